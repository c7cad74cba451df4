"""PSPNet: Zhao, Shi, Qi, Wang & Jia, "Pyramid Scene Parsing Network" (CVPR 2017).

A dilated ResNet (output stride 8 by default) feeds the pyramid pooling module (Sec. 3.2): the
final features average-pooled to bins 1x1, 2x2, 3x3 and 6x6, each reduced by a 1x1 convolution to
1/4 of the channels (2048 / 4 = 512), upsampled bilinearly and concatenated with the features;
then a 3x3 convolution (512), dropout 0.1 and a 1x1 classifier. The auxiliary head (Sec. 3.3) on
layer3 (the paper's res4b22) is a 3x3 convolution (256), dropout 0.1 and a 1x1 classifier; its
loss is weighted by 0.4 (``model.aux_weight``). The paper's ResNet has a deep stem (three 3x3
convolutions); here the stem is torchvision's 7x7, so that torchvision checkpoints load.
Convolutions followed by BatchNorm and ReLU are ``fastseg.nn.AtrousConvBNReLU``.
"""
import torch
import torch.nn.functional as F
from torch import nn

from .. import nn as fnn
from ._common import SegmentationModel, check_choice, check_flag, check_no_crf, check_num_classes, register, upsample
from .backbones import resnet_backbone

__all__ = ["PSPNet", "PyramidPooling", "pspnet"]


class PyramidPooling(nn.Module):
    """Zhao et al.'s pyramid pooling module: (B, C, H, W) -> (B, C + len(bins) * C/4, H, W)."""

    def __init__(self, in_channels, bins=(1, 2, 3, 6)):
        super().__init__()
        self.bins = tuple(bins)
        width = in_channels // len(self.bins)
        self.stages = nn.ModuleList(fnn.AtrousConvBNReLU(in_channels, width, 1) for _ in self.bins)
        self.out_channels = in_channels + width * len(self.bins)

    def forward(self, x):
        size = x.shape[-2:]
        pooled = [upsample(stage(F.adaptive_avg_pool2d(x, b)), size) for b, stage in zip(self.bins, self.stages)]
        return torch.cat([x] + pooled, 1)


def _head(in_channels, width, num_classes):
    return nn.Sequential(fnn.AtrousConvBNReLU(in_channels, width, 3), nn.Dropout(0.1),
                         nn.Conv2d(width, num_classes, 1))


class PSPNet(SegmentationModel):
    """PSPNet on an atrous ResNet; see the module docstring. forward -> {'out', 'aux'}."""

    name = "pspnet"

    def __init__(self, backbone, num_classes=21, aux_loss=True, aux_weight=0.4):
        super().__init__()
        self.backbone = backbone
        self.min_input_size = backbone.output_stride
        self.ppm = PyramidPooling(backbone.out_channels)
        self.classifier = _head(self.ppm.out_channels, 512, num_classes)
        self.aux_classifier = _head(backbone.out_channels // 2, 256, num_classes) if aux_loss else None
        #: The auxiliary loss weight of Sec. 3.3 / Sec. 4.2 (alpha = 0.4).
        self.aux_weight = aux_weight

    def _size_reason(self):
        return f"the network has output stride {self.backbone.output_stride}"

    def _forward(self, x):
        size = x.shape[-2:]
        features = self.backbone(x)
        out = {"out": upsample(self.classifier(self.ppm(features["layer4"])), size)}
        if self.aux_classifier is not None:
            out["aux"] = upsample(self.aux_classifier(features["layer3"]), size)
        return out


@register
def pspnet(num_classes=21, backbone="resnet50", output_stride=8, aux_loss=True, crf=None, backbone_weights=None,
           use_kernels=True):
    """PSPNet (Zhao et al. 2017): dilated ResNet-50/101, pyramid pooling bins 1/2/3/6, auxiliary
    head on layer3 (loss weight ``model.aux_weight`` = 0.4).

    Returns an nn.Module: (B, 3, H, W), H, W >= output_stride -> {'out': (B, num_classes, H, W),
    'aux': (B, num_classes, H, W)} ('aux' only with aux_loss=True). Training needs batches of 2
    or more (the 1x1 bin's BatchNorm sees one value per image).

    Example:
        >>> model = fastseg.models.pspnet(num_classes=150, backbone="resnet101")
        >>> x, y, ce = torch.randn(2, 3, 64, 64), torch.randint(0, 150, (2, 64, 64)), torch.nn.CrossEntropyLoss()
        >>> out = model(x); loss = ce(out["out"], y) + model.aux_weight * ce(out["aux"], y)
    """
    num_classes = check_num_classes("pspnet", num_classes)
    check_choice("pspnet", "output_stride", output_stride, (8, 16))
    check_no_crf("pspnet", crf)
    net = resnet_backbone("pspnet", backbone, output_stride, weights=backbone_weights)
    return PSPNet(net, num_classes, aux_loss=check_flag("pspnet", "aux_loss", aux_loss)).set_use_kernels(use_kernels)
