"""fastseg.models: backbones against torchvision (test-only dependency), every model forward and
backward on small CPU inputs, parameter counts against the papers' / torchvision's figures,
use_kernels True vs False, torch.compile, and every bad input."""
import pytest
import torch

import fastseg
from fastseg import models
from fastseg.models import backbones
from common import assert_relative_close

torchvision = pytest.importorskip("torchvision")

#: (name, builder kwargs, input (B, H, W)): small enough for a 2-core CPU; batch 2 where
#: BatchNorm sees a 1x1 map in training (image pooling, PSP's 1x1 bin). ResNet-50 where the paper
#: allows it.
CASES = {
    "fcn32s": (dict(), (1, 32, 32)),
    "fcn16s": (dict(), (1, 32, 32)),
    "fcn8s": (dict(), (1, 32, 32)),
    "segnet": (dict(), (1, 32, 32)),
    "dilated_frontend": (dict(), (1, 16, 16)),
    "dilated_context": (dict(context="large"), (1, 16, 16)),
    "deeplab_v1": (dict(), (1, 32, 32)),
    "deeplab_v2": (dict(backbone="resnet50"), (1, 32, 32)),
    "deeplab_v3": (dict(backbone="resnet50"), (2, 32, 32)),
    "deeplab_v3_plus": (dict(backbone="resnet50"), (2, 32, 32)),
    "pspnet": (dict(backbone="resnet50"), (2, 32, 32)),
    "refinenet": (dict(backbone="resnet50"), (1, 64, 64)),
    "gcn": (dict(backbone="resnet50"), (1, 64, 64)),
}
NUM_CLASSES = 3
AUX = {"pspnet"}


def _input(batch, h, w, seed=0):
    return torch.randn(batch, 3, h, w, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def built():
    cache = {}

    def get(name):
        if name not in cache:
            torch.manual_seed(0)
            cache[name] = models.get_model(name, num_classes=NUM_CLASSES, **CASES[name][0])
        return cache[name]

    return get


def _randomise_zero_scorers(model):
    """FCN's scorers start at zero (the paper's init): give them values so outputs say something."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "score" in name and p.abs().sum() == 0:
                p.normal_(0, 0.01, generator=torch.Generator().manual_seed(1))


def _num_params(module):
    return sum(p.numel() for p in module.parameters())


def test_registry():
    assert models.list_models() == sorted(CASES)
    assert fastseg.models is models
    with pytest.raises(ValueError, match="unknown model name 'gcn2'.*deeplab_v1.*segnet"):
        models.get_model("gcn2")


# --- backbones --------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["vgg16", "vgg16_bn", "resnet50", "resnet101"])
def test_backbone_loads_torchvision_and_matches(name, tmp_path):
    torch.manual_seed(0)
    tv = getattr(torchvision.models, name)().eval()
    path = tmp_path / f"{name}.pth"
    torch.save(tv.state_dict(), path)
    ours = backbones.BACKBONES[name]().eval()
    ours.load_torchvision(path)
    x = _input(1, 64, 64)
    with torch.no_grad():
        if name.startswith("vgg"):
            ref, out = tv.features(x), ours(x)["pool5"]
            head = tv.classifier
        else:
            ref = torch.nn.Sequential(*list(tv.children())[:-2])(x)
            out, head = ours(x)["layer4"], tv.fc
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    assert _num_params(ours) == _num_params(tv) - _num_params(head)


@pytest.mark.parametrize("output_stride,multi_grid,rates", [
    (32, None, ([1] * 6, [1] * 3)), (16, None, ([1] * 6, [2] * 3)), (16, (1, 2, 4), ([1] * 6, [2, 4, 8])),
    (8, None, ([2] * 6, [4] * 3)), (8, (1, 2, 4), ([2] * 6, [4, 8, 16])),
])
def test_resnet_output_stride(output_stride, multi_grid, rates):
    net = backbones.resnet50(output_stride, multi_grid).eval()
    assert [b.conv2.dilation[0] for b in net.layer3] == rates[0]
    assert [b.conv2.dilation[0] for b in net.layer4] == rates[1]
    with torch.no_grad():
        out = net(_input(1, 64, 64))
    assert out["layer4"].shape == (1, 2048, 64 // output_stride, 64 // output_stride)
    assert out["layer1"].shape == (1, 256, 16, 16)


# --- every model: forward, backward, shapes, keys -------------------------------------------

@pytest.mark.parametrize("name", sorted(CASES))
def test_forward_backward(name, built):
    model = built(name).train()
    _randomise_zero_scorers(model)
    batch, h, w = CASES[name][1]
    out = model(_input(batch, h, w))
    assert set(out) == ({"out", "aux"} if name in AUX else {"out"})
    for value in out.values():
        assert value.shape == (batch, NUM_CLASSES, h, w)
        assert torch.isfinite(value).all()
    model.zero_grad(set_to_none=True)
    sum(v.square().mean() for v in out.values()).backward()
    grads = [p.grad for p in model.backbone.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("name", sorted(CASES))
def test_use_kernels_equal(name, built):
    """The same weights through fastseg's kernels and through plain PyTorch, in eval mode (where
    fastseg.nn folds BatchNorm into its fused kernels)."""
    model = built(name).eval()
    _randomise_zero_scorers(model)
    batch, h, w = CASES[name][1]
    x = _input(batch, h, w, seed=2)
    with torch.no_grad():
        fast = model.set_use_kernels(True)(x)
        layers = [m for m in model.modules() if type(m).__module__.startswith("fastseg.nn")]
        assert all(m.backend == "auto" for m in layers)
        ref = model.set_use_kernels(False)(x)
        assert all(m.backend == "reference" for m in layers)
        model.set_use_kernels(True)
    for key in ref:
        assert_relative_close(fast[key], ref[key], torch.float32)


def test_use_kernels_false_builds_reference_layers():
    model = models.segnet(num_classes=2, use_kernels=False)
    assert model.unpool.backend == "reference" and not model.use_kernels


def test_pspnet_aux_weight_and_no_aux():
    model = models.pspnet(num_classes=2, backbone="resnet50", aux_loss=False).eval()
    assert model.aux_weight == 0.4  # Zhao et al. 2017, Sec. 4.2
    with torch.no_grad():
        assert set(model(_input(1, 16, 16))) == {"out"}


def test_deeplab_crf_in_eval_only():
    crf = fastseg.nn.DenseCRF(iterations=2)
    model = models.deeplab_v1(num_classes=NUM_CLASSES, crf=crf)
    assert model.crf is crf
    x = _input(1, 24, 24)
    with torch.no_grad():
        assert set(model.train()(x)) == {"out"}
        out = model.eval()(x)
        image = torch.randint(0, 256, (1, 3, 24, 24), dtype=torch.uint8)
        given = model(x, image=image)
    assert set(out) == {"out", "out_before_crf"}
    q = fastseg.dense_crf(out["out_before_crf"], image, iterations=2)
    torch.testing.assert_close(given["out"].exp(), q, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["out"].exp().sum(1), torch.ones(1, 24, 24), rtol=1e-5, atol=1e-5)
    assert isinstance(models.deeplab_v2(num_classes=2, backbone="resnet50", crf=dict(iterations=3)).crf,
                      fastseg.nn.DenseCRF)


def test_deeplab_learnable_crf_trains():
    """CRF-as-RNN (Zheng et al. 2015): a learnable CRF is part of the network in training too, and
    its parameters get gradients; a fixed one stays eval-only post-processing."""
    model = models.deeplab_v1(num_classes=NUM_CLASSES,
                              crf=dict(iterations=1, learnable=True, num_labels=NUM_CLASSES)).train()
    out = model(_input(1, 16, 16))
    assert set(out) == {"out", "out_before_crf"}
    torch.nn.functional.nll_loss(out["out"], torch.zeros(1, 16, 16, dtype=torch.long)).backward()
    assert model.crf.compat.grad is not None and model.crf.compat.grad.abs().sum() > 0
    assert model.crf.gaussian_weight.grad is not None


def test_learnable_crf_takes_num_labels_from_the_model():
    model = models.deeplab_v2(num_classes=5, backbone="resnet50", crf=dict(iterations=1, learnable=True))
    assert model.crf.num_labels == 5 and model.crf.compat.shape == (5, 5)


def test_crf_image_must_be_a_tensor():
    model = models.deeplab_v1(num_classes=NUM_CLASSES, crf=dict(iterations=1)).eval()
    with pytest.raises(TypeError, match="deeplab_v1: image must be a \\(B, 3, H, W\\) uint8 or float tensor, got str"):
        model(_input(1, 16, 16), image="photo.png")


def test_numpy_integers_and_scale_lists_are_accepted():
    np = pytest.importorskip("numpy")
    model = models.deeplab_v2(num_classes=np.int64(4), backbone="resnet50", multi_scale=[1, 0.5]).eval()
    assert model.multi_scale == (1.0, 0.5) and model.classifier.branches[0].out_channels == 4
    assert type(models.refinenet(num_classes=np.int32(2), backbone="resnet50", crp_blocks=np.int64(1))
                .head[-1].out_channels) is int


def test_dropout_is_element_wise():
    """The papers' Caffe models (FCN, DeepLab, the dilated front end, PSPNet) drop single units, as
    nn.Dropout does, not whole channels (nn.Dropout2d)."""
    for name in ("fcn8s", "deeplab_v1", "dilated_frontend", "pspnet", "refinenet"):
        kinds = {type(m) for m in models.get_model(name, **CASES[name][0]).modules() if "Dropout" in type(m).__name__}
        assert kinds == {torch.nn.Dropout}, (name, kinds)


def test_deeplab_v2_multi_scale():
    model = models.deeplab_v2(num_classes=2, backbone="resnet50", multi_scale=True).eval()
    with torch.no_grad():
        out = model(_input(1, 40, 40))["out"]
        single = model._scores(_input(1, 40, 40))
    assert out.shape == (1, 2, 40, 40) and single.shape == (1, 2, 5, 5)


def test_context_module_starts_as_identity():
    """Yu & Koltun 2016, Eq. 4: the basic module passes its (non-negative) input through; the large
    one does up to its small noise (Eq. 5)."""
    x = torch.rand(1, 5, 20, 20)
    with torch.no_grad():
        torch.testing.assert_close(models.ContextModule(5, "basic")(x), x)
        torch.testing.assert_close(models.ContextModule(5, "large")(x), x, rtol=0, atol=0.05)


def test_fcn_upsampling_starts_bilinear():
    model = models.fcn32s(num_classes=2)
    w = model.upscore.weight
    assert w.shape == (2, 2, 64, 64) and w.requires_grad
    assert torch.equal(w[0, 1], torch.zeros(64, 64)) and torch.isclose(w[0, 0].sum(), torch.tensor(32.0 ** 2))


# --- parameter counts --------------------------------------------------------------------------

def test_param_counts_vgg_models():
    K = 21
    tv = torchvision.models.vgg16()
    vgg_minus_fc8 = _num_params(tv) - (4096 * 1000 + 1000)
    # Long et al. 2015, Table 1: FCN-VGG16 has 134M parameters. FCN-32s is VGG-16 with fc8 -> K
    # scores and a (K, K, 64, 64) deconvolution; FCN-8s adds two 1x1 skip scorers and three
    # deconvolutions (4x4, 4x4, 16x16) instead.
    fcn32 = _num_params(models.fcn32s(num_classes=K))
    assert fcn32 == vgg_minus_fc8 + 4096 * K + K + K * K * 64 * 64
    fcn8 = _num_params(models.fcn8s(num_classes=K))
    assert fcn8 == vgg_minus_fc8 + 4096 * K + K + (512 + 256) * K + 2 * K + K * K * (16 + 16 + 256)
    assert round(fcn8 / 1e6) == 134
    # Yu & Koltun 2016: the front end is VGG-16 with its last pools removed (no weights change).
    assert _num_params(models.dilated_frontend(num_classes=K)) == vgg_minus_fc8 + 4096 * K + K
    # Chen et al. 2015, Table 2: DeepLab-LargeFOV has 20.5M parameters.
    assert round(_num_params(models.deeplab_v1(num_classes=K)) / 1e5) == 205


def test_param_count_segnet():
    # Badrinarayanan et al. 2017, Table 6: SegNet has 29.5M parameters (encoder 14.7M, the
    # decoder's mirror the same less the first/last layer's difference).
    count = _num_params(models.segnet(num_classes=11))
    assert 29.4e6 < count < 29.5e6


def test_param_counts_resnet_models():
    K = 5
    # torchvision's deeplabv3_resnet50 head: ASPP (same as the paper's) + a 3x3 conv (256) + BN that
    # the paper does not have (Chen et al. 2017, Sec. 3.3: ASPP, then the 1x1 classifier).
    tv = torchvision.models.segmentation.deeplabv3_resnet50(weights=None, weights_backbone=None, num_classes=K,
                                                            aux_loss=False)
    ours = models.deeplab_v3(num_classes=K, backbone="resnet50")
    assert _num_params(ours) == _num_params(tv) - (256 * 256 * 9 + 2 * 256)
    # PSPNet's auxiliary head is torchvision's FCNHead on layer3 (3x3 conv 256, BN, 1x1).
    tv_fcn = torchvision.models.segmentation.fcn_resnet50(weights=None, weights_backbone=None, num_classes=K,
                                                          aux_loss=True)
    psp = models.pspnet(num_classes=K, backbone="resnet50")
    assert _num_params(psp.aux_classifier) == _num_params(tv_fcn.aux_classifier)
    # DeepLab v2 (Chen et al. 2017): ResNet-101 + four 3x3 class scorers.
    v2 = models.deeplab_v2(num_classes=K)
    assert _num_params(v2) == 42_500_160 + 4 * (2048 * 9 * K + K)  # torchvision resnet101 less its fc


def test_param_count_gcn():
    # Peng et al. 2017, Fig. 2(a): per ResNet stage a GCN block (k x 1 + 1 x k and 1 x k + k x 1,
    # in -> K -> K, with biases) and a BR block (two 3x3 K -> K with biases); five more BR blocks and
    # five 4x4 deconvolutions (no bias) in the decoder; the backbone is torchvision's ResNet less fc.
    K, k = 21, 15
    resnet = torchvision.models.resnet50()
    backbone = _num_params(resnet) - _num_params(resnet.fc)
    gcn_blocks = sum(2 * k * K * (c + K) + 4 * K for c in (256, 512, 1024, 2048))
    br = 2 * (K * K * 9 + K)
    model = models.gcn(num_classes=K, backbone="resnet50")
    assert _num_params(model) == backbone + gcn_blocks + 9 * br + 5 * K * K * 16
    assert [m.k for m in model.gcn] == [15] * 4


def test_gcn_odd_input_size_and_bilinear_start():
    """Sizes off a multiple of 32 are cropped to each stage's map; the deconvolutions start bilinear,
    so a constant score map stays constant through one of them."""
    model = models.gcn(num_classes=2, backbone="resnet50").eval()
    with torch.no_grad():
        assert model(_input(1, 45, 70))["out"].shape == (1, 2, 45, 70)
        up = model.deconv[0](torch.ones(1, 2, 4, 4))
    torch.testing.assert_close(up[..., 1:-1, 1:-1], torch.ones(1, 2, 6, 6))


# --- torch.compile -----------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("name", ["segnet", "gcn"])
def test_torch_compile(built, name):
    model = built(name).eval()
    x = _input(1, 32, 32, seed=3)
    with torch.no_grad():
        expected = model(x)["out"]
        compiled = torch.compile(model, fullgraph=True)
        torch.testing.assert_close(compiled(x)["out"], expected, rtol=1e-4, atol=1e-4)


# --- bad input -----------------------------------------------------------------------------------

@pytest.mark.parametrize("name,kwargs,error,match", [
    ("deeplab_v3", dict(backbone="resnet18"), ValueError, "backbone must be one of 'resnet50', 'resnet101'"),
    ("fcn8s", dict(backbone="resnet50"), ValueError, "backbone"),
    ("segnet", dict(num_classes=0), ValueError, "num_classes must be >= 1, got 0"),
    ("pspnet", dict(num_classes=2.5), TypeError, "num_classes must be an int"),
    ("deeplab_v3", dict(output_stride=4), ValueError, "output_stride must be one of 8, 16; got 4"),
    ("refinenet", dict(output_stride=8), ValueError, "output_stride must be one of 32; got 8"),
    ("gcn", dict(output_stride=16), ValueError, "output_stride must be one of 32; got 16"),
    ("gcn", dict(backbone="vgg16"), ValueError, "backbone must be one of 'resnet50', 'resnet101'"),
    ("gcn", dict(aux_loss=True), ValueError, "aux_loss"),
    ("gcn", dict(crf=dict(iterations=2)), ValueError, "crf is only offered"),
    ("deeplab_v1", dict(output_stride=64), ValueError, "output_stride"),
    ("deeplab_v3", dict(aux_loss=True), ValueError, "aux_loss"),
    ("fcn8s", dict(crf=dict(iterations=2)), ValueError, "crf is only offered"),
    ("deeplab_v1", dict(crf="yes"), TypeError, "crf must be None, a fastseg.nn.DenseCRF"),
    ("deeplab_v1", dict(crf=dict(sigma=3)), ValueError, "crf dict does not hold DenseCRF parameters: unknown sigma"),
    ("dilated_context", dict(context="huge"), ValueError, "context must be one of 'basic', 'large'"),
    ("deeplab_v3", dict(output_stride=16.0), ValueError, "output_stride must be one of 8, 16; got 16.0"),
    ("pspnet", dict(aux_loss="False"), TypeError, "pspnet: aux_loss must be True or False, got 'False'"),
    ("gcn", dict(aux_loss=None), TypeError, "aux_loss must be True or False"),
    ("segnet", dict(use_kernels="no"), TypeError, "segnet: use_kernels must be True or False"),
    ("deeplab_v3", dict(multi_grid=(True, True, True)), ValueError, "multi_grid must be 3 ints >= 1"),
    ("deeplab_v3", dict(multi_grid=2), ValueError, "^deeplab_v3: multi_grid must be 3 ints >= 1"),
    ("deeplab_v2", dict(multi_scale="yes"), ValueError, "multi_scale must be True, False or a non-empty tuple"),
    ("deeplab_v2", dict(multi_scale=(1.0, 0)), ValueError, "multi_scale must be"),
    ("deeplab_v2", dict(multi_scale=()), ValueError, "multi_scale must be"),
    ("refinenet", dict(crp_blocks=True), ValueError, "crp_blocks must be an int >= 1"),
    ("deeplab_v1", dict(crf=dict(iterations="2")), TypeError, "DenseCRF: iterations must be an int"),
    ("deeplab_v1", dict(num_classes=3, crf=dict(learnable=True, num_labels=4)), ValueError,
     "deeplab_v1: crf was built with num_labels=4 but the model has num_classes=3"),
])
def test_bad_arguments(name, kwargs, error, match):
    with pytest.raises(error, match=match):
        models.get_model(name, **kwargs)


@pytest.mark.parametrize("name,shape,match", [
    ("segnet", (1, 3, 16, 40), "at least 32 \\(the encoder pools five times by 2\\); got 16x40"),
    ("refinenet", (1, 3, 31, 64), "at least 32"),
    ("gcn", (1, 3, 64, 31), "at least 32 \\(ResNet downsamples by 32\\); got 64x31"),
    ("deeplab_v3", (1, 3, 8, 8), "at least 16"),
    ("segnet", (3, 32, 32), "must be 4-D"),
    ("segnet", (1, 1, 32, 32), "must have 3 channels"),
])
def test_bad_input_size(name, shape, match, built):
    model = built(name)
    with pytest.raises(ValueError, match=match):
        model(torch.zeros(shape))


def test_integer_input_is_refused(built):
    """A uint8 image straight from a decoder is the usual mistake: named, not a dtype clash deep inside."""
    with pytest.raises(TypeError, match="segnet: input must be a floating-point tensor .* got torch.uint8"):
        built("segnet")(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))


def test_backbone_weights_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no file at .*downloads nothing"):
        models.deeplab_v3(backbone="resnet50", backbone_weights=str(tmp_path / "missing.pth"))
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read"):
        models.pspnet(backbone="resnet50", backbone_weights=garbage)
    # A ResNet-50 file for a ResNet-101: layer3's extra blocks are missing.
    r50 = tmp_path / "resnet50.pth"
    torch.save(backbones.resnet50().state_dict(), r50)
    with pytest.raises(ValueError, match=r"missing keys: layer3\.10\..*unexpected keys: none"):
        models.deeplab_v3(backbone="resnet101", backbone_weights=r50)
    # A VGG-16 file where VGG-16-BN is expected: names and shapes differ.
    vgg = tmp_path / "vgg.pth"
    state = backbones.vgg16().state_dict()
    torch.save(state, vgg)
    with pytest.raises(ValueError, match="missing keys: .*unexpected keys: "):
        models.segnet(backbone_weights=vgg)
    # No classifier: FCN cannot build fc6/fc7.
    with pytest.raises(ValueError, match="no VGG classifier.*classifier.0.weight"):
        models.fcn32s(backbone_weights=vgg)


def test_backbone_weights_without_num_batches_tracked(tmp_path):
    """Checkpoints older than torch 0.4.1 have no BatchNorm num_batches_tracked; torchvision loads
    them, and so does fastseg."""
    torch.manual_seed(0)
    state = {k: v for k, v in torchvision.models.resnet50().state_dict().items()
             if not k.endswith("num_batches_tracked")}
    path = tmp_path / "old_resnet50.pth"
    torch.save(state, path)
    model = models.deeplab_v3(num_classes=2, backbone="resnet50", backbone_weights=path)
    assert torch.equal(model.backbone.layer4[2].bn3.running_var, state["layer4.2.bn3.running_var"])
    assert model.backbone.bn1.num_batches_tracked == 0


def test_backbone_weights_load_into_models(tmp_path):
    """torchvision's vgg16 checkpoint fills FCN's fc6/fc7 (reshaped) and DeepLab v1's (decimated)."""
    torch.manual_seed(0)
    tv = torchvision.models.vgg16()
    path = tmp_path / "vgg16.pth"
    torch.save(tv.state_dict(), path)
    fcn = models.fcn8s(num_classes=2, backbone_weights=path)
    assert torch.equal(fcn.fc6.weight, tv.classifier[0].weight.view(4096, 512, 7, 7))
    assert torch.equal(fcn.backbone.features[28].weight, tv.features[28].weight)
    v1 = models.deeplab_v1(num_classes=2, backbone_weights=path)
    assert torch.equal(v1.fc6.weight, tv.classifier[0].weight.view(4096, 512, 7, 7)[::4, :, ::3, ::3])
    assert torch.equal(v1.fc7.weight[:, :, 0, 0], tv.classifier[3].weight[::4, ::4])
