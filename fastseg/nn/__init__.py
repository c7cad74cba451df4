"""nn.Module layers built on fastseg's ops."""
from .atrous import ASPP, AtrousConvBNReLU
from .dense_crf import DenseCRF
from .gcn import BoundaryRefinement, GlobalConv2d
from .unpool import MaxUnpool2d
from .unpool_conv import UnpoolConvBNReLU

__all__ = ["ASPP", "AtrousConvBNReLU", "BoundaryRefinement", "DenseCRF", "GlobalConv2d", "MaxUnpool2d", "UnpoolConvBNReLU"]
