"""Multi-scale context aggregation by dilated convolutions: Yu & Koltun (ICLR 2016).

* The front end (Sec. 4) is VGG-16 with its last two pools (and their striding) removed: conv5 is
  dilated by 2 and fc6 (a 7x7 convolution with 4096 channels, loadable from torchvision's
  ``classifier.0``) by 4, giving class scores at output stride 8, upsampled bilinearly to the input.
  The authors ran their front end without padding on a reflection-padded input; here the
  convolutions are padded ("same"), so the output aligns with the input at any size.
* The context module (Sec. 3, Table 1) maps C class-score maps to C: seven 3x3 convolutions with
  dilations 1, 1, 2, 4, 8, 16, 1, each followed by ReLU, then a 1x1. The basic module keeps C
  channels throughout, the large one widens to 2C, 2C, 4C, 8C, 16C, 32C, 32C. Both start as the
  identity (Eq. 4 and 5): a plain network that passes its input through, the large module's
  off-identity weights drawn from N(0, sigma^2) with sigma << C / c_{i+1}.
"""
import torch
from torch import nn

from ._common import SegmentationModel, check_choice, check_no_crf, check_no_aux, check_num_classes, register, upsample
from .backbones import VGG, load_vgg_with_fc

__all__ = ["ContextModule", "DilatedNet", "dilated_frontend", "dilated_context"]

CONTEXT_DILATIONS = (1, 1, 2, 4, 8, 16, 1)
CONTEXT_WIDTHS = {"basic": (1, 1, 1, 1, 1, 1, 1), "large": (2, 2, 4, 8, 16, 32, 32)}


class ContextModule(nn.Module):
    """Yu & Koltun's context module, ``kind`` 'basic' or 'large', on ``channels`` (C) score maps;
    identity-initialised. forward: (B, C, H, W) -> (B, C, H, W)."""

    def __init__(self, channels, kind="basic", noise=1e-3):
        super().__init__()
        check_choice("ContextModule", "kind", kind, tuple(CONTEXT_WIDTHS))
        widths = [channels * m for m in CONTEXT_WIDTHS[kind]] + [channels]
        layers, c_in = [], channels
        for i, c_out in enumerate(widths):
            last = i == len(widths) - 1
            conv = nn.Conv2d(c_in, c_out, 1 if last else 3, padding=0 if last else CONTEXT_DILATIONS[i],
                             dilation=1 if last else CONTEXT_DILATIONS[i])
            self._identity_init(conv, channels, noise)
            layers.append(conv)
            if not last:
                layers.append(nn.ReLU(inplace=True))
            c_in = c_out
        self.layers = nn.Sequential(*layers)
        self.kind = kind

    @staticmethod
    @torch.no_grad()
    def _identity_init(conv, classes, noise):
        # Eq. 5: k(t, a)_b = C / c_{i+1} where t = 0 and floor(a C / c_i) = floor(b C / c_{i+1}),
        # else noise; with c_i = c_{i+1} = C it is Eq. 4's exact identity.
        c_out, c_in, kh, kw = conv.weight.shape
        value = classes / c_out
        a = torch.arange(c_in) * classes // c_in
        b = torch.arange(c_out) * classes // c_out
        mask = (b[:, None] == a[None, :]).float()
        weight = torch.zeros_like(conv.weight)
        if c_in != classes or c_out != classes:
            weight.normal_(0.0, noise * value)
        weight[:, :, kh // 2, kw // 2] = torch.where(mask.bool(), value, weight[:, :, kh // 2, kw // 2])
        conv.weight.copy_(weight)
        conv.bias.zero_()

    def forward(self, x):
        return self.layers(x)


class DilatedNet(SegmentationModel):
    """The dilated front end, optionally followed by a context module; see the module docstring."""

    min_input_size = 8

    def __init__(self, num_classes=21, context=None):
        super().__init__()
        self.name = "dilated_frontend" if context is None else "dilated_context"
        pools = [nn.MaxPool2d(2, 2) for _ in range(3)] + [nn.Identity(), nn.Identity()]
        self.backbone = VGG(batch_norm=False, pools=pools, dilations=(1, 1, 1, 1, 2))
        self.fc6 = nn.Conv2d(512, 4096, 7, padding=12, dilation=4)
        self.fc7 = nn.Conv2d(4096, 4096, 1)
        self.relu = nn.ReLU(inplace=True)
        self.drop = nn.Dropout(0.5)
        self.final = nn.Conv2d(4096, num_classes, 1)
        self.context = None if context is None else ContextModule(num_classes, context)

    def _size_reason(self):
        return "the front end has output stride 8"

    def _forward(self, x):
        h = self.backbone(x)["pool5"]
        h = self.drop(self.relu(self.fc6(h)))
        h = self.drop(self.relu(self.fc7(h)))
        h = self.final(h)
        if self.context is not None:
            h = self.context(h)
        return {"out": upsample(h, x.shape[-2:])}


def _build(name, context, num_classes, backbone, output_stride, aux_loss, crf, backbone_weights, use_kernels):
    num_classes = check_num_classes(name, num_classes)
    check_choice(name, "backbone", backbone, ("vgg16",))
    check_choice(name, "output_stride", output_stride, (8,))
    check_no_aux(name, aux_loss)
    check_no_crf(name, crf)
    model = DilatedNet(num_classes, context)
    if backbone_weights is not None:
        load_vgg_with_fc(model.backbone, model.fc6, model.fc7, backbone_weights)
    return model.set_use_kernels(use_kernels)


@register
def dilated_frontend(num_classes=21, backbone="vgg16", output_stride=8, aux_loss=False, crf=None,
                     backbone_weights=None, use_kernels=True):
    """Yu & Koltun's (2016) front end: VGG-16 without pool4/pool5, dilated conv5 and fc6.

    Returns an nn.Module: (B, 3, H, W) float, H, W >= 8 -> {'out': (B, num_classes, H, W)}.
    """
    return _build("dilated_frontend", None, num_classes, backbone, output_stride, aux_loss, crf, backbone_weights,
                  use_kernels)


@register
def dilated_context(num_classes=21, backbone="vgg16", output_stride=8, aux_loss=False, crf=None,
                    backbone_weights=None, use_kernels=True, context="large"):
    """Yu & Koltun's (2016) front end followed by the context module (``context`` 'basic' or
    'large', identity-initialised).

    Returns an nn.Module: (B, 3, H, W) float, H, W >= 8 -> {'out': (B, num_classes, H, W)}.

    Example:
        >>> model = fastseg.models.dilated_context(num_classes=21, context="large")
    """
    check_choice("dilated_context", "context", context, tuple(CONTEXT_WIDTHS))
    return _build("dilated_context", context, num_classes, backbone, output_stride, aux_loss, crf, backbone_weights,
                  use_kernels)
