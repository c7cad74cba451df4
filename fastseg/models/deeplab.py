"""DeepLab v1, v2, v3 and v3+.

* v1 (Chen et al., "Semantic Image Segmentation with Deep Convolutional Nets and Fully Connected
  CRFs", ICLR 2015), the DeepLab-LargeFOV variant: VGG-16 with 3x3 pools, pool4/pool5 at stride 1,
  conv5 dilated by 2, fc6 a 3x3 convolution dilated by 12 with 1024 channels, fc7 1x1 with 1024:
  output stride 8. Its fc6/fc7 are torchvision's ``classifier.0``/``classifier.3`` subsampled as
  the paper does ("decimation": every 4th filter, fc6's 7x7 taps at 3-pixel steps to 3x3).
* v2 (Chen et al., "DeepLab: ... Atrous Convolution, and Fully Connected CRFs", TPAMI 2017):
  ResNet-101 at output stride 8 and ASPP-L, four 3x3 branches at rates 6/12/18/24 giving class
  scores, summed; optional multi-scale input fusion (scales 1, 0.75, 0.5, max over the scales).
* v1 and v2 may add the fully connected CRF (Kraehenbuehl & Koltun 2011) in eval mode:
  ``crf=fastseg.nn.DenseCRF(...)`` or a dict of its parameters; a learnable one
  (``learnable=True``, CRF-as-RNN, Zheng et al. 2015) runs in training too and trains end to end.
* v3 (Chen et al., "Rethinking Atrous Convolution for Semantic Image Segmentation", arXiv
  1706.05587, 2017): ResNet with multi-grid (1, 2, 4) in layer4, output stride 16 or 8, ASPP with
  image pooling and BatchNorm (256 channels), then a 1x1 convolution to the classes (Sec. 3.3).
* v3+ (Chen et al., "Encoder-Decoder with Atrous Separable Convolution", ECCV 2018), on ResNet:
  the v3 encoder (without its classifier) and a decoder that concatenates the 4x-upsampled
  encoder output with layer1's features reduced to 48 channels by a 1x1 convolution, then two 3x3
  convolutions (256) and a 1x1 classifier, upsampled 4x (Sec. 3.1). The paper's best results use a
  modified Xception; the ResNet-101 variant is the one the paper also reports (Table 3).

The ASPP heads are ``fastseg.nn.ASPP``; the conv-BN-ReLU layers of v3+'s decoder are
``fastseg.nn.AtrousConvBNReLU`` (BatchNorm folded into the fused kernel in eval mode).
"""
import inspect
import numbers

import torch
from torch import nn

from .. import nn as fnn
from ._common import OUTPUT_STRIDES, SegmentationModel, check_choice, check_no_aux, check_no_crf, check_num_classes, register, \
    upsample
from .backbones import VGG, load_vgg_with_fc, resnet_backbone

__all__ = ["DeepLabV1", "DeepLabV2", "DeepLabV3", "DeepLabV3Plus", "deeplab_v1", "deeplab_v2", "deeplab_v3",
           "deeplab_v3_plus", "IMAGENET_MEAN", "IMAGENET_STD"]

#: The input normalisation (torchvision's ImageNet statistics) that the CRF undoes to get the
#: 0..255 RGB image its bilateral kernel compares, when forward is not given the image itself.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _make_crf(model, crf, num_classes):
    if crf is None:
        return None
    if isinstance(crf, dict):
        known = set(inspect.signature(fnn.DenseCRF).parameters)
        unknown = sorted(map(str, set(crf) - known))
        if unknown:
            raise ValueError(f"{model}: crf dict does not hold DenseCRF parameters: unknown {', '.join(unknown)} "
                             f"(DenseCRF takes {', '.join(sorted(known))})")
        if crf.get("learnable") is True and crf.get("num_labels") is None:
            crf = dict(crf, num_labels=num_classes)  # the model knows the compatibility's size
        crf = fnn.DenseCRF(**crf)  # its own checks name what is wrong with a value
    if not isinstance(crf, fnn.DenseCRF):
        raise TypeError(f"{model}: crf must be None, a fastseg.nn.DenseCRF or a dict of its parameters, "
                        f"got {type(crf).__name__}")
    if crf.num_labels is not None and crf.num_labels != num_classes:
        raise ValueError(f"{model}: crf was built with num_labels={crf.num_labels} but the model has "
                         f"num_classes={num_classes}")
    return crf


class _CRFModel(SegmentationModel):
    """v1/v2: logits at the input size, then (``crf`` set: in eval mode, or always when the CRF is
    learnable) the dense CRF.

    forward(x, image=None): ``image`` (B, 3, H, W), uint8 or float in 0..255, is what the CRF's
    bilateral kernel compares; without it the CRF reads x un-normalised with IMAGENET_MEAN/STD.
    With the CRF applied, 'out' holds the log of its marginals (so softmax(out) is the CRF's Q and
    argmax is its labelling) and 'out_before_crf' the network's logits.
    """

    def forward(self, x, image=None):
        self.check_input(x)
        if self.crf is not None and isinstance(x, torch.fx.Proxy):
            # A traced graph would fix today's branch (training mode, image given or not) for good.
            raise torch.fx.proxy.TraceError(f"{self.name}: the CRF step depends on the training mode and on "
                                            "`image`; the model does not trace with a CRF attached")
        if image is not None and not isinstance(image, (torch.Tensor, torch.fx.Proxy)):
            raise TypeError(f"{self.name}: image must be a (B, 3, H, W) uint8 or float tensor, got {type(image).__name__}")
        logits = self._forward(x)["out"]
        # A fixed CRF is post-processing, run in eval mode only (as the papers do); a learnable one
        # (CRF-as-RNN) is part of the network and trains with it.
        if self.crf is None or (self.training and not self.crf.learnable):
            return {"out": logits}
        if image is None:
            mean = x.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
            std = x.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
            image = ((x * std + mean) * 255).clamp(0, 255)
        q = self.crf(logits.float(), image.detach())
        return {"out": q.clamp_min(1e-12).log().to(logits.dtype), "out_before_crf": logits}


class DeepLabV1(_CRFModel):
    """DeepLab-LargeFOV (Chen et al. 2015) on atrous VGG-16; see the module docstring."""

    name = "deeplab_v1"
    min_input_size = 8

    def _size_reason(self):
        return "the network has output stride 8"

    def __init__(self, num_classes=21, crf=None):
        super().__init__()
        pools = [nn.MaxPool2d(3, 2, 1) for _ in range(3)] + [nn.MaxPool2d(3, 1, 1) for _ in range(2)]
        self.backbone = VGG(batch_norm=False, pools=pools, dilations=(1, 1, 1, 1, 2))
        self.fc6 = nn.Conv2d(512, 1024, 3, padding=12, dilation=12)
        self.fc7 = nn.Conv2d(1024, 1024, 1)
        self.relu = nn.ReLU(inplace=True)
        self.drop = nn.Dropout(0.5)
        self.fc8 = nn.Conv2d(1024, num_classes, 1)
        nn.init.normal_(self.fc8.weight, 0, 0.01)  # as the paper's Caffe model initialises fc8
        nn.init.zeros_(self.fc8.bias)
        self.crf = crf

    def _forward(self, x):
        h = self.backbone(x)["pool5"]
        h = self.drop(self.relu(self.fc6(h)))
        h = self.drop(self.relu(self.fc7(h)))
        return {"out": upsample(self.fc8(h), x.shape[-2:])}


class DeepLabV2(_CRFModel):
    """DeepLab v2 (Chen et al. 2017) on atrous ResNet with ASPP-L; see the module docstring."""

    name = "deeplab_v2"

    def __init__(self, backbone, num_classes=21, rates=(6, 12, 18, 24), multi_scale=False, crf=None):
        super().__init__()
        self.backbone = backbone
        self.min_input_size = backbone.output_stride
        self.classifier = fnn.ASPP(backbone.out_channels, num_classes, version="v2", rates=rates,
                                   output_stride=backbone.output_stride)
        for conv in self.classifier.branches:  # the paper's Caffe model: N(0, 0.01) class scorers
            nn.init.normal_(conv.weight, 0, 0.01)
            nn.init.zeros_(conv.bias)
        self.multi_scale = _check_scales(multi_scale)
        self.crf = crf

    def _size_reason(self):
        return f"the network has output stride {self.backbone.output_stride}"

    def _scores(self, x):
        return self.classifier(self.backbone(x)["layer4"])

    def _forward(self, x):
        scores = self._scores(x)
        if self.multi_scale:
            # Sec. 3.3 (MSC): the same network on scaled inputs, fused by taking the maximum over
            # the scales at the full-scale score resolution.
            for scale in self.multi_scale:
                if scale == 1.0:
                    continue
                size = [max(self.min_input_size, int(round(s * scale))) for s in x.shape[-2:]]
                scaled = upsample(self._scores(upsample(x, size)), scores.shape[-2:])
                scores = torch.maximum(scores, scaled)
        return {"out": upsample(scores, x.shape[-2:])}


class DeepLabV3(SegmentationModel):
    """DeepLab v3 (Chen et al. 2017): atrous ResNet with multi-grid, ASPP with image pooling."""

    name = "deeplab_v3"

    def __init__(self, backbone, num_classes=21):
        super().__init__()
        self.backbone = backbone
        self.min_input_size = backbone.output_stride
        self.classifier = nn.Sequential(
            fnn.ASPP(backbone.out_channels, 256, version="v3", output_stride=backbone.output_stride),
            nn.Conv2d(256, num_classes, 1),
        )

    def _size_reason(self):
        return f"the network has output stride {self.backbone.output_stride}"

    def _forward(self, x):
        return {"out": upsample(self.classifier(self.backbone(x)["layer4"]), x.shape[-2:])}


class DeepLabV3Plus(SegmentationModel):
    """DeepLab v3+ (Chen et al. 2018) on ResNet: v3 encoder, 4x decoder with layer1 features."""

    name = "deeplab_v3_plus"

    def __init__(self, backbone, num_classes=21):
        super().__init__()
        self.backbone = backbone
        self.min_input_size = backbone.output_stride
        self.aspp = fnn.ASPP(backbone.out_channels, 256, version="v3", output_stride=backbone.output_stride)
        self.reduce = fnn.AtrousConvBNReLU(256, 48, 1)
        self.decoder = nn.Sequential(
            fnn.AtrousConvBNReLU(256 + 48, 256, 3),
            fnn.AtrousConvBNReLU(256, 256, 3),
            nn.Conv2d(256, num_classes, 1),
        )

    def _size_reason(self):
        return f"the encoder has output stride {self.backbone.output_stride}"

    def _forward(self, x):
        features = self.backbone(x)
        low = self.reduce(features["layer1"])
        high = upsample(self.aspp(features["layer4"]), low.shape[-2:])
        return {"out": upsample(self.decoder(torch.cat([high, low], 1)), x.shape[-2:])}


def _check_common(name, num_classes, output_stride, aux_loss, strides=OUTPUT_STRIDES):
    check_choice(name, "output_stride", output_stride, strides)
    check_no_aux(name, aux_loss)
    return check_num_classes(name, num_classes)


def _check_scales(multi_scale):
    """deeplab_v2's multi_scale as a tuple of scales, or None."""
    if multi_scale is False or multi_scale is None:
        return None
    if multi_scale is True:
        return (1.0, 0.75, 0.5)
    scales = tuple(multi_scale) if isinstance(multi_scale, (tuple, list)) else None
    if not scales or not all(isinstance(s, numbers.Real) and not isinstance(s, bool) and 0 < s < float("inf")
                             for s in scales):
        raise ValueError(f"deeplab_v2: multi_scale must be True, False or a non-empty tuple of scales > 0, "
                         f"got {multi_scale!r}")
    return tuple(float(s) for s in scales)


@register
def deeplab_v1(num_classes=21, backbone="vgg16", output_stride=8, aux_loss=False, crf=None, backbone_weights=None,
               use_kernels=True):
    """DeepLab-LargeFOV (Chen et al., ICLR 2015) on atrous VGG-16, output stride 8.

    Returns an nn.Module: forward(x (B, 3, H, W), image=None), H, W >= 8 -> {'out': (B, num_classes,
    H, W)}; with ``crf`` (a fastseg.nn.DenseCRF or a dict of its parameters), in eval mode (and in
    training too for a learnable CRF) 'out' is the log of the CRF's marginals and 'out_before_crf'
    the logits.

    Example:
        >>> model = fastseg.models.deeplab_v1(crf=dict(iterations=10)).eval()
        >>> x = torch.rand(1, 3, 64, 64)
        >>> labels = model(x)["out"].argmax(1)  # (1, 64, 64)
    """
    num_classes = _check_common("deeplab_v1", num_classes, output_stride, aux_loss, (8,))
    check_choice("deeplab_v1", "backbone", backbone, ("vgg16",))
    model = DeepLabV1(num_classes, _make_crf("deeplab_v1", crf, num_classes))
    if backbone_weights is not None:
        load_vgg_with_fc(model.backbone, model.fc6, model.fc7, backbone_weights, decimate=(4, 3))
    return model.set_use_kernels(use_kernels)


@register
def deeplab_v2(num_classes=21, backbone="resnet101", output_stride=8, aux_loss=False, crf=None, backbone_weights=None,
               use_kernels=True, multi_scale=False):
    """DeepLab v2 (Chen et al., TPAMI 2017): atrous ResNet-101 (or -50), ASPP-L rates 6/12/18/24
    summed; ``multi_scale`` True (scales 1, 0.75, 0.5) or a tuple of further scales for max fusion
    (the full scale, 1, is always one of them).

    Returns an nn.Module: forward(x, image=None), H, W >= output_stride -> {'out': (B, num_classes,
    H, W)} (CRF in eval mode as for deeplab_v1).
    """
    num_classes = _check_common("deeplab_v2", num_classes, output_stride, aux_loss, (8, 16))
    multi_scale = _check_scales(multi_scale)
    net = resnet_backbone("deeplab_v2", backbone, output_stride, weights=backbone_weights)
    return DeepLabV2(net, num_classes, multi_scale=multi_scale, crf=_make_crf("deeplab_v2", crf, num_classes)) \
        .set_use_kernels(use_kernels)


@register
def deeplab_v3(num_classes=21, backbone="resnet101", output_stride=16, aux_loss=False, crf=None,
               backbone_weights=None, use_kernels=True, multi_grid=(1, 2, 4)):
    """DeepLab v3 (Chen et al. 2017): ResNet with multi-grid layer4, ASPP with image pooling + BN.

    Returns an nn.Module: (B, 3, H, W), H, W >= output_stride -> {'out': (B, num_classes, H, W)}.
    Training needs batches of 2 or more (image pooling's BatchNorm sees one value per image).

    Example:
        >>> model = fastseg.models.deeplab_v3(num_classes=21, backbone="resnet50", output_stride=8)
    """
    num_classes = _check_common("deeplab_v3", num_classes, output_stride, aux_loss, (8, 16))
    check_no_crf("deeplab_v3", crf)
    net = resnet_backbone("deeplab_v3", backbone, output_stride, multi_grid, backbone_weights)
    return DeepLabV3(net, num_classes).set_use_kernels(use_kernels)


@register
def deeplab_v3_plus(num_classes=21, backbone="resnet101", output_stride=16, aux_loss=False, crf=None,
                    backbone_weights=None, use_kernels=True, multi_grid=None):
    """DeepLab v3+ (Chen et al., ECCV 2018) on ResNet: v3 encoder + decoder with layer1 features.

    Returns an nn.Module: (B, 3, H, W), H, W >= output_stride -> {'out': (B, num_classes, H, W)}.
    Training needs batches of 2 or more (image pooling's BatchNorm sees one value per image).
    """
    num_classes = _check_common("deeplab_v3_plus", num_classes, output_stride, aux_loss, (8, 16))
    check_no_crf("deeplab_v3_plus", crf)
    net = resnet_backbone("deeplab_v3_plus", backbone, output_stride, multi_grid, backbone_weights)
    return DeepLabV3Plus(net, num_classes).set_use_kernels(use_kernels)
