"""Backbones: VGG-16 (Simonyan & Zisserman, ICLR 2015), with or without BatchNorm, and ResNet-50/101
(He et al., CVPR 2016) with DeepLab's atrous output stride (Chen et al., TPAMI 2017; arXiv
1706.05587, 2017).

Parameter names are torchvision's (``features.N.*`` for VGG; ``conv1``, ``bn1``, ``layerK.I.*`` for
ResNet), so a torchvision checkpoint saved on disk loads with ``backbone_weights=PATH``. The
classification heads (VGG's ``classifier``, ResNet's ``fc``) are not part of a backbone; the models
that reuse VGG's fully connected layers (FCN, DeepLab v1, the dilated front end) read them from the
same file themselves.
"""
import numbers
import os

import torch
from torch import nn

from ._common import OUTPUT_STRIDES, check_choice, load_matching, read_state_dict

__all__ = ["VGG", "ResNet", "Bottleneck", "vgg16", "vgg16_bn", "resnet50", "resnet101", "BACKBONES"]

#: VGG-16's convolutions per stage (configuration D of Simonyan & Zisserman, Table 1).
VGG16_STAGES = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))


class VGG(nn.Module):
    """VGG-16's 13 convolutions and 5 pools in torchvision's ``features`` numbering.

    The models change what the weights do not fix: ``pools`` (five modules replacing the 2x2/2 max
    pools: FCN's ceil-mode pools, SegNet's pools with indices, DeepLab's 3x3 pools, nn.Identity for
    the dilated front end's removed ones), the per-stage ``dilations`` and the first convolution's
    ``first_padding`` (FCN's 100).

    forward(x) -> dict: ``stageK`` (K = 1..5) the last ReLU of stage K, ``poolK`` the pool's output;
    for pools returning indices also ``indicesK`` and ``sizeK`` (the pre-pool spatial size).
    """

    def __init__(self, batch_norm=False, *, pools=None, dilations=(1, 1, 1, 1, 1), first_padding=1, in_channels=3):
        super().__init__()
        pools = [nn.MaxPool2d(2, 2) for _ in range(5)] if pools is None else list(pools)
        layers, self._stage_ends = [], []
        channels = in_channels
        for stage, (widths, dilation, pool) in enumerate(zip(VGG16_STAGES, dilations, pools)):
            for i, width in enumerate(widths):
                padding = first_padding if (stage == 0 and i == 0) else dilation
                layers.append(nn.Conv2d(channels, width, 3, padding=padding, dilation=dilation))
                if batch_norm:
                    layers.append(nn.BatchNorm2d(width))
                layers.append(nn.ReLU(inplace=True))
                channels = width
            self._stage_ends.append(len(layers))
            layers.append(pool)
        self.features = nn.Sequential(*layers)
        self.out_channels = channels
        self.batch_norm = batch_norm

    def forward(self, x):
        out, start = {}, 0
        for stage, end in enumerate(self._stage_ends, 1):
            for layer in self.features[start:end]:
                x = layer(x)
            out[f"stage{stage}"] = x
            size = x.shape[-2:]
            pool = self.features[end]
            x = pool(x)
            if getattr(pool, "return_indices", False):  # a static branch, so that torch.fx can trace it
                x, out[f"indices{stage}"] = x
                out[f"size{stage}"] = size
            out[f"pool{stage}"] = x
            start = end + 1
        return out

    def load_torchvision(self, path, state=None):
        """Load torchvision's vgg16 / vgg16_bn checkpoint file; its classifier is ignored here."""
        state = read_state_dict(path, "vgg16_bn" if self.batch_norm else "vgg16") if state is None else state
        load_matching(self, state, path, ignore_prefixes=("classifier.",))


class Bottleneck(nn.Module):
    """ResNet's bottleneck block (He et al. 2016, Fig. 5 right), stride on the 3x3 convolution as
    torchvision's ResNet v1.5 has it; ``dilation`` is the 3x3's atrous rate."""

    expansion = 4

    def __init__(self, in_channels, width, stride=1, dilation=1, downsample=None):
        super().__init__()
        out_channels = width * self.expansion
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


RESNET_BLOCKS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}


def check_multi_grid(owner, multi_grid, num_blocks):
    """``multi_grid`` as a tuple of ``num_blocks`` ints >= 1 (or None), else a ValueError naming ``owner``."""
    if multi_grid is None:
        return None
    rates = tuple(multi_grid) if isinstance(multi_grid, (tuple, list)) else ()
    if len(rates) != num_blocks or not all(isinstance(r, numbers.Integral) and not isinstance(r, bool) and r >= 1
                                           for r in rates):
        raise ValueError(f"{owner}: multi_grid must be {num_blocks} ints >= 1 (one per layer4 block), "
                         f"got {multi_grid!r}")
    return tuple(int(r) for r in rates)


class ResNet(nn.Module):
    """ResNet-50/101 (He et al. 2016) with an atrous output stride (Chen et al., DeepLab).

    ``output_stride`` 32 is the classification network; 16 replaces layer4's stride by dilation 2,
    8 also replaces layer3's by dilation 2 and makes layer4's 4 (DeepLab v2/v3, PSPNet). As in
    DeepLab's networks, every block of a dilated layer, its first included, uses the layer's rate.
    ``multi_grid`` (DeepLab v3, Sec. 3.2): unit rates for layer4's three blocks, multiplied by
    layer4's rate, e.g. (1, 2, 4) at output stride 16 gives rates (2, 4, 8).

    forward(x) -> dict: ``stem`` (stride 4, after the max pool), ``layer1`` .. ``layer4``.
    """

    def __init__(self, depth=50, output_stride=32, multi_grid=None, in_channels=3):
        super().__init__()
        check_choice("ResNet", "depth", depth, tuple(RESNET_BLOCKS))
        check_choice("ResNet", "output_stride", output_stride, OUTPUT_STRIDES)
        blocks = RESNET_BLOCKS[depth]
        multi_grid = check_multi_grid("ResNet", multi_grid, blocks[3])
        self.depth, self.output_stride, self.multi_grid = depth, output_stride, multi_grid
        # (stride, dilation) of layer3 and layer4 for each output stride.
        layer3, layer4 = {32: ((2, 1), (2, 1)), 16: ((2, 1), (1, 2)), 8: ((1, 2), (1, 4))}[output_stride]
        self.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self._channels = 64
        self.layer1 = self._layer(64, blocks[0], 1, [1] * blocks[0])
        self.layer2 = self._layer(128, blocks[1], 2, [1] * blocks[1])
        self.layer3 = self._layer(256, blocks[2], layer3[0], [layer3[1]] * blocks[2])
        grid = multi_grid or (1,) * blocks[3]
        self.layer4 = self._layer(512, blocks[3], layer4[0], [layer4[1] * g for g in grid])
        self.out_channels = self._channels

    def _layer(self, width, count, stride, dilations):
        downsample = None
        if stride != 1 or self._channels != width * Bottleneck.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self._channels, width * Bottleneck.expansion, 1, stride=stride, bias=False),
                nn.BatchNorm2d(width * Bottleneck.expansion),
            )
        layers = [Bottleneck(self._channels, width, stride, dilations[0], downsample)]
        self._channels = width * Bottleneck.expansion
        layers += [Bottleneck(self._channels, width, 1, d) for d in dilations[1:]]
        return nn.Sequential(*layers)

    def forward(self, x):
        out = {}
        x = out["stem"] = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = out["layer1"] = self.layer1(x)
        x = out["layer2"] = self.layer2(x)
        x = out["layer3"] = self.layer3(x)
        out["layer4"] = self.layer4(x)
        return out

    def load_torchvision(self, path, state=None):
        """Load torchvision's resnet50 / resnet101 checkpoint file; its ``fc`` is ignored here."""
        state = read_state_dict(path, f"resnet{self.depth}") if state is None else state
        load_matching(self, state, path, ignore_prefixes=("fc.",))


def vgg16(**kwargs):
    """VGG-16 without BatchNorm (torchvision's ``vgg16`` names)."""
    return VGG(batch_norm=False, **kwargs)


def vgg16_bn(**kwargs):
    """VGG-16 with BatchNorm after every convolution (torchvision's ``vgg16_bn`` names)."""
    return VGG(batch_norm=True, **kwargs)


def resnet50(output_stride=32, multi_grid=None):
    """ResNet-50 (torchvision's ``resnet50`` names) with an atrous output stride of 8, 16 or 32."""
    return ResNet(50, output_stride, multi_grid)


def resnet101(output_stride=32, multi_grid=None):
    """ResNet-101 (torchvision's ``resnet101`` names) with an atrous output stride of 8, 16 or 32."""
    return ResNet(101, output_stride, multi_grid)


BACKBONES = {"vgg16": vgg16, "vgg16_bn": vgg16_bn, "resnet50": resnet50, "resnet101": resnet101}


def resnet_backbone(model, backbone, output_stride, multi_grid=None, weights=None):
    """The ResNet a model is built on, checked and (optionally) loaded from ``weights``."""
    check_choice(model, "backbone", backbone, ("resnet50", "resnet101"))
    check_choice(model, "output_stride", output_stride, OUTPUT_STRIDES)
    check_multi_grid(model, multi_grid, RESNET_BLOCKS[int(backbone[6:])][3])
    net = BACKBONES[backbone](output_stride=output_stride, multi_grid=multi_grid)
    if weights is not None:
        net.load_torchvision(weights)
    return net


def vgg_fc_weights(state, path, fc6_shape, fc7_shape, decimate=None):
    """fc6/fc7 of a torchvision VGG checkpoint as convolution weights: classifier.0 (4096, 25088)
    reshaped to (4096, 512, 7, 7), classifier.3 to (4096, 4096, 1, 1). ``decimate`` = (channel
    step, spatial step) subsamples them as DeepLab v1 does for its 1024-channel 3x3 fc6."""
    path = os.fspath(path)
    missing = [k for k in ("classifier.0.weight", "classifier.0.bias", "classifier.3.weight", "classifier.3.bias")
               if k not in state]
    if missing:
        raise ValueError(f"backbone_weights: {path!r} has no VGG classifier to build fc6/fc7 from; "
                         f"missing keys: {', '.join(missing)}")
    w6 = state["classifier.0.weight"].reshape(4096, 512, 7, 7)
    b6 = state["classifier.0.bias"]
    w7 = state["classifier.3.weight"].reshape(4096, 4096, 1, 1)
    b7 = state["classifier.3.bias"]
    if decimate is not None:
        c, s = decimate
        w6, b6 = w6[::c, :, ::s, ::s], b6[::c]
        w7, b7 = w7[::c, ::c], b7[::c]
    for name, w, shape in (("fc6", w6, fc6_shape), ("fc7", w7, fc7_shape)):
        if tuple(w.shape) != tuple(shape):
            raise ValueError(f"backbone_weights: {name} from {path!r} has shape {tuple(w.shape)}, "
                             f"the model's is {tuple(shape)}")
    return (w6.contiguous(), b6.contiguous()), (w7.contiguous(), b7.contiguous())


@torch.no_grad()
def load_vgg_with_fc(vgg, fc6, fc7, path, decimate=None):
    """Load a torchvision VGG checkpoint into ``vgg`` and its fully connected layers into the
    convolutions ``fc6`` and ``fc7`` (the "convolutionalisation" of Long et al. 2015, Sec. 3.1)."""
    state = read_state_dict(path, "vgg16_bn" if vgg.batch_norm else "vgg16")
    vgg.load_torchvision(path, state)
    (w6, b6), (w7, b7) = vgg_fc_weights(state, path, fc6.weight.shape, fc7.weight.shape, decimate)
    fc6.weight.copy_(w6), fc6.bias.copy_(b6), fc7.weight.copy_(w7), fc7.bias.copy_(b7)
