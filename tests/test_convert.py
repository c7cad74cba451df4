"""fastseg.convert: converted torchvision and segmentation_models_pytorch models give the originals'
outputs, the report lists what was replaced and what was left, the input model stays untouched,
torch.compile and torch.export take the result, unpooling modules and calls are swapped, and bad
arguments raise clear errors."""
import copy
import importlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastseg
from common import assert_trains_like_float64

torchvision = pytest.importorskip("torchvision")
convert_module = importlib.import_module("fastseg.convert")  # fastseg.convert is the function

#: fp32 tolerance of issue 7: max abs error <= 1e-4 of the output's scale (its max abs value).
TOLERANCE = 1e-4


@pytest.fixture
def fused_everywhere(monkeypatch):
    """Run every FusedConv2d through fastseg's kernel, even on the tests' small maps (by default
    maps under EAGER_BELOW elements run eagerly)."""
    monkeypatch.setattr(convert_module, "EAGER_BELOW", 0)


def _randomise_batch_norms(model, seed=0):
    """Non-trivial running statistics and affine parameters, so that folding them matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.rand(n, generator=g) * 0.2 - 0.1)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.rand(n, generator=g) * 0.2 - 0.1)
    return model.eval()


def _out(y):
    return y["out"] if isinstance(y, dict) else y


def _assert_close_to_scale(out, ref):
    assert out.shape == ref.shape and torch.isfinite(out).all()
    scale = ref.abs().max()
    assert scale > 0
    error = (out - ref).abs().max() / scale
    assert error <= TOLERANCE, f"max abs error {error:.3g} of the output scale > {TOLERANCE}"


def _snapshot(model):
    return type(model), {k: v.clone() for k, v in model.state_dict().items()}, repr(model)


def _assert_untouched(model, snapshot):
    cls, state, text = snapshot
    assert type(model) is cls and not hasattr(model, "fastseg_fused") and repr(model) == text
    now = model.state_dict()
    assert now.keys() == state.keys() and all(torch.equal(now[k], state[k]) for k in state)
    assert not any(isinstance(m, (convert_module.FusedConv2d, fastseg.nn.ASPP)) for m in model.modules())


def _tv(name):
    torch.manual_seed(0)
    return getattr(torchvision.models.segmentation, name)(weights=None, weights_backbone=None, num_classes=5)


def _smp(name, **kwargs):
    smp = pytest.importorskip("segmentation_models_pytorch")
    torch.manual_seed(0)
    return getattr(smp, name)(encoder_weights=None, classes=5, **kwargs)


#: (builder, input size, ASPP replaced?): torchvision's models take any size; smp's need a multiple
#: of their output stride (32).
ZOO = {
    "tv_deeplabv3_resnet50": (lambda: _tv("deeplabv3_resnet50"), 65, True),
    "tv_fcn_resnet50": (lambda: _tv("fcn_resnet50"), 65, False),
    "smp_DeepLabV3": (lambda: _smp("DeepLabV3"), 64, True),
    "smp_DeepLabV3Plus": (lambda: _smp("DeepLabV3Plus"), 64, False),  # separable ASPP: left, and why
    "smp_PSPNet": (lambda: _smp("PSPNet"), 64, False),
}


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_models_equal_outputs(name, fused_everywhere):
    build, size, has_aspp = ZOO[name]
    model = _randomise_batch_norms(build())
    before = _snapshot(model)
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1))
    fast, report = fastseg.convert(model)
    _assert_untouched(model, before)
    assert fast is not model
    with torch.no_grad():
        ref, out = _out(model(x)), _out(fast(x))
    _assert_close_to_scale(out, ref)
    counts = report.counts()
    assert counts.get("conv+bn+relu", 0) >= 10 and counts.get("conv+bn+add+relu", 0) >= 7, counts
    assert counts.get("aspp", 0) == int(has_aspp)
    fused = [m for m in fast.modules() if isinstance(m, convert_module.FusedConv2d)]
    assert len(fused) == sum(n for p, n in counts.items() if p.startswith("conv"))
    assert not any(m.training for m in fast.modules())  # else every fused layer would run eagerly
    text = str(report)
    assert "replaced" in text and "conv+bn+relu" in text
    if name == "smp_DeepLabV3Plus":
        assert [item.path for item in report.left] == ["decoder.aspp.0"]
        assert "separable" in report.left[0].reason and "separable" in text
    if name == "smp_PSPNet":
        assert counts.get("conv+relu") == 1  # the 1x1 bin's Conv2dReLU has no BatchNorm


#: fastseg's models and the conv chains convert fuses in each (measured; every model traces whole).
FASTSEG_MODELS = {"segnet": 20, "fcn8s": 15, "fcn16s": 15, "fcn32s": 15, "deeplab_v1": 15, "dilated_frontend": 15,
                  "dilated_context": 22, "deeplab_v2": 53, "deeplab_v3": 53, "deeplab_v3_plus": 53, "pspnet": 53,
                  "gcn": 53, "refinenet": 97}


def _fastseg_model(name, **kwargs):
    resnet = name.startswith(("deeplab_v2", "deeplab_v3", "pspnet", "gcn", "refinenet"))
    model = getattr(fastseg.models, name)(num_classes=5, **(dict(backbone="resnet50") if resnet else {}), **kwargs)
    model = _randomise_batch_norms(model)
    with torch.no_grad():  # FCN zero-initialises its scorers: the output would be all zeros
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)) and not m.weight.any():
                m.weight.normal_(0, 0.01, generator=torch.Generator().manual_seed(2))
    return model


@pytest.mark.parametrize("name", sorted(FASTSEG_MODELS))
def test_fastseg_models_convert(name, fused_everywhere):
    """fastseg's own models trace whole (SegNet's pools return indices: a branch on the pool's
    return_indices, not on the result's type), so every conv chain fuses, the heads' fc6/fc7 too."""
    model = _fastseg_model(name).eval()
    fast, report = fastseg.convert(model)
    assert "" in report.traced and not report.left, str(report)
    assert sum(n for p, n in report.counts().items() if p.startswith("conv")) == FASTSEG_MODELS[name], str(report)
    assert fast.state_dict().keys() == model.state_dict().keys()
    x = torch.randn(2, 3, 40, 48, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        _assert_close_to_scale(_out(fast(x)), _out(model(x)))
    with pytest.raises(ValueError, match=f"{name}: input must have 3 channels"):  # the check is in the graph
        fast(torch.zeros(1, 1, 40, 48))
    # The switch to plain PyTorch reaches the fused layers convert added.
    fast.set_use_kernels(False)
    fused = [m for m in fast.modules() if isinstance(m, convert_module.FusedConv2d)]
    assert fused and all(m.backend == "reference" for m in fused)


def test_model_on_its_references_stays_there(fused_everywhere):
    model = _fastseg_model("segnet", use_kernels=False).eval()
    fast = fastseg.convert(model, report=False)
    fused = [m for m in fast.modules() if isinstance(m, convert_module.FusedConv2d)]
    assert fused and all(m.backend == "reference" for m in fused) and not fast.use_kernels


def test_deeplab_with_crf_converts_below_the_crf_step(fused_everywhere):
    """The CRF step depends on the training mode and on `image`, which a traced graph would fix
    for good: the model's own forward stays, everything under it converts."""
    model = _fastseg_model("deeplab_v1", crf=dict(iterations=1)).eval()
    fast, report = fastseg.convert(model)
    assert "" not in report.traced and "backbone" in report.traced
    assert any("the CRF step depends on the training mode" in item.reason for item in report.left), str(report)
    x = torch.randn(1, 3, 24, 24, generator=torch.Generator().manual_seed(1))
    image = torch.randint(0, 256, (1, 3, 24, 24), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        for args in ((x,), (x, image)):
            out, ref = fast(*args), model(*args)
            assert out.keys() == ref.keys() == {"out", "out_before_crf"}
            _assert_close_to_scale(out["out_before_crf"], ref["out_before_crf"])


def test_fx_only_conversion_keeps_state_dict_and_inner_modules(fused_everywhere):
    """Where only conv chains are fused, the converted model's state dict is the original's and its
    inner modules still run their own (eager) forward."""
    model = _randomise_batch_norms(_tv("fcn_resnet50"))
    fast, report = fastseg.convert(model)
    assert fast.state_dict().keys() == model.state_dict().keys()
    assert isinstance(fast, type(model)) and "" in report.traced
    x = torch.randn(1, 3, 33, 33)
    with torch.no_grad():
        torch.testing.assert_close(fast.backbone(x)["out"], model.backbone(x)["out"], rtol=0, atol=0)
    fast.load_state_dict(model.state_dict())


def test_inplace_rewrites_the_model_itself(fused_everywhere):
    model = _randomise_batch_norms(_tv("deeplabv3_resnet50"))
    reference = copy.deepcopy(model)
    x = torch.randn(1, 3, 40, 40)
    fast = fastseg.convert(model, inplace=True, report=False)
    assert fast is model and hasattr(model, "fastseg_fused")
    assert isinstance(model.classifier[0][0], fastseg.nn.ASPP)
    with torch.no_grad():
        _assert_close_to_scale(_out(fast(x)), _out(reference(x)))


def test_default_small_maps_run_eagerly_and_equal():
    """Without the fixture: small maps take FusedConv2d's eager path; still equal."""
    model = _randomise_batch_norms(_tv("fcn_resnet50"))
    fast, _ = fastseg.convert(model)
    x = torch.randn(1, 3, 65, 65)
    with torch.no_grad():
        _assert_close_to_scale(_out(fast(x)), _out(model(x)))


def test_training_mode_is_left_alone():
    model = _tv("fcn_resnet50").train()
    before = _snapshot(model)
    fast, report = fastseg.convert(model)
    _assert_untouched(fast, before)
    assert report.replaced == [] and "training mode" in report.left[0].reason and "model.eval()" in str(report)


def test_unmeasured_device_is_left_alone(monkeypatch):
    """Patterns not measured no slower on the model's device are not replaced."""
    monkeypatch.setattr(convert_module, "NOT_SLOWER", {})
    model = _tv("fcn_resnet50").eval()
    before = _snapshot(model)
    fast, report = fastseg.convert(model)
    _assert_untouched(fast, before)
    assert report.replaced == [] and "measured" in report.left[0].reason


def test_cuda_rules_replace_the_aspp_block_only(monkeypatch, fused_everywhere):
    """CUDA's rules (ASPP measured no slower on an H200, the fused chains not), applied to a CPU
    model: the ASPP block becomes fastseg.nn.ASPP and every conv chain is left, outputs equal."""
    monkeypatch.setattr(convert_module, "NOT_SLOWER", {"cpu": convert_module.NOT_SLOWER["cuda"]})
    assert convert_module.NOT_SLOWER["cpu"] == {"aspp"}
    model = _randomise_batch_norms(_tv("deeplabv3_resnet50"))
    fast, report = fastseg.convert(model)
    assert report.counts() == {"aspp": 1}
    assert not any(isinstance(m, convert_module.FusedConv2d) for m in fast.modules())
    x = torch.randn(1, 3, 65, 65, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        _assert_close_to_scale(_out(fast(x)), _out(model(x)))


def test_fused_conv_training_mode_is_exact():
    conv, bn = nn.Conv2d(4, 6, 3, padding=2, dilation=2), nn.BatchNorm2d(6)
    ref_conv, ref_bn = copy.deepcopy(conv), copy.deepcopy(bn)
    layer = convert_module.FusedConv2d(conv, bn, relu=True).train()
    x, r = torch.randn(2, 4, 9, 9), torch.randn(2, 6, 9, 9)
    torch.testing.assert_close(layer(x, r), F.relu(ref_bn(ref_conv(x)) + r), rtol=0, atol=0)
    torch.testing.assert_close(bn.running_mean, ref_bn.running_mean, rtol=0, atol=0)
    # eval: fused, and a broadcasting residual is added after the convolution
    layer.eval(), ref_bn.eval()
    with torch.no_grad():
        for residual in (r, r[:, :, :1, :1]):
            expected = F.relu(ref_bn(ref_conv(x)) + residual)
            torch.testing.assert_close(layer(x, residual), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not fastseg._backends.EXTENSION_LOADED, reason="fastseg._C not loaded")
@pytest.mark.parametrize("padding", [(19, 0), "same"])
@pytest.mark.parametrize("hooked", [False, True], ids=["plain", "hooked"])
def test_fused_conv_trains_with_kernel_longer_than_map(hooked, padding):
    # A converted model put back in training mode, with a 39 x 1 kernel over a 20 x 64 map: the eager
    # path's convolution goes through the op there (nn.Conv2d's backward crashed the process), or
    # with a hook on the convolution, through the module under HandPadding ('same' included, which
    # convert leaves alone but the layer takes).
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(24, 21, (39, 1), padding=padding, bias=False), nn.BatchNorm2d(21)
    ref = nn.Sequential(copy.deepcopy(conv), copy.deepcopy(bn), nn.ReLU()).double()
    layer = convert_module.FusedConv2d(conv, bn, relu=True).train()
    calls = []
    if hooked:
        conv.register_forward_hook(lambda *_: calls.append(1))
    x = torch.randn(2, 24, 20, 64)
    assert_trains_like_float64(layer, ref, lambda: layer(x), lambda: ref(x.double()))
    assert len(calls) == (3 if hooked else 0)


# --- unpooling: nn.MaxUnpool2d modules and F.max_unpool2d calls -------------------------------------

class ToySegNet(nn.Module):
    """Two conv-BN-ReLU encoders with indexed pools, a MaxUnpool2d module and an F.max_unpool2d call."""

    def __init__(self):
        super().__init__()
        self.enc1 = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True))
        self.enc2 = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True))
        self.pool = nn.MaxPool2d(2, 2, return_indices=True)
        self.unpool = nn.MaxUnpool2d(2, 2)
        self.dec = nn.Conv2d(8, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        x = self.enc1(x)
        size1 = x.shape
        x, i1 = self.pool(x)
        x = self.enc2(x)
        size2 = x.shape
        x, i2 = self.pool(x)
        x = self.unpool(x, i2, output_size=size2)
        x = F.relu(self.bn(self.dec(x)))
        x = F.max_unpool2d(x, i1, 2, 2, output_size=size1)
        return self.head(x)


def test_max_unpool_module_and_call_replaced(fused_everywhere):
    model = _randomise_batch_norms(ToySegNet())
    fast, report = fastseg.convert(model)
    assert isinstance(fast.unpool, fastseg.nn.MaxUnpool2d) and isinstance(model.unpool, nn.MaxUnpool2d)
    counts = report.counts()
    assert counts == {"max_unpool2d": 1, "F.max_unpool2d": 1, "conv+bn+relu": 3}, counts
    x = torch.randn(2, 3, 18, 22)
    with torch.no_grad():
        _assert_close_to_scale(fast(x), model(x))
    assert "fastseg.max_unpool2d" in str(report)


class Untraceable(nn.Module):
    """Data-dependent control flow (torch.fx cannot trace it) around a traceable child."""

    def __init__(self):
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.conv = nn.Conv2d(8, 8, 1)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        y = self.block(x)
        if y.mean() > 0:
            y = y * 2
        return F.relu(self.bn(self.conv(y)))


def test_module_level_fallback_where_tracing_fails(fused_everywhere):
    model = _randomise_batch_norms(Untraceable())
    fast, report = fastseg.convert(model)
    assert [r.path for r in report.replaced] == ["block.0"] and report.traced == ["block"]
    assert report.left[0].path == "" and "does not trace" in report.left[0].reason
    x = torch.randn(1, 3, 10, 10)
    with torch.no_grad():
        _assert_close_to_scale(fast(x), model(x))


class BranchesOnType(nn.Module):
    """A forward that branches on the Python type of a pooling's result (as fastseg's VGG does):
    torch.fx would take the wrong branch, so convert must not use the traced graph."""

    def __init__(self):
        super().__init__()
        self.pool = nn.MaxPool2d(2, return_indices=True)
        self.block = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())

    def forward(self, x):
        y = self.pool(x)
        if isinstance(y, tuple):
            y = y[0]
        return self.block(y)


def test_type_branches_are_not_traced(fused_everywhere):
    model = _randomise_batch_norms(BranchesOnType())
    fast, report = fastseg.convert(model)
    assert "returns (values, indices)" in report.left[0].reason and report.left[0].path == ""
    assert [r.path for r in report.replaced] == ["block.0"]
    x = torch.randn(1, 3, 10, 10)
    with torch.no_grad():
        _assert_close_to_scale(fast(x), model(x))


class CallsFastsegOps(nn.Module):
    """A model that already calls a fastseg op: traced, the op stays one call."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y, i = F.max_pool2d(x, 2, return_indices=True)
        return torch.relu(self.bn(self.conv(fastseg.max_unpool2d(y, i, 2))))


def test_fastseg_op_calls_trace(fused_everywhere):
    model = _randomise_batch_norms(CallsFastsegOps())
    fast, report = fastseg.convert(model)
    assert report.traced == [""] and report.counts() == {"conv+bn+relu": 1} and report.left == []
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        _assert_close_to_scale(fast(x), model(x))


# --- torch.compile and torch.export ---------------------------------------------------------------

@pytest.mark.slow
def test_compile_and_export(fused_everywhere):
    model = _randomise_batch_norms(_tv("deeplabv3_resnet50"))
    fast, _ = fastseg.convert(model)
    x = torch.randn(1, 3, 33, 33, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = _out(model(x))
        _assert_close_to_scale(_out(torch.compile(fast, fullgraph=True)(x)), ref)
        exported = torch.export.export(fast, (x,))
        targets = {str(n.target) for n in exported.graph.nodes if n.op == "call_function"}
        assert any("fastseg.atrous_conv2d" in t for t in targets), sorted(targets)[:10]
        _assert_close_to_scale(_out(exported.module()(x)), ref)


# --- bad arguments ---------------------------------------------------------------------------------

@pytest.mark.parametrize("args,kwargs,error,match", [
    (("model",), {}, TypeError, "model must be a torch.nn.Module, got str"),
    ((nn.Conv2d(1, 1, 1),), dict(inplace="yes"), TypeError, "inplace must be True or False, got 'yes'"),
    ((nn.Conv2d(1, 1, 1),), dict(report=1), TypeError, "report must be True or False, got 1"),
])
def test_bad_arguments(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        fastseg.convert(*args, **kwargs)


def test_converting_twice_changes_nothing_more():
    model = _randomise_batch_norms(ToySegNet())
    fast = fastseg.convert(model, report=False)
    again, report = fastseg.convert(fast)
    assert report.replaced == [] and type(again) is type(fast)
    assert [(item.path, item.reason) for item in report.left] == [("", "already converted")]


def test_hooks_run_after_conversion(fused_everywhere):
    """A conv chain with a hook on one of its modules is left (a fused layer would skip the hook)
    and the report says so; a hook on a container still fires, the chains inside it fused."""
    model = _randomise_batch_norms(_tv("fcn_resnet50"))
    model.backbone.layer1[0].conv1.register_forward_hook(lambda mod, inp, out: out * 0.5)
    seen = []
    model.backbone.layer4.register_forward_hook(lambda mod, inp, out: seen.append(out.shape))
    model.backbone.layer2[0].bn2.register_forward_pre_hook(lambda mod, inp: (inp[0] + 1,))
    x = torch.randn(1, 3, 33, 33)
    with torch.no_grad():
        ref = _out(model(x))
    fast, report = fastseg.convert(model)
    with torch.no_grad():
        _assert_close_to_scale(_out(fast(x)), ref)
    assert len(seen) == 2  # the original's call and the converted one's
    left = {item.path: item.reason for item in report.left}
    assert "module hooks" in left["backbone.layer1.0.conv1"] and "module hooks" in left["backbone.layer2.0.conv2"]
    assert "backbone.layer4" in report.traced
    assert any(r.path.startswith("backbone.layer4.") for r in report.replaced)


def test_batch_norm_in_its_own_mode_and_unbatched_input(fused_everywhere):
    """A BatchNorm set to train on its own (test-time adaptation) normalises by the batch and updates
    its statistics in the converted model too; unbatched input to a conv + BatchNorm chain raises
    as BatchNorm2d does."""
    torch.manual_seed(0)
    model = _randomise_batch_norms(nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU()))
    fast, report = fastseg.convert(model)
    assert report.replaced
    x = torch.randn(2, 8, 12, 12)
    model[1].train()
    fast[1].train()
    with torch.no_grad():
        ref = model(x)
        out = fast(x)
    torch.testing.assert_close(out, ref)
    assert int(fast[1].num_batches_tracked) == 1
    model[1].eval()
    fast[1].eval()
    with pytest.raises(ValueError, match="expected 4D input"):
        model(x[0])
    with pytest.raises(ValueError, match="expected 4D input"):
        fast(x[0])


def test_converted_model_under_cpu_autocast(fused_everywhere):
    """Under autocast a fused chain runs its own modules, which autocast casts: the original's dtype
    and values (bfloat16 activations into float32 weights were a TypeError)."""
    torch.manual_seed(1)
    model = _randomise_batch_norms(nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                                 nn.Conv2d(16, 16, 3, padding=2, dilation=2), nn.BatchNorm2d(16)))
    fast, report = fastseg.convert(model)
    assert len(report.replaced) == 2
    x = torch.randn(2, 8, 12, 12)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        torch.testing.assert_close(fast(x), model(x))


_LOAD_AND_RUN = """
import sys, torch
model = torch.load(sys.argv[1], weights_only=False)
x, ref = torch.load(sys.argv[2])
with torch.no_grad():
    out = model(x)
out = out["out"] if isinstance(out, dict) else out
print(type(model).__qualname__, (out - ref).abs().max().item() / ref.abs().max().item())
"""


@pytest.mark.parametrize("name", ["tv_deeplabv3_resnet50", "segnet"])
def test_converted_model_pickles(name, tmp_path, fused_everywhere):
    """torch.save(model) of a converted model: its classes made by torch.fx conversion pickle as
    their recipe, and a fresh process (none of those classes made yet) loads and runs it."""
    import pickle
    import subprocess
    import sys

    if name in ZOO:
        build, size, _ = ZOO[name]
        model = _randomise_batch_norms(build())
    else:
        model, size = _randomise_batch_norms(getattr(fastseg.models, name)(num_classes=5)), 48
    fast, report = fastseg.convert(model)
    assert report.traced, str(report)
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = _out(fast(x))
    again = pickle.loads(pickle.dumps(fast))
    assert type(again) is type(fast) and type(copy.deepcopy(fast)) is type(fast)
    assert again.state_dict().keys() == fast.state_dict().keys()
    with torch.no_grad():
        assert torch.equal(_out(again(x)), ref)
    torch.save(fast, tmp_path / "model.pt")
    torch.save((x, ref), tmp_path / "io.pt")
    run = subprocess.run([sys.executable, "-c", _LOAD_AND_RUN, str(tmp_path / "model.pt"), str(tmp_path / "io.pt")],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    qualname, error = run.stdout.split()
    assert qualname == type(fast).__qualname__ and float(error) <= TOLERANCE
