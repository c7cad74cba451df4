"""SegNet: Badrinarayanan, Kendall & Cipolla, "SegNet: A Deep Convolutional Encoder-Decoder
Architecture for Image Segmentation" (TPAMI 2017).

The encoder is VGG-16's 13 convolutions with BatchNorm (no fully connected layers); each 2x2 max
pool keeps its indices, and the mirrored decoder upsamples with them (``fastseg.nn.MaxUnpool2d``,
Sec. 3: "the decoder upsamples its input using the memorized max-pooling indices") before its own
conv-BN-ReLU stack; each stage's unpooling and first conv-BN-ReLU are one
``fastseg.nn.UnpoolConvBNReLU``, which in eval mode never builds the unpooled map. The last
decoder convolution gives the class scores (no BN/ReLU), as in the authors' Caffe model.
Unpooling restores each pool's exact input size, so odd sizes work.
"""
from torch import nn

from .. import nn as fnn
from ._common import SegmentationModel, check_choice, check_no_crf, check_no_aux, check_num_classes, register
from .backbones import VGG, VGG16_STAGES

__all__ = ["SegNet", "segnet"]


def _conv_bn_relu(in_channels, out_channels):
    return [nn.Conv2d(in_channels, out_channels, 3, padding=1), nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True)]


class SegNet(SegmentationModel):
    """SegNet with a VGG-16-BN encoder; see the module docstring. Input at least 32x32."""

    name = "segnet"
    min_input_size = 32

    def _size_reason(self):
        return "the encoder pools five times by 2"

    def __init__(self, num_classes=21):
        super().__init__()
        self.backbone = VGG(batch_norm=True, pools=[nn.MaxPool2d(2, 2, return_indices=True) for _ in range(5)])
        self.unpool = fnn.MaxUnpool2d(2)
        decoders, unpool_convs = [], []
        for stage, widths in reversed(list(enumerate(VGG16_STAGES))):
            # Decoder stage mirrors encoder stage: its convolutions in reverse, ending at the width
            # that enters the encoder stage (num_classes for the first stage's mirror).
            outs = list(reversed(widths))[1:] + [VGG16_STAGES[stage - 1][-1] if stage else num_classes]
            # Every stage starts with a conv-BN-ReLU (VGG-16's stages have at least two convolutions).
            unpool_convs.append(fnn.UnpoolConvBNReLU(widths[-1], outs[0], 3, unpool=self.unpool))
            layers, channels = [], outs[0]
            for i, width in enumerate(outs[1:], 1):
                if stage == 0 and i == len(outs) - 1:
                    layers.append(nn.Conv2d(channels, width, 3, padding=1))
                else:
                    layers += _conv_bn_relu(channels, width)
                channels = width
            decoders.append(nn.Sequential(*layers))
        self.unpool_convs = nn.ModuleList(unpool_convs)  # unpool_convs[0] and decoders[0] mirror encoder stage 5
        self.decoders = nn.ModuleList(decoders)

    def _forward(self, x):
        features = self.backbone(x)
        h = features["pool5"]
        for i, (unpool_conv, decoder) in enumerate(zip(self.unpool_convs, self.decoders)):
            stage = 5 - i
            h = unpool_conv(h, features[f"indices{stage}"], output_size=features[f"size{stage}"])
            h = decoder(h)
        return {"out": h}


@register
def segnet(num_classes=21, backbone="vgg16_bn", output_stride=32, aux_loss=False, crf=None, backbone_weights=None,
           use_kernels=True):
    """SegNet (Badrinarayanan et al. 2017) on VGG-16-BN, max-unpooling with the encoder's indices.

    Returns an nn.Module: (B, 3, H, W) float, H, W >= 32 -> {'out': (B, num_classes, H, W)}.
    ``backbone_weights``: torchvision's vgg16_bn checkpoint file (the encoder; classifier ignored).

    Example:
        >>> out = fastseg.models.segnet(num_classes=12)(torch.randn(1, 3, 360, 480))["out"]
    """
    num_classes = check_num_classes("segnet", num_classes)
    check_choice("segnet", "backbone", backbone, ("vgg16_bn",))
    check_choice("segnet", "output_stride", output_stride, (32,))
    check_no_aux("segnet", aux_loss)
    check_no_crf("segnet", crf)
    model = SegNet(num_classes)
    if backbone_weights is not None:
        model.backbone.load_torchvision(backbone_weights)
    return model.set_use_kernels(use_kernels)
