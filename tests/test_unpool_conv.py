"""fastseg.unpool_conv2d on every backend against F.max_unpool2d + F.conv2d + F.batch_norm + F.relu in
float64 (every band split of the C++ kernel, overlapping and gapped poolings, out-of-window and
repeated indices), its gradients and custom ops, nn.UnpoolConvBNReLU against plain PyTorch, bad input."""
import copy

import pytest
import torch
import torch.nn.functional as F

import fastseg
from common import assert_relative_close, assert_trains_like_float64, backend_params

BACKENDS = backend_params(("reference", "cpp", "triton", "cudnn"))
COMPILED = [p for p in BACKENDS if p.values[0] not in ("reference", "cudnn")]  # cudnn: no op of its own
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
LAYOUTS = ["nchw", "channels_last"]
TRITON_FP32_TOLERANCE = 5e-4  # a float32 tl.dot (tf32x3 with TF32 off, as conftest sets)

# (B, C, O, H, W, pool kernel, pool stride, pool padding, conv kernel, conv padding, dilation):
# H x W is the pooled-from (and unpooled) size. SegNet's 2x2/2 on even and odd sizes, batch 1 and
# 3, dilation 2, a 1x1 and a 3x1 convolution, 'valid', overlapping 3x3/2 pooling with padding
# (repeated indices), 2x2/3 pooling (rows in no window), rates whose outer taps meet only padding.
CASES = [
    (1, 3, 4, 8, 8, 2, 2, 0, 3, "same", 1),
    (3, 4, 5, 9, 11, 2, 2, 0, 3, "same", 1),
    (1, 3, 2, 10, 7, 2, 2, 0, 3, "same", 2),
    (2, 5, 3, 7, 6, 2, 2, 0, 1, 0, 1),
    (1, 3, 4, 9, 8, 2, 2, 0, (3, 1), (1, 0), 1),
    (1, 2, 3, 8, 9, 2, 2, 0, 3, "valid", 1),
    (3, 2, 3, 7, 9, 3, 2, 1, 3, 1, 1),
    (1, 3, 2, 9, 10, 2, 3, 0, 3, "same", 1),
    (2, 3, 4, 8, 7, 2, 2, 0, 3, "same", 8),  # rate 8 on 8 x 7: only the centre tap meets the map
    (1, 3, 2, 6, 9, 2, 2, 0, 5, "same", 3),  # two of five rows dead, every column live
]
CASE_IDS = [f"{c[0]}x{c[1]}x{c[2]}x{c[3]}x{c[4]}-pool{c[5]}s{c[6]}p{c[7]}-k{c[8]}p{c[9]}d{c[10]}".replace(" ", "")
            for c in CASES]


def _layout(t, layout):
    return t.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else t.contiguous()


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def _conv_padding(case):
    k, p, d = _pair(case[8]), case[9], _pair(case[10])
    if p == "same":
        return tuple(dd * (kk - 1) // 2 for kk, dd in zip(k, d))
    return (0, 0) if p == "valid" else _pair(p)


def _problem(case, seed=0):
    """Float64 pooled values and indices, conv weights, BatchNorm folded into scale/shift, a residual."""
    B, C, O, H, W, pk, ps, pp, k, p, d = case
    gen = torch.Generator().manual_seed(seed)
    kH, kW = _pair(k)
    x = torch.randn(B, C, H, W, generator=gen, dtype=torch.float64)
    values, indices = F.max_pool2d(x, pk, ps, pp, return_indices=True)
    w = torch.randn(O, C, kH, kW, generator=gen, dtype=torch.float64) / (C * kH * kW) ** 0.5
    bias = torch.randn(O, generator=gen, dtype=torch.float64)
    scale = torch.rand(O, generator=gen, dtype=torch.float64) + 0.5
    shift = torch.randn(O, generator=gen, dtype=torch.float64)
    Ho, Wo = [n + 2 * pd - dd * (kk - 1) for n, pd, dd, kk in zip((H, W), _conv_padding(case), _pair(d), (kH, kW))]
    residual = torch.randn(B, O, Ho, Wo, generator=gen, dtype=torch.float64)
    return dict(values=values, indices=indices, w=w, bias=bias, scale=scale, shift=shift, residual=residual)


def _kwargs(case):
    B, C, O, H, W, pk, ps, pp, k, p, d = case
    return dict(kernel_size=pk, stride=ps, pool_padding=pp, output_size=(H, W), padding=p, dilation=d)


def _expected(pr, case, dtype):
    """The float64 result of the eager chain for the inputs as rounded to ``dtype``."""
    r = {k: v.to(dtype).double() if v.is_floating_point() else v for k, v in pr.items()}
    B, C, O, H, W, pk, ps, pp, k, p, d = case
    # fastseg's plain-PyTorch unpooling (tested against F.max_unpool2d in test_unpool.py): ATen's
    # has no deterministic mode, which the poison fixture turns on.
    unpooled = fastseg.max_unpool2d(r["values"], r["indices"], pk, ps, pp, output_size=(H, W), backend="reference")
    conv = F.conv2d(unpooled, r["w"], r["bias"], 1, _conv_padding(case), d)
    return F.relu(conv * r["scale"].view(1, -1, 1, 1) + r["shift"].view(1, -1, 1, 1) + r["residual"])


def _tolerance(backend, dtype):
    return TRITON_FP32_TOLERANCE if backend == "triton" and dtype == torch.float32 else None


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_matches_unpool_conv_bn_relu(backend, device, case, dtype, layout, poison):
    pr = _problem(case)
    t = {k: v.to(device=device, dtype=dtype) if v.is_floating_point() else v.to(device) for k, v in pr.items()}
    values, indices = _layout(t["values"], layout), _layout(t["indices"], layout)
    out = fastseg.unpool_conv2d(
        values, indices, t["w"], t["bias"], scale=t["scale"], shift=t["shift"], residual=_layout(t["residual"], layout),
        activation="relu", backend=backend, **_kwargs(case),
    )
    expected = _expected(pr, case, dtype)
    assert out.shape == expected.shape and out.dtype == dtype and out.device.type == device
    if layout == "channels_last" and out.shape[1] > 1:
        assert out.is_contiguous(memory_format=torch.channels_last)
    assert_relative_close(out.cpu(), expected, dtype, _tolerance(backend, dtype))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("band_rows", [1, 2, 3, 5, 100])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_cpp_every_band_split(case, band_rows, layout, poison):
    """The C++ kernel's row bands (first, middle, last, halo in the padding) joined seamlessly."""
    pr = _problem(case, seed=1)
    B, C, O, H, W, pk, ps, pp, k, p, d = case
    out = torch.ops.fastseg.unpool_conv2d(
        _layout(pr["values"], layout), _layout(pr["indices"], layout), pr["w"], pr["scale"], pr["shift"],
        _layout(pr["residual"], layout), list(_pair(pk)), list(_pair(ps)), list(_pair(pp)), [H, W],
        list(_conv_padding(case)), list(_pair(d)), True, band_rows,
    )
    pr["bias"] = torch.zeros_like(pr["bias"])
    assert_relative_close(out, _expected(pr, case, torch.float64), torch.float64)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", [(2, 384, 384, 11, 14, 2, 2, 0, 3, "same", 1), (1, 384, 352, 9, 8, 2, 2, 0, 3, "same", 2)],
                         ids=["384ch-odd", "384to352-dil2"])
def test_cpp_wide_layer_route(case, layout, poison):
    """Weights over 4 MiB take the unpool-then-atrous-conv route; forced bands give the same result."""
    pr = _problem(case, seed=2)
    B, C, O, H, W, pk, ps, pp, k, p, d = case
    assert pr["w"].to(torch.float32).nbytes > 4 << 20
    pr["bias"] = torch.zeros_like(pr["bias"])
    expected = _expected(pr, case, torch.float32)
    for band_rows in (0, 3):  # 0: auto (unpool + atrous_conv2d here); 3: bands
        out = torch.ops.fastseg.unpool_conv2d(
            *(_layout(pr[n].float() if pr[n].is_floating_point() else pr[n], layout) for n in ("values", "indices")),
            pr["w"].float(), pr["scale"].float(), pr["shift"].float(), _layout(pr["residual"].float(), layout),
            list(_pair(pk)), list(_pair(ps)), list(_pair(pp)), [H, W], list(_conv_padding(case)), list(_pair(d)),
            True, band_rows,
        )
        assert_relative_close(out, expected, torch.float32)
        if layout == "channels_last":
            assert out.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", [(1, 256, 160, 48, 51, 2, 2, 0, 3, "same", 1), (2, 256, 128, 37, 30, 2, 2, 0, 3, "same", 2)],
                         ids=["256to160-odd", "batch2-256to128-dil2"])
def test_cpp_winograd_bands(case, layout, poison):
    """float32 layers of 256+ channels under 4 MiB of weights convolve their bands through
    atrous_conv2d's winograd path: every band split joins seamlessly."""
    pr = _problem(case, seed=3)
    B, C, O, H, W, pk, ps, pp, k, p, d = case
    assert pr["w"].to(torch.float32).nbytes <= 4 << 20
    pr["bias"] = torch.zeros_like(pr["bias"])
    expected = _expected(pr, case, torch.float32)
    for band_rows in (0, 5, 100):
        out = torch.ops.fastseg.unpool_conv2d(
            *(_layout(pr[n].float() if pr[n].is_floating_point() else pr[n], layout) for n in ("values", "indices")),
            pr["w"].float(), pr["scale"].float(), pr["shift"].float(), _layout(pr["residual"].float(), layout),
            list(_pair(pk)), list(_pair(ps)), list(_pair(pp)), [H, W], list(_conv_padding(case)), list(_pair(d)),
            True, band_rows,
        )
        assert_relative_close(out, expected, torch.float32)


def _scrambled_indices(values, H, W, seed):
    """Indices anywhere in the plane, many repeated: max_unpool2d's later-entry-wins semantics."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, H * W, values.shape, generator=gen)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the cudnn route runs on CUDA tensors only")
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("case", [c for c in CASES if c[6] >= c[5]], ids=str)
def test_cudnn_route_with_aten_unpooling(case, dtype, layout):
    # Outside deterministic mode (which the poison fixture turns on) the cudnn route unpools with
    # ATen's kernel; its outputs are still checked against the float64 chain. Windows that do not
    # overlap only: where indices repeat, ATen's CUDA kernel keeps any one of them.
    assert not torch.are_deterministic_algorithms_enabled()
    pr = _problem(case)
    t = {k: v.to(device="cuda", dtype=dtype) if v.is_floating_point() else v.cuda() for k, v in pr.items()}
    out = fastseg.unpool_conv2d(
        _layout(t["values"], layout), _layout(t["indices"], layout), t["w"], t["bias"], scale=t["scale"],
        shift=t["shift"], residual=_layout(t["residual"], layout), activation="relu", **_kwargs(case),
    )
    expected = _expected(pr, case, dtype)
    assert out.shape == expected.shape and out.dtype == dtype
    if layout == "channels_last" and out.shape[1] > 1:
        assert out.is_contiguous(memory_format=torch.channels_last)
    assert_relative_close(out.cpu(), expected, dtype)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_out_of_window_and_repeated_indices(backend, device, layout, poison):
    case = CASES[1]
    pr = _problem(case)
    B, C, O, H, W = case[:5]
    pr["indices"] = _scrambled_indices(pr["values"], H, W, seed=3)
    planes = pr["indices"].flatten(0, 1).flatten(1)
    assert any(len(plane.unique()) < len(plane) for plane in planes)  # some positions named twice
    t = {k: v.to(device) for k, v in pr.items()}
    out = fastseg.unpool_conv2d(
        _layout(t["values"], layout), _layout(t["indices"], layout), t["w"], t["bias"], scale=t["scale"],
        shift=t["shift"], residual=t["residual"], activation="relu", backend=backend, **_kwargs(case),
    )
    # The reference unpooling is F.max_unpool2d's CPU semantics: the later entry in flat order wins.
    unpooled = fastseg.max_unpool2d(pr["values"], pr["indices"], 2, output_size=(H, W), backend="reference")
    conv = F.conv2d(unpooled, pr["w"], pr["bias"], padding=1)
    expected = F.relu(conv * pr["scale"].view(1, -1, 1, 1) + pr["shift"].view(1, -1, 1, 1) + pr["residual"])
    assert_relative_close(out.cpu(), expected, torch.float64)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_out_of_range_index_raises(backend, device):
    pr = _problem(CASES[0])
    indices = pr["indices"].clone()
    indices[0, 1, 2, 3] = 64  # the unpooled plane is 8 x 8
    with pytest.raises(IndexError, match="indices contains 64, outside the output plane of 8x8"):
        fastseg.unpool_conv2d(pr["values"].to(device), indices.to(device), pr["w"].to(device), kernel_size=2,
                              backend=backend)
    indices[0, 1, 2, 3] = -1
    with pytest.raises(IndexError, match="indices contains -1"):
        fastseg.unpool_conv2d(pr["values"].to(device), indices.to(device), pr["w"].to(device), kernel_size=2,
                              backend=backend)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_epilogue_terms_optional_and_unbatched(backend, device):
    case = CASES[1]
    pr = _problem(case)
    B, C, O, H, W = case[:5]
    t = {k: v.to(device) for k, v in pr.items()}
    out = fastseg.unpool_conv2d(t["values"][0], t["indices"][0], t["w"], kernel_size=2, output_size=(H, W),
                                backend=backend)
    unpooled = fastseg.max_unpool2d(pr["values"][:1], pr["indices"][:1], 2, output_size=(H, W), backend="reference")
    expected = F.conv2d(unpooled, pr["w"], padding=1)[0]
    assert out.shape == (O, H, W)
    assert_relative_close(out.cpu(), expected, torch.float64)


# --- autograd and custom ops ----------------------------------------------------------------------


# Distinct indices only: where two entries name one position (overlapping pools) the gradient is
# gathered for both, as max_unpool2d's, not the loser's true zero (test below).
@pytest.mark.parametrize("case", [CASES[i] for i in (1, 2, 7, 9)], ids=[CASE_IDS[i] for i in (1, 2, 7, 9)])
@pytest.mark.parametrize("backend,device", [p for p in BACKENDS if p.values[0] != "triton"])
def test_gradcheck(backend, device, case):
    B, C, O, H, W = case[:5]
    case = (min(B, 2), 2, 2, *case[3:])
    pr = _problem(case)
    t = {k: v.to(device).requires_grad_(k != "indices") for k, v in pr.items()}
    kwargs = _kwargs(case)

    def f(values, w, bias, scale, shift, residual):
        return fastseg.unpool_conv2d(values, t["indices"], w, bias, scale=scale, shift=shift, residual=residual,
                                     activation="relu", backend=backend, **kwargs)

    assert torch.autograd.gradcheck(f, (t["values"], t["w"], t["bias"], t["scale"], t["shift"], t["residual"]))


def test_gradient_of_repeated_indices_is_gathered():
    """Like max_unpool2d: every entry receives the gradient of the position it names."""
    pr = _problem(CASES[0])
    pr["indices"] = _scrambled_indices(pr["values"], 8, 8, seed=5)
    grads = []
    for backend in ("reference", "cpp"):
        v = pr["values"].clone().requires_grad_()
        fastseg.unpool_conv2d(v, pr["indices"], pr["w"], kernel_size=2, backend=backend).square().sum().backward()
        grads.append(v.grad)
    assert_relative_close(grads[1], grads[0], torch.float64)


@pytest.mark.parametrize("backend,device", COMPILED)
def test_opcheck(backend, device):
    case = CASES[1]
    pr = _problem(case)
    B, C, O, H, W = case[:5]
    t = {k: v.to(device).float() if v.is_floating_point() else v.to(device) for k, v in pr.items()}
    t["values"].requires_grad_()
    t["w"].requires_grad_()
    op = torch.ops.fastseg.unpool_conv2d_triton if backend == "triton" else torch.ops.fastseg.unpool_conv2d
    args = (t["values"], t["indices"], t["w"], t["scale"], t["shift"], t["residual"], [2, 2], [2, 2], [0, 0], [H, W],
            [1, 1], [1, 1], True)
    torch.library.opcheck(op, args)
    cl = tuple(_layout(a, "channels_last") if isinstance(a, torch.Tensor) and a.dim() == 4 else a for a in args)
    torch.library.opcheck(op, cl)


def test_torch_compile_fullgraph():
    case = CASES[1]
    pr = _problem(case)
    t = {k: v.float() if v.is_floating_point() else v for k, v in pr.items()}
    B, C, O, H, W = case[:5]

    def f(values, indices, w, scale, shift):
        return fastseg.unpool_conv2d(values, indices, w, kernel_size=2, output_size=(H, W), scale=scale, shift=shift,
                                     activation="relu")

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    args = (t["values"], t["indices"], t["w"], t["scale"], t["shift"])
    assert_relative_close(compiled(*args), f(*args), torch.float32)


# --- nn.UnpoolConvBNReLU -----------------------------------------------------------------------------


def _layer_and_plain(C, O, dilation=1):
    torch.manual_seed(0)
    layer = fastseg.nn.UnpoolConvBNReLU(C, O, 3, unpool=2, dilation=dilation)
    with torch.no_grad():
        layer.bn.running_mean.normal_()
        layer.bn.running_var.uniform_(0.5, 1.5)
        layer.bn.weight.normal_()
        layer.bn.bias.normal_()
    conv = torch.nn.Conv2d(C, O, 3, padding=dilation, dilation=dilation, bias=False)
    bn = torch.nn.BatchNorm2d(O)
    conv.load_state_dict({"weight": layer.conv.weight.detach().clone()})
    bn.load_state_dict(layer.bn.state_dict())
    return layer, conv, bn


@pytest.mark.parametrize("training,bn_training", [(False, False), (True, True), (False, True)],
                         ids=["eval", "train", "eval-bn-train"])
def test_layer_matches_plain_pytorch(training, bn_training):
    # eval-bn-train: the layer in eval mode with its BatchNorm set to train on its own (test-time
    # adaptation): batch statistics and updated running ones, as the plain BatchNorm2d.
    x = torch.randn(3, 4, 9, 11)
    values, indices = F.max_pool2d(x, 2, return_indices=True)
    layer, conv, bn = _layer_and_plain(4, 5, dilation=2)
    layer.train(training)
    layer.bn.train(bn_training)
    bn.train(bn_training)
    training = bn_training
    residual = torch.randn(3, 5, 9, 11)
    out = layer(values, indices, output_size=x.shape, residual=residual)
    expected = F.relu(bn(conv(F.max_unpool2d(values, indices, 2, output_size=x.shape[-2:]))) + residual)
    assert_relative_close(out.detach(), expected.detach(), torch.float32)
    if training:  # running statistics updated exactly as nn.BatchNorm2d does
        assert torch.equal(layer.bn.running_mean, bn.running_mean)
        assert torch.equal(layer.bn.num_batches_tracked, bn.num_batches_tracked)
    assert set(layer.state_dict()) == {f"conv.{k}" for k in conv.state_dict()} | {f"bn.{k}" for k in bn.state_dict()}


# --- bad input ------------------------------------------------------------------------------------


def _good():
    pr = _problem(CASES[1])
    return dict(values=pr["values"], indices=pr["indices"], weight=pr["w"], kernel_size=2, output_size=(9, 11))


BAD = [
    (dict(values=[1.0]), TypeError, "values must be a torch.Tensor"),
    (dict(values=torch.zeros(2, 2)), ValueError, "values must be 3-D or 4-D"),
    (dict(values=torch.zeros(3, 4, 4, 5, dtype=torch.int32)), TypeError, "values must have dtype"),
    (dict(indices=torch.zeros(3, 4, 4, 5, dtype=torch.int32)), TypeError, "indices must have dtype int64"),
    (dict(indices=torch.zeros(3, 4, 4, 4, dtype=torch.int64)), ValueError,
     r"indices has shape \(3, 4, 4, 4\) but values has shape \(3, 4, 4, 5\)"),
    (dict(weight=torch.zeros(5, 3, 3, 3, dtype=torch.float64)), ValueError,
     r"weight has shape \(5, 3, 3, 3\), expecting \(O, 4, kH, kW\)"),
    (dict(weight=torch.zeros(5, 4, 3, 3)), TypeError, "weight has dtype float32 but values has dtype float64"),
    (dict(weight=torch.zeros(5, 4, 3, dtype=torch.float64)), ValueError, "weight must be 4-D"),
    (dict(values=torch.zeros(3, 0, 4, 5, dtype=torch.float64), weight=torch.zeros(5, 0, 3, 3, dtype=torch.float64)),
     ValueError, r"values has no channels: shape \(3, 0, 4, 5\)"),
    (dict(kernel_size=0), ValueError, "kernel_size must be >= 1"),
    (dict(stride=(2, 2, 2)), TypeError, "stride must be an int or a pair"),
    (dict(pool_padding=-1), ValueError, "pool_padding must be >= 0"),
    (dict(output_size=(12, 11)), ValueError, r"unpool_conv2d: output_size\[0\] = 12 is not strictly between 6 and 10"),
    (dict(output_size="big"), TypeError, "unpool_conv2d: output_size must be a sequence of ints"),
    (dict(padding="full"), ValueError, "unpool_conv2d: padding must be an int, a pair, 'same' or 'valid'"),
    (dict(padding="same", weight=torch.zeros(5, 4, 2, 2, dtype=torch.float64)), ValueError,
     "unpool_conv2d: padding='same' needs dilation"),
    (dict(padding="valid", weight=torch.zeros(5, 4, 11, 11, dtype=torch.float64)), ValueError,
     "unpool_conv2d: the output would be empty"),
    (dict(dilation=0), ValueError, "dilation must be >= 1"),
    (dict(activation="gelu"), ValueError, "activation must be None or 'relu'"),
    (dict(scale=torch.zeros(4, dtype=torch.float64)), ValueError, r"scale has shape \(4,\), expecting \(5,\)"),
    (dict(shift=torch.zeros(5)), TypeError, "shift has dtype float32 but values has dtype float64"),
    (dict(bias=torch.zeros(5, 1, dtype=torch.float64)), ValueError, r"bias has shape \(5, 1\)"),
    (dict(residual=torch.zeros(3, 5, 9, 10, dtype=torch.float64)), ValueError,
     r"residual has shape \(3, 5, 9, 10\), expecting the output's \(3, 5, 9, 11\)"),
    (dict(backend="cuda"), ValueError, "has no 'cuda' backend"),
    (dict(backend="fast"), ValueError, "backend must be 'auto' or one of"),
]


@pytest.mark.parametrize("change,error,match", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_input(change, error, match):
    kwargs = _good()
    kwargs.update(change)
    values, indices, weight = kwargs.pop("values"), kwargs.pop("indices"), kwargs.pop("weight")
    if isinstance(values, torch.Tensor) and values.dim() == 4 and "values" in change and "indices" not in change:
        indices = torch.zeros(values.shape, dtype=torch.int64)
    with pytest.raises(error, match=match):
        fastseg.unpool_conv2d(values, indices, weight, **kwargs)


def test_layer_residual_that_broadcasts_or_differs_in_dtype():
    """What training mode adds after BatchNorm (any residual that broadcasts, or of another dtype)
    eval mode takes too, added after the fused call."""
    x = torch.randn(2, 4, 8, 10)
    values, indices = F.max_pool2d(x, 2, return_indices=True)
    layer, conv, bn = _layer_and_plain(4, 5)
    layer.eval(), bn.eval()
    for residual in (torch.randn(5, 1, 1), torch.randn(2, 5, 8, 10, dtype=torch.float64), torch.randn(1, 5, 8, 10)):
        with torch.no_grad():
            out = layer(values, indices, output_size=x.shape, residual=residual)
            expected = F.relu(bn(conv(F.max_unpool2d(values, indices, 2, output_size=x.shape[-2:]))) + residual)
        assert out.dtype == expected.dtype
        assert_relative_close(out, expected, torch.float32)


def test_layer_bad_arguments():
    with pytest.raises(TypeError, match="unpool must be a fastseg.nn.MaxUnpool2d or its kernel_size, got "
                                        "torch.nn.modules.pooling.MaxUnpool2d"):
        fastseg.nn.UnpoolConvBNReLU(4, 5, unpool=torch.nn.MaxUnpool2d(2))
    indices = torch.zeros(1, 4, 2, 2, dtype=torch.int64)
    with pytest.raises(TypeError, match="unpool_conv2d: values must be a torch.Tensor, got NoneType"):
        fastseg.nn.UnpoolConvBNReLU(4, 5).eval()(None, indices)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_empty_batch_backward(backend, device):
    values, indices = F.max_pool2d(torch.randn(0, 4, 6, 6, device=device), 2, return_indices=True)
    values.requires_grad_()
    weight = torch.randn(5, 4, 3, 3, device=device, requires_grad=True)
    out = fastseg.unpool_conv2d(values, indices, weight, kernel_size=2, backend=backend)
    out.sum().backward()
    assert out.shape == (0, 5, 6, 6) and values.grad.shape == values.shape and not weight.grad.any()


def test_bad_input_kernel_size_required():
    kwargs = _good()
    del kwargs["kernel_size"]
    with pytest.raises(TypeError, match="kernel_size"):
        fastseg.unpool_conv2d(kwargs.pop("values"), kwargs.pop("indices"), kwargs.pop("weight"), **kwargs)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_strided_scale_and_shift(backend, device, poison):
    # scale and shift as views (an expanded scalar, a slice), made after the cast (a cast of a view
    # is contiguous): the Triton launcher read them at unit stride.
    case = CASES[1]
    pr = _problem(case)
    O = pr["w"].shape[0]
    pr["scale"] = torch.full((1,), 1.25, dtype=torch.float64).expand(O)
    shift2 = torch.randn(2 * O, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    pr["shift"] = shift2[::2]
    expected = _expected(pr, case, torch.float32)
    t = {k: v.to(device, torch.float32) if v.is_floating_point() else v.to(device) for k, v in pr.items()}
    scale = torch.full((1,), 1.25, device=device).expand(O)
    shift = shift2.to(device, torch.float32)[::2]
    assert scale.stride() == (0,) and shift.stride() == (2,)
    out = fastseg.unpool_conv2d(t["values"], t["indices"], t["w"], t["bias"], scale=scale, shift=shift,
                                residual=t["residual"], activation="relu", backend=backend, **_kwargs(case))
    assert_relative_close(out.cpu(), expected, torch.float32)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend, device", BACKENDS)
def test_relu_keeps_nan(backend, device, dtype, layout):
    # torch.relu(nan) is nan: the fused ReLU must not turn a NaN (from the values or the shift)
    # into 0, forward or backward.
    if backend == "triton" and device == "cpu" and dtype == torch.float16:
        pytest.skip("float16 runs on the GPU; the interpreter covers float32 and bfloat16")
    gen = torch.Generator().manual_seed(12)
    values, indices = F.max_pool2d(torch.randn(2, 8, 10, 14, generator=gen), 2, return_indices=True)
    values[1, 2, 3, 4] = float("nan")
    w = torch.randn(21, 8, 3, 3, generator=gen) / 8
    shift = torch.randn(21, generator=gen)
    shift[7] = float("nan")
    ref = torch.relu(F.conv2d(F.max_unpool2d(values.double(), indices, 2), w.double(), padding=1)
                     + shift.double().view(1, -1, 1, 1))
    x = _layout(values.to(dtype), layout).to(device).clone().requires_grad_()
    out = fastseg.unpool_conv2d(x, _layout(indices, layout).to(device), w.to(device, dtype), kernel_size=2,
                                shift=shift.to(device, dtype), activation="relu", backend=backend)
    assert torch.equal(torch.isnan(out).cpu(), torch.isnan(ref))
    if dtype == torch.float32:  # where the output is NaN, relu's gradient passes grad_output
        out.backward(torch.ones_like(out))
        eager = values.clone().requires_grad_()
        torch.relu(F.conv2d(F.max_unpool2d(eager, indices, 2), w, padding=1) + shift.view(1, -1, 1, 1)).backward(
            torch.ones_like(ref, dtype=torch.float32))
        assert torch.equal(torch.isnan(x.grad).cpu(), torch.isnan(eager.grad))
        assert_relative_close(torch.nan_to_num(x.grad.cpu()), torch.nan_to_num(eager.grad), torch.float32,
                              TRITON_FP32_TOLERANCE if backend in ("triton", "cudnn") else None)


# As test_atrous.test_backward_kernel_longer_than_map: a 39 x 1 kernel over the 20 x 64 unpooled map,
# whose weight gradient through oneDNN with the padding as an argument corrupted the heap.
@pytest.mark.skipif(not fastseg._backends.EXTENSION_LOADED, reason="fastseg._C not loaded")
def test_backward_kernel_longer_than_map():
    gen = torch.Generator().manual_seed(39)
    unpooled_ref = torch.randn(1, 24, 20, 64, generator=gen, dtype=torch.float64)
    values, indices = F.max_pool2d(unpooled_ref, 2, return_indices=True)
    w = torch.randn(21, 24, 39, 1, generator=gen, dtype=torch.float64) / (24 * 39) ** 0.5
    ref_v, ref_w = values.clone().requires_grad_(), w.clone().requires_grad_()
    ref = F.conv2d(F.max_unpool2d(ref_v, indices, 2, output_size=(20, 64)), ref_w, padding=(19, 0))
    grad = torch.randn(ref.shape, generator=gen, dtype=torch.float64)
    ref.backward(grad)
    for _ in range(3):
        vf, wf = values.float().requires_grad_(), w.float().requires_grad_()
        out = fastseg.unpool_conv2d(vf, indices, wf, kernel_size=2, output_size=(20, 64), padding=(19, 0),
                                    backend="cpp")
        out.backward(grad.float())
        assert_relative_close(vf.grad, ref_v.grad, torch.float32)
        assert_relative_close(wf.grad, ref_w.grad, torch.float32)


@pytest.mark.skipif(not fastseg._backends.EXTENSION_LOADED, reason="fastseg._C not loaded")
@pytest.mark.parametrize("hooked", [False, True], ids=["plain", "hooked"])
def test_layer_trains_with_kernel_longer_than_map(hooked):
    # The layer's training path (eager BatchNorm): its convolution goes through atrous_conv2d here,
    # or with a hook on it, through the layer's own nn.Conv2d under HandPadding.
    torch.manual_seed(0)
    layer = fastseg.nn.UnpoolConvBNReLU(24, 21, (39, 1), unpool=2, padding=(19, 0)).train()
    ref = torch.nn.Sequential(copy.deepcopy(layer.conv), copy.deepcopy(layer.bn), torch.nn.ReLU()).double()
    calls = []
    if hooked:
        layer.conv.register_forward_pre_hook(lambda *_: calls.append(1))
    values, indices = F.max_pool2d(torch.randn(2, 24, 20, 64), 2, return_indices=True)
    unpooled = F.max_unpool2d(values.double(), indices, 2, output_size=(20, 64))
    assert_trains_like_float64(layer, ref, lambda: layer(values, indices, output_size=(20, 64)),
                               lambda: ref(unpooled))
    assert len(calls) == (3 if hooked else 0)
