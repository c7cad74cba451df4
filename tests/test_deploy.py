"""Deployment paths a user takes with fastseg layers: torch.jit.trace, torch.export of converted
models with dynamic sizes, hooks on the layers' submodules, eager-mode quantization."""
import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastseg


def _random_bn(model):
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.copy_(torch.rand(m.num_features, generator=g) * 2 - 1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.rand(m.num_features, generator=g) * 2 - 1)
    return model.eval()


LAYERS = {
    "AtrousConvBNReLU": lambda: fastseg.nn.AtrousConvBNReLU(16, 8, 3, dilation=2),
    "ASPP-v3": lambda: fastseg.nn.ASPP(16, 8),
    "ASPP-v2": lambda: fastseg.nn.ASPP(16, 8, version="v2"),
    "GlobalConv2d": lambda: fastseg.nn.GlobalConv2d(16, 8, k=5),
    "BoundaryRefinement": lambda: fastseg.nn.BoundaryRefinement(16),
}


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("name", list(LAYERS))
def test_jit_trace_records_the_parameters(name, grad):
    # A trace records computation from the parameters, not values a layer kept from an earlier
    # call (they would be frozen in as constants: weights loaded later unseen, and jit's own check
    # failing as its second run took the kept values), nor a mode chosen from autograd's state.
    x = torch.randn(1, 16, 17, 19, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    layer = _random_bn(LAYERS[name]())
    with torch.set_grad_enabled(grad), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        layer(x)  # an earlier eval call, which keeps the folded values
        traced = torch.jit.trace(layer, (x,))  # check_trace on: the graphs of two runs agree
    torch.manual_seed(1)
    other = LAYERS[name]()
    _random_bn(other)
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(1.5)
    traced.load_state_dict(other.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(traced(x), other(x), rtol=1e-5, atol=1e-5)


def test_traced_aspp_takes_another_batch_size():
    # The image-pooling term's batch-1 shortcut would be frozen into a batch-1 trace.
    aspp = _random_bn(fastseg.nn.ASPP(16, 8))
    x1, x2 = torch.randn(1, 16, 17, 19), torch.randn(2, 16, 17, 19)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(aspp, (x1,))
        torch.testing.assert_close(traced(x2), aspp(x2), rtol=1e-5, atol=1e-5)


def test_converted_model_exports_for_any_size():
    # convert's small-map eager branch would be a guard in the exported program: one exported at
    # 32x32 refused 96x96 ("Guard failed").
    from torch.export import Dim

    net = _random_bn(nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU()))
    fast = fastseg.convert(net, report=False)
    small, large = torch.randn(1, 3, 32, 32), torch.randn(1, 3, 96, 96)
    for example, other in ((small, large), (large, small)):
        program = torch.export.export(fast, (example,), dynamic_shapes=({2: Dim.DYNAMIC, 3: Dim.DYNAMIC},))
        with torch.no_grad():
            torch.testing.assert_close(program.module()(other), net(other), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("build", [
    lambda: _random_bn(fastseg.nn.AtrousConvBNReLU(8, 6, 3, dilation=12)).eval(),
    lambda: fastseg.nn.GlobalConv2d(8, 6, k=9, dilation=3),
], ids=["AtrousConvBNReLU", "GlobalConv2d"])
def test_dead_taps_are_not_frozen_into_a_trace(build):
    # On the small map the rate leaves only the centre taps live, and the ops drop the others; a
    # trace or an export with dynamic sizes must keep them for the larger map.
    from torch.export import Dim

    layer = build()
    small, large = torch.randn(1, 8, 9, 10), torch.randn(1, 8, 40, 37)
    with torch.no_grad():
        expected = layer(large)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            traced = torch.jit.trace(layer, (small,))
        torch.testing.assert_close(traced(large), expected, rtol=1e-5, atol=1e-5)
        program = torch.export.export(layer, (small,), dynamic_shapes=({2: Dim.DYNAMIC, 3: Dim.DYNAMIC},))
        torch.testing.assert_close(program.module()(large), expected, rtol=1e-5, atol=1e-5)
        compiled = torch.compile(layer, dynamic=True)
        torch.testing.assert_close(compiled(small), layer(small), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(compiled(large), expected, rtol=1e-5, atol=1e-5)


SUBMODULE_LAYERS = {
    "AtrousConvBNReLU": (lambda: fastseg.nn.AtrousConvBNReLU(16, 8, 3, dilation=2), "conv"),
    "UnpoolConvBNReLU": (lambda: fastseg.nn.UnpoolConvBNReLU(16, 8), "conv"),
    "GlobalConv2d": (lambda: fastseg.nn.GlobalConv2d(16, 8, k=5), "conv_l1"),
    "BoundaryRefinement": (lambda: fastseg.nn.BoundaryRefinement(16), "conv1"),
    "ASPP": (lambda: fastseg.nn.ASPP(16, 8), "project.conv"),
}


@pytest.mark.parametrize("name", list(SUBMODULE_LAYERS))
def test_hooks_on_submodules_see_every_call(name):
    # In eval the fused path reads the submodules' weights without calling them; a hook on one
    # (a user's, or a quantization observer) must still see the call: the layer then runs them.
    make, path = SUBMODULE_LAYERS[name]
    layer = _random_bn(make())
    calls = []
    layer.get_submodule(path).register_forward_hook(lambda *args: calls.append(1))
    if name == "UnpoolConvBNReLU":
        values, indices = F.max_pool2d(torch.randn(2, 16, 18, 20), 2, return_indices=True)
        args = (values, indices)
    else:
        args = (torch.randn(2, 16, 17, 19),)
    with torch.no_grad():
        out = layer(*args)
    assert calls, "the hook did not run"
    layer.get_submodule(path)._forward_hooks.clear()
    with torch.no_grad():
        torch.testing.assert_close(out, layer(*args), rtol=1e-5, atol=1e-5)


def test_eager_quantization_calibrates_a_layer():
    # torch.ao.quantization's prepare attaches observers as forward hooks: they must see data, or
    # convert builds a quantized convolution with an unit scale (half the output wrong, silently).
    import torch.ao.quantization as Q

    class Net(nn.Module):
        def __init__(self, layer):
            super().__init__()
            self.quant, self.layer, self.dequant = Q.QuantStub(), layer, Q.DeQuantStub()

        def forward(self, x):
            return self.dequant(self.layer(self.quant(x)))

    x = torch.randn(2, 16, 17, 19, generator=torch.Generator().manual_seed(3))
    model = Net(_random_bn(fastseg.nn.AtrousConvBNReLU(16, 8, 3, dilation=2))).eval()
    model.qconfig = Q.get_default_qconfig("x86")
    with torch.no_grad():
        prepared = Q.prepare(copy.deepcopy(model))
        prepared(x)
    observer = prepared.layer.conv.activation_post_process
    assert observer.min_val.isfinite() and observer.max_val.isfinite()


@pytest.mark.parametrize("name", ["deeplab_v3", "gcn", "segnet"])
def test_models_with_fastseg_layers_run_on_meta(name):
    """Shape inference on the meta device (no autocast exists there: not an error)."""
    model = getattr(fastseg.models, name)(num_classes=3).to("meta").eval()
    out = model(torch.empty(1, 3, 64, 64, device="meta"))
    out = out["out"] if isinstance(out, dict) else out
    assert out.shape == (1, 3, 64, 64) and out.device.type == "meta"
