"""nn.Module layers built on fastseg's ops."""
from .unpool import MaxUnpool2d

__all__ = ["MaxUnpool2d"]
