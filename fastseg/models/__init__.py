"""Classic semantic-segmentation architectures, faithful to their papers, built from torch.nn and
fastseg.nn layers. Each builder returns an nn.Module whose forward gives ``{'out': logits at the
input resolution}`` (plus ``'aux'`` where the paper has an auxiliary head)."""
from . import backbones
from ._common import get_model, list_models
from .fcn import fcn8s, fcn16s, fcn32s
from .segnet import segnet

__all__ = ["backbones", "fcn8s", "fcn16s", "fcn32s", "get_model", "list_models", "segnet"]
