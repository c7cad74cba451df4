"""Large-kernel layers of Peng et al., "Large Kernel Matters -- Improve Semantic Segmentation by
Global Convolutional Network" (CVPR 2017): ``GlobalConv2d`` (the GCN block, Fig. 2(b)) and
``BoundaryRefinement`` (the BR block, Fig. 2(c)).

Parameters live in plain ``nn.Conv2d`` modules, so state dicts match a plain-PyTorch version of the
same block; the forward passes go through ``fastseg.gcn_conv2d`` and ``fastseg.atrous_conv2d``.
"""
import torch
from torch import nn

from .. import _backends
from .._checks import is_plain_batch
from .._layout import output_memory_format
from ..ops import atrous as atrous_ops
from ..ops import gcn as gcn_ops
from ..ops.atrous import atrous_conv2d
from ..ops.gcn import gcn_conv2d
from ._kept import KeepsDerived, cached, runs_submodules
from .atrous import hand_padded

__all__ = ["GlobalConv2d", "BoundaryRefinement"]


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


class GlobalConv2d(KeepsDerived, nn.Module):
    """Global Convolutional Network block: (k x 1 then 1 x k) + (1 x k then k x 1) convolutions.

    ``forward(x)``: (B, in_ch, H, W) -> (B, out_ch, H, W). The paper uses k = 15 and
    mid_ch = out_ch = the number of classes (21 on VOC); no BatchNorm or ReLU inside the block.
    On CUDA in float16 / bfloat16 (or with backend='cudnn') the layer runs cuDNN's four
    convolutions on weights zero-padded to the channel counts its tensor cores want (multiples of
    8), kept between calls while autograd does not record through them (dropped on ``train()`` /
    ``eval()`` and when a parameter changes in place), so a call is the four convolutions and the
    final add: 1.4-1.8x eager at batch 1 on the paper's 21-class shapes, 1.25-1.4x at batch 8 (H200).
    Submodules ``conv_l1`` (k x 1), ``conv_l2`` (1 x k), ``conv_r1`` (1 x k), ``conv_r2`` (k x 1).

    Example:
        >>> gcn = fastseg.nn.GlobalConv2d(2048, 21, k=15)
        >>> gcn(torch.randn(1, 2048, 16, 16)).shape
        torch.Size([1, 21, 16, 16])
    """

    def __init__(self, in_ch, out_ch, k=15, mid_ch=None, *, dilation=1, bias=True, backend="auto"):
        super().__init__()
        if not _is_int(k) or k < 3 or k % 2 == 0:
            raise ValueError(f"GlobalConv2d: k must be an odd int >= 3, got {k!r}")
        if not _is_int(dilation) or dilation < 1:
            raise ValueError(f"GlobalConv2d: dilation must be an int >= 1, got {dilation!r}")
        mid_ch = out_ch if mid_ch is None else mid_ch
        if not _is_int(mid_ch) or mid_ch < 1:
            raise ValueError(f"GlobalConv2d: mid_ch must be an int >= 1 or None, got {mid_ch!r}")
        _backends.check_name("GlobalConv2d", backend, gcn_ops._IMPLEMENTED)
        p = dilation * (k - 1) // 2
        self.conv_l1 = nn.Conv2d(in_ch, mid_ch, (k, 1), padding=(p, 0), dilation=(dilation, 1), bias=bias)
        self.conv_l2 = nn.Conv2d(mid_ch, out_ch, (1, k), padding=(0, p), dilation=(1, dilation), bias=bias)
        self.conv_r1 = nn.Conv2d(in_ch, mid_ch, (1, k), padding=(0, p), dilation=(1, dilation), bias=bias)
        self.conv_r2 = nn.Conv2d(mid_ch, out_ch, (k, 1), padding=(p, 0), dilation=(dilation, 1), bias=bias)
        self.k, self.dilation, self.backend = k, dilation, backend

    def forward(self, x):
        if runs_submodules(self, x):  # PyTorch's convolutions (autocast casts them; hooks see them)
            with hand_padded(x):
                return self.conv_l2(self.conv_l1(x)) + self.conv_r2(self.conv_r1(x))
        convs = (self.conv_l1, self.conv_l2, self.conv_r1, self.conv_r2)
        weights, biases = [c.weight for c in convs], [c.bias for c in convs]
        w = weights[0]
        if (is_plain_batch(x, w.shape[1], w) and x.is_cuda
                and (self.backend == "cudnn" or (self.backend == "auto" and x.dtype in (torch.float16, torch.bfloat16)))):
            fmt = output_memory_format(x)
            multiple = gcn_ops.channel_multiple(x.dtype)
            padded = cached(self, "padded", weights + biases, (multiple, fmt),
                            lambda: gcn_ops.pad_channels(*weights, *biases, multiple, fmt))
            return gcn_ops.run_padded(x, padded, self.conv_l2.out_channels, self.dilation)
        return gcn_conv2d(x, *weights, *biases, dilation=self.dilation, backend=self.backend)

    def extra_repr(self):
        return f"k={self.k}, dilation={self.dilation}"


class BoundaryRefinement(nn.Module):
    """Boundary Refinement block: ``x + conv3x3(relu(conv3x3(x)))``, a residual branch that sharpens
    object boundaries. Both convolutions run through ``fastseg.atrous_conv2d``, the ReLU fused into the
    first and the residual add into the second.

    ``forward(x)``: (B, ch, H, W) -> (B, ch, H, W). Submodules ``conv1`` and ``conv2``.

    Example:
        >>> br = fastseg.nn.BoundaryRefinement(21)
        >>> br(torch.randn(1, 21, 64, 64)).shape
        torch.Size([1, 21, 64, 64])
    """

    def __init__(self, ch, *, bias=True, backend="auto"):
        super().__init__()
        _backends.check_name("BoundaryRefinement", backend, atrous_ops._IMPLEMENTED)
        self.conv1 = nn.Conv2d(ch, ch, 3, padding=1, bias=bias)
        self.conv2 = nn.Conv2d(ch, ch, 3, padding=1, bias=bias)
        self.backend = backend

    def forward(self, x):
        if runs_submodules(self, x):
            with hand_padded(x):
                return x + self.conv2(torch.relu(self.conv1(x)))
        h = atrous_conv2d(x, self.conv1.weight, self.conv1.bias, padding=1, activation="relu", backend=self.backend)
        return atrous_conv2d(h, self.conv2.weight, self.conv2.bias, padding=1, residual=x, backend=self.backend)
