"""nn.Module layers built on fastseg's ops."""
from .dense_crf import DenseCRF
from .unpool import MaxUnpool2d

__all__ = ["DenseCRF", "MaxUnpool2d"]
