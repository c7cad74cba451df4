"""nn.Module layers built on fastseg's ops."""
from .atrous import ASPP, AtrousConvBNReLU
from .dense_crf import DenseCRF
from .unpool import MaxUnpool2d

__all__ = ["ASPP", "AtrousConvBNReLU", "DenseCRF", "MaxUnpool2d"]
