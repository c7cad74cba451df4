"""Max-unpooling fused into the next convolution: ``fastseg.unpool_conv2d``.

SegNet's decoder (Badrinarayanan, Kendall & Cipolla, "SegNet: A Deep Convolutional Encoder-Decoder
Architecture for Image Segmentation", TPAMI 2017) upsamples with the encoder's max-pooling indices
and convolves the result, a map four times the pooled one and 75% zeros. This op computes

    y = act(scale * (conv(max_unpool2d(values, indices), weight) + bias) + shift + residual)

without that map ever existing in full: the C++ kernel builds a few rows of it at a time in a
per-thread buffer (csrc/cpu/unpool_conv.cpp), the Triton kernel rebuilds each unpooled pixel inside
the convolution's tile loader (kernels/unpool_conv.py). The epilogue is atrous_conv2d's.
"""
from typing import List, Optional

import torch
from torch import Tensor

from .. import _autocast, _backends
from .._checks import FLOAT_DTYPES, check_same_dtype_device, check_tensor, to_pair
from .._layout import output_memory_format
from ._reference import unpool as reference_unpool
from ._reference import unpool_conv as reference
from .atrous import (_cudnn_forward, _padding, atrous_output_size, check_epilogue, convolution_backward,
                     without_dead_taps)
from .unpool import (_ReferenceMaxUnpool2d, aten_max_unpool2d, aten_route_suits, check_pooled, max_unpool2d,
                     unpool_output_size)

__all__ = ["unpool_conv2d"]

OP = "unpool_conv2d"
_IMPLEMENTED = ("reference", "cpp", "triton", "cudnn")


def unpool_conv2d(
    values, indices, weight, bias=None, *, kernel_size, stride=None, pool_padding=0, output_size=None,
    padding="same", dilation=1, scale=None, shift=None, activation=None, residual=None, backend="auto",
):
    """Max-unpooling followed by a stride-1 (atrous) convolution and a fused per-channel affine,
    residual add and ReLU, without materialising the unpooled map.

    Equals ``atrous_conv2d(max_unpool2d(values, indices, kernel_size, stride, pool_padding,
    output_size), weight, bias, padding=padding, dilation=dilation, scale=scale, shift=shift,
    activation=activation, residual=residual)``: the unpooling arguments are those of
    ``fastseg.max_unpool2d`` (the pooling being inverted; ``pool_padding`` is its padding, since
    ``padding`` is the convolution's), the rest those of ``fastseg.atrous_conv2d``. Indices follow
    max_unpool2d's semantics: positions outside their pooling window are allowed (a slower path
    that does build the unpooled map), where two entries name one position the later in flat
    order wins, and an index outside the (H, W) plane raises IndexError.

    Args:
        values: (B, C, h, w) or (C, h, w) pooled values; float16, bfloat16, float32 or float64;
            NCHW or channels_last (the output takes values' memory format).
        indices: int64 of values' shape, flat positions in each (H, W) unpooled plane, as
            ``max_pool2d(..., return_indices=True)`` returns them.
        weight: (O, C, kH, kW), values' dtype and device.
        bias: (O,) or None.
        kernel_size, stride, pool_padding: those of the max pooling (int or pair); ``stride``
            defaults to ``kernel_size``.
        output_size: the unpooled (H, W), or 4 elements ending in them (e.g. the pooled-from
            batch's ``size()``); by default ``(h - 1) * stride - 2 * pool_padding + kernel_size``.
            Pass it whenever the pooled-from size was odd (SegNet at 360x480 pools 45x60 to 22x30).
        padding: the convolution's: int or pair >= 0, 'valid' or 'same' (``dilation * (k - 1) / 2``).
        dilation: int or pair >= 1 (outer taps that it puts past the map at every output are left
            out, as by ``atrous_conv2d``).
        scale, shift: (O,) per-output-channel affine (a folded BatchNorm), or None.
        activation: None or 'relu'.
        residual: (B, O, Ho, Wo) added before the activation, or None.
        backend: 'auto' (C++ on the CPU, 'cudnn' on CUDA), 'reference', 'cpp', 'triton' or
            'cudnn' (CUDA tensors: ATen's unpooling after a range check, then cuDNN's fused
            convolution + bias (+ residual) + ReLU as in ``atrous_conv2d``; the unpooled map is
            built, as in eager).

    Returns:
        (B, O, Ho, Wo) with Ho = H + 2 pH - dH (kH - 1) (likewise Wo), in values' dtype, device
        and memory format. Differentiable in values, weight, bias, scale, shift and residual (the
        gradient for values is gathered at indices, as max_unpool2d's). Under torch.autocast the
        float operands are cast as F.conv2d's are.

    Example:
        >>> x = torch.randn(1, 64, 45, 61)
        >>> pooled, idx = torch.nn.functional.max_pool2d(x, 2, return_indices=True)
        >>> w = torch.randn(64, 64, 3, 3) / 24
        >>> y = fastseg.unpool_conv2d(pooled, idx, w, kernel_size=2, output_size=x.shape,
        ...                           activation='relu')   # (1, 64, 45, 61)
    """
    values, weight, bias, scale, shift, residual = _autocast.lower_precision(
        values, values, weight, bias, scale, shift, residual)
    check_pooled(OP, "values", values, indices)
    check_tensor(OP, "weight", weight, ndims=(4,), dtypes=FLOAT_DTYPES)
    check_same_dtype_device(OP, "weight", weight, values, "values")
    C, O = values.shape[-3], weight.shape[0]
    if C == 0:
        raise ValueError(f"{OP}: values has no channels: shape {tuple(values.shape)}")
    if weight.shape[1] != C:
        raise ValueError(f"{OP}: weight has shape {tuple(weight.shape)}, expecting (O, {C}, kH, kW) for values "
                         f"with C = {C} channels")
    if 0 in weight.shape:
        raise ValueError(f"{OP}: weight has an empty dimension: shape {tuple(weight.shape)}")
    kernel_size = to_pair(OP, "kernel_size", kernel_size, minimum=1)
    stride = kernel_size if stride is None else to_pair(OP, "stride", stride, minimum=1)
    pool_padding = to_pair(OP, "pool_padding", pool_padding, minimum=0)
    unpooled_hw = _as_op(unpool_output_size, values.shape[-2:], kernel_size, stride, pool_padding, output_size)
    dilation = to_pair(OP, "dilation", dilation, minimum=1)
    kernel = tuple(weight.shape[2:])
    padding = _as_op(_padding, padding, kernel, dilation)
    out_hw = _as_op(atrous_output_size, unpooled_hw, kernel, (1, 1), padding, dilation)
    check_epilogue(OP, "values", values, O, out_hw, bias, scale, shift, activation, residual)
    batched = values.dim() == 4
    impl = _backends.select(OP, backend, values.device, _IMPLEMENTED)

    if bias is not None:  # scale * (conv + bias) + shift = scale * conv + (shift + scale * bias)
        folded = bias if scale is None else scale * bias
        shift = folded if shift is None else shift + folded
    if not batched:
        values, indices = values.unsqueeze(0), indices.unsqueeze(0)
        residual = residual.unsqueeze(0) if residual is not None else None
    relu = activation == "relu"
    if impl != "reference" and _backends.size_fixed(values) and all(isinstance(n, int) for n in unpooled_hw):
        weight, padding, dilation = without_dead_taps(weight, unpooled_hw, out_hw, (1, 1), padding, dilation)
    args = (values, indices, weight, scale, shift, residual, list(kernel_size), list(stride), list(pool_padding),
            list(unpooled_hw), list(padding), list(dilation), relu)
    if impl == "reference":
        out = _reference(*args)
    elif impl == "triton":
        out = _backends.call(torch.ops.fastseg.unpool_conv2d_triton, None, *args)
    elif impl == "cudnn":
        out = _cudnn(*args)
    else:
        out = _backends.call(torch.ops.fastseg.unpool_conv2d, None, *args)
    return out if batched else out.squeeze(0)


def _as_op(fn, *args):
    """Runs a helper shared with max_unpool2d/atrous_conv2d, its errors naming this op."""
    try:
        return fn(*args)
    except (TypeError, ValueError) as error:
        message = str(error)
        for other in ("max_unpool2d:", "atrous_conv2d:"):
            message = message.replace(other, f"{OP}:")
        raise type(error)(message) from None


def _reference(values, indices, weight, scale, shift, residual, kernel_size, stride, pool_padding, output_size,
               padding, dilation, relu):
    # Unpooling's autograd as in fastseg.max_unpool2d: repeated indices all receive their gradient.
    return reference.unpool_conv2d(values, indices, weight, scale, shift, residual, output_size, padding, dilation,
                                   relu, max_unpool2d=_ReferenceMaxUnpool2d.apply)


def _cudnn(values, indices, weight, scale, shift, residual, kernel_size, stride, pool_padding, output_size,
           padding, dilation, relu):
    # ATen's unpooling after the range check, then atrous_conv2d's cuDNN route (its own custom op
    # and autograd): eager's passes less the BatchNorm and ReLU ones. On the H200 this ran 0.80-1.18x
    # eager, unpooling by the Triton kernel 0.31-1.77x (host-bound on small maps: its three launches
    # and status read). Where ATen's route does not suit (deterministic mode, torch.compile):
    # max_unpool2d's own route (a Triton custom op).
    if aten_route_suits():
        unpooled = aten_max_unpool2d(values, indices, kernel_size, stride, pool_padding, output_size)
    else:
        unpooled = max_unpool2d(values, indices, kernel_size, stride, pool_padding, output_size)
    out = _backends.call(torch.ops.fastseg.atrous_conv2d_cudnn, _cudnn_forward, unpooled, weight, scale, shift,
                         residual, [1, 1], padding, dilation, 1, relu)
    return out.contiguous(memory_format=output_memory_format(values))


# --- custom ops: fake kernels and autograd -------------------------------------------------------


def _fake_unpool_conv2d(values, indices, weight, scale, shift, residual, kernel_size, stride, pool_padding,
                        output_size, padding, dilation, relu, *extra):
    kH, kW = weight.shape[2:]
    Ho = output_size[0] + 2 * padding[0] - dilation[0] * (kH - 1)
    Wo = output_size[1] + 2 * padding[1] - dilation[1] * (kW - 1)
    return torch.empty(
        (values.shape[0], weight.shape[0], Ho, Wo), dtype=values.dtype, device=values.device,
        memory_format=output_memory_format(values),
    )


def _setup_context(ctx, inputs, output):
    values, indices, weight, scale, shift, residual = inputs[:6]
    ctx.save_for_backward(values, indices, weight, scale, output if inputs[12] else None)
    ctx.geometry = tuple(inputs[6:12])
    ctx.relu = inputs[12]
    ctx.has = (shift is not None, residual is not None)
    ctx.n_extra = len(inputs) - 13


def _backward(ctx, grad_output):
    # The epilogue's gradient by hand; the unpooled map is rebuilt (training keeps the memory
    # saving of the forward only), then ATen's convolution backward and a gather at the indices.
    from .unpool import max_unpool2d

    values, indices, weight, scale, output = ctx.saved_tensors
    kernel_size, stride, pool_padding, output_size, padding, dilation = ctx.geometry
    needs = ctx.needs_input_grad
    g = grad_output
    if ctx.relu:
        g = torch.where(output <= 0, torch.zeros((), dtype=g.dtype, device=g.device), g)  # NaN passes, as relu's
    grad_scale = grad_shift = grad_residual = grad_values = grad_weight = None
    if needs[5] and ctx.has[1]:
        grad_residual = g
    if needs[4] and ctx.has[0]:
        grad_shift = g.sum((0, 2, 3))
    unpooled = None
    if scale is not None or needs[0] or needs[2]:
        unpooled = max_unpool2d(values, indices, kernel_size, stride, pool_padding, output_size)
    if scale is not None:
        if needs[3]:
            conv = torch.ops.aten.convolution(unpooled, weight, None, [1, 1], padding, dilation, False, [0, 0], 1)
            grad_scale = (g * conv).sum((0, 2, 3))
        g = g * scale.view(1, -1, 1, 1)
    if needs[0] or needs[2]:
        grad_unpooled, grad_weight = convolution_backward(g, unpooled, weight, [1, 1], padding, dilation, 1,
                                                          needs[0], needs[2])
        if needs[0]:
            grad_values = reference_unpool.max_unpool2d_backward(grad_unpooled, indices)
    return (grad_values, None, grad_weight, grad_scale, grad_shift, grad_residual) + (None,) * (7 + ctx.n_extra)


def _register(name):
    torch.library.register_fake(name)(_fake_unpool_conv2d)
    _backends.register_autograd(name, _backward, _setup_context)


@torch.library.custom_op("fastseg::unpool_conv2d_triton", mutates_args=())
def _unpool_conv2d_triton(
    values: Tensor, indices: Tensor, weight: Tensor, scale: Optional[Tensor], shift: Optional[Tensor],
    residual: Optional[Tensor], kernel_size: List[int], stride: List[int], pool_padding: List[int],
    output_size: List[int], padding: List[int], dilation: List[int], relu: bool,
) -> Tensor:
    from ..kernels import unpool_conv as kernels

    return kernels.unpool_conv2d(values, indices, weight, scale, shift, residual, kernel_size, stride, pool_padding,
                                 output_size, padding, dilation, relu)


_register("fastseg::unpool_conv2d_triton")
if _backends.EXTENSION_LOADED and hasattr(torch.ops.fastseg, "unpool_conv2d"):
    _register("fastseg::unpool_conv2d")
