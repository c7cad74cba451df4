"""SegNet's decoder step as one layer: ``UnpoolConvBNReLU`` (Badrinarayanan, Kendall & Cipolla,
TPAMI 2017): max-unpooling with the encoder's indices, then Conv2d -> BatchNorm2d -> ReLU.

In training mode it runs MaxUnpool2d, nn.Conv2d, nn.BatchNorm2d and F.relu, so BatchNorm keeps its
exact semantics (batch statistics, running-stat updates). In eval mode BatchNorm is folded into
``fastseg.unpool_conv2d``'s epilogue and the unpooled map is never built in full.
"""
import torch
import torch.nn.functional as F
from torch import nn

from .. import _backends
from .._checks import to_pair
from ..ops.atrous import _padding, atrous_output_size
from ..ops.unpool import unpool_output_size
from ..ops import unpool_conv as unpool_conv_ops
from ..ops.unpool_conv import unpool_conv2d
from ._kept import runs_submodules
from .atrous import eager_conv, fold_batch_norm, folds_batch_norm
from .unpool import MaxUnpool2d

__all__ = ["UnpoolConvBNReLU"]


def _fusable_residual(layer, values, output_size, residual):
    """Whether the fused call can add ``residual``: a tensor of the output's shape, dtype and
    device (else it broadcasts, or differs, and is added after the call). Arguments the op will
    refuse count as fusable: its checks name what is wrong."""
    if not isinstance(residual, torch.Tensor) or residual.dtype != values.dtype or residual.device != values.device:
        return False
    u, c = layer.unpool, layer.conv
    try:
        pairs = [to_pair("UnpoolConvBNReLU", n, v, minimum=0)
                 for n, v in (("kernel_size", u.kernel_size), ("stride", u.stride), ("padding", u.padding))]
        hw = unpool_output_size(values.shape[-2:], *pairs, output_size)
        size = atrous_output_size(hw, c.kernel_size, c.stride, c.padding, c.dilation)
    except (TypeError, ValueError):
        return True
    return tuple(residual.shape) == (*values.shape[:-3], c.out_channels, *size)


class UnpoolConvBNReLU(nn.Module):
    """MaxUnpool2d -> Conv2d (stride 1, any dilation) -> BatchNorm2d -> (+ residual) -> ReLU, fused
    in eval mode (the layer and its ``bn``; see ``AtrousConvBNReLU``).

    ``unpool``: the unpooling, a ``fastseg.nn.MaxUnpool2d`` (shared with others if wanted) or its
    kernel_size (stride = kernel_size, no padding). ``forward(values, indices, output_size=None,
    residual=None)``: pooled values and indices (B, in_channels, h, w) -> (B, out_channels, Ho, Wo),
    output_size being the unpooled (H, W) as for MaxUnpool2d. State-dict keys are those of a plain
    ``conv`` + ``bn`` pair.

    Example:
        >>> layer = fastseg.nn.UnpoolConvBNReLU(64, 64, 3, unpool=2).eval()
        >>> x = torch.randn(1, 64, 45, 61)
        >>> pooled, idx = torch.nn.functional.max_pool2d(x, 2, return_indices=True)
        >>> layer(pooled, idx, output_size=x.shape).shape
        torch.Size([1, 64, 45, 61])
    """

    def __init__(self, in_channels, out_channels, kernel_size=3, *, unpool=2, dilation=1, padding="same", bias=False,
                 relu=True, eps=1e-5, momentum=0.1, backend="auto"):
        super().__init__()
        _backends.check_name("UnpoolConvBNReLU", backend, unpool_conv_ops._IMPLEMENTED)
        if isinstance(unpool, nn.Module) and not isinstance(unpool, MaxUnpool2d):
            raise TypeError(f"UnpoolConvBNReLU: unpool must be a fastseg.nn.MaxUnpool2d or its kernel_size, got "
                            f"{type(unpool).__module__}.{type(unpool).__name__}")
        self.unpool = unpool if isinstance(unpool, MaxUnpool2d) else MaxUnpool2d(unpool, backend=backend)
        if isinstance(padding, str):
            k = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
            d = (dilation, dilation) if isinstance(dilation, int) else tuple(dilation)
            padding = _padding(padding, k, d)
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, 1, padding, dilation, bias=bias)
        self.bn = nn.BatchNorm2d(out_channels, eps=eps, momentum=momentum)
        self.relu = relu
        self.backend = backend

    def forward(self, values, indices, output_size=None, residual=None):
        own_modules = runs_submodules(self, values)  # hooks: the modules themselves are called
        if not folds_batch_norm(self) or own_modules:  # eager: BatchNorm in its own mode
            unpooled = self.unpool(values, indices, output_size)
            y = self.bn(eager_conv(self.conv, unpooled, own_modules))
            if residual is not None:
                y = y + residual
            return F.relu(y) if self.relu else y
        u, c = self.unpool, self.conv
        if not isinstance(values, torch.Tensor):  # the op says what is wrong
            return unpool_conv2d(values, indices, c.weight, kernel_size=u.kernel_size, backend=self.backend)
        scale, shift = fold_batch_norm(self.bn, values.dtype)
        late = None
        if residual is not None and not _fusable_residual(self, values, output_size, residual):
            # One that broadcasts (or another dtype or device): added after the fused call, as in training.
            residual, late = None, residual
        y = unpool_conv2d(
            values, indices, c.weight, c.bias, kernel_size=u.kernel_size, stride=u.stride, pool_padding=u.padding,
            output_size=output_size, padding=c.padding, dilation=c.dilation, scale=scale, shift=shift,
            residual=residual, activation="relu" if self.relu and late is None else None, backend=self.backend,
        )
        if late is None:
            return y
        y = y + late
        return F.relu(y) if self.relu else y

    def extra_repr(self):
        return f"relu={self.relu}"
