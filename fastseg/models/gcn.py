"""GCN: Peng, Zhang, Yu, Luo & Sun, "Large Kernel Matters -- Improve Semantic Segmentation by Global
Convolutional Network" (CVPR 2017), the pipeline of Fig. 2(a).

A ResNet (output stride 32; the paper's is ResNet-152, here ResNet-50/101 so that torchvision
checkpoints load) gives four feature maps, res-2 .. res-5 (``layer1`` .. ``layer4``, strides 4 .. 32).
Each passes a Global Convolutional Network block (``fastseg.nn.GlobalConv2d``: k x 1 + 1 x k and
1 x k + k x 1 convolutions, k = 15, straight to the number of classes, no BatchNorm or ReLU, Sec. 3.1)
and a Boundary Refinement block (``fastseg.nn.BoundaryRefinement``: x + conv(relu(conv(x))),
Sec. 3.2), giving a low-resolution score map per stage. The decoder starts from res-5's scores and
repeats "deconvolution (2x), add the next stage's scores, BR" down to res-2, then "deconvolution, BR"
twice up to the input resolution: 9 BR blocks and 5 deconvolutions in all.

The deconvolutions (4x4, stride 2, padding 1: exactly 2x) are learnable and start as bilinear
upsampling, as FCN's (Long et al. 2015, Sec. 3.3); their bias-free weights are the paper's
"Deconv" boxes. For inputs that are not a multiple of 32, ResNet rounds each stage's size up, so
a 2x deconvolution can overshoot the next stage's map by one row or column: it is cropped to that
map (and the last one to the input), which changes nothing at multiples of 32.
"""
from torch import nn

from .. import nn as fnn
from ._common import SegmentationModel, check_choice, check_no_aux, check_no_crf, check_num_classes, register
from .backbones import resnet_backbone
from .fcn import bilinear_kernel

__all__ = ["GCN", "gcn"]

#: The paper's kernel size for every GCN block (Sec. 4.1, Table 1: k = 15 does best).
KERNEL_SIZE = 15


def _deconv(channels):
    layer = nn.ConvTranspose2d(channels, channels, 4, stride=2, padding=1, bias=False)
    layer.weight.data.copy_(bilinear_kernel(channels, 4))
    return layer


def _crop(x, size):
    return x[:, :, :size[0], :size[1]]


class GCN(SegmentationModel):
    """Large Kernel Matters on ResNet; see the module docstring. forward -> {'out'}."""

    name = "gcn"
    min_input_size = 32

    def _size_reason(self):
        return "ResNet downsamples by 32"

    def __init__(self, backbone, num_classes=21, k=KERNEL_SIZE):
        super().__init__()
        self.backbone = backbone
        channels = (256, 512, 1024, 2048)  # layer1 .. layer4 of ResNet-50/101
        self.gcn = nn.ModuleList(fnn.GlobalConv2d(c, num_classes, k=k) for c in channels)
        self.br = nn.ModuleList(fnn.BoundaryRefinement(num_classes) for _ in channels)
        # After each of the three sums (res-4, res-3, res-2) and after each of the two final deconvolutions.
        self.br_decoder = nn.ModuleList(fnn.BoundaryRefinement(num_classes) for _ in range(5))
        self.deconv = nn.ModuleList(_deconv(num_classes) for _ in range(5))

    def _forward(self, x):
        features = self.backbone(x)
        scores = [br(gcn(features[f"layer{i}"])) for i, (gcn, br) in enumerate(zip(self.gcn, self.br), 1)]
        h = scores[3]
        for step, skip in enumerate(reversed(scores[:3])):  # res-4, res-3, res-2
            h = self.br_decoder[step](_crop(self.deconv[step](h), skip.shape[-2:]) + skip)
        full = x.shape[-2:]
        half = ((full[0] + 1) // 2, (full[1] + 1) // 2)  # the stem's stride-2 size
        h = self.br_decoder[3](_crop(self.deconv[3](h), half))
        h = self.br_decoder[4](_crop(self.deconv[4](h), full))
        return {"out": h}


@register
def gcn(num_classes=21, backbone="resnet101", output_stride=32, aux_loss=False, crf=None, backbone_weights=None,
        use_kernels=True):
    """GCN (Peng et al. 2017): ResNet-101 (or -50), a GCN block (k = 15) and a BR block per stage,
    deconvolution decoder with BR blocks (Fig. 2(a)).

    Returns an nn.Module: (B, 3, H, W), H, W >= 32 -> {'out': (B, num_classes, H, W)}.

    Example:
        >>> model = fastseg.models.gcn(num_classes=21, backbone="resnet50")
        >>> model(torch.randn(1, 3, 512, 512))["out"].shape
        torch.Size([1, 21, 512, 512])
    """
    num_classes = check_num_classes("gcn", num_classes)
    check_choice("gcn", "output_stride", output_stride, (32,))
    check_no_aux("gcn", aux_loss)
    check_no_crf("gcn", crf)
    net = resnet_backbone("gcn", backbone, output_stride, weights=backbone_weights)
    return GCN(net, num_classes).set_use_kernels(use_kernels)
