import torch

from .. import _backends
from ..ops import unpool as unpool_ops
from ..ops.unpool import max_unpool2d


class MaxUnpool2d(torch.nn.Module):
    """Drop-in for ``torch.nn.MaxUnpool2d`` running on fastseg's kernels (see
    ``fastseg.max_unpool2d``). ``forward(input, indices, output_size=None)``."""

    def __init__(self, kernel_size, stride=None, padding=0, *, backend="auto"):
        super().__init__()
        _backends.check_name("MaxUnpool2d", backend, unpool_ops._IMPLEMENTED)
        self.kernel_size = kernel_size
        self.stride = stride if stride is not None else kernel_size
        self.padding = padding
        self.backend = backend

    def forward(self, input, indices, output_size=None):
        return max_unpool2d(
            input, indices, self.kernel_size, self.stride, self.padding, output_size, backend=self.backend
        )

    def extra_repr(self):
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"
