"""Global Convolutional Network block: ``fastseg.gcn_conv2d``.

Peng et al., "Large Kernel Matters -- Improve Semantic Segmentation by Global Convolutional
Network" (CVPR 2017), Fig. 2(b): a dense k x k convolution (k = 15 in the paper) is replaced by the
sum of two separable branches, (k x 1 then 1 x k) + (1 x k then k x 1), whose cost grows with k
instead of k^2. Eager PyTorch runs it as four convolutions and an add, writing both middle maps of
each branch to memory; here it is one call:

- CPU (``cpp``): large kernels in the frequency domain. x is transformed once along H and once
  along W (csrc/cpu/fft.h); per frequency bin each branch's first convolution is a complex GEMM over
  Cin and its second one over Cmid, and the two branches are summed before the inverse transforms
  (k = 15 on the paper's stages: 4.6-6.6x fewer multiplications than the direct convolutions).
  Short kernels on small maps, inputs of fewer than 6 channels and float64 take one GEMM that reads
  x once, whose per-tap products the middle maps shift and add, or oneDNN's four convolutions where
  those products would outgrow the input (csrc/cpu/gcn.cpp gives the rules and the measurements). The weights' spectra
  are kept for unchanged weights unless autograd will update them. As with any FFT convolution, the
  rounding error is relative to the whole map's magnitude rather than each output's, and a
  non-finite value in x makes that image's whole output non-finite (a direct convolution spreads it
  over the kernel's footprint only).
- GPU (``triton``): four launches of the atrous-convolution implicit-GEMM kernel
  (kernels/atrous.py) with the biases in its fused epilogue, the last one adding the left branch as
  its residual, so the final add makes no pass of its own.

Backward, for every input, with the middle maps recomputed: on the CPU where the forward's FFT
route runs, in the frequency domain as well (per bin, each convolution's input gradient is one
complex GEMM with the conjugate taps' spectrum and its weight gradient a cross-correlation read off
one GEMM's inverse transform at the taps' lags); elsewhere through ATen's convolution backward
(four calls), as PyTorch's own.
"""
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _autocast, _backends
from .._checks import FLOAT_DTYPES, check_same_dtype_device, check_tensor
from .._layout import output_memory_format
from ._reference import gcn as reference
from .atrous import convolution_backward

__all__ = ["gcn_conv2d"]

OP = "gcn_conv2d"
_IMPLEMENTED = ("reference", "cpp", "triton", "cudnn")
_WEIGHTS = ("w_l1", "w_l2", "w_r1", "w_r2")
_BIASES = ("b_l1", "b_l2", "b_r1", "b_r2")


def gcn_conv2d(x, w_l1, w_l2, w_r1, w_r2, b_l1=None, b_l2=None, b_r1=None, b_r2=None, *, dilation=1,
               backend="auto"):
    """Global Convolutional Network block (Peng et al., CVPR 2017): two separable large-kernel branches, summed.

    ``left = conv(conv(x, w_l1) + b_l1, w_l2) + b_l2`` (k x 1 then 1 x k) and
    ``right = conv(conv(x, w_r1) + b_r1, w_r2) + b_r2`` (1 x k then k x 1); returns ``left + right``.
    Every convolution has 'same' zero padding ``dilation * (k - 1) / 2`` along its long axis, stride 1.

    Args:
        x: (B, Cin, H, W) or (Cin, H, W); float16, bfloat16, float32 or float64; NCHW or
            channels_last (the output takes x's memory format). H and W may be smaller than k.
        w_l1: (Cmid, Cin, k, 1), k odd and >= 3; x's dtype and device, like every other argument.
        w_l2: (Cout, Cmid, 1, k).
        w_r1: (Cmid, Cin, 1, k).
        w_r2: (Cout, Cmid, k, 1).
        b_l1, b_r1: (Cmid,) or None; b_l2, b_r2: (Cout,) or None.
        dilation: int >= 1, the rate of every convolution along its long axis. Taps it puts wholly
            past the map (|t - (k - 1) / 2| dilation >= H and W) meet only zero padding; every backend
            but 'reference' leaves them out (their gradients are zero).
        backend: 'auto' (the C++ kernel on the CPU; on CUDA see ``cuda_backend``), 'reference',
            'cpp', 'cudnn' (CUDA tensors: cuDNN's four convolutions, the middle and output channels
            zero-padded to multiples of 8 for its tensor-core kernels; ``fastseg.nn.GlobalConv2d``
            keeps its weights padded) or 'triton' (CUDA tensors; CPU tensors under
            TRITON_INTERPRET=1: the 'taps' route of kernels/taps_conv.py or four launches of the
            implicit-GEMM kernel, per ``triton_algorithm``).

    Returns:
        (B, Cout, H, W) (or (Cout, H, W)) in x's dtype, device and memory format; differentiable in x,
        every weight and every bias. Under torch.autocast the operands are cast as F.conv2d's are.

    Example:
        >>> x = torch.randn(1, 2048, 16, 16)
        >>> w_l1, w_r1 = torch.randn(21, 2048, 15, 1) / 175, torch.randn(21, 2048, 1, 15) / 175
        >>> w_l2, w_r2 = torch.randn(21, 21, 1, 15) / 18, torch.randn(21, 21, 15, 1) / 18
        >>> y = fastseg.gcn_conv2d(x, w_l1, w_l2, w_r1, w_r2)   # (1, 21, 16, 16)
    """
    x, w_l1, w_l2, w_r1, w_r2, b_l1, b_l2, b_r1, b_r2 = _autocast.lower_precision(
        x, x, w_l1, w_l2, w_r1, w_r2, b_l1, b_l2, b_r1, b_r2)
    check_tensor(OP, "x", x, ndims=(3, 4), dtypes=FLOAT_DTYPES)
    weights = dict(zip(_WEIGHTS, (w_l1, w_l2, w_r1, w_r2)))
    for name, w in weights.items():
        check_tensor(OP, name, w, ndims=(4,), dtypes=FLOAT_DTYPES)
        check_same_dtype_device(OP, name, w, x)
    Cin = x.shape[-3]
    if Cin == 0:
        raise ValueError(f"{OP}: x has no channels: shape {tuple(x.shape)}")
    Cmid, k = w_l1.shape[0], w_l1.shape[2]
    if w_l1.shape[3] != 1:
        raise ValueError(f"{OP}: w_l1 has shape {tuple(w_l1.shape)}, expecting (Cmid, Cin, k, 1): a k x 1 kernel")
    if k < 3 or k % 2 == 0:
        raise ValueError(
            f"{OP}: k must be odd and >= 3 ('same' padding needs an odd kernel), got k = {k} from w_l1 with shape "
            f"{tuple(w_l1.shape)}"
        )
    if Cmid == 0:
        raise ValueError(f"{OP}: w_l1 has shape {tuple(w_l1.shape)}: no middle channels")
    Cout = w_l2.shape[0]
    if Cout == 0:
        raise ValueError(f"{OP}: w_l2 has shape {tuple(w_l2.shape)}: no output channels")
    expected = {
        "w_l1": (Cmid, Cin, k, 1), "w_l2": (Cout, Cmid, 1, k), "w_r1": (Cmid, Cin, 1, k), "w_r2": (Cout, Cmid, k, 1),
    }
    meaning = {
        "w_l1": "(Cmid, Cin, k, 1)", "w_l2": "(Cout, Cmid, 1, k)", "w_r1": "(Cmid, Cin, 1, k)",
        "w_r2": "(Cout, Cmid, k, 1)",
    }
    for name, w in weights.items():
        if tuple(w.shape) != expected[name]:
            raise ValueError(
                f"{OP}: {name} has shape {tuple(w.shape)}, expecting {meaning[name]} = {expected[name]} "
                f"(Cin = {Cin} from x, Cmid = {Cmid} and k = {k} from w_l1, Cout = {Cout} from w_l2)"
            )
    biases = dict(zip(_BIASES, (b_l1, b_l2, b_r1, b_r2)))
    for name, b in biases.items():
        if b is None:
            continue
        check_tensor(OP, name, b, dtypes=FLOAT_DTYPES)
        n, what = (Cmid, "Cmid") if name in ("b_l1", "b_r1") else (Cout, "Cout")
        if tuple(b.shape) != (n,):
            raise ValueError(f"{OP}: {name} has shape {tuple(b.shape)}, expecting ({what} = {n},)")
        check_same_dtype_device(OP, name, b, x)
    if not isinstance(dilation, int) or isinstance(dilation, bool):
        raise TypeError(f"{OP}: dilation must be an int, got {dilation!r}")
    if dilation < 1:
        raise ValueError(f"{OP}: dilation must be >= 1, got {dilation}")
    if min(x.shape[-2:]) == 0:
        raise ValueError(f"{OP}: x has an empty spatial dimension: shape {tuple(x.shape)}")
    if backend == "auto" and x.device.type == "cuda":
        impl = cuda_backend(x.dtype, Cin, Cmid, Cout, k, x.shape[-2] * x.shape[-1])
    else:
        impl = _backends.select(OP, backend, x.device, _IMPLEMENTED)

    batched = x.dim() == 4
    if not batched:
        x = x.unsqueeze(0)
    if impl != "reference" and _backends.size_fixed(x):
        w_l1, w_l2, w_r1, w_r2, dilation = _without_dead_taps(w_l1, w_l2, w_r1, w_r2, dilation, *x.shape[-2:])
    args = (x, w_l1, w_l2, w_r1, w_r2, b_l1, b_l2, b_r1, b_r2, dilation)
    if impl == "reference":
        out = reference.gcn_conv2d(*args)
    elif impl == "triton":
        out = _backends.call(torch.ops.fastseg.gcn_conv2d_triton, _triton_forward, *args)
    elif impl == "cudnn":
        out = _backends.call(torch.ops.fastseg.gcn_conv2d_cudnn, _cudnn_forward, *args)
    else:
        # Weights that autograd will update change on every call: the CPU kernel neither keeps nor
        # looks up their spectra then. (Not frozen into a torch.jit trace: 'auto', right for any call.)
        training = (torch.is_grad_enabled() and any(w.requires_grad for w in weights.values())
                    and not torch.jit.is_tracing())
        out = _backends.call(torch.ops.fastseg.gcn_conv2d, None, *args, "auto_training" if training else "auto")
    return out if batched else out.squeeze(0)



def _without_dead_taps(w_l1, w_l2, w_r1, w_r2, dilation, H, W):
    """The weights without the taps that meet only zero padding, and the dilation to run them at.

    Tap t of a 'same' convolution (k taps, dilation d) reads t d - p pixels away from its output,
    so it touches the image only if |t - (k - 1) / 2| d < L, the map's length along its axis. With
    a large dilation on a small map most taps are dead: they add zero forward and get zero
    gradients (the slices' backward fills them in), yet the kernels would still multiply them and
    the CPU's frequency-domain routes would transform maps padded by all of them (d = 500 on
    16 x 16, 64 -> 21 channels: a forward + backward of 297 ms instead of 4.5 ms). The centre
    2 m + 1 taps are kept, m the most any axis has live; with no live tap but the centre (d >= H, W)
    three taps at dilation max(H, W) stand in, their outer two as dead as before (k >= 3 is the ops'
    contract)."""
    k = w_l1.shape[2]
    centre = (k - 1) // 2
    live = (max(H, W) - 1) // dilation  # the farthest tap, in taps from the centre, touching the image
    if live >= centre:
        return w_l1, w_l2, w_r1, w_r2, dilation
    if live == 0:
        live, dilation = 1, max(H, W)
    taps = slice(centre - live, centre + live + 1)
    return w_l1[:, :, taps], w_l2[..., taps], w_r1[..., taps], w_r2[:, :, taps], dilation


# --- custom ops: fake kernels and autograd -------------------------------------------------------


def _fake_gcn_conv2d(input, w_l1, w_l2, w_r1, w_r2, b_l1, b_l2, b_r1, b_r2, dilation, *extra):
    B, _, H, W = input.shape
    return torch.empty(
        (B, w_l2.shape[0], H, W), dtype=input.dtype, device=input.device, memory_format=output_memory_format(input)
    )


def _setup_context(ctx, inputs, output):
    input, w_l1, w_l2, w_r1, w_r2, b_l1, b_l2, b_r1, b_r2, dilation = inputs[:10]
    ctx.save_for_backward(input, w_l1, w_l2, w_r1, w_r2, b_l1, b_r1)
    ctx.dilation = dilation
    ctx.n_extra = len(inputs) - 10


# --- backward ------------------------------------------------------------------------------------
# The middle maps are recomputed (saving them would double the forward's memory). On the CPU, where
# the forward's FFT route runs, the whole backward runs in the frequency domain, in plain PyTorch
# (torch.fft and batched complex matmuls, exact up to rounding); elsewhere ATen's convolution
# backward runs each of the four convolutions in reverse (atrous' convolution_backward: on the CPU
# a map shorter than the kernel is padded by hand).


def _fft_length(n):
    """The smallest even n' >= n with no prime factor above 3 (csrc/cpu/fft.h's good_length)."""
    m = max(n, 2)
    while True:
        r = m
        for q in (2, 3):
            while r % q == 0:
                r //= q
        if r == 1 and m % 2 == 0:
            return m
        m += 1


def _fft_backward_pays(input, k, d):
    """Whether the backward runs in the frequency domain: on the CPU, not in float64, where the
    forward's FFT route runs (csrc/cpu/gcn.cpp: fft_saving >= 3 and Cin >= 6). An empty batch has
    nothing to transform (MKL's FFT refuses it)."""
    if input.device.type != "cpu" or input.dtype == torch.float64 or input.numel() == 0:
        return False
    H, W = input.shape[-2:]
    p = d * (k - 1) // 2
    bins = lambda size: (_fft_length(size + p) // 2 + 1) / size  # noqa: E731
    return input.shape[1] >= 6 and k / (2 * (bins(H) + bins(W))) >= 3.0


def _tap_positions(k, d, n):
    """Where a 'same' convolution's taps t = 0..k-1 (dilation d) sit in a length-n circular one:
    (p - t d) mod n. Positions that coincide (k > n) add up; with n >= L + p each such tap still
    meets only x's zero padding wherever the circular and the linear convolution differ."""
    p = d * (k - 1) // 2
    return torch.tensor([(p - t * d) % n for t in range(k)], dtype=torch.float64)


def _taps_spectrum(w, d, n):
    """(n // 2 + 1, O, I) complex: the half spectrum of w's (O, I, k) taps placed at _tap_positions,
    as one real matmul with the DFT terms (cheaper than placing and transforming), its real and
    imaginary rows already bins-major."""
    O, I, k = w.shape
    bins = n // 2 + 1
    angle = (2 * math.pi / n) * torch.arange(bins, dtype=torch.float64).unsqueeze(1) * _tap_positions(k, d, n)
    terms = torch.cat([torch.cos(angle), -torch.sin(angle)]).to(w.dtype).to(w.device)  # (2 bins, k)
    re_im = terms @ w.reshape(O * I, k).t()
    return torch.complex(re_im[:bins], re_im[bins:]).view(bins, O, I)


def _taps_from_spectrum(S, d, k, n):
    """(O, I, k): the inverse of _taps_spectrum's placement, read back at the taps' lags: for the
    half spectrum S (n // 2 + 1, O, I) of a length-n real sequence, its values at -position of each
    tap (the cross-correlation's lags t d - p). One real matmul of the inverse DFT terms with S's
    interleaved real and imaginary parts as they lie in memory, then the two halves' sum."""
    bins, O, I = S.shape
    weight = torch.full((bins,), 2.0, dtype=torch.float64)
    weight[0] = 1.0
    if n % 2 == 0:
        weight[-1] = 1.0
    angle = (-2 * math.pi / n) * _tap_positions(k, d, n).unsqueeze(1) * torch.arange(bins, dtype=torch.float64)
    terms = torch.cat([torch.cos(angle) * weight, -torch.sin(angle) * weight]) / n  # (2k, bins)
    # (2 O I, bins) @ (bins, 2k): the long dimension as the product's rows (MKL ran the other
    # orientation, 2k rows by 2 O I columns, 2-3x slower).
    parts = torch.view_as_real(S.resolve_conj()).reshape(bins, 2 * O * I)
    both = parts.t() @ terms.t().to(parts.dtype).to(S.device)
    taps = both[0::2, :k] + both[1::2, k:]  # cos terms on the real parts, sin terms on the imaginary
    return taps.view(O, I, k)


class _AxisTransform:
    """Real FFTs of (B, C, H, W) maps along one axis (2 or 3) of length L, zero-padded to n >= L + p
    points so that no wrap-around reaches an output of a 'same' convolution with padding p, and laid
    out bins-major, (n // 2 + 1, B * Lo, C), Lo the other axis' length: per bin, a convolution over
    channels is one matmul."""

    def __init__(self, shape, axis, p):
        self.B, _, H, W = shape
        self.axis = axis
        self.L, self.Lo = (H, W) if axis == 2 else (W, H)
        self.n = _fft_length(self.L + p)
        self.bins = self.n // 2 + 1
        self.to_bins = (2, 0, 3, 1) if axis == 2 else (3, 0, 2, 1)
        self.from_bins = (1, 3, 0, 2) if axis == 2 else (1, 3, 2, 0)

    def forward(self, t):
        spectrum = torch.fft.rfft(t, n=self.n, dim=self.axis)
        return spectrum.permute(*self.to_bins).reshape(self.bins, self.B * self.Lo, t.shape[1])

    def inverse(self, spectrum):
        C = spectrum.shape[-1]
        t = spectrum.view(self.bins, self.B, self.Lo, C).permute(*self.from_bins)
        return torch.fft.irfft(t, n=self.n, dim=self.axis).narrow(self.axis, 0, self.L)


def _conv_backward_fft(transform, GY, X, G, d, k, need_x, need_w):
    """Gradients of y = conv(x, w) ('same', dilation d, k taps along the transform's axis, G the
    taps' spectrum from _taps_spectrum) from the spectra GY of dL/dy and X of x: per bin, grad_x is
    GY conj(G); grad_w (O, I, k) is the cross-correlation of dL/dy with x at the taps' lags, read
    from the inverse transform of GY^H X."""
    grad_x = grad_w = None
    if need_x:
        grad_x = transform.inverse(torch.bmm(GY, G.conj().resolve_conj()))
    if need_w:
        S = torch.bmm(GY.conj().resolve_conj().transpose(1, 2), X)  # (bins, O, I)
        grad_w = _taps_from_spectrum(S, d, k, transform.n)
    return grad_x, grad_w


def _branch_backward_fft(x, w1, w2, b1, g, d, along_h, need_x, need_w1, need_w2, need_b1):
    """One branch's gradients in the frequency domain: w1 (Cmid, Cin, k) the first convolution's
    taps along H (along_h) or W, w2 (Cout, Cmid, k) the second's along the other axis. The middle
    map, which only the second weight's gradient reads, is recomputed from x's spectrum
    (Y = X G^T per bin); each convolution's gradients come from _conv_backward_fft."""
    k = w1.shape[-1]
    p = d * (k - 1) // 2
    first = _AxisTransform(x.shape, 2 if along_h else 3, p)
    second = _AxisTransform(x.shape, 3 if along_h else 2, p)
    G1 = _taps_spectrum(w1, d, first.n)
    X = first.forward(x) if need_w1 or need_w2 else None
    MID = None
    if need_w2:
        mid = first.inverse(torch.bmm(X, G1.transpose(1, 2)))
        if b1 is not None:
            mid = mid + b1.view(1, -1, 1, 1)
        MID = second.forward(mid)
    need_mid = need_x or need_w1 or need_b1
    grad_mid, grad_w2 = _conv_backward_fft(second, second.forward(g), MID, _taps_spectrum(w2, d, second.n), d, k,
                                           need_mid, need_w2)
    grad_b1 = grad_mid.sum((0, 2, 3)) if need_b1 else None
    grad_x = grad_w1 = None
    if need_x or need_w1:
        grad_x, grad_w1 = _conv_backward_fft(first, first.forward(grad_mid), X, G1, d, k, need_x, need_w1)
    return grad_x, grad_w1, grad_w2, grad_b1


def _branch_backward_aten(x, w1, w2, b1, g, d, along_h, need_x, need_w1, need_w2, need_b1):
    """One branch's gradients through ATen's convolution backward (w1, w2 4-D; atrous'
    convolution_backward pads a map that the kernel reaches past by hand on the CPU)."""
    p = d * (w1.shape[2 if along_h else 3] - 1) // 2
    tall, wide = ([p, 0], [d, 1]), ([0, p], [1, d])
    geo1, geo2 = (tall, wide) if along_h else (wide, tall)
    need_mid = need_x or need_w1 or need_b1
    mid = torch.ops.aten.convolution(x, w1, b1, [1, 1], geo1[0], geo1[1], False, [0, 0], 1)
    grad_mid, grad_w2 = convolution_backward(g, mid, w2, [1, 1], geo2[0], geo2[1], 1, need_mid, need_w2)
    grad_b1 = grad_mid.sum((0, 2, 3)) if need_b1 else None
    grad_x = grad_w1 = None
    if need_x or need_w1:
        grad_x, grad_w1 = convolution_backward(grad_mid, x, w1, [1, 1], geo1[0], geo1[1], 1, need_x, need_w1)
    return grad_x, grad_w1, grad_w2, grad_b1


def _backward(ctx, grad_output):
    input, w_l1, w_l2, w_r1, w_r2, b_l1, b_r1 = ctx.saved_tensors
    d = ctx.dilation
    needs = ctx.needs_input_grad
    fft = _fft_backward_pays(input, w_l1.shape[2], d)
    # The frequency-domain backward computes in float32 (as the forward's FFT route does).
    cast = (lambda t: None if t is None else t.float()) if fft else (lambda t: t)  # noqa: E731
    x, g = cast(input), cast(grad_output)
    grads = [None] * (10 + ctx.n_extra)
    grad_x = None
    # Branch: (first weight, second weight, first bias, first convolution along H, slots).
    for w1, w2, b1, along_h, (i1, i2, ib1) in (
        (w_l1, w_l2, b_l1, True, (1, 2, 5)),
        (w_r1, w_r2, b_r1, False, (3, 4, 7)),
    ):
        if not (needs[0] or needs[i1] or needs[i2] or needs[ib1]):
            continue
        if fft:
            # Taps as (O, I, k): the k x 1 kernels' H axis, the 1 x k kernels' W axis.
            tall_taps, wide_taps = (lambda w: w[..., 0]), (lambda w: w[:, :, 0, :])  # noqa: E731
            taps1, taps2 = (tall_taps, wide_taps) if along_h else (wide_taps, tall_taps)
            gx, gw1, gw2, gb1 = _branch_backward_fft(x, cast(taps1(w1)), cast(taps2(w2)), cast(b1), g, d, along_h,
                                                      needs[0], needs[i1], needs[i2], needs[ib1])
            unsqueeze = lambda t, tall: None if t is None else t.unsqueeze(-1 if tall else -2)  # noqa: E731
            gw1, gw2 = unsqueeze(gw1, along_h), unsqueeze(gw2, not along_h)
        else:
            gx, gw1, gw2, gb1 = _branch_backward_aten(x, w1, w2, b1, g, d, along_h,
                                                       needs[0], needs[i1], needs[i2], needs[ib1])
        for i, grad, like in ((i1, gw1, w1), (i2, gw2, w2), (ib1, gb1, b1)):
            if grad is not None:
                grads[i] = grad.to(like.dtype)
        if gx is not None:
            grad_x = gx if grad_x is None else grad_x + gx
    if grad_x is not None:
        grads[0] = grad_x.to(input.dtype).contiguous(memory_format=output_memory_format(input))
    if needs[6] or needs[8]:
        grad_b2 = grad_output.sum((0, 2, 3))
        grads[6] = grad_b2 if needs[6] else None
        grads[8] = grad_b2 if needs[8] else None
    return tuple(grads)


def _register(name):
    torch.library.register_fake(name)(_fake_gcn_conv2d)
    _backends.register_autograd(name, _backward, _setup_context)


TRITON_ALGORITHMS = ("auto", "implicit_gemm", "taps")


def cuda_backend(dtype, Cin, Cmid, Cout, k, pixels):
    """What 'auto' runs on CUDA tensors (measured on an H200, benchmarks/RESULTS.md, "NVIDIA H200,
    2026-11-27"): float32 by the taps route where the input has at least as many channels as pixels
    (a deep stage on a small map, where cuDNN's float32 kernels for 21 channels are slowest: the
    route ran 1.9-4.0x eager there), else eager's four convolutions ('reference'). The 'cudnn'
    route's padding costs more per call than its faster kernels save on a lone call (0.44-0.64x
    eager); ``fastseg.nn.GlobalConv2d`` keeps its weights padded and takes it in half precision."""
    taps = dtype == torch.float32 and Cin >= pixels and triton_algorithm(Cin, Cmid, Cout, k) == "taps"
    return "triton" if taps and _backends.unavailable_reason("triton", "cuda") is None else "reference"


def triton_algorithm(Cin, Cmid, Cout, k):
    """The GPU route 'auto' takes: 'taps' (kernels/taps_conv.py: cuBLAS GEMMs over the channels and
    a Triton shift-and-add over the taps) while the GEMMs' per-tap products stay a few times the
    input, else four launches of the implicit-GEMM kernel."""
    return "taps" if 2 * k * max(Cmid, Cout) <= 4 * max(Cin, 64) else "implicit_gemm"


def _triton_forward(input, w_l1, w_l2, w_r1, w_r2, b_l1, b_l2, b_r1, b_r2, dilation, algorithm="auto"):
    if algorithm not in TRITON_ALGORITHMS:
        raise ValueError(f"{OP}: the triton algorithm must be one of {TRITON_ALGORITHMS}, got {algorithm!r}")
    if algorithm == "auto":
        algorithm = triton_algorithm(input.shape[1], w_l1.shape[0], w_l2.shape[0], w_l1.shape[2])
    if algorithm == "taps":
        from ..kernels import taps_conv

        return taps_conv.gcn_conv2d(input, w_l1, w_l2, w_r1, w_r2, b_l1, b_l2, b_r1, b_r2, dilation)
    # Four launches of the atrous implicit-GEMM kernel; each bias rides in its epilogue as the shift,
    # and the last one adds the left branch as its residual (the final add, fused).
    from ..kernels import atrous as kernels

    d = dilation
    p = d * (w_l1.shape[2] - 1) // 2
    one = [1, 1]
    # Every map in the input's format: a one-channel middle map reads as NCHW on its own.
    fmt = output_memory_format(input)
    mid_l = kernels.atrous_conv2d(input, w_l1, None, b_l1, None, one, [p, 0], [d, 1], 1, False, fmt)
    mid_r = kernels.atrous_conv2d(input, w_r1, None, b_r1, None, one, [0, p], [1, d], 1, False, fmt)
    left = kernels.atrous_conv2d(mid_l, w_l2, None, b_l2, None, one, [0, p], [1, d], 1, False, fmt)
    return kernels.atrous_conv2d(mid_r, w_r2, None, b_r2, left, one, [p, 0], [d, 1], 1, False, fmt)


@torch.library.custom_op("fastseg::gcn_conv2d_triton", mutates_args=())
def _gcn_conv2d_triton(
    input: Tensor, w_l1: Tensor, w_l2: Tensor, w_r1: Tensor, w_r2: Tensor, b_l1: Optional[Tensor],
    b_l2: Optional[Tensor], b_r1: Optional[Tensor], b_r2: Optional[Tensor], dilation: int,
    algorithm: str = "auto",
) -> Tensor:
    return _triton_forward(input, w_l1, w_l2, w_r1, w_r2, b_l1, b_l2, b_r1, b_r2, dilation, algorithm)


_register("fastseg::gcn_conv2d_triton")


def pad_channels(w_l1, w_l2, w_r1, w_r2, b_l1, b_l2, b_r1, b_r2, multiple, fmt):
    """The weights and biases with Cmid and Cout zero-padded to multiples of ``multiple``, the
    weights in memory format ``fmt`` (where cuDNN would otherwise copy them)."""
    Cmid, Cout = w_l1.shape[0], w_l2.shape[0]
    pm, po = -Cmid % multiple, -Cout % multiple
    if pm == po == 0:
        return [w.contiguous(memory_format=fmt) for w in (w_l1, w_l2, w_r1, w_r2)] + [b_l1, b_l2, b_r1, b_r2]
    first = lambda w: F.pad(w, (0, 0, 0, 0, 0, 0, 0, pm))  # noqa: E731  (more output channels)
    second = lambda w: F.pad(w, (0, 0, 0, 0, 0, pm, 0, po))  # noqa: E731  (more in and out)
    bias = lambda b, p: None if b is None else F.pad(b, (0, p))  # noqa: E731
    ws = [first(w_l1), second(w_l2), first(w_r1), second(w_r2)]
    return ([w.contiguous(memory_format=fmt) for w in ws]
            + [bias(b_l1, pm), bias(b_l2, po), bias(b_r1, pm), bias(b_r2, po)])


def _cudnn_forward(input, w_l1, w_l2, w_r1, w_r2, b_l1, b_l2, b_r1, b_r2, dilation):
    fmt = output_memory_format(input)
    padded = pad_channels(w_l1, w_l2, w_r1, w_r2, b_l1, b_l2, b_r1, b_r2, channel_multiple(input.dtype), fmt)
    return run_padded(input, padded, w_l2.shape[0], dilation)


@torch.library.custom_op("fastseg::gcn_conv2d_cudnn", mutates_args=())
def _gcn_conv2d_cudnn(
    input: Tensor, w_l1: Tensor, w_l2: Tensor, w_r1: Tensor, w_r2: Tensor, b_l1: Optional[Tensor],
    b_l2: Optional[Tensor], b_r1: Optional[Tensor], b_r2: Optional[Tensor], dilation: int,
) -> Tensor:
    return _cudnn_forward(input, w_l1, w_l2, w_r1, w_r2, b_l1, b_l2, b_r1, b_r2, dilation)


_register("fastseg::gcn_conv2d_cudnn")


def channel_multiple(dtype):
    """What cuDNN's route pads the middle and output channels to: its tensor-core kernels want
    multiples of 8 (a 21-class float16 block ran 1.3 to 2.5x slower unpadded on an H200)."""
    return 8 if dtype in (torch.float16, torch.bfloat16) else 1


def run_padded(input, padded, Cout, dilation):
    """The four convolutions on channel-padded weights (``pad_channels``) and the final add, which
    reads the Cout real channels only: zero weights and biases keep the padded ones zero."""
    left, right = reference.branches(input, *padded, dilation)
    fmt = output_memory_format(input)
    if left.requires_grad or right.requires_grad:  # autograd records no out= ops
        return (left[:, :Cout] + right[:, :Cout]).contiguous(memory_format=fmt)
    out = torch.empty((input.shape[0], Cout, *input.shape[2:]), dtype=input.dtype, device=input.device,
                      memory_format=fmt)
    return torch.add(left[:, :Cout], right[:, :Cout], out=out)


if _backends.EXTENSION_LOADED and hasattr(torch.ops.fastseg, "gcn_conv2d"):
    _register("fastseg::gcn_conv2d")
