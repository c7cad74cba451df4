"""The memory-format rule every op's output follows (mirrors csrc/common.h)."""
import torch


def output_memory_format(t):
    """channels_last when ``t`` is channels_last and not also NCHW contiguous, else NCHW."""
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format
