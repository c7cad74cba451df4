"""gcn_conv2d (Peng et al., "Large Kernel Matters", CVPR 2017) against eager PyTorch's four
convolutions and an add, the dense k x k convolution the block replaces, and torch.compile.

The paper's shapes: a ResNet's four stages at a 512x512 input (2048/1024/512/256 channels at
16/32/64/128 px), Cmid = Cout = 21 (VOC classes), k = 15; plus a 256 -> 256 block at 64x64. FLOPs
are the GCN block's nominal 2 * B * H * W * k * (Cin * Cmid + Cmid * Cout) * 2 (padded taps
included) for every peer, the dense one included, so GFLOP/s compare time to the same work.
"""
import functools

import pytest
import torch
import torch.nn.functional as F

import fastseg
from conftest import DEVICES, FASTSEG, shapes
from fastseg.benchmarking import compiled, dtypes

# (B, Cin, H, Cmid, Cout, k)
GCN_SHAPES = shapes(
    [(1, 2048, 16, 21, 21, 15), (1, 1024, 32, 21, 21, 15), (1, 512, 64, 21, 21, 15), (1, 256, 128, 21, 21, 15),
     (1, 256, 64, 256, 256, 15)],
    [(1, 8, 9, 4, 3, 7), (2, 6, 5, 3, 2, 15)],
)
CASES = [(device, dtype) for device in DEVICES for dtype in dtypes(device)]
IMPLS = [FASTSEG, "torch eager", "dense kxk conv", "torch.compile"]


def _four_convs(x, w_l1, w_l2, w_r1, w_r2, b_l1, b_l2, b_r1, b_r2):
    p = w_l1.shape[2] // 2
    left = F.conv2d(F.conv2d(x, w_l1, b_l1, padding=(p, 0)), w_l2, b_l2, padding=(0, p))
    right = F.conv2d(F.conv2d(x, w_r1, b_r1, padding=(0, p)), w_r2, b_r2, padding=(p, 0))
    return left + right


@functools.lru_cache(maxsize=None)
def _compiled(device):
    return compiled(_four_convs, device)


def _shape_id(s):
    return "B{}-C{}-{}x{}-mid{}-out{}-k{}".format(s[0], s[1], s[2], s[2], s[3], s[4], s[5])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("shape", GCN_SHAPES, ids=_shape_id)
@pytest.mark.parametrize("device,dtype", CASES, ids=lambda v: str(v).replace("torch.", ""))
def test_gcn_conv2d(bench, device, dtype, shape, layout, impl):
    B, Cin, H, Cm, Co, k = shape
    gen = torch.Generator().manual_seed(0)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = torch.randn(B, Cin, H, H, generator=gen).contiguous(memory_format=fmt).to(device, dtype)
    make = lambda *s: (torch.randn(*s, generator=gen) / (s[1] * k) ** 0.5).to(device, dtype)
    ws = [make(Cm, Cin, k, 1), make(Co, Cm, 1, k), make(Cm, Cin, 1, k), make(Co, Cm, k, 1)]
    bs = [torch.randn(n, generator=gen).to(device, dtype) for n in (Cm, Co, Cm, Co)]
    if impl == FASTSEG:
        fn = lambda: fastseg.gcn_conv2d(x, *ws, *bs)
    elif impl == "torch eager":
        fn = lambda: _four_convs(x, *ws, *bs)
    elif impl == "torch.compile":
        peer = _compiled(device)
        fn = lambda: peer(x, *ws, *bs)
    else:  # what the block replaces: one dense k x k convolution Cin -> Cout
        dense = make(Co, Cin, k, k)
        fn = lambda: F.conv2d(x, dense, bs[1], padding=k // 2)
    name = "B{} C{}->{}->{} {}x{} k{} {} {}".format(B, Cin, Cm, Co, H, H, k, layout, str(dtype).replace("torch.", ""))
    flops = 2 * B * H * H * k * (Cin * Cm + Cm * Co) * 2
    with torch.no_grad():
        out = bench(f"GCN block {name} {device}", impl, fn, device=device, flops=flops)
    assert out.shape == (B, Co, H, H)
