"""Max-unpooling in plain PyTorch: slow, obviously right, deterministic on every device."""
import torch

from ..._backends import tracing
from ..._checks import check_in_graph
from ..._layout import output_memory_format


def max_unpool2d(input, indices, output_size):
    """Output (B, C, Ho, Wo): each position takes the input value whose index points at it (the
    latest in flat order when several do), zero where none does."""
    B, C, H, W = input.shape
    Ho, Wo = output_size
    plane = Ho * Wo
    flat_indices = indices.reshape(B, C, H * W)
    # (Meta tensors hold no values to check: shapes only. While torch.compile or export traces, a
    # value read in Python would break the graph: the check becomes an assertion in it.)
    if flat_indices.numel() and not indices.is_meta:
        if tracing():
            check_in_graph(((flat_indices >= 0) & (flat_indices < plane)).all(),
                           f"max_unpool2d: indices contains a value outside the output plane of {Ho}x{Wo} "
                           f"(valid: 0 to {plane - 1})")
        elif flat_indices.min() < 0 or flat_indices.max() >= plane:
            raise_index_out_of_range(flat_indices, Ho, Wo)
    # For each output position, the flat order of the last input entry pointing at it, or -1.
    order = torch.arange(H * W, device=input.device).expand(B, C, H * W)
    winner = torch.full((B, C, plane), -1, dtype=torch.long, device=input.device)
    winner.scatter_reduce_(2, flat_indices, order, reduce="amax")
    values = input.reshape(B, C, H * W).gather(2, winner.clamp(min=0))
    out = torch.where(winner >= 0, values, torch.zeros((), dtype=input.dtype, device=input.device))
    return out.reshape(B, C, Ho, Wo).contiguous(memory_format=output_memory_format(input))


def raise_index_out_of_range(indices, Ho, Wo):
    """The IndexError every Python backend raises for an index outside the (Ho, Wo) plane; the
    C++ kernels raise the same message (csrc/unpool.h)."""
    plane = Ho * Wo
    bad = indices[(indices < 0) | (indices >= plane)].flatten()[0].item()
    raise IndexError(
        f"max_unpool2d: indices contains {bad}, outside the output plane of {Ho}x{Wo} (valid: 0 to {plane - 1})"
    )


def max_unpool2d_backward(grad_output, indices):
    """Gradient with respect to input: grad_output gathered at indices. Like ATen, every entry
    receives the gradient of the position it points at, also when several point at one."""
    B, C, Ho, Wo = grad_output.shape
    flat_indices = indices.reshape(B, C, indices.shape[-2] * indices.shape[-1])  # (-1 fails at B = 0)
    grad = grad_output.reshape(B, C, Ho * Wo).gather(2, flat_indices)
    return grad.reshape(indices.shape).contiguous(memory_format=output_memory_format(indices))


def max_unpool2d_backward_adjoint(grad_grad_input, indices, output_size):
    """Adjoint of max_unpool2d_backward with respect to grad_output (for double backward)."""
    B, C = indices.shape[:2]
    Ho, Wo = output_size
    out = grad_grad_input.new_zeros((B, C, Ho * Wo))
    n = indices.shape[-2] * indices.shape[-1]  # (-1 fails at B = 0)
    out.scatter_add_(2, indices.reshape(B, C, n), grad_grad_input.reshape(B, C, n))
    return out.reshape(B, C, Ho, Wo)
