"""max_unpool2d against F.max_unpool2d on SegNet's decoder shapes.

The shapes are unpooled outputs (B, C, H, W) of SegNet's VGG-16 decoder stages (Badrinarayanan et
al. 2017) for a batch of 8: 64 channels at 256x256, 128 at 128x128 and 512 at 32x32; the input is
the 2x2/2 max-pooled map. Bytes moved: values and int64 indices read once, the output written once.
"""
import pytest
import torch
import torch.nn.functional as F

import fastseg
from conftest import DEVICES, FASTSEG, shapes

SHAPES = shapes([(8, 64, 256, 256), (8, 128, 128, 128), (8, 512, 32, 32)], [(2, 4, 16, 16)])
IMPLS = {
    FASTSEG: lambda v, i: fastseg.max_unpool2d(v, i, 2),
    "torch eager": lambda v, i: F.max_unpool2d(v, i, 2),
    "torch.compile": torch.compile(lambda v, i: F.max_unpool2d(v, i, 2), dynamic=False),
}


@pytest.fixture(scope="module")
def pooled():
    cache = {}

    def get(shape, layout, device):
        key = (shape, layout, device)
        if key not in cache:
            x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(device)
            values, indices = F.max_pool2d(x, 2, return_indices=True)
            fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
            cache.clear()  # one shape's tensors at a time: the largest are hundreds of MB
            cache[key] = values.contiguous(memory_format=fmt), indices.contiguous(memory_format=fmt)
        return cache[key]

    return get


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("device", DEVICES)
def test_max_unpool2d(bench, pooled, device, shape, layout, impl):
    values, indices = pooled(shape, layout, device)
    IMPLS[impl](values, indices)  # compile (torch.compile) and warm up outside the timing
    out_bytes = values.element_size() * values.numel() * 4
    moved = values.numel() * (values.element_size() + indices.element_size()) + out_bytes
    shape_name = "x".join(map(str, shape))
    out = bench(
        f"max_unpool2d {shape_name} {layout} fp32 {device}", impl, lambda: IMPLS[impl](values, indices),
        device=device, bytes_moved=moved,
    )
    assert out.shape == shape
