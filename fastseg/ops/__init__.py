"""One public function per op; each checks its arguments, picks a backend and runs it."""
from .unpool import max_unpool2d

__all__ = ["max_unpool2d"]
