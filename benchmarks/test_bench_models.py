"""Inference of every fastseg.models architecture, three ways with the same weights: fastseg's
kernels in its layers and the backbone's conv (+BN) + ReLU chains fused by ``fastseg.convert``
("fastseg", what README's quickstart recommends for inference); fastseg's layers alone
(use_kernels=True, unconverted: "fastseg layers only"); and plain PyTorch (use_kernels=False,
"reference layers").

512x512 RGB input (256x256 in quick mode, for three models), batch 1 (and 8 in full mode on a GPU; on a CPU batch 8 of the VGG/ResNet-101
models takes minutes per round), eval mode, no grad, fp32, 21 classes, each model with its paper's
default backbone. Smoke mode: 64x64 (32 for the dilated front end), batch 1, ResNet-50.

Also ``fastseg.convert`` on other zoos' models: torchvision's deeplabv3_resnet50 and fcn_resnet50
and segmentation_models_pytorch's DeepLabV3 (its default ResNet-34 encoder), random weights, 21
classes, converted vs the original module (eager); 512x512 batch 1 (quick: deeplabv3_resnet50 at
256x256; smoke: all three at 64x64). Skipped where torchvision / smp are not installed.
"""
import functools

import pytest
import torch

from conftest import DEVICES, FASTSEG, shapes
from fastseg import models
from fastseg.benchmarking import QUICK, SMOKE

REFERENCE = "reference layers"
LAYERS_ONLY = "fastseg layers only"
IMPLS = [FASTSEG, LAYERS_ONLY, REFERENCE]
SMOKE_SIZES = {"dilated_frontend": 32, "dilated_context": 32}


def _batches(device):
    return shapes([1, 8], [1], [1]) if device == "cuda" else shapes([1], [1], [1])


# --quick: three representative models (SegNet's unpooling, DeepLab v3's ASPP, PSPNet) at 256x256.
QUICK_MODELS = ("segnet", "deeplab_v3", "pspnet")
CASES = [(device, name, batch) for device in DEVICES for name in models.list_models()
         for batch in _batches(device) if not QUICK or SMOKE or name in QUICK_MODELS]


@functools.lru_cache(maxsize=1)
def _model(name, device, smoke):
    torch.manual_seed(0)
    kwargs = dict(num_classes=21)
    if smoke and name in ("deeplab_v2", "deeplab_v3", "deeplab_v3_plus", "gcn", "pspnet", "refinenet"):
        kwargs["backbone"] = "resnet50"
    return models.get_model(name, **kwargs).eval().to(device)


@functools.lru_cache(maxsize=1)
def _converted(name, device, smoke):
    from fastseg import convert

    model = _model(name, device, smoke)
    model.set_use_kernels(True)
    return convert(model, report=False)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("device,name,batch", CASES, ids=lambda c: str(c))
def test_model_inference(bench, device, name, batch, impl):
    size = SMOKE_SIZES.get(name, 64) if SMOKE else 256 if QUICK else 512
    if impl == FASTSEG:
        model = _converted(name, device, SMOKE)
    else:
        model = _model(name, device, SMOKE)
        model.set_use_kernels(impl == LAYERS_ONLY)
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)

    def run():
        with torch.no_grad():
            return model(x)["out"]

    run()  # warm up (allocator, oneDNN primitives, Triton autotuning) outside the timing
    out = bench(f"{name} {batch}x3x{size}x{size} fp32 {device}", impl, run, device=device)
    assert out.shape == (batch, 21, size, size)


# --- fastseg.convert on torchvision / segmentation_models_pytorch models ----------------------------

ORIGINAL = "original (eager)"
ZOO = ("tv_deeplabv3_resnet50", "tv_fcn_resnet50", "smp_DeepLabV3")
ZOO_CASES = [(device, name) for device in DEVICES for name in ZOO
             if not QUICK or SMOKE or name == "tv_deeplabv3_resnet50"]


def _zoo_model(name):
    torch.manual_seed(0)
    if name.startswith("tv_"):
        segmentation = pytest.importorskip("torchvision").models.segmentation
        return getattr(segmentation, name[3:])(weights=None, weights_backbone=None, num_classes=21)
    smp = pytest.importorskip("segmentation_models_pytorch")
    return getattr(smp, name[4:])(encoder_weights=None, classes=21)


@functools.lru_cache(maxsize=1)
def _zoo_pair(name, device):
    from fastseg import convert

    original = _zoo_model(name).eval().to(device)
    return original, convert(original, report=False)


@pytest.mark.parametrize("impl", [FASTSEG, ORIGINAL])
@pytest.mark.parametrize("device,name", ZOO_CASES, ids=lambda c: str(c))
def test_converted_inference(bench, device, name, impl):
    size = 64 if SMOKE else 256 if QUICK else 512
    original, converted = _zoo_pair(name, device)
    model = converted if impl == FASTSEG else original
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)

    def run():
        with torch.no_grad():
            out = model(x)
        return out["out"] if isinstance(out, dict) else out

    run()  # warm up outside the timing
    out = bench(f"convert {name} 1x3x{size}x{size} fp32 {device}", impl, run, device=device)
    assert out.shape == (1, 21, size, size)
