"""fastseg.gcn_conv2d on every backend against the four-convolution reference of Peng et al. (CVPR
2017) in float64, its gradients and custom ops, GlobalConv2d and BoundaryRefinement against plain
PyTorch, bad input."""
import copy

import pytest
import torch
import torch.nn.functional as F

import fastseg
import fastseg.ops.gcn as gcn_ops
from common import assert_relative_close, assert_trains_like_float64, backend_params, skip_if_interpreter_lacks

BACKENDS = backend_params(("reference", "cpp", "triton", "cudnn"))
COMPILED = [p for p in BACKENDS if p.values[0] != "reference"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
LAYOUTS = ["nchw", "channels_last"]
# A float32 tl.dot in Triton (DEVELOPERS.md's bound; with TF32 off, as conftest sets, it runs tf32x3).
TRITON_FP32_TOLERANCE = 5e-4

# (B, Cin, Cmid, Cout, H, W, k, dilation): every k of the issue, Cout 21 (VOC) and 1, maps smaller
# than k (down to one row), batch 1 and 2, dilation 2, and channels wide enough (Cmid x Cout > 64 x 64)
# for the C++ kernel's GEMM route through the second convolutions.
CASES = [
    (2, 4, 5, 21, 9, 8, 3, 1),
    (1, 3, 4, 1, 11, 13, 7, 1),
    (2, 5, 21, 21, 6, 10, 9, 1),
    (1, 6, 21, 21, 8, 12, 15, 1),
    (2, 3, 3, 1, 5, 7, 31, 1),
    (1, 4, 3, 2, 12, 10, 7, 2),
    (2, 3, 2, 21, 1, 6, 15, 1),
    (2, 4, 70, 64, 6, 7, 5, 1),
]
def _case_id(case):
    return "B{}-{}-{}-{}-{}x{}-k{}-d{}".format(*case)


CASE_IDS = [_case_id(c) for c in CASES]
# The interpreter is slow: under it Triton runs these cases only, in float32 and bfloat16.
INTERPRETER_CASES = {0, 4, 5}


def _layout(t, layout):
    return t.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else t.contiguous()


def _problem(case, seed=0):
    """Float64 x, weights and biases (scaled to keep activations O(1))."""
    B, Cin, Cm, Co, H, W, k, d = case
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *shape, fan=1: torch.randn(*shape, generator=gen, dtype=torch.float64) / fan ** 0.5
    return dict(
        x=rand(B, Cin, H, W),
        weights=[rand(Cm, Cin, k, 1, fan=Cin * k), rand(Co, Cm, 1, k, fan=Cm * k), rand(Cm, Cin, 1, k, fan=Cin * k),
                 rand(Co, Cm, k, 1, fan=Cm * k)],
        biases=[rand(Cm), rand(Co), rand(Cm), rand(Co)],
        dilation=d,
    )


def _four_convs(x, w_l1, w_l2, w_r1, w_r2, b_l1, b_l2, b_r1, b_r2, d):
    """The paper's block written out: what every backend must match."""
    p = d * (w_l1.shape[2] - 1) // 2
    left = F.conv2d(F.conv2d(x, w_l1, b_l1, padding=(p, 0), dilation=(d, 1)), w_l2, b_l2, padding=(0, p), dilation=(1, d))
    right = F.conv2d(F.conv2d(x, w_r1, b_r1, padding=(0, p), dilation=(1, d)), w_r2, b_r2, padding=(p, 0), dilation=(d, 1))
    return left + right


def _tolerance(backend, dtype):
    return TRITON_FP32_TOLERANCE if backend == "triton" and dtype == torch.float32 else None


def _skip_unsupported(backend, device, dtype, case=None):
    skip_if_interpreter_lacks(backend, device, dtype, case, CASES, INTERPRETER_CASES)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_matches_four_convolutions(case, dtype, layout, backend, device, poison):
    _skip_unsupported(backend, device, dtype, case)
    pr = _problem(case)
    cast = lambda t: t.to(device=device, dtype=dtype)
    x = _layout(cast(pr["x"]), layout)
    out = fastseg.gcn_conv2d(x, *map(cast, pr["weights"]), *map(cast, pr["biases"]), dilation=pr["dilation"],
                             backend=backend)
    # The float64 result for the inputs as rounded to dtype: what a kernel can be held to.
    rounded = lambda t: t.to(dtype).double()
    expected = _four_convs(rounded(pr["x"]), *map(rounded, pr["weights"]), *map(rounded, pr["biases"]), pr["dilation"])
    B, Cin, Cm, Co, H, W, k, d = case
    assert out.shape == (B, Co, H, W) and out.dtype == dtype and out.device.type == device
    assert_relative_close(out.cpu(), expected, dtype, _tolerance(backend, dtype))
    if layout == "channels_last" and Co > 1 and H * W > 1:
        assert out.is_contiguous(memory_format=torch.channels_last)
    else:
        assert out.is_contiguous()


TRITON = [p for p in BACKENDS if p.values[0] == "triton"]


@pytest.mark.parametrize("backend,device", TRITON)
@pytest.mark.parametrize("algorithm", ["taps", "implicit_gemm"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_triton_algorithms(case, dtype, layout, algorithm, backend, device, poison):
    # Each GPU route by name ('auto' picks one per shape): the taps route (cuBLAS GEMMs over the
    # channels, a Triton shift-and-add over the taps) and the implicit-GEMM kernel's four launches.
    _skip_unsupported(backend, device, dtype, case)
    if algorithm == "implicit_gemm" and device == "cpu":
        pytest.skip("the implicit-GEMM route is test_matches_four_convolutions' under the interpreter")
    pr = _problem(case)
    cast = lambda t: t.to(device=device, dtype=dtype)
    x = _layout(cast(pr["x"]), layout)
    out = torch.ops.fastseg.gcn_conv2d_triton(x, *map(cast, pr["weights"]), *map(cast, pr["biases"]),
                                              pr["dilation"], algorithm)
    rounded = lambda t: t.to(dtype).double()
    expected = _four_convs(rounded(pr["x"]), *map(rounded, pr["weights"]), *map(rounded, pr["biases"]), pr["dilation"])
    assert out.shape == expected.shape and out.dtype == dtype
    assert_relative_close(out.cpu(), expected, dtype, _tolerance(backend, dtype))
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    assert out.is_contiguous(memory_format=fmt)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the layer's padded-weights path runs on CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_layer_keeps_padded_weights_on_cuda(dtype, layout):
    torch.manual_seed(6)
    layer = fastseg.nn.GlobalConv2d(12, 21, k=7).to("cuda", dtype)
    x = _layout(torch.randn(2, 12, 9, 11, device="cuda", dtype=dtype), layout)
    plain = lambda: _four_convs(x.double(), *[c.weight.double() for c in (layer.conv_l1, layer.conv_l2, layer.conv_r1,
                                                                          layer.conv_r2)],
                                *[c.bias.double() for c in (layer.conv_l1, layer.conv_l2, layer.conv_r1, layer.conv_r2)], 1)
    with torch.no_grad():
        out = layer(x)
        assert out.shape == (2, 21, 9, 11) and out.dtype == dtype
        assert out.is_contiguous(memory_format=torch.channels_last if layout == "channels_last" else torch.contiguous_format)
        assert_relative_close(out.cpu(), plain().cpu(), dtype)
        layer.conv_r2.weight.mul_(-2)  # seen at once
        assert_relative_close(layer(x).cpu(), plain().cpu(), dtype)
    # Training through the same path: gradients reach the weights.
    layer(x).float().square().mean().backward()
    assert all(c.weight.grad is not None for c in (layer.conv_l1, layer.conv_l2, layer.conv_r1, layer.conv_r2))


def test_taps_route_leaves_out_taps_past_the_map():
    # Dilation 4 on a 3-row map: every k x 1 tap but the centre lands in the padding for every
    # pixel; the GEMM then has those taps' columns left out, and the result must not change.
    pr = _problem((1, 3, 4, 5, 3, 9, 5, 4), seed=5)
    taps_conv = pytest.importorskip("fastseg.kernels.taps_conv")
    if not fastseg._backends.TRITON_INTERPRETED and not torch.cuda.is_available():
        pytest.skip("Triton needs a GPU or TRITON_INTERPRET=1")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    f = lambda t: t.float().to(device)
    out = taps_conv.gcn_conv2d(f(pr["x"]), *map(f, pr["weights"]), *map(f, pr["biases"]), 4)
    expected = _four_convs(pr["x"], *pr["weights"], *pr["biases"], 4)
    assert_relative_close(out.cpu(), expected, torch.float32)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_optional_biases_and_unbatched(backend, device, poison):
    pr = _problem(CASES[5])
    x, ws = pr["x"].to(device), [w.to(device) for w in pr["weights"]]
    b_l1, b_l2, b_r1, b_r2 = [b.to(device) for b in pr["biases"]]
    out = fastseg.gcn_conv2d(x[0], *ws, b_l1, None, None, b_r2, dilation=2, backend=backend)
    expected = _four_convs(pr["x"][:1], *pr["weights"], pr["biases"][0], None, None, pr["biases"][3], 2)[0]
    assert out.shape == expected.shape
    assert_relative_close(out.cpu(), expected, torch.float64, _tolerance(backend, torch.float64))
    no_bias = fastseg.gcn_conv2d(x, *ws, dilation=2, backend=backend)
    assert_relative_close(no_bias.cpu(), _four_convs(pr["x"], *pr["weights"], None, None, None, None, 2), torch.float64)


@pytest.mark.skipif(not fastseg._backends.EXTENSION_LOADED, reason="fastseg._C not loaded")
def test_empty_batch():
    pr = _problem(CASES[0])
    out = fastseg.gcn_conv2d(pr["x"][:0], *pr["weights"], *pr["biases"], backend="cpp")
    assert out.shape == (0, 21, 9, 8)
    # The backward too, where a non-empty batch would take the frequency domain (MKL's FFT refuses
    # an empty one): zero weight gradients, an empty input gradient.
    pr = _problem((2, 16, 21, 5, 20, 24, 15, 1))
    leaves = [t.float().requires_grad_() for t in [pr["x"][:0], *pr["weights"], *pr["biases"]]]
    fastseg.gcn_conv2d(*leaves).sum().backward()
    assert leaves[0].grad.shape == (0, 16, 20, 24)
    assert all(torch.equal(t.grad, torch.zeros_like(t)) for t in leaves[1:])


@pytest.mark.skipif(not fastseg._backends.EXTENSION_LOADED, reason="fastseg._C not loaded")
@pytest.mark.parametrize("algorithm", ["gemm", "conv", "fft"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_cpu_routes(case, dtype, layout, algorithm, poison):
    # Every route of the C++ kernel, whichever 'auto' would pick for the shape.
    pr = _problem(case)
    cast = lambda t: t.to(dtype)
    if algorithm == "fft" and dtype == torch.float64:
        with pytest.raises(TypeError, match="algorithm 'fft' computes in float32"):
            torch.ops.fastseg.gcn_conv2d(cast(pr["x"]), *map(cast, pr["weights"]), None, None, None, None, 1, "fft")
        return
    out = torch.ops.fastseg.gcn_conv2d(
        _layout(cast(pr["x"]), layout), *map(cast, pr["weights"]), *map(cast, pr["biases"]), pr["dilation"], algorithm,
    )
    rounded = lambda t: t.to(dtype).double()
    expected = _four_convs(rounded(pr["x"]), *map(rounded, pr["weights"]), *map(rounded, pr["biases"]), pr["dilation"])
    assert_relative_close(out, expected, dtype)
    assert out.dtype == dtype
    if layout == "channels_last" and case[3] > 1 and case[4] * case[5] > 1:
        assert out.is_contiguous(memory_format=torch.channels_last)
    else:
        assert out.is_contiguous()


# Shapes for the FFT route's batched transforms: full 16-sequence batches and partial ones along
# every axis and channel count (Cin 40 = 16 + 16 + 8; 37 and 35 px), transform lengths with factors 4,
# 3 and 2 only (37 + 7 -> 48, 35 + 7 -> 48; 16 + 14 -> 32 at dilation 2; 20 + 31 -> 54), k from 3 to
# 63, and Cmid / Cout above and below the paper's 21.
FFT_CASES = [
    (2, 40, 21, 21, 37, 35, 15, 1),
    (1, 16, 8, 3, 16, 16, 15, 2),
    (1, 33, 24, 17, 20, 64, 63, 1),
    (3, 17, 5, 1, 9, 48, 3, 1),
    (1, 64, 70, 64, 32, 18, 9, 3),
]


@pytest.mark.skipif(not fastseg._backends.EXTENSION_LOADED, reason="fastseg._C not loaded")
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", FFT_CASES, ids=_case_id)
def test_cpu_fft_route(case, dtype, layout, poison):
    pr = _problem(case, seed=3)
    cast = lambda t: t.to(dtype)
    for biases in (pr["biases"], [None, None, pr["biases"][2], None]):
        out = torch.ops.fastseg.gcn_conv2d(
            _layout(cast(pr["x"]), layout), *map(cast, pr["weights"]), *[None if b is None else cast(b) for b in biases],
            pr["dilation"], "fft",
        )
        rounded = lambda t: None if t is None else t.to(dtype).double()
        expected = _four_convs(rounded(pr["x"]), *map(rounded, pr["weights"]), *map(rounded, biases), pr["dilation"])
        assert_relative_close(out, expected, dtype)
        assert out.dtype == dtype
        assert out.is_contiguous(memory_format=torch.channels_last if layout == "channels_last" else torch.contiguous_format)


@pytest.mark.skipif(not fastseg._backends.EXTENSION_LOADED, reason="fastseg._C not loaded")
def test_cpu_fft_route_sees_changed_weights():
    # The weights' spectra are kept between calls: a change in place must not reuse them.
    pr = _problem(FFT_CASES[0], seed=5)
    x = pr["x"].float()
    ws, bs = [w.float() for w in pr["weights"]], [b.float() for b in pr["biases"]]
    op = lambda: torch.ops.fastseg.gcn_conv2d(x, *ws, *bs, 1, "fft")
    first = op()
    assert_relative_close(first, _four_convs(x.double(), *[t.double() for t in ws + bs], 1), torch.float32)
    assert torch.equal(op(), first)
    for w in ws:
        with torch.no_grad():
            w[0, 0].mul_(-3)
        assert_relative_close(op(), _four_convs(x.double(), *[t.double() for t in ws + bs], 1), torch.float32)


@pytest.mark.skipif(not fastseg._backends.EXTENSION_LOADED, reason="fastseg._C not loaded")
def test_cpu_fft_route_under_autograd():
    # 'auto' picks the FFT route here (16 channels, k = 15 on 20x24); with weights that require grad
    # it passes 'auto_training' (spectra not kept), and the gradients go through ATen's convolutions.
    pr = _problem((2, 16, 21, 5, 20, 24, 15, 1), seed=6)
    f32 = lambda t: t.float().requires_grad_()
    x, ws, bs = f32(pr["x"]), [f32(w) for w in pr["weights"]], [f32(b) for b in pr["biases"]]
    out = fastseg.gcn_conv2d(x, *ws, *bs)
    ref_args = [t.detach().double().requires_grad_() for t in [x, *ws, *bs]]
    ref = _four_convs(*ref_args, 1)
    assert_relative_close(out.detach(), ref.detach(), torch.float32)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    out.backward(grad)
    ref.backward(grad.double())
    for mine, theirs in zip([x, *ws, *bs], ref_args):
        assert_relative_close(mine.grad, theirs.grad, torch.float32)


# The frequency-domain backward (fastseg/ops/gcn.py, _branch_backward_fft) on every FFT_CASES shape,
# forced where the rule would pick ATen's (k = 3, 9x48), in every dtype it serves and both layouts,
# with every gradient or only some of them.
@pytest.mark.skipif(not fastseg._backends.EXTENSION_LOADED, reason="fastseg._C not loaded")
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", FFT_CASES, ids=_case_id)
def test_cpu_fft_backward(case, dtype, layout, monkeypatch):
    monkeypatch.setattr(gcn_ops, "_fft_backward_pays", lambda *args: True)
    pr = _problem(case, seed=7)
    tensors = [pr["x"], *pr["weights"], *pr["biases"]]
    for wanted in (range(9), [0], [1, 4, 5], [2, 3, 6, 7]):
        leaves = [_layout(t.to(dtype), layout) if i == 0 else t.to(dtype) for i, t in enumerate(tensors)]
        for i in wanted:
            leaves[i].requires_grad_()
        out = fastseg.gcn_conv2d(*leaves, dilation=pr["dilation"])
        grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
        out.backward(grad.to(dtype))
        ref_leaves = [t.detach().double().requires_grad_(i in wanted) for i, t in enumerate(leaves)]
        ref = _four_convs(*ref_leaves, pr["dilation"])
        ref.backward(grad.to(dtype).double())
        for i in range(9):
            if i not in wanted:
                assert leaves[i].grad is None
                continue
            assert leaves[i].grad.dtype == dtype
            assert_relative_close(leaves[i].grad, ref_leaves[i].grad, dtype)
        if 0 in wanted:
            memory_format = torch.channels_last if layout == "channels_last" else torch.contiguous_format
            assert leaves[0].grad.is_contiguous(memory_format=memory_format)


@pytest.mark.skipif(not fastseg._backends.EXTENSION_LOADED, reason="fastseg._C not loaded")
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", [(2, 3, 2, 2, 5, 4, 3, 2), (1, 2, 3, 2, 3, 6, 9, 1)], ids=_case_id)
def test_fft_backward_gradcheck(case, layout, monkeypatch):
    # In float64 the frequency-domain backward is exact up to rounding: gradcheck holds it to the
    # numerical Jacobian, maps smaller than the kernel included.
    monkeypatch.setattr(gcn_ops, "_fft_backward_pays", lambda *args: True)
    pr = _problem(case, seed=4)
    x = _layout(pr["x"], layout).requires_grad_()
    ws = [w.clone().requires_grad_() for w in pr["weights"]]
    bs = [b.clone().requires_grad_() for b in pr["biases"]]
    gcn = lambda *a: fastseg.gcn_conv2d(*a, dilation=pr["dilation"], backend="cpp")
    assert torch.autograd.gradcheck(gcn, (x, *ws, *bs))


@pytest.mark.skipif(not fastseg._backends.EXTENSION_LOADED, reason="fastseg._C not loaded")
@pytest.mark.parametrize("case", [(1, 3, 21, 21, 20, 64, 41, 1), (2, 4, 17, 5, 64, 20, 39, 1),
                                  (1, 30, 9, 9, 10, 70, 37, 1), (2, 64, 21, 21, 16, 16, 15, 4)], ids=_case_id)
@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_backward_kernel_longer_than_map(case, backend):
    # Shapes on which oneDNN's convolution backward corrupted the heap or returned garbage (eager
    # PyTorch 2.14 too: a padding argument with a kernel longer than the map): the backward pads
    # the map itself there (the first two cases, few channels, and the last, whose cut kernel of 7
    # taps does not pay in the frequency domain) or runs in the frequency domain (the third).
    pr = _problem(case, seed=8)
    for _ in range(3):
        leaves = [t.float().requires_grad_() for t in [pr["x"], *pr["weights"], *pr["biases"]]]
        out = fastseg.gcn_conv2d(*leaves, dilation=pr["dilation"], backend=backend)
        grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
        out.backward(grad.float())
        ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
        _four_convs(*ref_leaves, pr["dilation"]).backward(grad)
        for mine, theirs in zip(leaves, ref_leaves):
            assert_relative_close(mine.grad, theirs.grad, torch.float32)


@pytest.mark.parametrize("hooked", ["conv_l1", "conv_r2", "global"])
def test_hooked_layer_trains_with_kernel_longer_than_map(hooked):
    # A hook makes GlobalConv2d call its own convolutions (under HandPadding), whose 39 x 1 kernels
    # reach past this 20 x 64 map: padded by hand, not by oneDNN (which crashed there).
    torch.manual_seed(0)
    layer = fastseg.nn.GlobalConv2d(24, 21, k=39).train()
    convs = [copy.deepcopy(c).double() for c in (layer.conv_l1, layer.conv_l2, layer.conv_r1, layer.conv_r2)]
    ref = torch.nn.ModuleList(convs)
    calls = []
    hook = lambda *_: calls.append(1)  # noqa: E731
    x = torch.randn(2, 24, 20, 64)
    if hooked == "global":
        handle = torch.nn.modules.module.register_module_forward_hook(hook)
    else:
        handle = getattr(layer, hooked).register_forward_hook(hook)
    try:
        assert_trains_like_float64(layer, ref, lambda: layer(x),
                                   lambda: convs[1](convs[0](x.double())) + convs[3](convs[2](x.double())))
    finally:
        handle.remove()
    assert calls


def test_autocast_layer_trains_with_kernel_longer_than_map():
    # Under CPU autocast GlobalConv2d runs its own convolutions (autocast casts them), under
    # HandPadding: bfloat16 training steps on the hooked test's shape, against float64.
    torch.manual_seed(0)
    layer = fastseg.nn.GlobalConv2d(24, 21, k=39).train()
    convs = [copy.deepcopy(c).double() for c in (layer.conv_l1, layer.conv_l2, layer.conv_r1, layer.conv_r2)]
    x = torch.randn(2, 24, 20, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    grad = torch.randn(out.shape, dtype=torch.float64)
    out.float().backward(grad.float())
    expected = convs[1](convs[0](x.double())) + convs[3](convs[2](x.double()))
    expected.backward(grad)
    assert_relative_close(out.detach(), expected.detach(), torch.bfloat16)
    for mine, theirs in zip(layer.parameters(), torch.nn.ModuleList(convs).parameters(), strict=True):
        assert_relative_close(mine.grad, theirs.grad, torch.bfloat16)


# (B, Cin, Cmid, Cout, H, W, k, dilation) whose dilation leaves taps that touch no pixel: none live
# but the centre, two of seven each side, and a map taller than wide.
DEAD_TAP_CASES = [(1, 6, 4, 3, 16, 16, 15, 500), (2, 5, 3, 21, 7, 12, 15, 4), (1, 3, 2, 2, 9, 5, 9, 3)]


def test_dead_taps_rule():
    w = lambda *shape: torch.empty(*shape)  # noqa: E731
    trim = lambda H, W, k, d: gcn_ops._without_dead_taps(  # noqa: E731
        w(2, 3, k, 1), w(4, 2, 1, k), w(2, 3, 1, k), w(4, 2, k, 1), d, H, W)
    kept = trim(16, 16, 15, 500)
    assert [tuple(t.shape) for t in kept[:4]] == [(2, 3, 3, 1), (4, 2, 1, 3), (2, 3, 1, 3), (4, 2, 3, 1)]
    assert kept[4] == 16  # dilation max(H, W): the outer two as dead as before
    assert trim(7, 12, 15, 4)[0].shape[2] == 5 and trim(7, 12, 15, 4)[4] == 4  # (12 - 1) // 4 = 2 each side
    assert trim(16, 16, 15, 1)[0].shape[2] == 15  # every tap touches the map
    assert trim(16, 16, 31, 1)[0].shape[2] == 31  # 15 each side, all live on 16 pixels


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("case", DEAD_TAP_CASES, ids=_case_id)
def test_dead_taps_left_out(case, backend, device, poison):
    # The op leaves out the taps that meet only zero padding: outputs and every gradient (zero for
    # those taps) must be the four convolutions' with the whole kernel.
    if (backend, device) == ("triton", "cpu") and case != DEAD_TAP_CASES[1]:
        pytest.skip("one case under the interpreter (slow)")
    pr = _problem(case, seed=11)
    d = pr["dilation"]
    for dtype in (torch.float32, torch.float64):
        if backend == "triton" and dtype == torch.float64:
            continue
        for layout in LAYOUTS:
            leaves = [_layout(pr["x"], layout)] + pr["weights"] + pr["biases"]
            leaves = [t.detach().to(device=device, dtype=dtype).requires_grad_() for t in leaves]
            out = fastseg.gcn_conv2d(*leaves, dilation=d, backend=backend)
            grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
            out.backward(grad.to(device=device, dtype=dtype))
            ref_leaves = [t.detach().cpu().double().requires_grad_() for t in leaves]
            expected = _four_convs(*ref_leaves, d)
            expected.backward(grad)
            assert_relative_close(out.detach().cpu(), expected.detach(), dtype, _tolerance(backend, dtype))
            for mine, theirs in zip(leaves, ref_leaves):
                assert_relative_close(mine.grad.cpu(), theirs.grad, dtype, _tolerance(backend, dtype))


@pytest.mark.skipif(not fastseg._backends.EXTENSION_LOADED, reason="fastseg._C not loaded")
def test_dead_taps_gradcheck():
    pr = _problem((1, 2, 2, 2, 4, 6, 7, 4), seed=12)  # (6 - 1) // 4 = 1: three of seven taps live
    leaves = [t.requires_grad_() for t in [pr["x"], *pr["weights"], *pr["biases"]]]
    assert torch.autograd.gradcheck(lambda *a: fastseg.gcn_conv2d(*a, dilation=4, backend="cpp"), leaves)


def test_fft_backward_rule():
    # The forward's rule (csrc/cpu/gcn.cpp): CPU, not float64, Cin >= 6, fft_saving >= 3.
    pays = gcn_ops._fft_backward_pays
    assert pays(torch.empty(1, 16, 20, 24), 15, 1)
    assert pays(torch.empty(1, 2048, 16, 16, dtype=torch.bfloat16), 15, 1)
    assert not pays(torch.empty(1, 16, 20, 24, dtype=torch.float64), 15, 1)
    assert not pays(torch.empty(1, 5, 20, 24), 15, 1)
    assert not pays(torch.empty(1, 16, 16, 16), 7, 1)
    # A kernel reaching past the map no longer forces it (its ATen backward pads the map itself).
    assert not pays(torch.empty(1, 3, 20, 64), 41, 1) and not pays(torch.empty(1, 3, 64, 7), 5, 2)
    assert not pays(torch.empty(1, 16, 20, 24, device="meta"), 15, 1)


def test_poison_fixture_poisons(poison):
    assert torch.isnan(torch.empty(64)).all()


# --- gradients and custom ops ----------------------------------------------------------------------


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_gradcheck(layout, backend, device):
    if (backend, device) == ("triton", "cpu") and layout == "channels_last":
        pytest.skip("one layout under the interpreter (slow); both on the GPU")
    pr = _problem((2, 3, 2, 2, 5, 4, 3, 2), seed=3)
    leaf = lambda t: t.to(device).requires_grad_()
    x = _layout(pr["x"].to(device), layout).requires_grad_()
    ws, bs = [leaf(w) for w in pr["weights"]], [leaf(b) for b in pr["biases"]]
    gcn = lambda *a: fastseg.gcn_conv2d(*a, dilation=2, backend=backend)
    if (backend, device) == ("triton", "cpu"):
        # Each interpreted forward takes seconds: a projected (fast-mode) check over a few inputs;
        # the backward is the same ATen code that the cpp case checks in full.
        some = lambda x, w_r2, b_l2: gcn(x, *ws[:3], w_r2, bs[0], b_l2, *bs[2:])
        assert torch.autograd.gradcheck(some, (x, ws[3], bs[1]), fast_mode=True)
        return
    assert torch.autograd.gradcheck(gcn, (x, *ws, *bs))
    # Some biases absent, some inputs without gradients.
    partial = lambda x, w_l2, b_r1: fastseg.gcn_conv2d(x, ws[0].detach(), w_l2, ws[2].detach(), ws[3].detach(),
                                                       None, None, b_r1, None, backend=backend)
    assert torch.autograd.gradcheck(partial, (x, ws[1], bs[2]))


def _op_for(backend):
    return {"triton": torch.ops.fastseg.gcn_conv2d_triton, "cudnn": torch.ops.fastseg.gcn_conv2d_cudnn,
            "cpp": getattr(torch.ops.fastseg, "gcn_conv2d", None)}[backend]


def test_cuda_auto_rule():
    # Selection only: float32 by the taps route where the input has at least as many channels as
    # pixels (and the taps' products stay small), else eager's four convolutions.
    rule = fastseg.ops.gcn.cuda_backend
    assert rule(torch.float16, 2048, 21, 21, 15, 16 * 16) == "reference"
    assert rule(torch.bfloat16, 256, 21, 21, 15, 128 * 128) == "reference"
    assert rule(torch.float32, 256, 21, 21, 15, 128 * 128) == "reference"
    assert rule(torch.float32, 256, 256, 256, 15, 16 * 16) == "reference"  # products 30x the input
    expected = "triton" if fastseg._backends.unavailable_reason("triton", "cuda") is None else "reference"
    assert rule(torch.float32, 2048, 21, 21, 15, 16 * 16) == expected


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_padded_route_matches_and_trains(dtype, layout):
    # The cudnn route's padding and final add (GlobalConv2d keeps the padded weights on CUDA), on
    # any device: the padded channels stay zero and never reach the output; gradients flow.
    pr = _problem(CASES[3], seed=7)
    cast = lambda t: t.to(dtype)
    x = _layout(cast(pr["x"]), layout)
    leaves = [cast(t).requires_grad_() for t in pr["weights"] + pr["biases"]]
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    padded = gcn_ops.pad_channels(*leaves, 8, fmt)
    assert padded[0].shape[0] == 24 and padded[1].shape[:2] == (24, 24)
    out = gcn_ops.run_padded(x, padded, 21, pr["dilation"])
    rounded = lambda t: t.to(dtype).double()
    expected = _four_convs(rounded(pr["x"]), *map(rounded, pr["weights"]), *map(rounded, pr["biases"]), pr["dilation"])
    assert out.shape == expected.shape and out.is_contiguous(memory_format=fmt)
    assert_relative_close(out.detach(), expected, dtype)
    out.float().square().mean().backward()
    assert all(t.grad is not None and t.grad.shape == t.shape for t in leaves)


@pytest.mark.parametrize("backend,device", COMPILED)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_opcheck(layout, backend, device):
    if (backend, device) == ("triton", "cpu") and layout == "channels_last":
        pytest.skip("one layout under the interpreter (slow); both on the GPU")
    pr = _problem((2, 3, 4, 2, 6, 5, 3, 1), seed=4)
    f32 = lambda t: t.float().to(device)
    x = _layout(f32(pr["x"]), layout).requires_grad_()
    ws = [f32(w).requires_grad_() for w in pr["weights"]]
    bs = [f32(b) for b in pr["biases"]]
    bs[0].requires_grad_()
    torch.library.opcheck(_op_for(backend), (x, *ws, *bs, 1))
    torch.library.opcheck(_op_for(backend), (x, *ws, None, None, None, None, 2))
    if backend == "triton":
        torch.library.opcheck(_op_for(backend), (x, *ws, *bs, 1, "taps"))
        torch.library.opcheck(_op_for(backend), (x, *ws, *bs, 2, "implicit_gemm"))
    if backend == "cpp":  # the other routes too (these shapes pick the conv route)
        torch.library.opcheck(_op_for(backend), (x, *ws, *bs, 1, "gemm"))
        torch.library.opcheck(_op_for(backend), (x, *ws, *bs, 1, "fft"))


@pytest.mark.parametrize("backend,device", [p for p in COMPILED if p.values[0] == "cpp"])
def test_torch_compile_fullgraph(backend, device):
    torch._dynamo.reset()
    pr = _problem(CASES[1])
    x = pr["x"].float().to(device)
    ws, bs = [w.float().to(device) for w in pr["weights"]], [b.float().to(device) for b in pr["biases"]]

    @torch.compile(fullgraph=True)
    def block(x):
        return fastseg.gcn_conv2d(x * 2, *ws, *bs, backend=backend) + 1

    expected = _four_convs(x * 2, *ws, *bs, 1) + 1
    assert_relative_close(block(x).cpu(), expected.cpu(), torch.float32)


@pytest.mark.skipif(not fastseg._backends.EXTENSION_LOADED, reason="fastseg._C not loaded")
def test_fft_backward_opcheck_and_compiled_training():
    # A shape whose backward runs in the frequency domain: opcheck (its AOT checks run the
    # backward), and gradients of a compiled training step equal the eager ones.
    torch._dynamo.reset()
    pr = _problem((2, 16, 21, 5, 20, 24, 15, 1), seed=6)
    leaves = [t.float().requires_grad_() for t in [pr["x"], *pr["weights"], *pr["biases"]]]
    assert gcn_ops._fft_backward_pays(leaves[0], 15, 1)
    torch.library.opcheck(torch.ops.fastseg.gcn_conv2d.default, (*leaves, 1, "auto_training"))
    step = lambda *a: fastseg.gcn_conv2d(*a).square().sum()  # noqa: E731
    torch.compile(step, fullgraph=True)(*leaves).backward()
    compiled = [t.grad for t in leaves]
    for t in leaves:
        t.grad = None
    step(*leaves).backward()
    for mine, eager in zip(compiled, leaves):
        assert_relative_close(mine, eager.grad, torch.float32)


# --- layers -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend,device", [p for p in BACKENDS if p.values[0] != "triton"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_global_conv_matches_plain_pytorch(layout, backend, device):
    torch.manual_seed(0)
    gcn = fastseg.nn.GlobalConv2d(6, 21, k=15, backend=backend).to(device)
    assert gcn.conv_l1.weight.shape == (21, 6, 15, 1) and gcn.conv_r2.weight.shape == (21, 21, 15, 1)
    x = _layout(torch.randn(2, 6, 10, 7), layout).to(device).requires_grad_()
    out = gcn(x)
    plain = gcn.conv_l2(gcn.conv_l1(x)) + gcn.conv_r2(gcn.conv_r1(x))  # nn.Conv2d forwards, same weights
    assert_relative_close(out.detach().cpu(), plain.detach().cpu(), torch.float32)
    # Training: the same gradients as the plain block for x and every parameter.
    g = torch.randn_like(out)
    ours = torch.autograd.grad(out, [x, *gcn.parameters()], g)
    theirs = torch.autograd.grad(plain, [x, *gcn.parameters()], g)
    for a, b in zip(ours, theirs):
        assert_relative_close(a.cpu(), b.cpu(), torch.float32)
    narrow = fastseg.nn.GlobalConv2d(4, 3, k=7, mid_ch=5, dilation=2, bias=False)
    assert narrow.conv_l1.weight.shape == (5, 4, 7, 1) and narrow.conv_l1.bias is None
    assert "k=7, dilation=2" in repr(narrow)
    y = torch.randn(1, 4, 9, 9)
    expected = narrow.conv_l2(narrow.conv_l1(y)) + narrow.conv_r2(narrow.conv_r1(y))
    assert_relative_close(narrow(y).detach(), expected.detach(), torch.float32)


@pytest.mark.parametrize("backend,device", [p for p in BACKENDS if p.values[0] != "triton"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_boundary_refinement_matches_plain_pytorch(layout, backend, device):
    torch.manual_seed(1)
    br = fastseg.nn.BoundaryRefinement(21, backend=backend).to(device)
    x = _layout(torch.randn(2, 21, 9, 11), layout).to(device).requires_grad_()
    out = br(x)
    plain = x + br.conv2(F.relu(br.conv1(x)))
    assert_relative_close(out.detach().cpu(), plain.detach().cpu(), torch.float32)
    assert out.is_contiguous(memory_format=torch.channels_last) == (layout == "channels_last")
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, [x, *br.parameters()], g), torch.autograd.grad(plain, [x, *br.parameters()], g)):
        assert_relative_close(a.cpu(), b.cpu(), torch.float32)


@pytest.mark.parametrize("kwargs,match", [
    (dict(k=14), "k must be an odd int >= 3, got 14"),
    (dict(dilation=0), "dilation must be an int >= 1, got 0"),
    (dict(dilation=1.5), "dilation must be an int >= 1, got 1.5"),
    (dict(mid_ch=0), "mid_ch must be an int >= 1 or None, got 0"),
    (dict(backend="bogus"), "backend must be 'auto' or one of .*, got 'bogus'"),
])
def test_global_conv_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match="GlobalConv2d: " + match):
        fastseg.nn.GlobalConv2d(4, 3, **dict(dict(k=5), **kwargs))


@pytest.mark.parametrize("build,name", [
    (lambda: fastseg.nn.AtrousConvBNReLU(4, 4, backend="bogus"), "AtrousConvBNReLU"),
    (lambda: fastseg.nn.ASPP(4, 4, backend="aten"), "ASPP"),
    (lambda: fastseg.nn.BoundaryRefinement(4, backend="gpu"), "BoundaryRefinement"),
    (lambda: fastseg.nn.MaxUnpool2d(2, backend="cudnn"), "MaxUnpool2d"),
    (lambda: fastseg.nn.UnpoolConvBNReLU(4, 4, backend=None), "UnpoolConvBNReLU"),
])
def test_layers_check_their_backend_when_built(build, name):
    # A misspelt backend is named where the layer is made, not at its first call.
    with pytest.raises(ValueError, match=f"{name}: backend must be 'auto' or one of"):
        build()


# --- bad input ---------------------------------------------------------------------------------


def _args():
    x = torch.randn(2, 4, 9, 9)
    return x, [torch.randn(5, 4, 7, 1), torch.randn(3, 5, 1, 7), torch.randn(5, 4, 1, 7), torch.randn(3, 5, 7, 1)]


def _with(ws, i, w):
    ws = list(ws)
    ws[i] = w
    return ws


BAD_CALLS = [
    ("x not a tensor", lambda x, ws: ([[1.0]], *ws), {}, TypeError, "x must be a torch.Tensor"),
    ("2-D x", lambda x, ws: (x[0, 0], *ws), {}, ValueError, "x must be 3-D or 4-D, got 2-D"),
    ("integer x", lambda x, ws: (x.long(), *ws), {}, TypeError, "x must have dtype"),
    ("3-D w_l2", lambda x, ws: (x, *_with(ws, 1, ws[1][0])), {}, ValueError, "w_l2 must be 4-D, got 3-D"),
    ("even k", lambda x, ws: (x, torch.randn(5, 4, 6, 1), torch.randn(3, 5, 1, 6), torch.randn(5, 4, 1, 6),
                              torch.randn(3, 5, 6, 1)), {}, ValueError, r"k must be odd and >= 3.*got k = 6"),
    ("k = 1", lambda x, ws: (x, *[w[..., :1, :1] for w in ws]), {}, ValueError, "got k = 1"),
    ("w_l1 not k x 1", lambda x, ws: (x, *_with(ws, 0, torch.randn(5, 4, 1, 7))), {}, ValueError,
     r"w_l1 has shape \(5, 4, 1, 7\), expecting \(Cmid, Cin, k, 1\)"),
    ("w_l1 Cin mismatch", lambda x, ws: (x, *_with(ws, 0, torch.randn(5, 3, 7, 1))), {}, ValueError,
     r"w_l1 has shape \(5, 3, 7, 1\), expecting \(Cmid, Cin, k, 1\) = \(5, 4, 7, 1\)"),
    ("w_l2 Cmid mismatch", lambda x, ws: (x, *_with(ws, 1, torch.randn(3, 6, 1, 7))), {}, ValueError,
     r"w_l2 has shape \(3, 6, 1, 7\), expecting \(Cout, Cmid, 1, k\) = \(3, 5, 1, 7\)"),
    ("w_r1 Cmid differs from the left branch", lambda x, ws: (x, *_with(ws, 2, torch.randn(6, 4, 1, 7))), {}, ValueError,
     r"w_r1 has shape \(6, 4, 1, 7\), expecting \(Cmid, Cin, 1, k\) = \(5, 4, 1, 7\)"),
    ("w_r1 k differs", lambda x, ws: (x, *_with(ws, 2, torch.randn(5, 4, 1, 9))), {}, ValueError,
     r"w_r1 has shape \(5, 4, 1, 9\)"),
    ("w_r2 Cout differs from the left branch", lambda x, ws: (x, *_with(ws, 3, torch.randn(4, 5, 7, 1))), {}, ValueError,
     r"w_r2 has shape \(4, 5, 7, 1\), expecting \(Cout, Cmid, k, 1\) = \(3, 5, 7, 1\)"),
    ("w_r2 transposed", lambda x, ws: (x, *_with(ws, 3, torch.randn(3, 5, 1, 7))), {}, ValueError,
     r"w_r2 has shape \(3, 5, 1, 7\)"),
    ("mixed dtypes", lambda x, ws: (x, *_with(ws, 2, ws[2].double())), {}, TypeError,
     "w_r1 has dtype float64 but x has dtype float32"),
    ("mixed devices", lambda x, ws: (x, *_with(ws, 3, ws[3].to("meta"))), {}, ValueError, "x is on cpu but w_r2 is on meta"),
    ("b_l1 wrong length", lambda x, ws: (x, *ws, torch.ones(3)), {}, ValueError, r"b_l1 has shape \(3,\), expecting \(Cmid = 5,\)"),
    ("b_r2 wrong length", lambda x, ws: (x, *ws, None, None, None, torch.ones(5)), {}, ValueError,
     r"b_r2 has shape \(5,\), expecting \(Cout = 3,\)"),
    ("b_l2 wrong dtype", lambda x, ws: (x, *ws, None, torch.ones(3, dtype=torch.float64)), {}, TypeError,
     "b_l2 has dtype float64 but x has dtype float32"),
    ("b_r1 on another device", lambda x, ws: (x, *ws, None, None, torch.ones(5, device="meta")), {}, ValueError,
     "x is on cpu but b_r1 is on meta"),
    ("zero dilation", lambda x, ws: (x, *ws), dict(dilation=0), ValueError, "dilation must be >= 1, got 0"),
    ("pair dilation", lambda x, ws: (x, *ws), dict(dilation=(2, 2)), TypeError, "dilation must be an int"),
    ("empty map", lambda x, ws: (x[..., :0], *ws), {}, ValueError, "x has an empty spatial dimension"),
    ("no input channels", lambda x, ws: (x[:, :0], ws[0][:, :0], ws[1], ws[2][:, :0], ws[3]), {}, ValueError,
     r"x has no channels: shape \(2, 0, 9, 9\)"),
    ("no output channels", lambda x, ws: (x, ws[0], ws[1][:0], ws[2], ws[3][:0]), {}, ValueError,
     r"w_l2 has shape \(0, 5, 1, 7\): no output channels"),
    ("bad backend", lambda x, ws: (x, *ws), dict(backend="fast"), ValueError, "backend must be 'auto' or one of"),
    ("cuda backend on cpu", lambda x, ws: (x, *ws), dict(backend="cuda"), ValueError, "has no 'cuda' backend"),
]


@pytest.mark.parametrize("description,build,kwargs,error,message", BAD_CALLS, ids=[c[0] for c in BAD_CALLS])
def test_bad_input(description, build, kwargs, error, message):
    with pytest.raises(error, match=message):
        fastseg.gcn_conv2d(*build(*_args()), **kwargs)


@pytest.mark.skipif(not fastseg._backends.EXTENSION_LOADED, reason="fastseg._C not loaded")
def test_compiled_op_checks_its_arguments():
    x, (w_l1, w_l2, w_r1, w_r2) = _args()
    op = torch.ops.fastseg.gcn_conv2d
    with pytest.raises(ValueError, match="input must be 4-D"):
        op(x[0], w_l1, w_l2, w_r1, w_r2, None, None, None, None, 1)
    with pytest.raises(ValueError, match="input and w_l1 must have channels"):
        op(x[:, :0], w_l1[:, :0], w_l2, w_r1[:, :0], w_r2, None, None, None, None, 1)
    with pytest.raises(ValueError, match="k must be odd"):
        op(x, w_l1[:, :, :6], w_l2[..., :6], w_r1[..., :6], w_r2[:, :, :6], None, None, None, None, 1)
    with pytest.raises(ValueError, match=r"w_r2 has shape \[4, 5, 7, 1\], expecting \(3, 5, 7, 1\)"):
        op(x, w_l1, w_l2, w_r1, torch.randn(4, 5, 7, 1), None, None, None, None, 1)
    with pytest.raises(ValueError, match=r"b_l2 has shape \[2\], expecting \(3\)"):
        op(x, w_l1, w_l2, w_r1, w_r2, None, torch.ones(2), None, None, 1)
    with pytest.raises(TypeError, match="w_l2 has dtype Double but input has dtype Float"):
        op(x, w_l1, w_l2.double(), w_r1, w_r2, None, None, None, None, 1)
    with pytest.raises(ValueError, match="dilation must be >= 1"):
        op(x, w_l1, w_l2, w_r1, w_r2, None, None, None, None, 0)
    with pytest.raises(ValueError, match="algorithm must be 'auto', 'auto_training', 'gemm', 'conv' or 'fft'"):
        op(x, w_l1, w_l2, w_r1, w_r2, None, None, None, None, 1, "winograd")


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_one_middle_channel_channels_last_and_strided_biases(backend, device, poison):
    # A (B, 1, H, W) middle map is NCHW- and channels_last-contiguous at once: the output must still
    # take x's format (the Triton implicit-GEMM route returned NCHW). The biases are views (a slice,
    # an expanded scalar), which the Triton launcher read at unit stride.
    B, Cin, Cm, Co, H, W, k = 2, 3, 1, 5, 6, 7, 7
    g = torch.Generator().manual_seed(21)
    rand = lambda *shape, fan=1: torch.randn(*shape, generator=g, dtype=torch.float64) / fan ** 0.5  # noqa: E731
    x = rand(B, Cin, H, W)
    ws = [rand(Cm, Cin, k, 1, fan=Cin * k), rand(Co, Cm, 1, k, fan=k), rand(Cm, Cin, 1, k, fan=Cin * k),
          rand(Co, Cm, k, 1, fan=k)]
    b_l1, b_l2_twice, b_r1 = rand(Cm), rand(2 * Co), rand(Cm)
    f32 = lambda t: t.to(device, torch.float32)  # noqa: E731
    # The views made after the cast (a cast of a view is contiguous).
    bs = [f32(b_l1), f32(b_l2_twice)[::2], f32(b_r1), torch.full((1,), 0.75, device=device).expand(Co)]
    expected = _four_convs(x, *ws, *(b.double().cpu() for b in bs), 1)
    xl = f32(x).contiguous(memory_format=torch.channels_last)
    if backend == "triton":
        outs = [torch.ops.fastseg.gcn_conv2d_triton(xl, *map(f32, ws), *bs, 1, algorithm)
                for algorithm in ("taps", "implicit_gemm")]
    else:
        outs = [fastseg.gcn_conv2d(xl, *map(f32, ws), *bs, backend=backend)]
    for out in outs:
        assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
        assert_relative_close(out.cpu(), expected, torch.float32, _tolerance(backend, torch.float32))
