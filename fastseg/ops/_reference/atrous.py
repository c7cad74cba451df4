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


def reaches_past(input, kernel_size, padding, dilation):
    """Whether, on the CPU, a kernel reaches past input's map along a padded axis (dilation (k - 1)
    >= its length): there oneDNN's weight gradient of k x 1 and 1 x k kernels (torch 2.14) crashes
    the process or returns garbage when the padding is an argument of the convolution, and never
    did with the map padded by hand (benchmarks/RESULTS.md)."""
    return input.device.type == "cpu" and any(
        p > 0 and d * (k - 1) >= n for n, k, p, d in zip(input.shape[-2:], kernel_size, padding, dilation))


def conv2d(input, weight, bias, stride, padding, dilation, groups):
    """F.conv2d, with the map padded by hand where ``reaches_past`` (autograd then differentiates
    the pad instead of handing oneDNN the padding)."""
    if reaches_past(input, weight.shape[-2:], padding, dilation):
        (pH, pW) = padding
        return F.conv2d(F.pad(input, (pW, pW, pH, pH)), weight, bias, stride, 0, dilation, groups)
    return F.conv2d(input, weight, bias, stride, padding, dilation, groups)


def atrous_conv2d(input, weight, scale, shift, residual, stride, padding, dilation, groups, relu):
    """input (B, C, H, W), weight (O, C / groups, kH, kW) -> (B, O, Ho, Wo) in input's format."""
    conv = conv2d(input, weight, None, stride, padding, dilation, groups)
    out = epilogue(conv, scale, shift, residual, relu)
    return out.contiguous(memory_format=output_memory_format(input))
