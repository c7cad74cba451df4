import os
import subprocess
import sys

import pytest
import torch

import fastseg
from fastseg._checks import all_finite

from common import assert_relative_close, backend_params


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("where", [0, 1, 12345, -1])
def test_all_finite_finds_every_nonfinite_value(dtype, bad, where):
    x = torch.randn(3, 21, 37, 53).to(dtype)
    assert all_finite(x)
    x.view(-1)[where] = bad
    assert not all_finite(x)
    assert not all_finite(x.transpose(1, 3))  # strided input too


def test_all_finite_edge_cases():
    assert all_finite(torch.empty(0, 3))
    assert all_finite(torch.randint(0, 255, (3, 4), dtype=torch.uint8))
    assert all_finite(torch.tensor(1e38).expand(100))  # large but finite (a sum would overflow)
    assert not all_finite(torch.tensor([1.0, float("nan")], dtype=torch.complex64))


@pytest.mark.skipif(not fastseg._backends.EXTENSION_LOADED, reason="fastseg._C not loaded")
def test_forward_mode_ad_is_refused():
    # A custom op without a forward-AD rule gets a zero (torch.func.jvp) or no (forward_ad) tangent
    # from PyTorch, silently: fastseg's ops raise instead; reverse mode is unaffected.
    import torch.autograd.forward_ad as fwAD
    import torch.nn.functional as F
    from torch.func import jvp

    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, 8, 8, generator=g)
    values, indices = F.max_pool2d(x, 2, return_indices=True)
    w = torch.randn(4, 3, 3, 3, generator=g)
    calls = [
        (x, lambda a: fastseg.atrous_conv2d(a, w, padding=1)),
        (values, lambda a: fastseg.max_unpool2d(a, indices, 2)),
        (values, lambda a: fastseg.unpool_conv2d(a, indices, w, kernel_size=2)),
        (x, lambda a: fastseg.gcn_conv2d(a, w[:2, :, :, :1], w[:, :2, :1], w[:2, :, :1], w[:, :2, :, :1])),
        (x, lambda a: fastseg.dense_crf(a, iterations=1, bilateral=None)),
    ]
    for arg, fn in calls:
        with pytest.raises(NotImplementedError, match="forward-mode AD"):
            jvp(fn, (arg,), (torch.ones_like(arg),))
        with fwAD.dual_level(), pytest.raises(NotImplementedError, match="forward-mode AD"):
            fn(fwAD.make_dual(arg, torch.ones_like(arg)))
        leaf = arg.clone().requires_grad_()
        fn(leaf).sum().backward()
        assert leaf.grad is not None and torch.isfinite(leaf.grad).all()


def _func_cases(backend, dtype, device="cpu"):
    """(op under test, the same in eager PyTorch, input, indices) for each differentiable op; the
    functions take (input, indices)."""
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 7, 7, generator=g).to(dtype)
    values, indices = F.max_pool2d(torch.randn(2, 3, 8, 8, generator=g).to(dtype), 2, return_indices=True)
    w = torch.randn(4, 3, 3, 3, generator=g).to(dtype)
    scale, shift = torch.rand(4, generator=g).to(dtype) + 0.5, torch.randn(4, generator=g).to(dtype)
    w1, w2 = torch.randn(4, 3, 5, 1, generator=g).to(dtype), torch.randn(2, 4, 1, 5, generator=g).to(dtype)
    features = torch.randn(1, 2, 7, 7, generator=g)
    none = torch.zeros(2)  # the second argument of the ops that take no indices (one per sample for vmap)
    x, values, indices, w, scale, shift, w1, w2, features, none = (
        t.to(device) for t in (x, values, indices, w, scale, shift, w1, w2, features, none))

    def epilogue(y):
        return torch.relu(y * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1))

    def gcn_eager(a):
        left = F.conv2d(F.conv2d(a, w1, padding=(2, 0)), w2, padding=(0, 2))
        right = F.conv2d(F.conv2d(a, w1.transpose(2, 3), padding=(0, 2)), w2.transpose(2, 3), padding=(2, 0))
        return left + right

    from fastseg.ops.dense_crf import permutohedral_filter
    return {
        "atrous_conv2d": (
            lambda a, _: fastseg.atrous_conv2d(a, w, dilation=2, scale=scale, shift=shift, activation="relu",
                                            backend=backend),
            lambda a, _: epilogue(F.conv2d(a, w, padding=2, dilation=2)), x, none),
        "max_unpool2d": (lambda a, i: fastseg.max_unpool2d(a, i, 2, backend=backend),
                         lambda a, i: F.max_unpool2d(a, i, 2), values, indices),
        "unpool_conv2d": (
            lambda a, i: fastseg.unpool_conv2d(a, i, w, kernel_size=2, scale=scale, shift=shift,
                                            activation="relu", backend=backend),
            lambda a, i: epilogue(F.conv2d(F.max_unpool2d(a, i, 2), w, padding=1)), values, indices),
        "gcn_conv2d": (lambda a, _: fastseg.gcn_conv2d(a, w1, w2, w1.transpose(2, 3), w2.transpose(2, 3),
                                                       backend=backend), lambda a, _: gcn_eager(a), x, none),
        # Linear: its eager counterpart is the reference backend's filter, checked elsewhere.
        "permutohedral_filter": (lambda a, _: permutohedral_filter(a, features, backend=backend),
                                 lambda a, _: permutohedral_filter(a, features, backend="reference"), x, none),
    }


FUNC_OPS = ["atrous_conv2d", "max_unpool2d", "unpool_conv2d", "gcn_conv2d", "permutohedral_filter"]


@pytest.mark.parametrize("op", FUNC_OPS)
@pytest.mark.parametrize("backend, device", backend_params(("reference", "cpp", "triton")))
def test_torch_func_transforms(op, backend, device):
    # PyTorch's autograd for a custom op refuses torch.func's transforms ("must override
    # setup_context"); fastseg's ops take them: grad, vjp, jacrev and per-sample gradients (vmap of grad).
    from torch.func import grad, jacrev, vjp, vmap

    dtype = torch.float32 if backend == "triton" else torch.float64
    fn_, eager_, arg, indices = _func_cases(backend, dtype, device)[op]
    fn, eager = (lambda a: fn_(a, indices)), (lambda a: eager_(a, indices))
    weight = torch.randn(fn(arg).shape, generator=torch.Generator().manual_seed(2), dtype=dtype).to(device)
    # The C++ lattice filter computes in float32.
    tolerance = 5e-4 if backend == "triton" else 1e-5 if op == "permutohedral_filter" else 1e-10

    def loss(f):
        return lambda a: (f(a) * weight).square().sum()

    def per_sample(f):
        def one(a, i):
            return (f(a[None], i[None]) * weight[:1]).square().sum()
        return vmap(grad(one), in_dims=(0, 0))(arg, indices)

    assert_relative_close(grad(loss(fn))(arg), grad(loss(eager))(arg), dtype, tolerance)
    out, pullback = vjp(fn, arg)
    assert_relative_close(out, eager(arg), dtype, tolerance)
    assert_relative_close(pullback(weight)[0], vjp(eager, arg)[1](weight)[0], dtype, tolerance)
    pick = (0, slice(None), 3, 3)
    assert_relative_close(jacrev(lambda a: fn(a)[pick])(arg), jacrev(lambda a: eager(a)[pick])(arg), dtype, tolerance)
    assert_relative_close(per_sample(fn_), per_sample(eager_), dtype, tolerance)
    if op == "max_unpool2d":  # second order through the backward op
        def second(f):
            return grad(lambda a: grad(lambda b: f(b).pow(3).sum())(a).square().sum())(arg)
        assert_relative_close(second(fn), second(eager), dtype, tolerance)


def test_torch_func_refused_by_dense_crf():
    from torch.func import grad

    scores = torch.randn(1, 3, 5, 6)
    with pytest.raises(NotImplementedError, match="dense_crf: torch.func"):
        grad(lambda s: fastseg.dense_crf(s, iterations=1, bilateral=None).sum())(scores)


def _strided_inputs(B, C, H, W, device="cpu"):
    """Inputs whose memory format only their stride order tells, each with a (B, C, H, W) shape."""
    g = torch.Generator().manual_seed(3)

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(device)

    return {
        # NHWC order, contiguous in neither format
        "channels_last-channel-slice": randn(B, C + 4, H, W).contiguous(memory_format=torch.channels_last)[:, 2:2 + C],
        "nchw-channel-slice": randn(B, C + 4, H, W)[:, 1:1 + C],
        "nhwc-permuted": randn(B, H, W, C).permute(0, 3, 1, 2),
        "column-step": randn(B, C, H, 2 * W).contiguous(memory_format=torch.channels_last)[..., ::2],
    }


LAYOUT_CASES = ["channels_last-channel-slice", "nchw-channel-slice", "nhwc-permuted", "column-step"]


@pytest.mark.parametrize("case", LAYOUT_CASES)
@pytest.mark.parametrize("op", ["atrous_conv2d", "max_unpool2d", "unpool_conv2d", "gcn_conv2d"])
@pytest.mark.parametrize("backend, device", backend_params(("reference", "cpp", "triton")))
def test_output_memory_format_follows_eager(op, case, backend, device):
    # Outputs take eager PyTorch's memory format (suggest_memory_format: the input's stride order),
    # also for inputs contiguous in neither format; values as eager's.
    import torch.nn.functional as F

    from fastseg._layout import output_memory_format

    g = torch.Generator().manual_seed(4)
    x = _strided_inputs(2, 3, 6, 5, device)[case]
    w = torch.randn(4, 3, 3, 3, generator=g).to(device)
    if op in ("max_unpool2d", "unpool_conv2d"):
        pooled, indices = F.max_pool2d(torch.randn(2, 3, 12, 10, generator=g).to(device), 2, return_indices=True)
        x = x.copy_(pooled)  # x's strides, pooled's values
        indices = torch.empty_like(x, dtype=torch.int64).copy_(indices)
    if op == "atrous_conv2d":
        out, eager = fastseg.atrous_conv2d(x, w, dilation=2, backend=backend), F.conv2d(x, w, padding=2, dilation=2)
    elif op == "max_unpool2d":
        out, eager = fastseg.max_unpool2d(x, indices, 2, backend=backend), F.max_unpool2d(x, indices, 2)
    elif op == "unpool_conv2d":
        out = fastseg.unpool_conv2d(x, indices, w, kernel_size=2, backend=backend)
        eager = F.conv2d(F.max_unpool2d(x, indices, 2), w, padding=1)
    else:
        w1, w2 = torch.randn(4, 3, 3, 1, generator=g).to(device), torch.randn(2, 4, 1, 3, generator=g).to(device)
        out = fastseg.gcn_conv2d(x, w1, w2, w1.transpose(2, 3), w2.transpose(2, 3), backend=backend)
        eager = (F.conv2d(F.conv2d(x, w1, padding=(1, 0)), w2, padding=(0, 1))
                 + F.conv2d(F.conv2d(x, w1.transpose(2, 3), padding=(0, 1)), w2.transpose(2, 3), padding=(1, 0)))
    fmt = output_memory_format(x)
    if device == "cpu":  # (ATen's CUDA unpooling writes NCHW whatever its input; fastseg keeps the rule)
        assert output_memory_format(eager) == fmt
    assert out.is_contiguous(memory_format=fmt), (out.stride(), eager.stride())
    tolerance = 0 if op == "max_unpool2d" else 5e-4 if backend == "triton" else 1e-5
    assert_relative_close(out, eager, torch.float32, tolerance)


def test_every_op_runs_without_the_extension():
    # With fastseg._C unavailable (not built, built for another torch, or FASTSEG_NO_EXTENSION=1)
    # every public entry point runs on the reference, forward and backward.
    code = """
import warnings; warnings.simplefilter("ignore")
import numpy as np, torch, torch.nn.functional as F, fastseg, fastseg.crf
from fastseg.ops import permutohedral_filter
assert not fastseg._backends.EXTENSION_LOADED
g = torch.Generator().manual_seed(0)
x, w = torch.randn(1, 3, 8, 8, generator=g), torch.randn(4, 3, 3, 3, generator=g)
v, i = F.max_pool2d(x, 2, return_indices=True)
image = torch.randint(0, 256, (1, 3, 8, 8), dtype=torch.uint8, generator=g)
calls = {
    "atrous_conv2d": lambda a: fastseg.atrous_conv2d(a, w, dilation=2, activation="relu"),
    "max_unpool2d": lambda a: fastseg.max_unpool2d(F.max_pool2d(a, 2), i, 2),
    "unpool_conv2d": lambda a: fastseg.unpool_conv2d(F.max_pool2d(a, 2), i, w, kernel_size=2),
    "gcn_conv2d": lambda a: fastseg.gcn_conv2d(a, w[:2, :, :, :1], w[:, :2, :1], w[:2, :, :1], w[:, :2, :, :1]),
    "dense_crf": lambda a: fastseg.dense_crf(a, image, iterations=2),
    "dense_crf-reference": lambda a: fastseg.dense_crf(a, image, iterations=2, backend="reference"),
    "permutohedral_filter": lambda a: permutohedral_filter(a, torch.randn(1, 2, 8, 8, generator=g)),
    "nn.DenseCRF": lambda a: fastseg.nn.DenseCRF(iterations=2)(a, image),
}
for name, fn in calls.items():
    with torch.no_grad():
        assert torch.isfinite(fn(x)).all(), name
    leaf = x.clone().requires_grad_()
    fn(leaf).square().sum().backward()
    assert torch.isfinite(leaf.grad).all(), name
d = fastseg.crf.DenseCRF2D(8, 8, 3)
d.setUnaryEnergy(np.random.rand(3, 64).astype(np.float32))
d.addPairwiseGaussian(sxy=3, compat=3)
d.addPairwiseBilateral(sxy=20, srgb=13, rgbim=np.ascontiguousarray(image[0].permute(1, 2, 0).numpy()), compat=10)
assert np.asarray(d.inference(3)).shape == (3, 64)
print("ok")
"""
    env = dict(os.environ, FASTSEG_NO_EXTENSION="1")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["ok"]


@pytest.mark.skipif(not fastseg._backends.EXTENSION_LOADED, reason="fastseg._C not loaded")
def test_extension_built_for_another_torch_is_refused():
    # The C++ ABI changes between torch releases: an extension built against another one is not
    # used (a call could crash); the ops fall back to the reference with the reason in the warning.
    code = """
import warnings
import torch
torch.__version__ = "2.99.0+cpu"
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import fastseg
print(fastseg._backends.EXTENSION_LOADED)
print(any("built against torch" in str(w.message) and "this is torch 2.99" in str(w.message) for w in caught))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["False", "True"]
    assert fastseg._backends.EXTENSION_LOADED  # this process's own torch is the one it was built for
