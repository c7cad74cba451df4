"""One public function per op; each checks its arguments, picks a backend and runs it."""
from .atrous import atrous_conv2d
from .dense_crf import dense_crf, permutohedral_filter
from .gcn import gcn_conv2d
from .unpool import max_unpool2d
from .unpool_conv import unpool_conv2d

__all__ = ["atrous_conv2d", "dense_crf", "gcn_conv2d", "max_unpool2d", "permutohedral_filter", "unpool_conv2d"]
