"""Max-unpooling with indices: ``fastseg.max_unpool2d``.

SegNet (Badrinarayanan, Kendall & Cipolla, TPAMI 2017) upsamples its decoder by placing each
pooled value back at the position its encoder max-pooling took it from. The semantics are exactly
those of ``torch.nn.functional.max_unpool2d``; the kernels write every output element once, in a
single pass and without atomics, so they are deterministic; on CUDA 'auto' runs ATen's own kernel
for NCHW input (faster there), whose pick among repeated indices is unspecified, as
``F.max_unpool2d``'s is.
"""
import operator
from typing import List

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _backends
from .._checks import FLOAT_DTYPES, check_same_device, check_tensor, to_pair
from .._layout import output_memory_format
from ._reference import unpool as reference

__all__ = ["max_unpool2d", "unpool_output_size"]

OP = "max_unpool2d"
_IMPLEMENTED = ("reference", "cpp", "cuda", "triton", "aten")



def check_pooled(op, name, values, indices):
    """Pooled values (argument ``name``: (B, C, h, w) or (C, h, w) float, non-empty plane) and
    their int64 indices of the same shape and device, as max_pool2d(return_indices=True) gives them."""
    check_tensor(op, name, values, ndims=(3, 4), dtypes=FLOAT_DTYPES)
    check_tensor(op, "indices", indices, dtypes=(torch.int64,))
    if indices.shape != values.shape:
        raise ValueError(f"{op}: indices has shape {tuple(indices.shape)} but {name} has shape {tuple(values.shape)}")
    check_same_device(op, **{name: values, "indices": indices})
    if values.shape[-1] == 0 or values.shape[-2] == 0:
        raise ValueError(f"{op}: {name} has an empty spatial dimension: shape {tuple(values.shape)}")


def max_unpool2d(input, indices, kernel_size, stride=None, padding=0, output_size=None, *, backend="auto"):
    """Inverse of ``max_pool2d``: scatter ``input`` to the positions in ``indices``, zeros elsewhere.

    Args:
        input: (B, C, H, W) or (C, H, W) pooled values; float16, bfloat16, float32 or float64;
            NCHW or channels_last (the output keeps the input's memory format).
        indices: int64 tensor of input's shape, flat positions in each (Ho, Wo) output plane, as
            ``max_pool2d(..., return_indices=True)`` returns them. Positions outside the pooling
            windows are allowed too (slower path); where two entries name one position the later
            one in flat order wins (with ``backend='aten'``, and 'auto' for NCHW CUDA tensors
            outside ``torch.use_deterministic_algorithms``, ATen's CUDA kernel keeps any one).
        kernel_size, stride, padding: those of the pooling being inverted (int or pair);
            ``stride`` defaults to ``kernel_size``.
        output_size: (Ho, Wo), or 4 elements ending in them (a batch's ``size()``), as
            ``F.max_unpool2d`` takes it; by default
            ``(H - 1) * stride - 2 * padding + kernel_size`` per dimension, and it must lie
            strictly within ``stride`` of that default (as in PyTorch).
        backend: 'auto', or one of 'reference', 'cpp', 'cuda', 'triton', 'aten' (``F.max_unpool2d``
            after fastseg's checks) (see ``fastseg info``).

    Returns:
        (B, C, Ho, Wo) (or (C, Ho, Wo)) tensor of input's dtype and device. Differentiable in
        ``input``: the gradient is ``grad_output`` gathered at ``indices``.

    Example:
        >>> x = torch.randn(1, 64, 32, 32)
        >>> pooled, idx = torch.nn.functional.max_pool2d(x, 2, return_indices=True)
        >>> fastseg.max_unpool2d(pooled, idx, 2).shape
        torch.Size([1, 64, 32, 32])
    """
    check_pooled(OP, "input", input, indices)
    kernel_size = to_pair(OP, "kernel_size", kernel_size, minimum=1)
    stride = kernel_size if stride is None else to_pair(OP, "stride", stride, minimum=1)
    padding = to_pair(OP, "padding", padding, minimum=0)
    out_hw = unpool_output_size(input.shape[-2:], kernel_size, stride, padding, output_size)
    if backend == "auto" and input.device.type == "cuda":
        impl = cuda_backend(input)
    else:
        impl = _backends.select(OP, backend, input.device, _IMPLEMENTED)

    batched = input.dim() == 4
    if not batched:
        input, indices = input.unsqueeze(0), indices.unsqueeze(0)
    if impl == "reference":
        out = _ReferenceMaxUnpool2d.apply(input, indices, out_hw)
    elif impl == "aten":
        out = aten_max_unpool2d(input, indices, kernel_size, stride, padding, out_hw)
    elif impl == "triton":
        out = _backends.call(torch.ops.fastseg.max_unpool2d_triton, None, input, indices, kernel_size, stride, padding,
                             out_hw)
    else:  # cpp or cuda: one op, dispatched on the tensors' device
        out = _backends.call(torch.ops.fastseg.max_unpool2d, None, input, indices, kernel_size, stride, padding, out_hw)
    return out if batched else out.squeeze(0)


def cuda_backend(input):
    """What 'auto' runs on CUDA tensors (an H200, benchmarks/RESULTS.md, "NVIDIA H200, 2026-11-27
    (third session)"): channels_last input by the Triton kernel, which writes its output in that
    format (2.1x ``F.max_unpool2d`` on SegNet's large maps; ATen's CUDA kernel writes NCHW, and
    converting back cost more than the unpooling); NCHW input by ATen's kernel after the range
    check ('aten'); under ``torch.use_deterministic_algorithms``, which ATen's CUDA unpooling
    refuses, by the Triton kernel, else the CUDA C++ one, else the reference. Under torch.compile
    the Triton custom op too: the 'aten' route's range check reads a value back to the host, which
    breaks the graph."""
    triton = _backends.unavailable_reason("triton", "cuda") is None
    if triton and (not aten_route_suits() or output_memory_format(input) == torch.channels_last):
        return "triton"
    if not torch.are_deterministic_algorithms_enabled():
        return "aten"
    return "cuda" if _backends.unavailable_reason("cuda", "cuda") is None else "reference"


def aten_route_suits():
    """Whether ATen's CUDA unpooling may take a call: not under deterministic mode, which it refuses,
    nor while torch.compile traces, whose graph the range check's read-back would break."""
    return not torch.are_deterministic_algorithms_enabled() and not _backends.tracing()


def aten_max_unpool2d(input, indices, kernel_size, stride, padding, output_size):
    """``F.max_unpool2d`` on a 4-D batch, in the input's memory format, after a range check of the
    indices: ATen's CUDA kernel asserts on the device for an index outside the plane, which ends
    the process's CUDA context, so fastseg raises its IndexError first (one pass over the indices
    and a host sync)."""
    Ho, Wo = output_size
    if indices.numel():
        low, high = torch.aminmax(indices)
        if bool((low < 0) | (high >= Ho * Wo)):  # one sync
            reference.raise_index_out_of_range(indices, Ho, Wo)
    out = F.max_unpool2d(input, indices, list(kernel_size), list(stride), list(padding), output_size=[Ho, Wo])
    return out.contiguous(memory_format=output_memory_format(input))


def unpool_output_size(input_hw, kernel_size, stride, padding, output_size=None):
    """(Ho, Wo) of an unpooling, with PyTorch's rules for an explicit ``output_size``."""
    default = [(n - 1) * s - 2 * p + k for n, k, s, p in zip(input_hw, kernel_size, stride, padding)]
    if output_size is None:
        size = default
    else:
        try:
            size = [v if isinstance(v, torch.SymInt) else operator.index(v) for v in output_size]
        except TypeError:  # not a sequence, or a float in it (8.9 is not rounded silently)
            raise TypeError(f"{OP}: output_size must be a sequence of ints, got {output_size!r}") from None
        if len(size) == 4:  # (B, C, Ho, Wo), as x.size() of the pooled-from tensor gives it
            size = size[2:]
        if len(size) != 2:
            raise ValueError(f"{OP}: output_size must have 2 (or 4) elements, got {output_size!r}")
        for d, (got, dflt, s) in enumerate(zip(size, default, stride)):
            if not dflt - s < got < dflt + s:
                raise ValueError(
                    f"{OP}: output_size[{d}] = {got} is not strictly between {dflt - s} and "
                    f"{dflt + s} (the default {dflt} +- stride {s})"
                )
    if min(size) <= 0:
        raise ValueError(f"{OP}: the output would be empty: size {tuple(size)} from input {tuple(input_hw)}")
    # Symbolic sizes (torch.export with dynamic shapes) stay symbolic: int() would specialise them.
    return [v if isinstance(v, torch.SymInt) else int(v) for v in size]


class _ReferenceMaxUnpool2d(torch.autograd.Function):
    # The reference's own autograd would give duplicated indices a zero gradient; this keeps the
    # gradient identical to the kernels' (and ATen's) gather.
    # setup_context apart from forward, and a vmap rule: torch.func's transforms take it.

    @staticmethod
    def forward(input, indices, output_size):
        return reference.max_unpool2d(input, indices, output_size)

    @staticmethod
    def vmap(info, in_dims, input, indices, output_size):
        # Samples are independent: fold vmap's dimension into the batch (the reference's index
        # check reads values, which vmap's own rule for it could not).
        input, indices = [t.movedim(d, 0) if d is not None else t.expand(info.batch_size, *t.shape)
                          for t, d in zip((input, indices), in_dims[:2])]
        out = _ReferenceMaxUnpool2d.apply(input.flatten(0, 1), indices.flatten(0, 1), output_size)
        return out.unflatten(0, (info.batch_size, -1)), 0

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[1])

    @staticmethod
    def backward(ctx, grad_output):
        (indices,) = ctx.saved_tensors
        return reference.max_unpool2d_backward(grad_output, indices), None, None


# --- custom ops: fake kernels and autograd -------------------------------------------------------


def _fake_max_unpool2d(input, indices, kernel_size, stride, padding, output_size):
    B, C = input.shape[:2]
    return torch.empty(
        (B, C, *output_size), dtype=input.dtype, device=input.device,
        memory_format=output_memory_format(input),
    )


def _fake_max_unpool2d_backward(grad_output, indices):
    return torch.empty(
        indices.shape, dtype=grad_output.dtype, device=grad_output.device,
        memory_format=output_memory_format(indices),
    )


def _setup_forward(ctx, inputs, output):
    ctx.save_for_backward(inputs[1])


def _setup_backward(ctx, inputs, output):
    grad_output, indices = inputs
    ctx.save_for_backward(indices)
    ctx.output_size = grad_output.shape[-2:]


def _double_backward(ctx, grad_grad_input):
    (indices,) = ctx.saved_tensors
    return reference.max_unpool2d_backward_adjoint(grad_grad_input, indices, ctx.output_size), None


def _register_autograd(forward_name, backward_name):
    backward_op = getattr(torch.ops.fastseg, backward_name.split("::")[1])

    def backward(ctx, grad_output):
        (indices,) = ctx.saved_tensors
        return _backends.call(backward_op, None, grad_output, indices), None, None, None, None, None

    torch.library.register_fake(forward_name)(_fake_max_unpool2d)
    torch.library.register_fake(backward_name)(_fake_max_unpool2d_backward)
    _backends.register_autograd(forward_name, backward, _setup_forward)
    _backends.register_autograd(backward_name, _double_backward, _setup_backward)


@torch.library.custom_op("fastseg::max_unpool2d_triton", mutates_args=())
def _max_unpool2d_triton(
    input: Tensor, indices: Tensor, kernel_size: List[int], stride: List[int], padding: List[int],
    output_size: List[int],
) -> Tensor:
    from ..kernels import unpool as kernels

    return kernels.max_unpool2d(input, indices, kernel_size, stride, padding, output_size)


@torch.library.custom_op("fastseg::max_unpool2d_backward_triton", mutates_args=())
def _max_unpool2d_backward_triton(grad_output: Tensor, indices: Tensor) -> Tensor:
    from ..kernels import unpool as kernels

    return kernels.max_unpool2d_backward(grad_output, indices)


_register_autograd("fastseg::max_unpool2d_triton", "fastseg::max_unpool2d_backward_triton")
if _backends.EXTENSION_LOADED:
    _register_autograd("fastseg::max_unpool2d", "fastseg::max_unpool2d_backward")
