"""Atrous convolution with a fused epilogue in plain PyTorch: the oracle and the fallback.

y = act(scale * conv(x, weight) + shift + residual), each term optional; ``conv`` is F.conv2d with
the given stride, padding, dilation and groups (the a trous algorithm of Yu & Koltun 2016 and
Chen et al.'s DeepLab).
"""
import torch.nn.functional as F

from ..._layout import output_memory_format


def epilogue(conv, scale, shift, residual, relu):
    """act(scale * conv + shift + residual), per-channel scale/shift of shape (O,)."""
    y = conv
    if scale is not None:
        y = y * scale.view(1, -1, 1, 1)
    if shift is not None:
        y = y + shift.view(1, -1, 1, 1)
    if residual is not None:
        y = y + residual
    if relu:
        y = F.relu(y)
    return y


def atrous_conv2d(input, weight, scale, shift, residual, stride, padding, dilation, groups, relu):
    """input (B, C, H, W), weight (O, C / groups, kH, kW) -> (B, O, Ho, Wo) in input's format."""
    conv = F.conv2d(input, weight, None, stride, padding, dilation, groups)
    out = epilogue(conv, scale, shift, residual, relu)
    return out.contiguous(memory_format=output_memory_format(input))
