"""fastseg.atrous_conv2d on every backend against F.conv2d + F.batch_norm + F.relu in float64, its
gradients and custom ops, the AtrousConvBNReLU and ASPP layers against plain PyTorch, bad input."""
import copy
import os
import random
import subprocess
import sys
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

import fastseg
from common import assert_relative_close, assert_trains_like_float64, backend_params, skip_if_interpreter_lacks

BACKENDS = backend_params(("reference", "cpp", "triton", "cudnn"))
COMPILED = [p for p in BACKENDS if p.values[0] != "reference"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
LAYOUTS = ["nchw", "channels_last"]
# A float32 tl.dot in Triton (DEVELOPERS.md's bound; with TF32 off, as conftest sets, it runs tf32x3).
TRITON_FP32_TOLERANCE = 5e-4

# (B, C, O, H, W, kernel, stride, padding, dilation, groups): every DeepLab rate, strides 1 and 2,
# 'same' and explicit paddings, depthwise, odd maps smaller than the dilated kernel, batch 1 and 4.
CASES = [
    (1, 3, 4, 8, 8, 3, 1, "same", 1, 1),
    (4, 4, 5, 9, 7, 3, 1, "same", 2, 1),
    (1, 5, 3, 11, 13, 3, 2, 4, 4, 1),
    (2, 4, 6, 13, 10, 3, 1, "same", 6, 1),
    (1, 3, 4, 7, 9, 3, 1, "same", 12, 1),
    (1, 4, 3, 5, 5, 3, 2, 18, 18, 1),
    (4, 2, 3, 9, 6, 3, 1, "same", 24, 1),
    (1, 3, 2, 7, 5, 3, 1, 36, 36, 1),
    (2, 6, 6, 9, 9, 3, 1, "same", 6, 6),  # depthwise
    (1, 4, 6, 10, 7, 3, 2, 3, (2, 3), 2),
    (2, 3, 5, 6, 6, 1, 1, 0, 1, 1),
    (1, 3, 3, 9, 8, (3, 1), 1, (12, 0), 12, 1),
]
CASE_IDS = ["x".join(map(str, c[:5])) + f"-k{c[5]}s{c[6]}p{c[7]}d{c[8]}g{c[9]}".replace(" ", "") for c in CASES]


def _layout(t, layout):
    return t.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else t.contiguous()


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def _problem(case, seed=0):
    """Float64 inputs, BatchNorm statistics, a residual and the expected output."""
    B, C, O, H, W, k, s, p, d, g = case
    gen = torch.Generator().manual_seed(seed)
    kH, kW = _pair(k)
    x = torch.randn(B, C, H, W, generator=gen, dtype=torch.float64)
    w = torch.randn(O, C // g, kH, kW, generator=gen, dtype=torch.float64) / (C // g * kH * kW) ** 0.5
    bias = torch.randn(O, generator=gen, dtype=torch.float64)
    mean, var = torch.randn(O, generator=gen, dtype=torch.float64), torch.rand(O, generator=gen, dtype=torch.float64) + 0.5
    gamma, beta = torch.randn(O, generator=gen, dtype=torch.float64), torch.randn(O, generator=gen, dtype=torch.float64)
    padding = p if isinstance(p, str) else _pair(p)
    if padding == "same":
        padding = tuple(dd * (kk - 1) // 2 for kk, dd in zip((kH, kW), _pair(d)))
    y = F.batch_norm(F.conv2d(x, w, bias, s, padding, d, g), mean, var, gamma, beta, False, 0.0, 1e-5)
    residual = torch.randn(y.shape, generator=gen, dtype=torch.float64)
    expected = F.relu(y + residual)
    scale = gamma / torch.sqrt(var + 1e-5)
    shift = beta - mean * scale
    return dict(x=x, w=w, bias=bias, scale=scale, shift=shift, residual=residual, expected=expected,
                conv=F.conv2d(x, w, None, s, padding, d, g), kwargs=dict(stride=s, padding=p, dilation=d, groups=g))


def _expected_from_rounded(pr, dtype):
    """The float64 result for the inputs as rounded to ``dtype``: what a kernel can be held to."""
    r = {k: pr[k].to(dtype).double() for k in ("x", "w", "bias", "scale", "shift", "residual")}
    kw = pr["kwargs"]
    B, C, H, W = r["x"].shape
    kH, kW = r["w"].shape[2:]
    p = kw["padding"]
    padding = tuple(dd * (kk - 1) // 2 for kk, dd in zip((kH, kW), _pair(kw["dilation"]))) if p == "same" else p
    conv = F.conv2d(r["x"], r["w"], None, kw["stride"], padding, kw["dilation"], kw["groups"])
    y = (conv + r["bias"].view(1, -1, 1, 1)) * r["scale"].view(1, -1, 1, 1) + r["shift"].view(1, -1, 1, 1)
    return F.relu(y + r["residual"])


def _tolerance(backend, dtype):
    return TRITON_FP32_TOLERANCE if backend == "triton" and dtype == torch.float32 else None


# The interpreter is slow: under it, Triton runs these cases only (every rate class, stride 2,
# depthwise, rectangular kernels) in float32 and bfloat16; on a GPU it runs them all.
INTERPRETER_CASES = {0, 4, 5, 7, 8, 9, 11}


def _skip_unsupported(backend, device, dtype, case=None):
    skip_if_interpreter_lacks(backend, device, dtype, case, CASES, INTERPRETER_CASES)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_matches_conv_bn_relu(case, dtype, layout, backend, device, poison):
    _skip_unsupported(backend, device, dtype, case)
    pr = _problem(case)
    cast = lambda t: t.to(device=device, dtype=dtype)
    x = _layout(cast(pr["x"]), layout)
    out = fastseg.atrous_conv2d(
        x, cast(pr["w"]), cast(pr["bias"]), scale=cast(pr["scale"]), shift=cast(pr["shift"]),
        residual=_layout(cast(pr["residual"]), layout), activation="relu", backend=backend, **pr["kwargs"],
    )
    assert out.shape == pr["expected"].shape and out.dtype == dtype and out.device.type == device
    assert_relative_close(out.cpu(), _expected_from_rounded(pr, dtype), dtype, _tolerance(backend, dtype))
    if dtype in (torch.float32, torch.float64):  # and against conv -> batch_norm -> relu itself
        assert_relative_close(out.cpu(), pr["expected"], dtype, _tolerance(backend, dtype))
    if layout == "channels_last" and out.shape[1] > 1:
        assert out.is_contiguous(memory_format=torch.channels_last)
    else:
        assert out.is_contiguous()


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_plain_convolution(dtype, backend, device, poison):
    # No epilogue at all, and the unbatched form.
    pr = _problem(CASES[3])
    x, w = pr["x"].to(device, dtype), pr["w"].to(device, dtype)
    out = fastseg.atrous_conv2d(x[0], w, backend=backend, **pr["kwargs"])
    assert out.shape == pr["conv"].shape[1:]
    assert_relative_close(out.cpu(), pr["conv"][0], dtype, _tolerance(backend, dtype))


@pytest.mark.skipif(not fastseg._backends.EXTENSION_LOADED, reason="fastseg._C not loaded")
@pytest.mark.parametrize("algorithm", ["taps", "conv", "winograd"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("case", [c for c in CASES if c[9] == 1], ids=[i for c, i in zip(CASES, CASE_IDS) if c[9] == 1])
def test_cpu_paths(case, dtype, layout, algorithm, poison):
    # Every path of the C++ kernel, whichever 'auto' would pick.
    pr = _problem(case)
    B, C, O, H, W, k, s, p, d, g = case
    if algorithm == "winograd" and (_pair(k) != (3, 3) or s != 1):
        pytest.skip("the winograd path is for 3x3 kernels at stride 1")
    kH, kW = _pair(k)
    padding = [dd * (kk - 1) // 2 for kk, dd in zip((kH, kW), _pair(d))] if p == "same" else list(_pair(p))
    shift = pr["shift"] + pr["scale"] * pr["bias"]
    out = torch.ops.fastseg.atrous_conv2d(
        _layout(pr["x"].to(dtype), layout), pr["w"].to(dtype), pr["scale"].to(dtype), shift.to(dtype),
        _layout(pr["residual"].to(dtype), layout), list(_pair(s)), padding, list(_pair(d)), 1, True, algorithm,
    )
    assert_relative_close(out, pr["expected"], dtype)


@pytest.mark.skipif(not fastseg._backends.EXTENSION_LOADED, reason="fastseg._C not loaded")
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("out_channels", [8, 21])
def test_cpu_half_epilogue(out_channels, dtype, layout, poison):
    # The conv path's epilogue for half types converts 8 values at a time (F16C for float16, bit
    # operations for bfloat16) and the rest one by one: channels_last rows of 8 and 21 channels
    # (the CASES above have at most 6), NCHW planes of 7x9. It computes in float32 and rounds once:
    # within one rounding of ATen's convolution followed by the epilogue in float32.
    gen = torch.Generator().manual_seed(3)
    x = _layout(torch.randn(2, 5, 7, 9, generator=gen).to(dtype), layout)
    w = (torch.randn(out_channels, 5, 3, 3, generator=gen) / 6).to(dtype)
    scale, shift = torch.rand(out_channels, generator=gen) + 0.5, torch.randn(out_channels, generator=gen)
    residual = _layout(torch.randn(2, out_channels, 7, 9, generator=gen).to(dtype), layout)
    out = torch.ops.fastseg.atrous_conv2d(x, w, scale.to(dtype), shift.to(dtype), residual, [1, 1], [2, 2],
                                          [2, 2], 1, True, "conv")
    conv = F.conv2d(x, w, padding=2, dilation=2).float()
    expected = torch.relu(conv * scale.to(dtype).float()[:, None, None] + shift.to(dtype).float()[:, None, None]
                          + residual.float())
    resolution = 2.0 ** -8 if dtype == torch.bfloat16 else 2.0 ** -11  # half a unit in the last place
    torch.testing.assert_close(out.float(), expected, rtol=resolution * 1.01, atol=1e-6)
    assert out.dtype == dtype and (layout == "nchw") == out.is_contiguous()


# The winograd path's tilings: every rate class on maps around the dilated kernel's size (runs of
# 1, 2, 3 and more outputs per residue, tiles with padding at either or both ends), explicit
# paddings below and above 'same', rectangular maps, batches, channel counts off its 128-channel
# blocks.
WINOGRAD_CASES = [
    # (B, C, O, H, W, padding, dilation)
    (1, 3, 4, 1, 1, 1, 1),
    (2, 5, 3, 2, 7, 1, 1),
    (1, 4, 4, 17, 16, 1, 1),
    (3, 7, 2, 11, 12, (0, 2), 2),
    (1, 6, 5, 13, 9, 6, 6),
    (2, 3, 4, 25, 25, 12, 12),
    (1, 4, 6, 33, 33, 18, 18),
    (2, 5, 3, 33, 31, 24, 24),
    (1, 3, 3, 65, 65, 36, 36),
    (1, 2, 5, 30, 20, (3, 9), (2, 7)),
    (1, 4, 2, 9, 40, 20, 4),
    (1, 130, 7, 10, 9, 2, 2),
]


@pytest.mark.skipif(not fastseg._backends.EXTENSION_LOADED, reason="fastseg._C not loaded")
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("case", WINOGRAD_CASES, ids=lambda c: "-".join(map(str, c)).replace(" ", ""))
def test_winograd_tilings(case, dtype, layout, poison):
    B, C, O, H, W, p, d = case
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(B, C, H, W, generator=gen, dtype=torch.float64)
    w = torch.randn(O, C, 3, 3, generator=gen, dtype=torch.float64) / (9 * C) ** 0.5
    scale, shift = torch.rand(O, generator=gen, dtype=torch.float64) + 0.5, torch.randn(O, generator=gen, dtype=torch.float64)
    ref = F.conv2d(x, w, None, 1, _pair(p), _pair(d)) * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)
    residual = torch.randn(ref.shape, generator=gen, dtype=torch.float64)
    expected = F.relu(ref + residual)
    out = torch.ops.fastseg.atrous_conv2d(
        _layout(x.to(dtype), layout), w.to(dtype), scale.to(dtype), shift.to(dtype), _layout(residual.to(dtype), layout),
        [1, 1], list(_pair(p)), list(_pair(d)), 1, True, "winograd",
    )
    assert out.shape == expected.shape
    assert_relative_close(out, expected, dtype)
    assert out.is_contiguous(memory_format=torch.channels_last if layout == "channels_last" and O > 1 else torch.contiguous_format)


# The blocks' float32 GEMM kernels (AVX2: 6-row tiles of one 16-channel panel; AVX-512: 12-row
# tiles of two panels, in 128-deep chunks): output channels that fill one panel, a pair, a pair and
# one more, or part of one; input channels across the chunk boundary; maps whose pairs of G rows get
# every row count left over by the tiles.
@pytest.mark.skipif(not fastseg._backends.EXTENSION_LOADED, reason="fastseg._C not loaded")
@pytest.mark.parametrize("C,O", [(1, 1), (17, 16), (128, 17), (129, 32), (300, 48), (40, 80)])
def test_winograd_gemm_shapes(C, O, poison):
    gen = torch.Generator().manual_seed(C * 1000 + O)
    for B, H, W, d in [(1, 13, 11, 1), (2, 9, 17, 4), (1, 23, 23, 12)]:
        x = torch.randn(B, C, H, W, generator=gen, dtype=torch.float64)
        w = torch.randn(O, C, 3, 3, generator=gen, dtype=torch.float64) / (9 * C) ** 0.5
        shift = torch.randn(O, generator=gen, dtype=torch.float64)
        expected = F.conv2d(x, w, shift, 1, d, d)
        for layout in LAYOUTS:
            out = torch.ops.fastseg.atrous_conv2d(_layout(x.float(), layout), w.float(), None, shift.float(), None,
                                                  [1, 1], [d, d], [d, d], 1, False, "winograd")
            assert_relative_close(out, expected, torch.float32)


# 'auto_training' (weights that change every call): the winograd path's weight transforms are
# computed into a scratch buffer reused between calls, not cached. Calls that grow and shrink it,
# in both layouts, match float64 and, bit for bit, the cached transforms of the forced path.
@pytest.mark.skipif(not fastseg._backends.EXTENSION_LOADED, reason="fastseg._C not loaded")
@pytest.mark.parametrize("poisoned", [False, True], ids=["reused", "poisoned"])
def test_winograd_uncached_transforms(poisoned, request):
    if poisoned:
        request.getfixturevalue("poison")
    gen = torch.Generator().manual_seed(5)
    takes_winograd = fastseg._backends.cpu_isa() in ("avx2", "avx512")
    for B, C, O, H, d, layout in [(2, 128, 128, 33, 1, "channels_last"), (1, 64, 80, 41, 1, "nchw"),
                                  (2, 160, 144, 33, 1, "nchw"), (1, 64, 80, 41, 1, "channels_last")]:
        x = torch.randn(B, C, H, H, generator=gen, dtype=torch.float64)
        w = torch.randn(O, C, 3, 3, generator=gen, dtype=torch.float64) / (9 * C) ** 0.5
        shift = torch.randn(O, generator=gen, dtype=torch.float64)
        expected = F.relu(F.conv2d(x, w, shift, 1, d, d))
        xf, wf = _layout(x.float(), layout), w.float()
        run = lambda algorithm: torch.ops.fastseg.atrous_conv2d(xf, wf, None, shift.float(), None, [1, 1], [d, d],
                                                                [d, d], 1, True, algorithm)
        out = run("auto_training")
        assert_relative_close(out, expected, torch.float32)
        if takes_winograd:
            assert torch.equal(out, run("winograd")), (B, C, O, H, d, layout)


@pytest.mark.skipif(not fastseg._backends.EXTENSION_LOADED, reason="fastseg._C not loaded")
def test_winograd_blocks_and_chunks():
    # Up to 512 input channels the tiles run in blocks of about FASTSEG_WINOGRAD_BLOCK_PRODUCTS
    # products, one thread each, and each block's input transform in chunks of
    # FASTSEG_WINOGRAD_CHUNK_CHANNELS channels whose GEMMs accumulate. Tiny blocks (a tile or two
    # each) and chunks of 4 channels over 6 and 9 channels, blocks over image boundaries, 5 to 33
    # output channels (float32 blocks multiply in panels of 16), in float64 and float32; the
    # weight-transform cache off; 0 = one block of all tiles.
    script = """
import os, torch, torch.nn.functional as F, fastseg
torch.set_num_threads(2)
gen = torch.Generator().manual_seed(3)
for blocks, chunk in [('1', '4'), ('7', '4'), ('40', '5'), ('0', '4')]:
    os.environ['FASTSEG_WINOGRAD_BLOCK_PRODUCTS'], os.environ['FASTSEG_WINOGRAD_CHUNK_CHANNELS'] = blocks, chunk
    for B, C, O, H, W, p, d in [(3, 6, 5, 13, 11, 2, 2), (2, 9, 21, 20, 17, 7, 7), (1, 6, 16, 9, 30, 1, 1),
                                (2, 9, 33, 33, 33, 24, 24)]:
        for dtype, tol in [(torch.float64, 1e-12), (torch.float32, 1e-5)]:
            x = torch.randn(B, C, H, W, generator=gen, dtype=torch.float64)
            w = torch.randn(O, C, 3, 3, generator=gen, dtype=torch.float64)
            r = torch.randn(B, O, H + 2 * p - 2 * d, W + 2 * p - 2 * d, generator=gen, dtype=torch.float64)
            out = torch.ops.fastseg.atrous_conv2d(x.to(dtype), w.to(dtype), None, None, r.to(dtype), [1, 1], [p, p],
                                                  [d, d], 1, False, 'winograd')
            ref = F.conv2d(x, w, None, 1, p, d) + r
            err = ((out.double() - ref).norm() / ref.norm()).item()
            assert err < tol, (blocks, chunk, B, C, O, H, W, p, d, dtype, err)
print('ok')
"""
    env = dict(os.environ, FASTSEG_WINOGRAD_CACHE_MB="0")
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


@pytest.mark.skipif(not fastseg._backends.EXTENSION_LOADED, reason="fastseg._C not loaded")
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", [(2, 64, 64, 37, 1), (1, 130, 70, 41, 6), (3, 256, 21, 33, 12)],
                         ids=lambda c: "-".join(map(str, c)))
def test_auto_on_the_channel_thresholds(case, layout, poison):
    # Shapes at and near 'auto''s channel thresholds for the winograd path (64 in, 16 or 64 out with
    # the AVX2 kernel; NCHW inputs transposed in and out), whichever path it picks: float32 within
    # 1e-5 of float64, in the input's layout.
    B, C, O, S, d = case
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(B, C, S, S, generator=gen, dtype=torch.float64)
    w = torch.randn(O, C, 3, 3, generator=gen, dtype=torch.float64) / (9 * C) ** 0.5
    expected = F.relu(F.conv2d(x, w, None, 1, d, d))
    out = fastseg.atrous_conv2d(_layout(x.float(), layout), w.float(), padding=d, dilation=d, activation="relu")
    assert_relative_close(out, expected, torch.float32)
    assert out.is_contiguous(memory_format=torch.channels_last if layout == "channels_last" else torch.contiguous_format)


@pytest.mark.skipif(not fastseg._backends.EXTENSION_LOADED, reason="fastseg._C not loaded")
@pytest.mark.parametrize("C", [1024, 1028])
def test_winograd_streamed_transforms(C, poison):
    # Over 512 channels the products of all tiles are one block, and beyond 16 MiB of them the
    # input transform writes them with non-temporal stores: 40x40 at rate 2 has about 4800 products
    # (19 MiB at 1024 channels). 1028 channels leave rows off 32-byte boundaries and a 4-channel
    # tail, which take plain stores.
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(1, C, 40, 40, generator=gen, dtype=torch.float64)
    w = torch.randn(4, C, 3, 3, generator=gen, dtype=torch.float64) / (9 * C) ** 0.5
    shift = torch.randn(4, generator=gen, dtype=torch.float64)
    expected = F.relu(F.conv2d(x, w, None, 1, 2, 2) + shift.view(1, -1, 1, 1))
    out = torch.ops.fastseg.atrous_conv2d(
        x.float().contiguous(memory_format=torch.channels_last), w.float(), None, shift.float(), None,
        [1, 1], [2, 2], [2, 2], 1, True, "winograd",
    )
    assert_relative_close(out, expected, torch.float32)


def _intel_avx512():
    try:
        with open("/proc/cpuinfo") as f:
            intel = "GenuineIntel" in f.read(4096)
    except OSError:
        return False
    return intel and fastseg._backends.cpu_isa() == "avx512"


# 'auto's route for layers with fewer than 64 outputs on Intel AVX-512 (winograd_pays, measured in
# benchmarks/RESULTS.md): channels_last from 64 input channels at a saving of 0.9 (a 17x17 map at
# rate 12); NCHW from 128 to 256 input channels on any map, from 64 on maps up to 33x33, and not
# at 512 or more. And maps up to 33x33 at any saving: channels_last up to 512 input channels, NCHW
# up to 256 and under 128 outputs. But channels_last 16, 32 or 48 outputs from more than 512 input
# channels on maps larger than 17x17 go to oneDNN (which runs them at full vector width). Which path
# ran shows in the bits: forced winograd's output or forced conv's.
@pytest.mark.skipif(not _intel_avx512(), reason="the route measured on Intel AVX-512")
@pytest.mark.parametrize("layout,C,O,H,d,path", [
    ("channels_last", 256, 21, 17, 12, "winograd"),
    ("channels_last", 64, 32, 17, 4, "winograd"),
    ("nchw", 128, 21, 65, 12, "winograd"),
    ("nchw", 64, 32, 33, 6, "winograd"),
    ("nchw", 64, 32, 65, 12, "conv"),
    ("nchw", 512, 21, 33, 12, "conv"),
    ("nchw", 256, 63, 65, 12, "winograd"),
    ("nchw", 257, 16, 65, 12, "conv"),
    ("nchw", 64, 16, 33, 6, "winograd"),
    ("nchw", 64, 15, 33, 6, "conv"),
    ("nchw", 64, 32, 34, 6, "conv"),
    ("channels_last", 32, 32, 33, 6, "conv"),
    # small maps whatever the saving by count (17x17 at rate 6: 0.54), within the channel limits
    ("channels_last", 256, 256, 17, 6, "winograd"),
    ("channels_last", 512, 21, 25, 12, "winograd"),
    ("channels_last", 1024, 32, 17, 6, "conv"),
    ("nchw", 64, 48, 17, 6, "winograd"),
    ("nchw", 256, 256, 17, 6, "conv"),
    # oneDNN's full-width output counts from many input channels
    ("channels_last", 1024, 32, 65, 24, "conv"),
    ("channels_last", 2048, 16, 33, 18, "conv"),
    ("channels_last", 2048, 48, 18, 4, "conv"),
    ("channels_last", 2048, 21, 65, 12, "winograd"),
    ("channels_last", 1024, 48, 17, 4, "winograd"),
    ("channels_last", 512, 32, 33, 18, "winograd"),
])
def test_auto_route_few_outputs(layout, C, O, H, d, path):
    gen = torch.Generator().manual_seed(C + O + H)
    x = _layout(torch.randn(1, C, H, H, generator=gen), layout)
    w = torch.randn(O, C, 3, 3, generator=gen) / (9 * C) ** 0.5
    run = lambda algorithm: torch.ops.fastseg.atrous_conv2d(x, w, None, None, None, [1, 1], [d, d], [d, d], 1,
                                                            False, algorithm)
    auto, chosen, other = run("auto"), run(path), run("conv" if path == "winograd" else "winograd")
    assert not torch.equal(chosen, other)  # the paths are told apart
    assert torch.equal(auto, chosen)


@pytest.mark.skipif(not fastseg._backends.EXTENSION_LOADED, reason="fastseg._C not loaded")
def test_winograd_weight_cache_keeps_entries_in_use():
    # An 8 MiB budget holds one 128 -> 128 layer's transforms (33x33, rate 12), not two. While the
    # first layer is in use the second is not cached, and 'auto' chooses its route as if the
    # transforms were recomputed on every call (as 'auto_training' does); once the first layer has
    # gone unused long enough, the second takes its room and 'auto' runs it as the first; and once
    # the second has gone unused for a few lookups more than twice the period of its calls, the first
    # takes the room back. Every output is checked against float64.
    script = """
import torch, torch.nn.functional as F
import fastseg
op = torch.ops.fastseg.atrous_conv2d
gen = torch.Generator().manual_seed(7)
def layer(C):
    x = torch.randn(1, C, 33, 33, generator=gen)
    w = torch.randn(128, C, 3, 3, generator=gen) / (9 * C) ** 0.5
    return x, w
def run(xw, algorithm):
    x, w = xw
    out = op(x, w, None, None, None, [1, 1], [12, 12], [12, 12], 1, False, algorithm)
    err = ((out.double() - F.conv2d(x.double(), w.double(), None, 1, 12, 12)).norm()).item()
    assert err <= 1e-5 * F.conv2d(x.double(), w.double(), None, 1, 12, 12).norm().item(), (algorithm, err)
    return out
a, b, small = layer(128), layer(127), layer(8)
a_auto = run(a, 'auto')
warm = torch.equal(a_auto, run(a, 'winograd'))  # does 'auto' take winograd here with the transforms kept?
assert torch.equal(run(b, 'auto'), run(b, 'auto_training'))  # no room: chosen as if recomputed
for _ in range(300):  # lookups of another layer: the first one goes stale
    run(small, 'winograd')
assert torch.equal(run(b, 'auto'), run(b, 'winograd' if warm else 'conv'))
for _ in range(10):  # a layer reused call after call goes stale a few lookups after its calls stop
    run(small, 'winograd')
assert torch.equal(run(a, 'auto'), run(a, 'winograd' if warm else 'conv'))
print('ok', warm)
"""
    env = dict(os.environ, FASTSEG_WINOGRAD_CACHE_MB="8")
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.startswith("ok"), done.stdout[-1000:] + done.stderr[-2000:]


@pytest.mark.skipif(not fastseg._backends.EXTENSION_LOADED, reason="fastseg._C not loaded")
def test_winograd_weight_cache_sees_every_change():
    # The weight transforms are cached by the weights' bytes: an in-place change through .data
    # (which leaves the version counter alone), a new tensor at a reused address, or the same
    # values in another tensor must all give the right answer.
    op = torch.ops.fastseg.atrous_conv2d
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 16, 20, 20, generator=gen)
    w = torch.randn(8, 16, 3, 3, generator=gen)

    def check(weight):
        out = op(x, weight, None, None, None, [1, 1], [4, 4], [4, 4], 1, False, "winograd")
        assert_relative_close(out, F.conv2d(x.double(), weight.double(), None, 1, 4, 4), torch.float32)

    check(w)
    check(w)
    w.data.mul_(-2.0)
    check(w)
    w.data[3, 5, 1, 2] = 7.0
    check(w)
    check(w.clone())
    for _ in range(3):
        check(torch.randn(8, 16, 3, 3, generator=gen))


@pytest.mark.skipif(not fastseg._backends.EXTENSION_LOADED, reason="fastseg._C not loaded")
def test_winograd_weight_cache_sees_changes_in_large_weights():
    # Weights of 1 MiB or more are compared in parts, one per thread: a change through .data in the
    # first, a middle or the last value must each be seen.
    op = torch.ops.fastseg.atrous_conv2d
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(1, 512, 10, 10, generator=gen)
    w = torch.randn(64, 512, 3, 3, generator=gen) / 48  # 1.1 MiB

    def check():
        out = op(x, w, None, None, None, [1, 1], [2, 2], [2, 2], 1, False, "winograd")
        assert_relative_close(out, F.conv2d(x.double(), w.double(), None, 1, 2, 2), torch.float32)

    check()
    for index in (0, w.numel() // 2 + 3, w.numel() - 1):
        w.data.view(-1)[index] += 5.0
        check()


@pytest.mark.skipif(not fastseg._backends.EXTENSION_LOADED, reason="fastseg._C not loaded")
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_winograd_never_hides_non_finite_input(bad):
    # Every output that F.conv2d makes non-finite is non-finite here too (Winograd may spread a
    # non-finite value over its tile, documented; it must never drop one).
    x = torch.randn(1, 4, 17, 17, generator=torch.Generator().manual_seed(5))
    x[0, 2, 8, 5] = bad
    w = torch.randn(3, 4, 3, 3, generator=torch.Generator().manual_seed(6))
    out = torch.ops.fastseg.atrous_conv2d(x, w, None, None, None, [1, 1], [2, 2], [2, 2], 1, False, "winograd")
    ref = F.conv2d(x, w, None, 1, 2, 2)
    assert (~torch.isfinite(out))[~torch.isfinite(ref)].all()
    # and it stays within its rate-2 sub-grid (rows of its parity, columns of its parity)
    other = torch.ones(17, 17, dtype=torch.bool)
    other[0::2, 1::2] = False
    assert torch.isfinite(out[..., other]).all()


@pytest.mark.skipif(not fastseg._backends.EXTENSION_LOADED, reason="fastseg._C not loaded")
def test_winograd_sized_layer_trains():
    # A layer 'auto' sends down the winograd path (float32, 256 -> 128, 3x3), trained for a few SGD
    # steps: each step's forward and gradients match F.conv2d's with the same updated weights.
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 256, 21, 19, generator=gen)
    w = (torch.randn(128, 256, 3, 3, generator=gen) / 48).requires_grad_()
    w_ref = w.detach().clone().requires_grad_()
    for _ in range(3):
        out = fastseg.atrous_conv2d(x, w, dilation=2, activation="relu")
        ref = F.relu(F.conv2d(x, w_ref, None, 1, 2, 2))
        assert_relative_close(out.detach(), ref.detach().double(), torch.float32)
        out.square().sum().backward()
        ref.square().sum().backward()
        assert_relative_close(w.grad, w_ref.grad.double(), torch.float32)
        with torch.no_grad():
            for p in (w, w_ref):
                p -= 1e-4 * p.grad
                p.grad = None
    with torch.no_grad():  # inference on the trained weights
        assert_relative_close(fastseg.atrous_conv2d(x, w, dilation=2), F.conv2d(x.double(), w_ref.double(), None, 1, 2, 2),
                              torch.float32)


def test_poison_fixture_poisons(poison):
    assert torch.isnan(torch.empty(64)).all()


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_gradcheck(layout, backend, device):
    if (backend, device) == ("triton", "cpu") and layout == "channels_last":
        pytest.skip("one layout under the interpreter (slow); both on the GPU")
    gen = torch.Generator().manual_seed(3)
    make = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    x = _layout(make(1, 2, 5, 4).detach(), layout).requires_grad_()
    w, b, scale, shift = make(3, 2, 3, 3), make(3), make(3), make(3)
    residual = _layout(make(1, 3, 5, 4).detach(), layout).requires_grad_()

    def conv(x, w, b, scale, shift, residual):
        return fastseg.atrous_conv2d(x, w, b, dilation=2, scale=scale, shift=shift, residual=residual,
                                     activation="relu", backend=backend)

    assert torch.autograd.gradcheck(conv, (x, w, b, scale, shift, residual))
    strided = lambda x, w: fastseg.atrous_conv2d(x, w, stride=2, padding=3, dilation=3, backend=backend)
    assert torch.autograd.gradcheck(strided, (x, w))


def test_dead_taps_rule():
    trim = lambda hw, k, s, p, d: fastseg.ops.atrous.without_dead_taps(  # noqa: E731
        torch.empty(2, 2, *k), hw, fastseg.ops.atrous.atrous_output_size(hw, k, s, p, d), s, p, d)
    w, p, d = trim((33, 33), (3, 3), (1, 1), (36, 36), (36, 36))  # DeepLab v3's degenerate rate: a 1 x 1
    assert (tuple(w.shape[2:]), p, d) == ((1, 1), (0, 0), (1, 1))
    w, p, d = trim((65, 65), (3, 3), (1, 1), (36, 36), (36, 36))  # every tap meets the map somewhere
    assert (tuple(w.shape[2:]), p, d) == ((3, 3), (36, 36), (36, 36))
    w, p, d = trim((2, 6), (5, 5), (1, 1), (4, 4), (2, 2))  # two dead rows each side, no dead column
    assert (tuple(w.shape[2:]), p, d) == ((1, 5), (0, 4), (1, 2))
    w, p, d = trim((1, 5), (4, 3), (2, 1), (2, 1), (1, 1))  # rows 0, 1 and 3 dead: one cut each side
    assert (tuple(w.shape[2:]), p, d) == ((2, 3), (1, 1), (1, 1))
    w, p, d = trim((3, 9), (3, 3), (1, 1), (1, 1), (2, 1))  # rows 0 and 2 dead, but no padding to cut
    assert (tuple(w.shape[2:]), p, d) == ((3, 3), (1, 1), (2, 1))


def test_dead_taps_left_out_exactly():
    # Random geometries (a quarter of them with dead taps): output and gradients equal F.conv2d's.
    rng = random.Random(0)
    trimmed = 0
    for _ in range(200):
        H, W, kH, kW = rng.randint(1, 12), rng.randint(1, 12), rng.choice([1, 2, 3, 5]), rng.choice([1, 3, 4])
        d, s, p = (rng.randint(1, 14), rng.randint(1, 14)), (rng.randint(1, 3), rng.randint(1, 3)), \
            (rng.randint(0, 20), rng.randint(0, 20))
        try:
            out_hw = fastseg.ops.atrous.atrous_output_size((H, W), (kH, kW), s, p, d)
        except ValueError:
            continue
        gen = torch.Generator().manual_seed(rng.randint(0, 1 << 30))
        x = torch.randn(2, 2, H, W, generator=gen, dtype=torch.float64, requires_grad=True)
        w = torch.randn(3, 2, kH, kW, generator=gen, dtype=torch.float64, requires_grad=True)
        w_kept = fastseg.ops.atrous.without_dead_taps(w, (H, W), out_hw, s, p, d)[0]
        trimmed += w_kept.shape != w.shape
        expected = F.conv2d(x, w, stride=s, padding=p, dilation=d)
        g = torch.randn(expected.shape, generator=gen, dtype=torch.float64)
        grads = torch.autograd.grad(expected, (x, w), g)
        for dtype in (torch.float64, torch.float32):
            xx, ww = (t.detach().to(dtype).requires_grad_() for t in (x, w))
            out = fastseg.atrous_conv2d(xx, ww, stride=s, padding=p, dilation=d, backend="cpp")
            out.backward(g.to(dtype))
            for mine, theirs in ((out.detach(), expected.detach()), (xx.grad, grads[0]), (ww.grad, grads[1])):
                assert_relative_close(mine, theirs, dtype)
    assert trimmed >= 10, trimmed


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_dead_taps_gradcheck(backend, device):
    gen = torch.Generator().manual_seed(4)
    make = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    # Rate 5 on a 5 x 4 map: the centre tap only; 5 x 5 taps at rate 2 on a 2-row map: the centre row.
    x, w, scale, shift = make(1, 2, 5, 4), make(3, 2, 3, 3), make(3), make(3)
    conv = lambda x, w, scale, shift: fastseg.atrous_conv2d(x, w, dilation=5, scale=scale, shift=shift,  # noqa: E731
                                                            activation="relu", backend=backend)
    fast = (backend, device) == ("triton", "cpu")  # each interpreted forward takes seconds
    assert torch.autograd.gradcheck(conv, (x, w, scale, shift), fast_mode=fast)
    x, w = make(1, 2, 2, 6), make(3, 2, 5, 5)
    assert torch.autograd.gradcheck(lambda x, w: fastseg.atrous_conv2d(x, w, dilation=2, backend=backend), (x, w),
                                    fast_mode=fast)


def _op_for(backend):
    return {"triton": torch.ops.fastseg.atrous_conv2d_triton, "cudnn": torch.ops.fastseg.atrous_conv2d_cudnn,
            "cpp": getattr(torch.ops.fastseg, "atrous_conv2d", None)}[backend]


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_autograd_records_only_what_it_needs(backend, device):
    # fastseg._backends.call starts a call below the Autograd key when no argument requires grad
    # (or grad mode is off): the result must be the same, and a graph recorded whenever one is needed.
    pr = _problem(CASES[1])
    x, w = pr["x"].to(device, torch.float64), pr["w"].to(device, torch.float64)
    kwargs = dict(backend=backend, activation="relu", **pr["kwargs"])
    plain = fastseg.atrous_conv2d(x, w, **kwargs)
    assert plain.grad_fn is None and not plain.requires_grad
    for needs in ("input", "weight"):
        xi, wi = x.clone().requires_grad_(needs == "input"), w.clone().requires_grad_(needs == "weight")
        out = fastseg.atrous_conv2d(xi, wi, **kwargs)
        assert out.requires_grad and out.grad_fn is not None
        torch.testing.assert_close(out.detach(), plain, rtol=0, atol=0)
        out.sum().backward()
        assert (xi.grad if needs == "input" else wi.grad) is not None
        with torch.no_grad():
            assert fastseg.atrous_conv2d(xi, wi, **kwargs).grad_fn is None
        with torch.inference_mode():
            assert fastseg.atrous_conv2d(xi, wi, **kwargs).grad_fn is None


@pytest.mark.parametrize("backend,device", COMPILED)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_opcheck(layout, backend, device):
    gen = torch.Generator().manual_seed(4)
    x = _layout(torch.randn(2, 3, 6, 5, generator=gen), layout).to(device).requires_grad_()
    w = torch.randn(4, 3, 3, 3, generator=gen).to(device).requires_grad_()
    scale, shift = torch.rand(4, generator=gen).to(device).requires_grad_(), torch.randn(4, generator=gen).to(device)
    residual = _layout(torch.randn(2, 4, 6, 5, generator=gen), layout).to(device)
    torch.library.opcheck(_op_for(backend), (x, w, scale, shift, residual, [1, 1], [2, 2], [2, 2], 1, True))
    torch.library.opcheck(_op_for(backend), (x, w, None, None, None, [2, 2], [1, 1], [1, 1], 1, False))


@pytest.mark.parametrize("backend,device", [p for p in COMPILED if p.values[0] == "cpp"])
def test_torch_compile_fullgraph(backend, device):
    torch._dynamo.reset()
    pr = _problem(CASES[1])
    x, w = pr["x"].float().to(device), pr["w"].float().to(device)
    scale, shift = pr["scale"].float().to(device), pr["shift"].float().to(device)

    @torch.compile(fullgraph=True)
    def block(x):
        return fastseg.atrous_conv2d(x * 2, w, dilation=2, scale=scale, shift=shift, activation="relu",
                                     backend=backend) + 1

    expected = F.relu(F.conv2d(x * 2, w, padding=2, dilation=2) * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)) + 1
    assert_relative_close(block(x).cpu(), expected.cpu(), torch.float32)


# --- layers -------------------------------------------------------------------------------------


def _randomise_bn(module, seed=5):
    gen = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen))
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.weight.data.copy_(torch.randn(m.num_features, generator=gen))
            m.bias.data.copy_(torch.randn(m.num_features, generator=gen))


def _plain_cbr(layer, x, relu=True):
    """Conv -> BatchNorm -> ReLU of an AtrousConvBNReLU's weights, in plain PyTorch, the BatchNorm in
    its own mode (batch statistics, running ones updated, when it is training)."""
    c, bn = layer.conv, layer.bn
    y = F.conv2d(x, c.weight, c.bias, c.stride, c.padding, c.dilation, c.groups)
    y = F.batch_norm(y, bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.training, bn.momentum, bn.eps)
    return F.relu(y) if relu else y


def _plain_aspp(aspp, x):
    if aspp.version == "v2":
        return sum(F.conv2d(x, c.weight, c.bias, 1, c.padding, c.dilation) for c in aspp.branches)
    outs = [_plain_cbr(b, x) for b in aspp.branches]
    if aspp.image_pooling:
        pooled = _plain_cbr(aspp.pooling, x.mean((2, 3), keepdim=True))
        outs.append(F.interpolate(pooled, size=x.shape[-2:], mode="bilinear", align_corners=False))
    return _plain_cbr(aspp.project, torch.cat(outs, 1))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_conv_bn_relu_layer(layout):
    torch.manual_seed(0)
    layer = fastseg.nn.AtrousConvBNReLU(4, 6, 3, dilation=6)
    plain = torch.nn.Sequential(torch.nn.Conv2d(4, 6, 3, padding=6, dilation=6, bias=False), torch.nn.BatchNorm2d(6))
    plain.load_state_dict({"0.weight": layer.conv.weight, **{f"1.{k}": v for k, v in layer.bn.state_dict().items()}})
    x = _layout(torch.randn(2, 4, 9, 9), layout)
    residual = torch.randn(2, 6, 9, 9)
    # Training: exact BatchNorm semantics, running statistics included.
    assert torch.equal(layer(x, residual), F.relu(plain(x) + residual))
    assert torch.equal(layer.bn.running_mean, plain[1].running_mean)
    assert torch.equal(layer.bn.running_var, plain[1].running_var)
    layer.eval(), plain.eval()
    _randomise_bn(layer), _randomise_bn(plain)
    with torch.no_grad():
        out = layer(x, residual)
        assert_relative_close(out, F.relu(plain(x.double().float()) + residual), torch.float32)
    assert out.is_contiguous(memory_format=torch.channels_last) == (layout == "channels_last")


def test_layer_broadcasting_residual_in_eval():
    # A residual that broadcasts is added after the fused call in eval mode, as in training.
    torch.manual_seed(5)
    layer = fastseg.nn.AtrousConvBNReLU(4, 6, 3, dilation=2)
    _randomise_bn(layer)
    layer.eval()
    x = torch.randn(2, 4, 9, 9)
    for residual in (torch.randn(1, 6, 1, 1), torch.randn(6, 1, 1), torch.randn(2, 6, 9, 9).double()):
        with torch.no_grad():
            expected = F.relu(_plain_cbr(layer, x, relu=False) + residual)
            assert_relative_close(layer(x, residual), expected, torch.float32)


def test_batch_norm_set_to_train_on_its_own():
    # Test-time adaptation puts the model in eval mode and its BatchNorms in training mode: they
    # normalise by the batch and update their running statistics, in fastseg's layers as in plain ones.
    torch.manual_seed(3)
    layer = fastseg.nn.AtrousConvBNReLU(4, 6, 3, dilation=2)
    aspp = fastseg.nn.ASPP(4, 6, version="v3", rates=(2, 3))
    _randomise_bn(layer), _randomise_bn(aspp)
    x = torch.randn(2, 4, 9, 9)
    for module, plain in ((layer, _plain_cbr), (aspp, _plain_aspp)):
        twin = copy.deepcopy(module)
        module.eval(), twin.eval()
        for m in (module, twin):
            for bn in (b for b in m.modules() if isinstance(b, torch.nn.BatchNorm2d)):
                bn.train()
        with torch.no_grad():
            out, expected = module(x), plain(twin, x)
        assert_relative_close(out, expected, torch.float32)
        bns = [b for b in module.modules() if isinstance(b, torch.nn.BatchNorm2d)]
        twins = [b for b in twin.modules() if isinstance(b, torch.nn.BatchNorm2d)]
        for bn, tbn in zip(bns, twins):
            assert int(bn.num_batches_tracked) == 1
            torch.testing.assert_close(bn.running_mean, tbn.running_mean)


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpp", marks=pytest.mark.skipif(
    not fastseg._backends.EXTENSION_LOADED, reason="fastseg._C not loaded"))])
def test_layers_under_inference_mode(backend):
    # Values the eval layers keep (folded BatchNorms, the folded projection) made under
    # torch.inference_mode must serve later calls: no_grad ones (an inference tensor's version
    # cannot be read) and ones autograd records (an inference tensor cannot be saved for backward).
    torch.manual_seed(4)
    layer = fastseg.nn.AtrousConvBNReLU(4, 6, 3, dilation=2, backend=backend).eval().requires_grad_(False)
    aspp = fastseg.nn.ASPP(4, 6, version="v3", rates=(2, 3), backend=backend).eval()
    _randomise_bn(layer), _randomise_bn(aspp)
    x = torch.randn(2, 4, 9, 9)
    with torch.no_grad():
        expected = [_plain_cbr(layer, x), _plain_aspp(aspp, x)]
    for _ in range(2):
        with torch.inference_mode():
            outs = [layer(x), aspp(x)]
        for out, ref in zip(outs, expected):
            assert_relative_close(out.clone(), ref, torch.float32)
        with torch.no_grad():
            assert_relative_close(aspp(x), expected[1], torch.float32)
    xr = x.clone().requires_grad_()
    layer(xr).sum().backward()
    xp = x.clone().requires_grad_()
    _plain_cbr(layer, xp).sum().backward()
    assert_relative_close(xr.grad, xp.grad, torch.float32)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("batch,layout", [(2, "nchw"), (1, "channels_last")])
@pytest.mark.parametrize("version,rates,output_stride", [("v2", None, 16), ("v3", None, 16), ("v3", None, 8), ("v3", (2, 5), 16)])
def test_aspp_matches_plain_pytorch(version, rates, output_stride, batch, layout, backend, device):
    # batch 1 and 2: in eval, v3 folds the pooled branch into the projection's shift for one image
    # and into its first residual for more.
    torch.manual_seed(1)
    aspp = fastseg.nn.ASPP(6, 4, version=version, rates=rates, output_stride=output_stride, backend=backend)
    expected_rates = rates or {("v2", 16): (6, 12, 18, 24), ("v3", 16): (6, 12, 18), ("v3", 8): (12, 24, 36)}[version, output_stride]
    assert aspp.rates == tuple(expected_rates)
    _randomise_bn(aspp)
    aspp.eval().to(device)
    x = _layout(torch.randn(batch, 6, 7, 9), layout).to(device)
    with torch.no_grad():
        out, expected = aspp(x), _plain_aspp(aspp, x.double().float())
    assert out.shape == (batch, 4, 7, 9)
    assert out.is_contiguous(memory_format=torch.channels_last) == (layout == "channels_last")
    tolerance = TRITON_FP32_TOLERANCE if backend == "triton" else None
    assert_relative_close(out.cpu(), expected.cpu(), torch.float32, tolerance)


@pytest.mark.parametrize("backend,device", [p for p in BACKENDS if p.values[0] in ("reference", "triton", "cudnn")])
def test_eval_layers_see_changed_weights(backend, device):
    # Eval-mode layers keep their folded BatchNorm and packed weights between calls: an in-place
    # update must be seen at once, a write through .data after .eval().
    torch.manual_seed(2)
    x = torch.randn(1, 6, 7, 9, device=device)
    for aspp in (fastseg.nn.ASPP(6, 4, version="v3", rates=(2, 3), backend=backend),
                 fastseg.nn.ASPP(6, 4, version="v2", rates=(1, 2), backend=backend)):
        _randomise_bn(aspp)
        aspp.eval().to(device)
        with torch.no_grad():
            first = aspp(x)
            assert torch.equal(aspp(x), first)
            for p in aspp.parameters():
                p.mul_(1.5)
            assert_relative_close(aspp(x).cpu(), _plain_aspp(aspp, x).cpu(), torch.float32, TRITON_FP32_TOLERANCE)
            for p in aspp.parameters():
                p.data.mul_(0.5)
            aspp.eval()
            assert_relative_close(aspp(x).cpu(), _plain_aspp(aspp, x).cpu(), torch.float32, TRITON_FP32_TOLERANCE)


def test_layer_plain_call_rule():
    # Which inputs the eval layer's CUDA route hands straight to the kernel call (decided the same
    # way on any device); everything else takes atrous_conv2d's checks.
    layer = fastseg.nn.AtrousConvBNReLU(4, 6, 3, dilation=6).eval()
    w, shift = layer.conv.weight.detach(), torch.zeros(6)
    plain = lambda x, w=w: layer._plain_call(x, w, shift)
    with torch.no_grad():
        assert plain(torch.randn(2, 4, 9, 9))
        assert plain(torch.randn(1, 4, 1, 1))  # 'same' padding: a 1x1 map still has an output
        assert not plain(torch.randn(4, 9, 9))  # unbatched
        assert not plain(torch.randn(2, 5, 9, 9))  # channels
        assert not plain(torch.randn(2, 4, 9, 9, dtype=torch.float64))  # dtype
        assert not plain(torch.randn(0, 4, 9, 9))  # empty batch
        assert not plain(torch.randn(2, 4, 0, 9))  # empty map
    assert not plain(torch.randn(2, 4, 9, 9, requires_grad=True))  # autograd records
    narrow = fastseg.nn.AtrousConvBNReLU(4, 6, 3, dilation=6, padding=0).eval()
    with torch.no_grad():
        assert not narrow._plain_call(torch.randn(1, 4, 9, 9), w, shift)  # smaller than the dilated kernel


def test_aspp_trains():
    torch.manual_seed(2)
    aspp = fastseg.nn.ASPP(4, 3, version="v3", rates=(2, 3))
    x = torch.randn(2, 4, 6, 6)
    aspp(x).sum().backward()
    assert all(p.grad is not None for p in aspp.parameters())
    assert "version='v3', rates=(2, 3)" in repr(aspp)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("version", ["v2", "v3"])
def test_aspp_eval_gradients(version, backend, device):
    """Gradients through an eval-mode ASPP (saliency, frozen-BatchNorm fine-tuning) on every route:
    the GPU taps route has no backward of its own, so autograd must not take it."""
    torch.manual_seed(3)
    aspp = fastseg.nn.ASPP(6, 4, version=version, rates=(1, 2), backend=backend)
    _randomise_bn(aspp)
    aspp.eval().to(device)
    x = torch.randn(2, 6, 5, 7, device=device, requires_grad=True)
    out = aspp(x)
    grads = torch.autograd.grad(out.square().sum(), [x, *aspp.parameters()])
    expected = torch.autograd.grad(_plain_aspp(aspp, x).square().sum(), [x, *aspp.parameters()])
    for got, want in zip(grads, expected):
        assert_relative_close(got.cpu(), want.cpu(), torch.float32, TRITON_FP32_TOLERANCE)
    with torch.no_grad():  # unbatched (C, H, W), as conv2d takes it
        assert_relative_close(aspp(x[0]).cpu(), aspp(x[:1])[0].cpu(), torch.float32)


def test_aspp_bad_arguments():
    with pytest.raises(ValueError, match="version must be 'v2' or 'v3'"):
        fastseg.nn.ASPP(4, 3, version="v4")
    for rates in ("12", (6.5,), 12, (True,), ()):
        with pytest.raises(ValueError, match="rates must be a non-empty tuple of ints >= 1"):
            fastseg.nn.ASPP(4, 3, rates=rates)
    with pytest.raises(ValueError, match="output_stride must be 8 or 16"):
        fastseg.nn.ASPP(4, 3, output_stride=32)


# --- bad input ---------------------------------------------------------------------------------


def _args():
    return torch.randn(2, 4, 9, 9), torch.randn(6, 4, 3, 3)


BAD_CALLS = [
    ("x not a tensor", lambda x, w: ([[1.0]], w), {}, TypeError, "x must be a torch.Tensor"),
    ("2-D x", lambda x, w: (x[0, 0], w), {}, ValueError, "x must be 3-D or 4-D, got 2-D"),
    ("integer x", lambda x, w: (x.long(), w), {}, TypeError, "x must have dtype"),
    ("3-D weight", lambda x, w: (x, w[0]), {}, ValueError, "weight must be 4-D, got 3-D"),
    # F.conv2d returns 0 channels here, not the epilogue of an empty sum
    ("no input channels", lambda x, w: (x[:, :0], w[:, :0]), dict(shift=torch.ones(6)), ValueError,
     r"x has no channels: shape \(2, 0, 9, 9\)"),
    ("channel mismatch", lambda x, w: (x, w[:, :3]), {}, ValueError,
     r"weight has shape \(6, 3, 3, 3\), expecting \(O, C / groups = 4, kH, kW\) for x with C = 4"),
    ("groups not dividing C", lambda x, w: (x, w), dict(groups=3), ValueError, "groups = 3 does not divide the 4 input"),
    ("groups not dividing O", lambda x, w: (x, torch.randn(5, 1, 3, 3)), dict(groups=4), ValueError,
     "groups = 4 does not divide the 5 output"),
    ("zero groups", lambda x, w: (x, w), dict(groups=0), ValueError, "groups must be >= 1"),
    ("zero dilation", lambda x, w: (x, w), dict(dilation=0), ValueError, "dilation must be >= 1"),
    ("negative stride", lambda x, w: (x, w), dict(stride=(1, -1)), ValueError, "stride must be >= 1"),
    ("negative padding", lambda x, w: (x, w), dict(padding=-1), ValueError, "padding must be >= 0"),
    ("bad padding string", lambda x, w: (x, w), dict(padding="full"), ValueError, "padding must be an int, a pair"),
    ("odd same padding", lambda x, w: (x, torch.randn(6, 4, 2, 2)), dict(padding="same"), ValueError,
     r"padding='same' needs dilation \* \(kernel_size - 1\) even"),
    ("empty output", lambda x, w: (x, w), dict(padding=0, dilation=12), ValueError,
     r"the output would be empty: input \(9, 9\) with padding \(0, 0\) is smaller than the dilated kernel \(25, 25\)"),
    ("mixed dtypes", lambda x, w: (x, w.double()), {}, TypeError, "weight has dtype float64 but x has dtype float32"),
    ("mixed devices", lambda x, w: (x, w.to("meta")), {}, ValueError, "x is on cpu but weight is on meta"),
    ("scale wrong length", lambda x, w: (x, w), dict(scale=torch.ones(5)), ValueError,
     r"scale has shape \(5,\), expecting \(6,\)"),
    ("shift wrong length", lambda x, w: (x, w), dict(shift=torch.ones(6, 1)), ValueError, r"shift has shape \(6, 1\)"),
    ("bias wrong dtype", lambda x, w: (x, w, torch.ones(6, dtype=torch.float64)), {}, TypeError,
     "bias has dtype float64 but x has dtype float32"),
    ("shift on another device", lambda x, w: (x, w), dict(shift=torch.ones(6, device="meta")), ValueError,
     "x is on cpu but shift is on meta"),
    ("residual wrong shape", lambda x, w: (x, w), dict(residual=torch.ones(2, 6, 9, 8)), ValueError,
     r"residual has shape \(2, 6, 9, 8\), expecting the output's \(2, 6, 9, 9\)"),
    ("bad activation", lambda x, w: (x, w), dict(activation="gelu"), ValueError, "activation must be None or 'relu'"),
    ("bad backend", lambda x, w: (x, w), dict(backend="fast"), ValueError, "backend must be 'auto' or one of"),
    ("cuda backend on cpu", lambda x, w: (x, w), dict(backend="cuda"), ValueError, "has no 'cuda' backend"),
]


@pytest.mark.parametrize("description,build,kwargs,error,message", BAD_CALLS, ids=[c[0] for c in BAD_CALLS])
def test_bad_input(description, build, kwargs, error, message):
    with pytest.raises(error, match=message):
        fastseg.atrous_conv2d(*build(*_args()), **kwargs)


@pytest.mark.skipif(not fastseg._backends.EXTENSION_LOADED, reason="fastseg._C not loaded")
def test_compiled_op_checks_its_arguments():
    x, w = _args()
    op = torch.ops.fastseg.atrous_conv2d
    with pytest.raises(ValueError, match="weight has shape"):
        op(x, w[:, :3], None, None, None, [1, 1], [1, 1], [1, 1], 1, False)
    with pytest.raises(ValueError, match="stride and dilation must be positive"):
        op(x, w, None, None, None, [1, 1], [1, 1], [0, 1], 1, False)
    with pytest.raises(ValueError, match="input has no channels"):
        op(x[:, :0], w[:, :0], None, None, None, [1, 1], [1, 1], [1, 1], 1, False)
    with pytest.raises(ValueError, match="output would be empty"):
        op(x, w, None, None, None, [1, 1], [0, 0], [12, 12], 1, False)
    with pytest.raises(ValueError, match="algorithm must be"):
        op(x, w, None, None, None, [1, 1], [1, 1], [1, 1], 1, False, "fft")
    with pytest.raises(ValueError, match="winograd algorithm needs a 3x3 kernel, stride 1"):
        op(x, w, None, None, None, [2, 2], [1, 1], [1, 1], 1, False, "winograd")
    with pytest.raises(ValueError, match="winograd algorithm needs"):
        op(x.half(), w.half(), None, None, None, [1, 1], [1, 1], [1, 1], 1, False, "winograd")
    with pytest.raises(ValueError, match="taps algorithm needs groups == 1"):
        op(x, torch.randn(4, 1, 3, 3), None, None, None, [1, 1], [1, 1], [1, 1], 4, False, "taps")


def test_auto_on_cuda():
    # Selection only (no CUDA tensor is made): the Triton conv kernels lost to cuDNN on an H200
    # (RESULTS.md, "GPU"), so 'auto' runs atrous_conv2d and unpool_conv2d through cuDNN's fused
    # kernel on CUDA and gcn_conv2d by its own rule; 'triton' stays by name.
    implemented = ("reference", "cpp", "triton", "cudnn")
    cuda = torch.device("cuda")
    if torch.backends.cudnn.is_available():
        for op in ("atrous_conv2d", "unpool_conv2d"):  # unpool_conv2d: ATen's unpooling, then cuDNN
            assert fastseg._backends.select(op, "auto", cuda, implemented) == "cudnn"
    # gcn_conv2d: see fastseg.ops.gcn.cuda_backend
    assert fastseg._backends.select("gcn_conv2d", "auto", cuda, implemented) == "reference"
    # max_unpool2d on CUDA (layout only: CPU tensors stand in): ATen's kernel for NCHW, Triton's for
    # channels_last; deterministic mode, which ATen's CUDA unpooling refuses, a fastseg kernel.
    choose = fastseg.ops.unpool.cuda_backend
    nchw = torch.empty(2, 3, 4, 5)
    cl = nchw.contiguous(memory_format=torch.channels_last)
    triton = fastseg._backends.unavailable_reason("triton", "cuda") is None
    assert choose(nchw) == "aten"
    assert choose(cl) == ("triton" if triton else "aten")
    deterministic, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        compiled = [b for b in ("triton", "cuda") if fastseg._backends.unavailable_reason(b, "cuda") is None]
        assert choose(nchw) == choose(cl) == (compiled + ["reference"])[0]
    finally:
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
    # Under torch.compile, the Triton custom op (the 'aten' route's check reads back to the host).
    with mock.patch.object(fastseg._backends, "tracing", return_value=True):
        assert choose(nchw) == ("triton" if triton else "aten")
    assert fastseg._backends.select("dense_crf", "auto", torch.device("cuda"), ("reference", "cpp", "triton")) == "triton"


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_strided_bias_scale_and_shift(backend, device, poison):
    # Per-channel vectors that are views: slices (stride 2), an expanded scalar (stride 0). The
    # Triton kernel read them at unit stride (past the end of the expanded scalar's storage).
    g = torch.Generator().manual_seed(12)
    x, w, b8, s8 = (torch.randn(*s, generator=g).to(device) for s in ((2, 3, 7, 6), (4, 3, 3, 3), (8,), (8,)))
    bias, shift, scale = b8[::2], s8[1::2], torch.full((1,), 1.5, device=device).expand(4)
    conv = lambda b: F.conv2d(x.double(), w.double(), b, 1, 2, 2)  # noqa: E731
    cases = [  # (bias, scale, shift, expected): a bias alone is passed on as the shift
        (bias, scale, shift, conv(bias.double()) * 1.5 + shift.double().view(1, -1, 1, 1)),
        (bias, None, None, conv(bias.double())),
        (None, scale, None, conv(None) * 1.5),
    ]
    for b, sc, sh, expected in cases:
        out = fastseg.atrous_conv2d(x, w, b, dilation=2, scale=sc, shift=sh, activation="relu", backend=backend)
        assert_relative_close(out.cpu(), F.relu(expected).cpu(), torch.float32)


def test_layers_under_cpu_autocast():
    # Under autocast the layers run PyTorch's own modules, which autocast casts: the dtype and values
    # of the plain modules (fastseg's ops refuse mixed dtypes, and the eval paths took bfloat16
    # activations with float32 weights: a TypeError).
    torch.manual_seed(6)
    x = torch.randn(2, 4, 10, 10)
    values, indices = F.max_pool2d(torch.randn(2, 4, 10, 10), 2, return_indices=True)
    layer = fastseg.nn.AtrousConvBNReLU(4, 6, 3, dilation=2)
    aspp3 = fastseg.nn.ASPP(4, 6, version="v3", rates=(2, 3))
    aspp2 = fastseg.nn.ASPP(4, 6, version="v2", rates=(1, 2))
    up = fastseg.nn.UnpoolConvBNReLU(4, 6, 3, unpool=2)
    gcn = fastseg.nn.GlobalConv2d(4, 6, k=5)
    br = fastseg.nn.BoundaryRefinement(4)
    for m in (layer, aspp3, up):
        _randomise_bn(m)
    cases = [
        (layer, (x,), lambda: F.relu(layer.bn(layer.conv(x)))),
        (aspp3, (x,), None),
        (aspp2, (x,), lambda: sum(c(x) for c in aspp2.branches)),
        (up, (values, indices, (10, 10)), lambda: F.relu(up.bn(up.conv(F.max_unpool2d(values, indices, 2))))),
        (gcn, (x,), lambda: gcn.conv_l2(gcn.conv_l1(x)) + gcn.conv_r2(gcn.conv_r1(x))),
        (br, (x,), lambda: x + br.conv2(F.relu(br.conv1(x)))),
    ]
    for module, args, plain in cases:
        module.eval()
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            out = module(*args)
            if plain is None:
                assert out.dtype == torch.bfloat16
            else:  # BoundaryRefinement's float32 x + bfloat16 branch is float32, as in PyTorch
                torch.testing.assert_close(out, plain())
            # bfloat16 activations (from an autocast layer before it) into the layer
            module(*((args[0].bfloat16(),) + args[1:]))
    with torch.no_grad():
        expected = _plain_aspp(aspp3, x)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert_relative_close(aspp3(x).float(), expected, torch.bfloat16)


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_ops_follow_cpu_autocast(backend):
    """Under autocast the convolution ops cast as F.conv2d does (float32 operands to autocast's
    dtype, float64 ones kept): bfloat16 out, within bfloat16's tolerance of the float64 result, and
    gradients reach the float32 leaves."""
    torch.manual_seed(7)
    x = torch.randn(2, 6, 11, 9, requires_grad=True)
    w = (torch.randn(5, 6, 3, 3) / 7).requires_grad_()
    scale, shift, residual = torch.rand(5) + 0.5, torch.randn(5), torch.randn(2, 5, 11, 9)
    gcn_w = [torch.randn(4, 6, 5, 1) / 4, torch.randn(3, 4, 1, 5) / 4, torch.randn(4, 6, 1, 5) / 4,
             torch.randn(3, 4, 5, 1) / 4]
    values, indices = F.max_pool2d(x.detach(), 2, return_indices=True)
    w_up = torch.randn(5, 6, 3, 3) / 7
    d = lambda t: t.detach().double()  # noqa: E731
    cases = [
        (lambda: fastseg.atrous_conv2d(x, w, dilation=2, scale=scale, shift=shift, residual=residual,
                                       activation="relu", backend=backend),
         F.relu(F.conv2d(d(x), d(w), padding=2, dilation=2) * d(scale).view(-1, 1, 1) + d(shift).view(-1, 1, 1)
                + d(residual))),
        (lambda: fastseg.gcn_conv2d(x, *gcn_w, backend=backend),
         F.conv2d(F.conv2d(d(x), d(gcn_w[0]), padding=(2, 0)), d(gcn_w[1]), padding=(0, 2))
         + F.conv2d(F.conv2d(d(x), d(gcn_w[2]), padding=(0, 2)), d(gcn_w[3]), padding=(2, 0))),
        (lambda: fastseg.unpool_conv2d(values, indices, w_up, kernel_size=2, output_size=(11, 9), backend=backend),
         F.conv2d(F.max_unpool2d(d(values), indices, 2, output_size=(11, 9)), d(w_up), padding=1)),
    ]
    for run, expected in cases:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = run()
        assert out.dtype == torch.bfloat16
        assert_relative_close(out.detach(), expected, torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cases[0][0]().float().sum().backward()
    assert x.grad.dtype == w.grad.dtype == torch.float32 and x.grad.abs().sum() > 0
    # float64 operands are not autocast's to cast: the op runs in float64, as F.conv2d does.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fastseg.atrous_conv2d(d(x), d(w), dilation=2, backend=backend)
    assert out.dtype == torch.float64


def _nan_problem(dtype, layout, C=16, O=21):
    # 21 output channels: the half epilogue's 8-wide loop and its scalar tail; a NaN in x (spread by
    # the convolution) and one in shift (a whole channel).
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(2, C, 13, 11, generator=gen)
    x[1, 3, 6, 4] = float("nan")
    w = torch.randn(O, C, 3, 3, generator=gen) / 12
    scale, shift = torch.rand(O, generator=gen) + 0.5, torch.randn(O, generator=gen)
    shift[min(5, O - 1)] = float("nan")
    residual = torch.randn(2, O, 13, 11, generator=gen)
    ref = torch.relu(F.conv2d(x.double(), w.double(), None, 1, 2, 2) * scale.double().view(1, -1, 1, 1)
                     + shift.double().view(1, -1, 1, 1) + residual.double())
    return [_layout(t.to(dtype), layout) if t.dim() == 4 else t.to(dtype) for t in (x, w, scale, shift, residual)], ref


def _assert_same_nans(out, ref, spreads=False):
    assert torch.isnan(ref).any() and (~torch.isnan(ref)).any()
    if spreads:  # Winograd may spread a NaN over its tile (documented); it must never drop one
        assert torch.isnan(out)[torch.isnan(ref)].all()
    else:
        assert torch.equal(torch.isnan(out), torch.isnan(ref))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend, device", BACKENDS)
def test_relu_keeps_nan(backend, device, dtype, layout):
    # torch.relu(nan) is nan: a fused ReLU written max(v, 0) would return 0 and hide a NaN that
    # eager PyTorch shows.
    skip_if_interpreter_lacks(backend, device, dtype)
    (x, w, scale, shift, residual), ref = _nan_problem(dtype, layout)
    out = fastseg.atrous_conv2d(x.to(device), w.to(device), dilation=2, scale=scale.to(device),
                                shift=shift.to(device), residual=residual.to(device), activation="relu",
                                backend=backend)
    _assert_same_nans(out.cpu(), ref)


@pytest.mark.skipif(not fastseg._backends.EXTENSION_LOADED, reason="fastseg._C not loaded")
@pytest.mark.parametrize("algorithm", ["taps", "conv", "winograd"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16], ids=str)
def test_cpu_relu_keeps_nan(algorithm, dtype, layout):
    if algorithm != "conv" and dtype in (torch.float16, torch.bfloat16):
        pytest.skip(f"the {algorithm} path computes in float32 or float64")
    (x, w, scale, shift, residual), ref = _nan_problem(dtype, layout)
    out = torch.ops.fastseg.atrous_conv2d(x, w, scale, shift, residual, [1, 1], [2, 2], [2, 2], 1, True, algorithm)
    _assert_same_nans(out, ref, spreads=algorithm == "winograd")


# A k x 1 kernel longer than the map (with the padding to match): oneDNN's weight gradient with the
# padding as an argument corrupted the heap on these shapes (eager PyTorch 2.14 too), so the
# backward pads the map by hand (convolution_backward), and so does the reference's convolution.
# Gradients against float64, three times over, both layouts and a 1 x k kernel.
@pytest.mark.skipif(not fastseg._backends.EXTENSION_LOADED, reason="fastseg._C not loaded")
@pytest.mark.parametrize("C,k,kw,stride,dilation,groups", [
    (17, 39, 1, 1, 1, 1), (24, 41, 1, 1, 1, 1), (32, 39, 1, 1, 1, 1),
    (24, 39, 3, (2, 1), 1, 1), (24, 21, 1, 1, (2, 1), 3), (24, 41, 1, (1, 2), 1, 24),
])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_backward_kernel_longer_than_map(C, k, kw, stride, dilation, groups, layout, backend):
    gen = torch.Generator().manual_seed(C + k)
    d = _pair(dilation)[0]
    for tall in (True, False):
        x = torch.randn(2, C, 20, 64, generator=gen, dtype=torch.float64)
        O = 21 if groups == 1 else C
        w = torch.randn(O, C // groups, k, kw, generator=gen, dtype=torch.float64) / (C * k) ** 0.5
        s, dil, padding = _pair(stride), _pair(dilation), (d * (k - 1) // 2, (kw - 1) // 2)
        if not tall:
            x, w = x.transpose(2, 3).contiguous(), w.transpose(2, 3).contiguous()
            s, dil, padding = s[::-1], dil[::-1], padding[::-1]
        ref_x, ref_w = x.clone().requires_grad_(), w.clone().requires_grad_()
        ref = F.conv2d(ref_x, ref_w, None, s, padding, dil, groups)
        grad = torch.randn(ref.shape, generator=gen, dtype=torch.float64)
        ref.backward(grad)
        for _ in range(3):
            xf = _layout(x.float(), layout).requires_grad_()
            wf = w.float().requires_grad_()
            out = fastseg.atrous_conv2d(xf, wf, stride=s, padding=padding, dilation=dil, groups=groups, backend=backend)
            out.backward(_layout(grad.float(), layout))
            assert_relative_close(xf.grad, ref_x.grad, torch.float32)
            assert_relative_close(wf.grad, ref_w.grad, torch.float32)
            assert xf.grad.is_contiguous(memory_format=torch.channels_last if layout == "channels_last" else
                                         torch.contiguous_format)


# The layer's training path (eager BatchNorm) with such a kernel: its convolution goes through the op
# there (nn.Conv2d's backward crashed the process on this shape).
@pytest.mark.skipif(not fastseg._backends.EXTENSION_LOADED, reason="fastseg._C not loaded")
@pytest.mark.parametrize("hooked", [False, True], ids=["plain", "hooked"])
def test_layer_trains_with_kernel_longer_than_map(hooked):
    # hooked: a hook on the convolution makes the layer call its own modules (under HandPadding).
    torch.manual_seed(0)
    layer = fastseg.nn.AtrousConvBNReLU(24, 21, kernel_size=(39, 1), padding=(19, 0)).train()
    ref = torch.nn.Sequential(copy.deepcopy(layer.conv), copy.deepcopy(layer.bn), torch.nn.ReLU()).double()
    calls = []
    if hooked:
        layer.conv.register_forward_hook(lambda *_: calls.append(1))
    x = torch.randn(2, 24, 20, 64)
    assert_trains_like_float64(layer, ref, lambda: layer(x), lambda: ref(x.double()))
    assert len(calls) == (3 if hooked else 0)


def test_one_element_sequences_as_conv2d_takes_them():
    # F.conv2d and nn.Conv2d spread a one-element stride, padding or dilation over both axes.
    torch.manual_seed(0)
    x, w = torch.randn(2, 4, 11, 13, dtype=torch.float64), torch.randn(3, 4, 3, 3, dtype=torch.float64)
    out = fastseg.atrous_conv2d(x, w, stride=[2], padding=(4,), dilation=[2], backend="reference")
    torch.testing.assert_close(out, F.conv2d(x, w, None, [2], (4,), [2]))
    layer = fastseg.nn.AtrousConvBNReLU(4, 3, 9, padding=[4])
    ref = torch.nn.Sequential(copy.deepcopy(layer.conv), copy.deepcopy(layer.bn), torch.nn.ReLU())
    for mode in ("train", "eval"):
        getattr(layer, mode)(), getattr(ref, mode)()
        torch.testing.assert_close(layer(x.float()), ref(x.float()), rtol=1e-4, atol=1e-5)


def test_hand_padding_mode():
    # Under HandPadding, F.conv2d pads by hand only where the kernel reaches past the map, with the
    # same result; a padding string, other functions and tensors that need no padding pass through.
    from fastseg.nn.atrous import HandPadding, hand_padded

    def padded_by_hand(out, depth=4):  # a pad in the autograd graph just behind the convolution
        todo = [out.grad_fn]
        for _ in range(depth):
            todo = [f for node in todo for f, _ in node.next_functions if f is not None]
            if any(type(f).__name__.startswith("ConstantPadNd") for f in todo):
                return True
        return False

    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 30, dtype=torch.float64, requires_grad=True)
    tall = torch.randn(2, 3, 9, 30, dtype=torch.float64, requires_grad=True)
    w, even = torch.randn(4, 3, 7, 1, dtype=torch.float64), torch.randn(4, 3, 6, 2, dtype=torch.float64)
    for args, kwargs, by_hand in [((x, w, None, 1, (3, 0)), {}, True),
                                  ((x, w), dict(padding=(6, 0), dilation=(2, 1)), True),
                                  ((x, w), dict(padding=[3], dilation=(1,)), True),  # F.conv2d spreads these
                                  ((x, w), dict(padding="same"), True),
                                  ((x, even), dict(padding="same", dilation=(1, 3)), True),  # the odd pixel at the end
                                  ((tall, w), dict(padding="valid"), False),
                                  ((tall, w, None, 1, (3, 0)), {}, False), ((tall, w), dict(padding="same"), False),
                                  ((x[0], w, None, 2, 3, 1, 1), {}, True)]:
        with HandPadding():
            mine = F.conv2d(*args, **kwargs)
        torch.testing.assert_close(mine, F.conv2d(*args, **kwargs), rtol=1e-12, atol=1e-12)
        assert padded_by_hand(mine) == by_hand, (kwargs, by_hand)
    with HandPadding(), pytest.raises(RuntimeError, match="same"):
        F.conv2d(x, w, padding="same", stride=2)  # refused as without the mode
    with HandPadding():
        assert torch.equal(torch.relu(x), x.clamp(min=0))
    assert isinstance(hand_padded(x), HandPadding)
    with torch.no_grad():
        assert not isinstance(hand_padded(x), HandPadding)  # no backward: no crash to avoid
    assert not isinstance(hand_padded(torch.empty(1, 1, 1, 1, device="meta")), HandPadding)


@pytest.mark.parametrize("hooked", [False, True], ids=["plain", "hooked"])
def test_aspp_v2_trains_with_rates_past_the_map(hooked):
    # ASPP v2's branches run their nn.Conv2d modules in training; rate 24 reaches past this 9 x 40 map.
    torch.manual_seed(0)
    aspp = fastseg.nn.ASPP(8, 5, version="v2", rates=(2, 24)).train()
    ref = copy.deepcopy(aspp.branches).double()
    calls = []
    if hooked:
        aspp.branches[1].register_forward_hook(lambda *_: calls.append(1))
    x = torch.randn(2, 8, 9, 40)
    assert_trains_like_float64(aspp, ref, lambda: aspp(x), lambda: ref[0](x.double()) + ref[1](x.double()))
    assert len(calls) == (3 if hooked else 0)


@pytest.mark.parametrize("backend, device", BACKENDS)
def test_relu_backward_passes_nan_positions(backend, device):
    # relu's gradient is zero only where the output is <= 0: where it is NaN, grad_output passes
    # (threshold_backward), so the residual there gets it.
    skip_if_interpreter_lacks(backend, device, torch.float32)
    (x, w, scale, shift, residual), _ = _nan_problem(torch.float32, "nchw", C=4, O=3)
    residual[0, 1, 2, 3] = float("nan")
    mine, theirs = residual.clone().to(device).requires_grad_(), residual.clone().requires_grad_()
    fastseg.atrous_conv2d(x.to(device), w.to(device), dilation=2, residual=mine, activation="relu",
                          backend=backend).sum().backward()
    torch.relu(F.conv2d(x, w, None, 1, 2, 2) + theirs).sum().backward()
    assert torch.equal(mine.grad.cpu(), theirs.grad)
