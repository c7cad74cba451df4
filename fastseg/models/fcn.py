"""Fully convolutional networks FCN-32s, FCN-16s and FCN-8s on VGG-16: Long, Shelhamer & Darrell,
"Fully Convolutional Networks for Semantic Segmentation" (CVPR 2015), as in their Caffe models.

* The input is padded by 100 in conv1_1 and the pools round up (Caffe's ceil mode), so that the
  7x7 fc6 yields an output for any input size; the upsampled scores are then cropped back to the
  input at the paper's offsets (19 for FCN-32s, 27 for FCN-16s, 31 for FCN-8s; the skip scores at
  5 for pool4 and 9 for pool3).
* fc6/fc7 are convolutionalised (Sec. 3.1): fc6 a 7x7 convolution, fc7 a 1x1, both loaded from
  torchvision's ``classifier.0`` / ``classifier.3`` when ``backbone_weights`` is given.
* Upsampling is a learnable deconvolution initialised to bilinear interpolation (Sec. 3.3); the
  class-scoring layers and the skip scorers start at zero (Sec. 4.2, 4.1).
"""
import torch
from torch import nn

from ._common import SegmentationModel, check_choice, check_no_aux, check_no_crf, check_num_classes, register
from .backbones import VGG, load_vgg_with_fc

__all__ = ["FCN", "fcn32s", "fcn16s", "fcn8s", "bilinear_kernel"]


def bilinear_kernel(channels, kernel_size):
    """ConvTranspose2d weight (channels, channels, k, k) that upsamples each channel bilinearly
    (the identity across channels)."""
    factor = (kernel_size + 1) // 2
    centre = factor - 1 if kernel_size % 2 == 1 else factor - 0.5
    grid = torch.arange(kernel_size, dtype=torch.float64)
    filt = 1 - (grid - centre).abs() / factor
    weight = torch.zeros(channels, channels, kernel_size, kernel_size, dtype=torch.float64)
    weight[range(channels), range(channels)] = filt[:, None] * filt[None, :]
    return weight.float()


def _deconv(channels, factor):
    layer = nn.ConvTranspose2d(channels, channels, 2 * factor, stride=factor, bias=False)
    with torch.no_grad():
        layer.weight.copy_(bilinear_kernel(channels, 2 * factor))
    return layer


def _scorer(in_channels, num_classes):
    layer = nn.Conv2d(in_channels, num_classes, 1)
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


def _crop(x, offset, size):
    return x[:, :, offset:offset + size[0], offset:offset + size[1]]


class FCN(SegmentationModel):
    """FCN-``stride``s (32, 16 or 8) on VGG-16; see the module docstring. Any input size."""

    min_input_size = 1

    def __init__(self, num_classes=21, stride=8):
        super().__init__()
        self.name = f"fcn{stride}s"
        self.stride = stride
        pools = [nn.MaxPool2d(2, 2, ceil_mode=True) for _ in range(5)]
        self.backbone = VGG(batch_norm=False, pools=pools, first_padding=100)
        self.fc6 = nn.Conv2d(512, 4096, 7)
        self.fc7 = nn.Conv2d(4096, 4096, 1)
        self.relu = nn.ReLU(inplace=True)
        self.drop = nn.Dropout(0.5)
        self.score_fr = _scorer(4096, num_classes)
        if stride == 32:
            self.upscore = _deconv(num_classes, 32)
        else:
            self.upscore2 = _deconv(num_classes, 2)
            self.score_pool4 = _scorer(512, num_classes)
            if stride == 16:
                self.upscore16 = _deconv(num_classes, 16)
            else:
                self.upscore_pool4 = _deconv(num_classes, 2)
                self.score_pool3 = _scorer(256, num_classes)
                self.upscore8 = _deconv(num_classes, 8)

    def _forward(self, x):
        size = x.shape[-2:]
        features = self.backbone(x)
        h = self.drop(self.relu(self.fc6(features["pool5"])))
        h = self.drop(self.relu(self.fc7(h)))
        h = self.score_fr(h)
        if self.stride == 32:
            return {"out": _crop(self.upscore(h), 19, size)}
        h = self.upscore2(h)
        h = h + _crop(self.score_pool4(features["pool4"]), 5, h.shape[-2:])
        if self.stride == 16:
            return {"out": _crop(self.upscore16(h), 27, size)}
        h = self.upscore_pool4(h)
        h = h + _crop(self.score_pool3(features["pool3"]), 9, h.shape[-2:])
        return {"out": _crop(self.upscore8(h), 31, size)}


def _build(stride, num_classes, backbone, output_stride, aux_loss, crf, backbone_weights, use_kernels):
    name = f"fcn{stride}s"
    num_classes = check_num_classes(name, num_classes)
    check_choice(name, "backbone", backbone, ("vgg16",))
    check_choice(name, "output_stride", output_stride, (stride,))
    check_no_aux(name, aux_loss)
    check_no_crf(name, crf)
    model = FCN(num_classes, stride)
    if backbone_weights is not None:
        load_vgg_with_fc(model.backbone, model.fc6, model.fc7, backbone_weights)
    return model.set_use_kernels(use_kernels)


@register
def fcn32s(num_classes=21, backbone="vgg16", output_stride=32, aux_loss=False, crf=None, backbone_weights=None,
           use_kernels=True):
    """FCN-32s (Long et al. 2015): VGG-16, single 32x learnable deconvolution.

    Returns an nn.Module: (B, 3, H, W) float -> {'out': (B, num_classes, H, W)}, any H, W.

    Example:
        >>> model = fastseg.models.fcn32s(num_classes=21, backbone_weights="vgg16-397923af.pth")
    """
    return _build(32, num_classes, backbone, output_stride, aux_loss, crf, backbone_weights, use_kernels)


@register
def fcn16s(num_classes=21, backbone="vgg16", output_stride=16, aux_loss=False, crf=None, backbone_weights=None,
           use_kernels=True):
    """FCN-16s (Long et al. 2015): FCN-32s plus a pool4 skip, 2x then 16x deconvolution.

    Returns an nn.Module: (B, 3, H, W) float -> {'out': (B, num_classes, H, W)}, any H, W.
    """
    return _build(16, num_classes, backbone, output_stride, aux_loss, crf, backbone_weights, use_kernels)


@register
def fcn8s(num_classes=21, backbone="vgg16", output_stride=8, aux_loss=False, crf=None, backbone_weights=None,
          use_kernels=True):
    """FCN-8s (Long et al. 2015): pool4 and pool3 skips, 2x, 2x then 8x deconvolution.

    Returns an nn.Module: (B, 3, H, W) float -> {'out': (B, num_classes, H, W)}, any H, W.

    Example:
        >>> out = fastseg.models.fcn8s(num_classes=21)(torch.randn(1, 3, 224, 224))["out"]
    """
    return _build(8, num_classes, backbone, output_stride, aux_loss, crf, backbone_weights, use_kernels)
