"""Inference of every fastseg.models architecture with fastseg's kernels (use_kernels=True) vs the
same weights through plain PyTorch (use_kernels=False, "reference layers").

512x512 RGB input (256x256 in quick mode, for three models), batch 1 (and 8 in full mode on a GPU; on a CPU batch 8 of the VGG/ResNet-101
models takes minutes per round), eval mode, no grad, fp32, 21 classes, each model with its paper's
default backbone. Smoke mode: 64x64 (32 for the dilated front end), batch 1, ResNet-50.
"""
import functools

import pytest
import torch

from conftest import DEVICES, FASTSEG, shapes
from fastseg import models
from fastseg.benchmarking import QUICK, SMOKE

REFERENCE = "reference layers"
IMPLS = [FASTSEG, REFERENCE]
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
    if smoke and name in ("deeplab_v2", "deeplab_v3", "deeplab_v3_plus", "pspnet", "refinenet"):
        kwargs["backbone"] = "resnet50"
    return models.get_model(name, **kwargs).eval().to(device)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("device,name,batch", CASES, ids=lambda c: str(c))
def test_model_inference(bench, device, name, batch, impl):
    size = SMOKE_SIZES.get(name, 64) if SMOKE else 256 if QUICK else 512
    model = _model(name, device, SMOKE)
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    model.set_use_kernels(impl == FASTSEG)

    def run():
        with torch.no_grad():
            return model(x)["out"]

    run()  # warm up (allocator, oneDNN primitives, Triton autotuning) outside the timing
    out = bench(f"{name} {batch}x3x{size}x{size} fp32 {device}", impl, run, device=device)
    assert out.shape == (batch, 21, size, size)
