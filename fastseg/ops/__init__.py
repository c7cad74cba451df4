"""One public function per op; each checks its arguments, picks a backend and runs it."""
from .dense_crf import dense_crf, permutohedral_filter
from .unpool import max_unpool2d

__all__ = ["dense_crf", "max_unpool2d", "permutohedral_filter"]
