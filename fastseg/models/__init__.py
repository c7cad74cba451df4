"""Classic semantic-segmentation architectures, faithful to their papers, built from torch.nn and
fastseg.nn layers (a model never calls a kernel directly).

Each builder ``fastseg.models.<name>(num_classes=21, backbone=..., output_stride=..., aux_loss=...,
crf=None, backbone_weights=None, use_kernels=True)`` returns an nn.Module whose forward gives
``{'out': logits at the input resolution}``, plus ``'aux'`` where the paper has an auxiliary head
(PSPNet). ``backbone_weights`` is a local torchvision checkpoint file (nothing downloads);
``use_kernels=False`` runs the same weights through plain PyTorch. ``list_models()`` names them
all and ``get_model(name, **kwargs)`` builds one.

Example:
    >>> model = fastseg.models.get_model("deeplab_v3", num_classes=21, backbone="resnet50").eval()
    >>> logits = model(torch.randn(1, 3, 512, 512))["out"]          # (1, 21, 512, 512)
"""
from . import backbones
from ._common import get_model, list_models
from .deeplab import deeplab_v1, deeplab_v2, deeplab_v3, deeplab_v3_plus
from .dilated import ContextModule, dilated_context, dilated_frontend
from .fcn import fcn8s, fcn16s, fcn32s
from .gcn import gcn
from .pspnet import pspnet
from .refinenet import refinenet
from .segnet import segnet

__all__ = ["ContextModule", "backbones", "deeplab_v1", "deeplab_v2", "deeplab_v3", "deeplab_v3_plus",
           "dilated_context", "dilated_frontend", "fcn8s", "fcn16s", "fcn32s", "gcn", "get_model", "list_models",
           "pspnet", "refinenet", "segnet"]
