"""max_unpool2d against F.max_unpool2d on SegNet's decoder shapes.

The shapes are unpooled outputs (B, C, H, W) of SegNet's VGG-16 decoder stages (Badrinarayanan et
al. 2017) for a batch of 8: 64 channels at 256x256, 128 at 128x128 and 512 at 32x32; the input is
the 2x2/2 max-pooled map. Bytes moved: values and int64 indices read once, the output written once.
"""
import functools

import pytest
import torch
import torch.nn.functional as F

import fastseg
from conftest import DEVICES, FASTSEG, shapes
from fastseg.benchmarking import compiled, dtypes

SHAPES = shapes([(8, 64, 256, 256), (8, 128, 128, 128), (8, 512, 32, 32)], [(2, 4, 16, 16)])
CASES = [(device, dtype) for device in DEVICES for dtype in dtypes(device)]
IMPLS = [FASTSEG, "torch eager", "torch.compile"]


def _unpool_aten(v, i):
    return F.max_unpool2d(v, i, 2)


@functools.lru_cache(maxsize=None)
def _impl(impl, device):
    if impl == FASTSEG:
        return lambda v, i: fastseg.max_unpool2d(v, i, 2)
    if impl == "torch eager":
        return _unpool_aten
    return compiled(_unpool_aten, device)


@pytest.fixture(scope="module")
def pooled():
    cache = {}

    def get(shape, layout, device, dtype):
        key = (shape, layout, device, dtype)
        if key not in cache:
            x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(device, dtype)
            values, indices = F.max_pool2d(x, 2, return_indices=True)
            fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
            cache.clear()  # one shape's tensors at a time: the largest are hundreds of MB
            cache[key] = values.contiguous(memory_format=fmt), indices.contiguous(memory_format=fmt)
        return cache[key]

    return get


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("device,dtype", CASES, ids=lambda c: str(c).replace("torch.", ""))
def test_max_unpool2d(bench, pooled, device, dtype, shape, layout, impl):
    values, indices = pooled(shape, layout, device, dtype)
    fn = _impl(impl, device)
    fn(values, indices)  # compile (torch.compile) and warm up outside the timing
    out_bytes = values.element_size() * values.numel() * 4
    moved = values.numel() * (values.element_size() + indices.element_size()) + out_bytes
    shape_name = "x".join(map(str, shape))
    dtype_name = str(dtype).replace("torch.", "").replace("float", "fp")
    out = bench(
        f"max_unpool2d {shape_name} {layout} {dtype_name} {device}", impl, lambda: fn(values, indices),
        device=device, bytes_moved=moved,
    )
    assert out.shape == shape
