"""Max-unpooling then a stride-1 atrous convolution with the fused epilogue, in plain PyTorch: the
oracle and the fallback of ``fastseg.unpool_conv2d`` (SegNet's decoder, Badrinarayanan et al. 2017)."""
from . import atrous, unpool


def unpool_conv2d(values, indices, weight, scale, shift, residual, output_size, padding, dilation, relu,
                  max_unpool2d=unpool.max_unpool2d):
    """act(scale * conv(max_unpool2d(values, indices, output_size), weight) + shift + residual):
    exactly the composition of the two references. ``max_unpool2d`` may be replaced by a version
    with another autograd (fastseg/ops/unpool.py's gathers the gradient of repeated indices)."""
    unpooled = max_unpool2d(values, indices, output_size)
    return atrous.atrous_conv2d(unpooled, weight, scale, shift, residual, [1, 1], padding, dilation, 1, relu)
