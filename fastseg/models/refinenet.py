"""RefineNet: Lin, Milan, Shen & Reid, "RefineNet: Multi-Path Refinement Networks for
High-Resolution Semantic Segmentation" (CVPR 2017), the 4-cascaded variant on ResNet (Fig. 2(c)).

ResNet's four stages (output strides 32, 16, 8, 4) are first reduced by a 3x3 convolution to 512
channels (layer4) or 256 (the others). RefineNet-4 refines layer4 alone; RefineNet-3, -2, -1 each
fuse one ResNet path with the previous RefineNet's output. A RefineNet block (Sec. 3.2, Fig. 3):

* adaptive convolutions: two residual conv units (RCU: ReLU, 3x3, ReLU, 3x3, plus the input) per
  input, at its channel count (512 in RefineNet-4, 256 elsewhere);
* multi-resolution fusion: a 3x3 convolution per input to the smallest channel count among them,
  upsampling to the largest resolution, and a sum;
* chained residual pooling: a ReLU, then a chain of blocks (5x5 max pool at stride 1, 3x3
  convolution) whose outputs are each added to the running sum (``crp_blocks``, 2 as in Fig. 3);
* one RCU at the output.

RefineNet-1's output passes two more RCUs and a 1x1 classifier (with dropout before it), at output
stride 4, upsampled bilinearly to the input.
"""
import numbers

from torch import nn

from ._common import SegmentationModel, check_choice, check_no_crf, check_no_aux, check_num_classes, register, upsample
from .backbones import resnet_backbone

__all__ = ["RefineNet", "RefineNetBlock", "ResidualConvUnit", "MultiResolutionFusion", "ChainedResidualPooling",
           "refinenet"]


def _conv3x3(in_channels, out_channels, bias=True):
    return nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=bias)


class ResidualConvUnit(nn.Module):
    """RCU: x + conv(relu(conv(relu(x)))), 3x3 convolutions at ``channels``."""

    def __init__(self, channels):
        super().__init__()
        self.conv1 = _conv3x3(channels, channels)
        self.conv2 = _conv3x3(channels, channels)
        self.relu = nn.ReLU()  # not in place: x is the residual

    def forward(self, x):
        return x + self.conv2(self.relu(self.conv1(self.relu(x))))


class MultiResolutionFusion(nn.Module):
    """A 3x3 convolution per input to ``out_channels``, upsampled to the first (the finest) input's
    size, summed."""

    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.convs = nn.ModuleList(_conv3x3(c, out_channels) for c in in_channels)

    def forward(self, xs):
        size = xs[0].shape[-2:]  # the finest path comes first (it also keeps torch.fx tracing)
        out = None
        for conv, x in zip(self.convs, xs):
            y = upsample(conv(x), size)
            out = y if out is None else out + y
        return out


class ChainedResidualPooling(nn.Module):
    """relu(x) + sum of a chain of (5x5/1 max pool, 3x3 convolution) blocks applied to it."""

    def __init__(self, channels, blocks=2):
        super().__init__()
        self.relu = nn.ReLU()
        self.pool = nn.MaxPool2d(5, stride=1, padding=2)
        self.convs = nn.ModuleList(_conv3x3(channels, channels, bias=False) for _ in range(blocks))

    def forward(self, x):
        x = path = self.relu(x)
        for conv in self.convs:
            path = conv(self.pool(path))
            x = x + path
        return x


class RefineNetBlock(nn.Module):
    """One RefineNet (Fig. 3): RCUs per input, multi-resolution fusion, chained residual pooling
    and an output RCU. forward(list of (B, C_i, H_i, W_i)) -> (B, min C_i, max H_i, max W_i)."""

    def __init__(self, in_channels, crp_blocks=2):
        super().__init__()
        out_channels = min(in_channels)
        self.adapt = nn.ModuleList(nn.Sequential(ResidualConvUnit(c), ResidualConvUnit(c)) for c in in_channels)
        self.fusion = MultiResolutionFusion(in_channels, out_channels) if len(in_channels) > 1 else None
        self.crp = ChainedResidualPooling(out_channels, crp_blocks)
        self.output = ResidualConvUnit(out_channels)

    def forward(self, xs):
        xs = [adapt(x) for adapt, x in zip(self.adapt, xs)]
        x = self.fusion(xs) if self.fusion is not None else xs[0]
        return self.output(self.crp(x))


class RefineNet(SegmentationModel):
    """4-cascaded RefineNet on ResNet; see the module docstring. Input at least 32x32."""

    name = "refinenet"
    min_input_size = 32

    def _size_reason(self):
        return "ResNet downsamples by 32"

    def __init__(self, backbone, num_classes=21, crp_blocks=2):
        super().__init__()
        self.backbone = backbone
        channels = (256, 512, 1024, 2048)  # layer1..layer4
        widths = (256, 256, 256, 512)
        self.reduce = nn.ModuleList(_conv3x3(c, w, bias=False) for c, w in zip(channels, widths))
        self.refine4 = RefineNetBlock([512], crp_blocks)
        self.refine3 = RefineNetBlock([256, 512], crp_blocks)
        self.refine2 = RefineNetBlock([256, 256], crp_blocks)
        self.refine1 = RefineNetBlock([256, 256], crp_blocks)
        self.head = nn.Sequential(ResidualConvUnit(256), ResidualConvUnit(256), nn.Dropout(0.5),
                                  nn.Conv2d(256, num_classes, 1))

    def _forward(self, x):
        features = self.backbone(x)
        paths = [reduce(features[f"layer{i}"]) for i, reduce in enumerate(self.reduce, 1)]
        h = self.refine4([paths[3]])
        h = self.refine3([paths[2], h])
        h = self.refine2([paths[1], h])
        h = self.refine1([paths[0], h])
        return {"out": upsample(self.head(h), x.shape[-2:])}


@register
def refinenet(num_classes=21, backbone="resnet101", output_stride=32, aux_loss=False, crf=None,
              backbone_weights=None, use_kernels=True, crp_blocks=2):
    """4-cascaded RefineNet (Lin et al. 2017) on ResNet-101 (or -50).

    Returns an nn.Module: (B, 3, H, W), H, W >= 32 -> {'out': (B, num_classes, H, W)}.

    Example:
        >>> model = fastseg.models.refinenet(num_classes=21, backbone="resnet50")
    """
    num_classes = check_num_classes("refinenet", num_classes)
    check_choice("refinenet", "output_stride", output_stride, (32,))
    check_no_aux("refinenet", aux_loss)
    check_no_crf("refinenet", crf)
    if isinstance(crp_blocks, bool) or not isinstance(crp_blocks, numbers.Integral) or crp_blocks < 1:
        raise ValueError(f"refinenet: crp_blocks must be an int >= 1, got {crp_blocks!r}")
    net = resnet_backbone("refinenet", backbone, output_stride, weights=backbone_weights)
    return RefineNet(net, num_classes, int(crp_blocks)).set_use_kernels(use_kernels)
