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

Backward, for every input: the middle maps are recomputed with ATen's convolution and the gradients
chained through ATen's convolution backward (four calls), so it matches PyTorch's own.
"""
from typing import Optional

import torch
from torch import Tensor

from .. import _backends
from .._checks import FLOAT_DTYPES, check_same_dtype_device, check_tensor
from .._layout import output_memory_format
from ._reference import gcn as reference

__all__ = ["gcn_conv2d"]

OP = "gcn_conv2d"
_IMPLEMENTED = ("reference", "cpp", "triton")
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
        dilation: int >= 1, the rate of every convolution along its long axis.
        backend: 'auto' (the C++ kernel on the CPU; on CUDA the plain-PyTorch path, which beat the
            Triton kernel where measured), 'reference', 'cpp' or 'triton' (CUDA tensors; CPU tensors
            under TRITON_INTERPRET=1).

    Returns:
        (B, Cout, H, W) (or (Cout, H, W)) in x's dtype, device and memory format; differentiable in x,
        every weight and every bias.

    Example:
        >>> x = torch.randn(1, 2048, 16, 16)
        >>> w_l1, w_r1 = torch.randn(21, 2048, 15, 1) / 175, torch.randn(21, 2048, 1, 15) / 175
        >>> w_l2, w_r2 = torch.randn(21, 21, 1, 15) / 18, torch.randn(21, 21, 15, 1) / 18
        >>> y = fastseg.gcn_conv2d(x, w_l1, w_l2, w_r1, w_r2)   # (1, 21, 16, 16)
    """
    check_tensor(OP, "x", x, ndims=(3, 4), dtypes=FLOAT_DTYPES)
    weights = dict(zip(_WEIGHTS, (w_l1, w_l2, w_r1, w_r2)))
    for name, w in weights.items():
        check_tensor(OP, name, w, ndims=(4,), dtypes=FLOAT_DTYPES)
        check_same_dtype_device(OP, name, w, x)
    Cin = x.shape[-3]
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
    impl = _backends.select(OP, backend, x.device, _IMPLEMENTED)

    batched = x.dim() == 4
    if not batched:
        x = x.unsqueeze(0)
    args = (x, w_l1, w_l2, w_r1, w_r2, b_l1, b_l2, b_r1, b_r2, dilation)
    if impl == "reference":
        out = reference.gcn_conv2d(*args)
    elif impl == "triton":
        out = torch.ops.fastseg.gcn_conv2d_triton(*args)
    else:
        # Weights that autograd will update change on every call: the CPU kernel neither keeps nor
        # looks up their spectra then.
        training = torch.is_grad_enabled() and any(w.requires_grad for w in weights.values())
        out = torch.ops.fastseg.gcn_conv2d(*args, "auto_training" if training else "auto")
    return out if batched else out.squeeze(0)



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


def _backward(ctx, grad_output):
    # The middle maps are recomputed (not saved: they would double the forward's memory), then ATen's
    # convolution backward runs each branch's two convolutions in reverse.
    input, w_l1, w_l2, w_r1, w_r2, b_l1, b_r1 = ctx.saved_tensors
    d = ctx.dilation
    k = w_l1.shape[2]
    p = d * (k - 1) // 2
    tall = ([p, 0], [d, 1])
    wide = ([0, p], [1, d])
    needs = ctx.needs_input_grad
    g = grad_output
    grad_b2 = g.sum((0, 2, 3)) if (needs[6] or needs[8]) else None
    grads = [None] * (10 + ctx.n_extra)
    grad_x = None
    # Branch: (first weight, second weight, first bias, first geometry, second geometry, slots).
    for w1, w2, b1, geo1, geo2, (i1, i2, ib1) in (
        (w_l1, w_l2, b_l1, tall, wide, (1, 2, 5)),
        (w_r1, w_r2, b_r1, wide, tall, (3, 4, 7)),
    ):
        need_mid = needs[0] or needs[i1] or needs[ib1]
        if not (need_mid or needs[i2]):
            continue
        mid = torch.ops.aten.convolution(input, w1, b1, [1, 1], geo1[0], geo1[1], False, [0, 0], 1)
        grad_mid, grad_w2, _ = torch.ops.aten.convolution_backward(
            g, mid, w2, None, [1, 1], geo2[0], geo2[1], False, [0, 0], 1, [need_mid, needs[i2], False],
        )
        grads[i2] = grad_w2
        if not need_mid:
            continue
        if needs[ib1]:
            grads[ib1] = grad_mid.sum((0, 2, 3))
        if needs[0] or needs[i1]:
            gx, gw1, _ = torch.ops.aten.convolution_backward(
                grad_mid, input, w1, None, [1, 1], geo1[0], geo1[1], False, [0, 0], 1, [needs[0], needs[i1], False],
            )
            grads[i1] = gw1
            if gx is not None:
                grad_x = gx if grad_x is None else grad_x + gx
    grads[0] = grad_x
    if needs[6]:
        grads[6] = grad_b2
    if needs[8]:
        grads[8] = grad_b2
    return tuple(grads)


def _register(name):
    torch.library.register_fake(name)(_fake_gcn_conv2d)
    torch.library.register_autograd(name, _backward, setup_context=_setup_context)


@torch.library.custom_op("fastseg::gcn_conv2d_triton", mutates_args=())
def _gcn_conv2d_triton(
    input: Tensor, w_l1: Tensor, w_l2: Tensor, w_r1: Tensor, w_r2: Tensor, b_l1: Optional[Tensor],
    b_l2: Optional[Tensor], b_r1: Optional[Tensor], b_r2: Optional[Tensor], dilation: int,
) -> Tensor:
    # Four launches of the atrous implicit-GEMM kernel; each bias rides in its epilogue as the shift,
    # and the last one adds the left branch as its residual (the final add, fused).
    from ..kernels import atrous as kernels

    d = dilation
    p = d * (w_l1.shape[2] - 1) // 2
    one = [1, 1]
    mid_l = kernels.atrous_conv2d(input, w_l1, None, b_l1, None, one, [p, 0], [d, 1], 1, False)
    mid_r = kernels.atrous_conv2d(input, w_r1, None, b_r1, None, one, [0, p], [1, d], 1, False)
    left = kernels.atrous_conv2d(mid_l, w_l2, None, b_l2, None, one, [0, p], [1, d], 1, False)
    return kernels.atrous_conv2d(mid_r, w_r2, None, b_r2, left, one, [p, 0], [d, 1], 1, False)


_register("fastseg::gcn_conv2d_triton")
if _backends.EXTENSION_LOADED and hasattr(torch.ops.fastseg, "gcn_conv2d"):
    _register("fastseg::gcn_conv2d")
