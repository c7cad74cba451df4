"""The memory-format rule every op's output follows (mirrors csrc/common.h)."""
import torch


def output_memory_format(t):
    """channels_last when ``t``'s strides are ordered as NHWC, else NCHW: eager PyTorch's own rule
    (``Tensor.suggest_memory_format``), so a channel slice of a channels_last tensor, which is not
    contiguous in either format, stays channels_last as it does through F.conv2d."""
    if t.dim() == 4 and _nhwc_strides(t.shape, t.stride()):
        return torch.channels_last
    return torch.contiguous_format


def _nhwc_strides(sizes, strides):
    # c10's is_channels_last_strides_2d_s4: strides non-decreasing in the order C, W, H, N (a
    # size-1 dimension adds nothing to the next bound); ambiguous cases are NCHW.
    if strides[1] == 0:
        return False
    bound = 0
    for d in (1, 3, 2, 0):
        if sizes[d] == 0 or strides[d] < bound:
            return False
        if d == 0 and bound == strides[1]:  # N111 (or a sliced N11W): NCHW
            return False
        bound = strides[d] * sizes[d] if sizes[d] > 1 else strides[d]
    return True
