"""fastseg: fast fused kernels for the classic semantic-segmentation building blocks.

``import fastseg`` always works: when the compiled extension is missing every op falls back to
its plain-PyTorch reference (with one warning). ``python -m fastseg info`` says what runs here.
"""
__version__ = "0.1.0"

from . import _backends  # loads fastseg._C first: its TORCH_LIBRARY must precede Python registrations
from . import nn, ops
from . import models  # after nn: the models are built from its layers
from .ops import atrous_conv2d, dense_crf, gcn_conv2d, max_unpool2d, unpool_conv2d
from .convert import convert  # after models and nn: it rewrites other models onto them

__all__ = ["atrous_conv2d", "convert", "dense_crf", "gcn_conv2d", "max_unpool2d", "models", "nn", "ops", "unpool_conv2d", "__version__"]
