"""Atrous (dilated) convolution with a fused epilogue: ``fastseg.atrous_conv2d``.

The a trous algorithm convolves with a kernel whose taps are ``dilation`` pixels apart, enlarging
the receptive field without pooling or extra weights: Yu & Koltun, "Multi-Scale Context Aggregation
by Dilated Convolutions" (ICLR 2016); Chen et al., "DeepLab: Semantic Image Segmentation with Deep
Convolutional Nets, Atrous Convolution, and Fully Connected CRFs" (TPAMI 2017, v2) and "Rethinking
Atrous Convolution for Semantic Image Segmentation" (arXiv 1706.05587, 2017, v3). Those networks
follow every such convolution by BatchNorm and ReLU, and often a residual add; here they are one
epilogue of the convolution instead of separate passes over memory:

    y = act(scale * (conv(x, weight) + bias) + shift + residual)

with per-output-channel ``scale``/``shift`` (a folded BatchNorm) and ``act`` ReLU or identity.
"""
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _autocast, _backends
from .._checks import FLOAT_DTYPES, check_same_dtype_device, check_tensor, to_pair
from .._layout import output_memory_format
from ._reference import atrous as reference

__all__ = ["atrous_conv2d", "atrous_output_size", "ACTIVATIONS"]

OP = "atrous_conv2d"
ACTIVATIONS = (None, "relu")
_IMPLEMENTED = ("reference", "cpp", "triton", "cudnn")


def atrous_conv2d(
    x, weight, bias=None, *, stride=1, padding="same", dilation=1, groups=1, scale=None, shift=None,
    activation=None, residual=None, backend="auto",
):
    """Dilated 2-D convolution followed by a fused per-channel affine, residual add and ReLU.

    Computes ``act(scale * (conv2d(x, weight) + bias) + shift + residual)`` in one call, where
    ``conv2d`` is ``torch.nn.functional.conv2d`` with the given stride, padding, dilation and
    groups, and every term of the epilogue is optional. A BatchNorm in eval mode folds into
    ``scale = gamma / sqrt(var + eps)`` and ``shift = beta - mean * scale``.

    Args:
        x: (B, C, H, W) or (C, H, W); float16, bfloat16, float32 or float64; NCHW or
            channels_last (the output takes x's memory format).
        weight: (O, C / groups, kH, kW), x's dtype and device.
        bias: (O,) or None.
        stride: int or pair, >= 1.
        padding: int or pair >= 0 (zero padding on both sides), 'valid' (0) or 'same'
            (``dilation * (k - 1) / 2`` per side, which needs ``dilation * (k - 1)`` even; the output
            is then ceil(H / stride) x ceil(W / stride)).
        dilation: int or pair, >= 1 (the atrous rate).
        groups: divides C and O; ``groups == C`` is a depthwise convolution.
        scale, shift: (O,) per-output-channel affine, or None.
        activation: None or 'relu'.
        residual: (B, O, Ho, Wo) (or (O, Ho, Wo)) added before the activation, or None.
        backend: 'auto' (the C++ kernel on the CPU, 'cudnn' on CUDA), 'reference', 'cpp',
            'cudnn' (CUDA tensors: ``scale`` folded into the weights, then cuDNN's fused convolution +
            bias (+ residual) + ReLU) or 'triton' (CUDA tensors; CPU tensors under TRITON_INTERPRET=1).

    Returns:
        (B, O, Ho, Wo) with Ho = floor((H + 2 pH - dH (kH - 1) - 1) / sH) + 1 (likewise Wo), in x's
        dtype, device and memory format. Differentiable in x, weight, bias, scale, shift and
        residual. Under torch.autocast the operands are cast as F.conv2d's are (float32 ones to
        autocast's dtype), and the output is in that dtype.

    On the CPU, float32 3x3 convolutions at stride 1 with enough channels (on AVX2 machines 64+
    input and 16+ output channels for channels_last inputs, 64+ / 64+ for NCHW (on Intel AVX-512
    also 16+ outputs from 128 to 256 inputs, or from 64 on maps up to 33 x 33, where it is taken
    at any rate up to 512 inputs, 256 and under 128 outputs for NCHW); elsewhere 256+ /
    128+) run as Winograd minimal-filtering tiles (Lavin & Gray, CVPR 2016) laid over the rate's
    interleaved sub-grids, skipping the zero padding and most multiplications; their transformed
    weights are kept for reuse while the weights' bytes are unchanged (512 MiB in all, or
    ``FASTSEG_WINOGRAD_CACHE_MB``; past it, layers whose transforms cannot be kept are routed as if
    recomputed on every call), so the first call with new weights is slower. As in every
    Winograd implementation, a non-finite input value can turn the other outputs of its tile into
    NaN (their terms in it cancel only in exact arithmetic: inf - inf), and the transforms' sums of a
    tile's inputs overflow float32 for values above about 1e37 where a direct convolution need not.
    Other cases call oneDNN with
    the epilogue fused into one pass. Every backend but 'reference' first leaves out the outer taps
    that meet only zero padding at every output (``without_dead_taps``): at a rate near the map's
    size (DeepLab v3's rate 36 on a 33 x 33 map) the convolution shrinks to the live centre taps.

    Example:
        >>> x = torch.randn(1, 256, 65, 65)
        >>> w = torch.randn(256, 256, 3, 3) / 48
        >>> y = fastseg.atrous_conv2d(x, w, dilation=12, activation='relu')   # (1, 256, 65, 65)
    """
    x, weight, bias, scale, shift, residual = _autocast.lower_precision(x, x, weight, bias, scale, shift, residual)
    check_tensor(OP, "x", x, ndims=(3, 4), dtypes=FLOAT_DTYPES)
    check_tensor(OP, "weight", weight, ndims=(4,), dtypes=FLOAT_DTYPES)
    check_same_dtype_device(OP, "weight", weight, x)
    if not isinstance(groups, int) or isinstance(groups, bool):
        raise TypeError(f"{OP}: groups must be an int, got {groups!r}")
    if groups < 1:
        raise ValueError(f"{OP}: groups must be >= 1, got {groups}")
    C, O = x.shape[-3], weight.shape[0]
    if C == 0:  # F.conv2d would return 0 channels, not the epilogue of an empty sum
        raise ValueError(f"{OP}: x has no channels: shape {tuple(x.shape)}")
    if C % groups:
        raise ValueError(f"{OP}: groups = {groups} does not divide the {C} input channels of x")
    if O % groups:
        raise ValueError(f"{OP}: groups = {groups} does not divide the {O} output channels of weight")
    if weight.shape[1] * groups != C:
        raise ValueError(
            f"{OP}: weight has shape {tuple(weight.shape)}, expecting (O, C / groups = {C // groups}, kH, kW) "
            f"for x with C = {C} channels and groups = {groups}"
        )
    if weight.shape[2] == 0 or weight.shape[3] == 0 or O == 0:
        raise ValueError(f"{OP}: weight has an empty dimension: shape {tuple(weight.shape)}")
    stride = to_pair(OP, "stride", stride, minimum=1)
    dilation = to_pair(OP, "dilation", dilation, minimum=1)
    kernel = tuple(weight.shape[2:])
    padding = _padding(padding, kernel, dilation)
    out_hw = atrous_output_size(x.shape[-2:], kernel, stride, padding, dilation)
    check_epilogue(OP, "x", x, O, out_hw, bias, scale, shift, activation, residual)
    batched = x.dim() == 4
    impl = _backends.select(OP, backend, x.device, _IMPLEMENTED)

    if bias is not None:  # scale * (conv + bias) + shift = scale * conv + (shift + scale * bias)
        folded = bias if scale is None else scale * bias
        shift = folded if shift is None else shift + folded
    if not batched:
        x = x.unsqueeze(0)
        residual = residual.unsqueeze(0) if residual is not None else None
    relu = activation == "relu"
    if impl != "reference" and _backends.size_fixed(x):
        weight, padding, dilation = without_dead_taps(weight, x.shape[-2:], out_hw, stride, padding, dilation)
    args = (x, weight, scale, shift, residual, list(stride), list(padding), list(dilation), groups, relu)
    if impl == "reference":
        out = reference.atrous_conv2d(*args)
    elif impl == "triton":
        out = _backends.call(torch.ops.fastseg.atrous_conv2d_triton, None, *args)
    elif impl == "cudnn":
        out = _backends.call(torch.ops.fastseg.atrous_conv2d_cudnn, _cudnn_forward, *args)
    else:
        # Weights that autograd will update change on every call: the CPU kernel neither keeps nor
        # looks up their Winograd transforms then. (A torch.jit trace would freeze the choice: there
        # 'auto', whose cache is matched by the weights' bytes, right for any call.)
        training = torch.is_grad_enabled() and weight.requires_grad and not torch.jit.is_tracing()
        out = _backends.call(torch.ops.fastseg.atrous_conv2d, None, *args, "auto_training" if training else "auto")
    return out if batched else out.squeeze(0)


def atrous_output_size(input_hw, kernel_size, stride, padding, dilation):
    """(Ho, Wo) of a convolution; a ValueError naming the cause when it would be empty."""
    size = [
        (n + 2 * p - d * (k - 1) - 1) // s + 1
        for n, k, s, p, d in zip(input_hw, kernel_size, stride, padding, dilation)
    ]
    if min(input_hw) <= 0:
        raise ValueError(f"{OP}: x has an empty spatial dimension: {tuple(input_hw)}")
    if min(size) <= 0:
        raise ValueError(
            f"{OP}: the output would be empty: input {tuple(input_hw)} with padding {tuple(padding)} is "
            f"smaller than the dilated kernel ({', '.join(str(d * (k - 1) + 1) for k, d in zip(kernel_size, dilation))})"
        )
    return size


def without_dead_taps(weight, input_hw, out_hw, stride, padding, dilation):
    """The weight without the outer rows and columns of taps that meet only zero padding at every
    output, the padding that keeps each remaining tap reading the same pixels, and the dilation
    (1 along an axis left with one tap, where oneDNN's dilated kernels ran 2.5x slower than its plain
    1 x 1 one).

    At a rate near the map's size the outer taps of a dilated kernel fall past the map for every
    output (DeepLab v3, Sec. 3.3: at rate 36 on a 33 x 33 map a 3 x 3 kernel degenerates to its
    centre, a 1 x 1 convolution), yet a convolution multiplies them all. Taps are cut in equal
    numbers from both ends of an axis, as many as are dead on the less dead side and as the padding
    allows (each cut removes ``dilation`` pixels of it), so the output size and every live tap's
    input are unchanged; their gradients are zero, which the slice's backward fills in."""
    cut = [0, 0]
    for axis in (0, 1):
        k, p, d = weight.shape[2 + axis], padding[axis], dilation[axis]
        if p < d:  # no padding to give back (the common case at rate 1 and 'valid')
            continue
        geometry = (input_hw[axis], out_hw[axis], stride[axis], p, d)
        if _tap_live(0, *geometry) or _tap_live(k - 1, *geometry):  # either end live: nothing to cut
            continue
        taps = [t for t in range(k) if _tap_live(t, *geometry)]
        cut[axis] = min(taps[0], k - 1 - taps[-1], p // d) if taps else 0
    if cut == [0, 0]:
        return weight, padding, dilation
    (cH, cW), (kH, kW) = cut, weight.shape[2:]
    padding = tuple(p - c * d for p, c, d in zip(padding, cut, dilation))
    dilation = tuple(1 if k - 2 * c == 1 else d for k, c, d in zip((kH, kW), cut, dilation))
    return weight[:, :, cH:kH - cH, cW:kW - cW], padding, dilation


def _tap_live(t, n, n_out, s, p, d):
    """Whether tap t reads the map at some output: it reads positions o s - p + t d, o < n_out, of
    an axis n long."""
    return max(-((t * d - p) // s), 0) <= min((n - 1 + p - t * d) // s, n_out - 1)


def check_epilogue(op, x_name, x, O, out_hw, bias, scale, shift, activation, residual):
    """Checks the fused epilogue's arguments (shared by the convolution ops): bias, scale and shift
    of shape (O,), a residual of the output's shape (batch of ``x``, O, *out_hw), all of ``x``'s
    dtype and device, and the activation's name."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"{op}: activation must be None or 'relu', got {activation!r}")
    for name, t in (("bias", bias), ("scale", scale), ("shift", shift)):
        if t is not None:
            check_tensor(op, name, t, dtypes=FLOAT_DTYPES)
            if t.shape != (O,):
                raise ValueError(f"{op}: {name} has shape {tuple(t.shape)}, expecting ({O},): one per output channel")
            check_same_dtype_device(op, name, t, x, x_name)
    if residual is not None:
        check_tensor(op, "residual", residual, dtypes=FLOAT_DTYPES)
        expected = (*x.shape[:-3], O, *out_hw)
        if residual.shape != expected:
            raise ValueError(f"{op}: residual has shape {tuple(residual.shape)}, expecting the output's {expected}")
        check_same_dtype_device(op, "residual", residual, x, x_name)


def _padding(padding, kernel, dilation):
    if isinstance(padding, str):
        if padding == "valid":
            return (0, 0)
        if padding != "same":
            raise ValueError(f"{OP}: padding must be an int, a pair, 'same' or 'valid', got {padding!r}")
        total = [d * (k - 1) for k, d in zip(kernel, dilation)]
        if any(t % 2 for t in total):
            raise ValueError(
                f"{OP}: padding='same' needs dilation * (kernel_size - 1) even, got {tuple(total)} for "
                f"kernel {kernel} and dilation {dilation}; pass an explicit padding"
            )
        return tuple(t // 2 for t in total)
    return to_pair(OP, "padding", padding, minimum=0)



# --- custom ops: fake kernels and autograd -------------------------------------------------------


def _fake_atrous_conv2d(input, weight, scale, shift, residual, stride, padding, dilation, groups, relu, *extra):
    B = input.shape[0]
    kernel = weight.shape[2:]
    Ho, Wo = [
        (n + 2 * p - d * (k - 1) - 1) // s + 1 for n, k, s, p, d in zip(input.shape[2:], kernel, stride, padding, dilation)
    ]
    return torch.empty(
        (B, weight.shape[0], Ho, Wo), dtype=input.dtype, device=input.device,
        memory_format=output_memory_format(input),
    )


def _setup_context(ctx, inputs, output):
    input, weight, scale, shift, residual, stride, padding, dilation, groups, relu = inputs[:10]
    ctx.save_for_backward(input, weight, scale, output if relu else None)
    ctx.geometry = (stride, padding, dilation, groups)
    ctx.relu = relu
    ctx.has = (shift is not None, residual is not None)
    ctx.n_extra = len(inputs) - 10


def _backward(ctx, grad_output):
    # The epilogue's gradient by hand, then ATen's convolution backward for x and weight.
    input, weight, scale, output = ctx.saved_tensors
    stride, padding, dilation, groups = ctx.geometry
    needs = ctx.needs_input_grad
    g = grad_output
    if ctx.relu:
        g = torch.where(output <= 0, torch.zeros((), dtype=g.dtype, device=g.device), g)  # NaN passes, as relu's
    grad_scale = grad_shift = grad_residual = None
    if needs[4] and ctx.has[1]:
        grad_residual = g
    if needs[3] and ctx.has[0]:
        grad_shift = g.sum((0, 2, 3))
    if scale is not None:
        if needs[2]:
            conv = torch.ops.aten.convolution(input, weight, None, stride, padding, dilation, False, [0, 0], groups)
            grad_scale = (g * conv).sum((0, 2, 3))
        g = g * scale.view(1, -1, 1, 1)
    grad_input = grad_weight = None
    if needs[0] or needs[1]:
        grad_input, grad_weight = convolution_backward(g, input, weight, stride, padding, dilation, groups,
                                                       needs[0], needs[1])
    return (grad_input, grad_weight, grad_scale, grad_shift, grad_residual) + (None,) * (5 + ctx.n_extra)


def convolution_backward(grad, input, weight, stride, padding, dilation, groups, need_input, need_weight):
    """(grad_input, grad_weight) of ``conv2d(input, weight)`` (no bias) through ATen, None where not
    needed. On the CPU, where the kernel reaches past the map along a padded axis (dilation (k - 1)
    >= its length), the map is zero-padded by hand and the convolution given no padding: with the
    padding as an argument, oneDNN's weight gradient of k x 1 and 1 x k kernels (torch 2.14, eager
    PyTorch too) corrupted the heap, crashed or returned values off by 1e9 on such shapes (39 x 1
    taps over 20 x 64 at 17 to 32 channels; a segmentation fault in each of three random sweeps of
    fastseg.atrous_conv2d's training step), and with the padding in the map it never did (1356
    random shapes, within 1e-6 of float64). The padding copies only maps smaller than the kernel."""
    mask = [need_input, need_weight, False]
    if not reference.reaches_past(input, weight.shape[-2:], padding, dilation):
        grad_input, grad_weight, _ = torch.ops.aten.convolution_backward(
            grad, input, weight, None, stride, padding, dilation, False, [0, 0], groups, mask)
        return grad_input, grad_weight
    (pH, pW), (H, W) = padding, input.shape[-2:]
    padded = F.pad(input, (pW, pW, pH, pH))
    grad_input, grad_weight, _ = torch.ops.aten.convolution_backward(
        grad, padded, weight, None, stride, [0, 0], dilation, False, [0, 0], groups, mask)
    if grad_input is not None:
        grad_input = grad_input[..., pH:pH + H, pW:pW + W].contiguous(memory_format=output_memory_format(input))
    return grad_input, grad_weight


def _register(name):
    torch.library.register_fake(name)(_fake_atrous_conv2d)
    _backends.register_autograd(name, _backward, _setup_context)


@torch.library.custom_op("fastseg::atrous_conv2d_triton", mutates_args=())
def _atrous_conv2d_triton(
    input: Tensor, weight: Tensor, scale: Optional[Tensor], shift: Optional[Tensor], residual: Optional[Tensor],
    stride: List[int], padding: List[int], dilation: List[int], groups: int, relu: bool,
) -> Tensor:
    from ..kernels import atrous as kernels

    return kernels.atrous_conv2d(input, weight, scale, shift, residual, stride, padding, dilation, groups, relu)


_register("fastseg::atrous_conv2d_triton")


def _cudnn_forward(input, weight, scale, shift, residual, stride, padding, dilation, groups, relu):
    # scale * conv(x, w) = conv(x, scale * w): with the scale in the weights, shift is the bias of
    # cuDNN's fused convolution + bias (+ z) + ReLU (one kernel instead of eager's conv, BatchNorm
    # and ReLU passes). The weights are folded in the input's memory format, which ATen would
    # otherwise copy them into on every call.
    fmt = output_memory_format(input)
    if scale is not None:
        folded = torch.empty_like(weight, memory_format=fmt)
        weight = torch.mul(weight, scale.view(-1, 1, 1, 1), out=folded)
    if relu and input.dtype != torch.float64:  # float64 (gradcheck's dtype) takes the plain convolution
        if residual is None:
            out = torch.cudnn_convolution_relu(input, weight, shift, stride, padding, dilation, groups)
        else:
            out = torch.cudnn_convolution_add_relu(input, weight, residual, 1.0, shift, stride, padding, dilation,
                                                   groups)
        return out.contiguous(memory_format=fmt)
    out = F.conv2d(input, weight, shift, stride, padding, dilation, groups)
    if residual is not None:
        out = out.add_(residual)
    return (out.relu_() if relu else out).contiguous(memory_format=fmt)


@torch.library.custom_op("fastseg::atrous_conv2d_cudnn", mutates_args=())
def _atrous_conv2d_cudnn(
    input: Tensor, weight: Tensor, scale: Optional[Tensor], shift: Optional[Tensor], residual: Optional[Tensor],
    stride: List[int], padding: List[int], dilation: List[int], groups: int, relu: bool,
) -> Tensor:
    return _cudnn_forward(input, weight, scale, shift, residual, stride, padding, dilation, groups, relu)


_register("fastseg::atrous_conv2d_cudnn")
if _backends.EXTENSION_LOADED and hasattr(torch.ops.fastseg, "atrous_conv2d"):
    _register("fastseg::atrous_conv2d")
