"""What every fastseg model shares: argument checks, the input check, the kernels switch, loading
a torchvision checkpoint file from disk, and the model registry."""
import numbers
import os

import torch
import torch.nn.functional as F
from torch import nn

OUTPUT_STRIDES = (8, 16, 32)

_REGISTRY = {}


def register(fn):
    """Add a model builder to ``fastseg.models.list_models()`` / ``get_model()`` under its name."""
    _REGISTRY[fn.__name__] = fn
    return fn


def list_models():
    """Names of every model ``get_model`` builds, sorted."""
    return sorted(_REGISTRY)


def get_model(name, **kwargs):
    """Build the model ``name`` (one of ``list_models()``) with the builder's keyword arguments.

    Example:
        >>> model = fastseg.models.get_model("pspnet", num_classes=19, backbone="resnet50")
    """
    if name not in _REGISTRY:
        raise ValueError(f"get_model: unknown model name {name!r}; known models: {', '.join(list_models())}")
    return _REGISTRY[name](**kwargs)


def check_num_classes(model, num_classes):
    """num_classes as an int (numpy's integers accepted)."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral):
        raise TypeError(f"{model}: num_classes must be an int, got {num_classes!r}")
    if num_classes < 1:
        raise ValueError(f"{model}: num_classes must be >= 1, got {num_classes}")
    return int(num_classes)


def check_choice(model, name, value, choices):
    # 8.0 == 8 and True == 1: a float or bool where ints are listed is refused, not coerced.
    ints = all(isinstance(c, int) for c in choices)
    if value not in choices or isinstance(value, bool) or (ints and not isinstance(value, numbers.Integral)):
        raise ValueError(f"{model}: {name} must be one of {', '.join(map(repr, choices))}; got {value!r}")


def check_flag(model, name, value):
    """A True/False option: anything else (a string "False", None, 1) is an error, not truthiness."""
    if not isinstance(value, bool):
        raise TypeError(f"{model}: {name} must be True or False, got {value!r}")
    return value


def check_no_aux(model, aux_loss):
    if check_flag(model, "aux_loss", aux_loss):
        raise ValueError(f"{model}: aux_loss=True, but the paper's {model} has no auxiliary head")


def check_no_crf(model, crf):
    if crf is not None:
        raise ValueError(f"{model}: crf is only offered for deeplab_v1 and deeplab_v2 (their papers' post-processing)")


class SegmentationModel(nn.Module):
    """Base of the models: checks the input, and switches every fastseg.nn layer inside between
    fastseg's kernels and plain PyTorch (``use_kernels``). Subclasses set ``name`` and
    ``min_input_size`` (the smallest height/width the architecture takes) and implement
    ``_forward(x) -> dict``."""

    name = "model"
    min_input_size = 1
    in_channels = 3

    def set_use_kernels(self, use_kernels):
        """Run every fastseg.nn layer on fastseg's kernels (True: backend='auto') or on its
        plain-PyTorch reference (False: backend='reference'); the weights stay the same."""
        self.use_kernels = check_flag(self.name, "use_kernels", use_kernels)
        for module in self.modules():
            # fastseg.nn's layers, and the fused convolutions fastseg.convert adds
            if type(module).__module__.startswith(("fastseg.nn", "fastseg.convert")) and hasattr(module, "backend"):
                module.backend = "auto" if use_kernels else "reference"
        return self

    def check_input(self, x):
        check_model_input(self.name, self.in_channels, self.min_input_size, self._size_reason(), x)

    def _size_reason(self):
        return f"the network downsamples by {self.min_input_size}"

    def forward(self, x):
        self.check_input(x)
        return self._forward(x)


def check_model_input(name, in_channels, min_size, size_reason, x):
    """A model's input check: (B, in_channels, H, W) with H, W >= min_size. Wrapped for torch.fx
    (below): a traced model, fastseg.convert's included, keeps it as one call in its graph."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: input must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{name}: input must be 4-D (B, C, H, W), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name}: input must be a floating-point tensor (the normalised image), got {x.dtype}")
    if x.shape[1] != in_channels:
        raise ValueError(f"{name}: input must have {in_channels} channels (B, {in_channels}, H, W), "
                         f"got shape {tuple(x.shape)}")
    h, w = x.shape[-2:]
    if min(h, w) < min_size:
        raise ValueError(f"{name}: input height and width must be at least {min_size} ({size_reason}); got {h}x{w}")


torch.fx.wrap("check_model_input")


def upsample(x, size):
    """Bilinear resize to ``size`` with align_corners=False (what DeepLab v3+/PSPNet ports use)."""
    if not isinstance(x, torch.fx.Proxy) and tuple(x.shape[-2:]) == tuple(size):
        return x  # (a resize to the same size is an exact copy: skipped, except when tracing)
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def read_state_dict(path, what):
    """A state dict from a local file (a torchvision checkpoint as saved by torch.save)."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"backbone_weights must be a path to a local file, got {type(path).__name__}")
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"backbone_weights: no file at {os.fspath(path)!r}. fastseg downloads nothing: fetch torchvision's "
            f"{what} checkpoint yourself (e.g. torchvision.models.{what}(weights=...).state_dict() saved with "
            "torch.save) and pass the local path")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - every unreadable file gets the same explanation
        raise ValueError(f"backbone_weights: cannot read {os.fspath(path)!r} as a torch state dict "
                         f"({type(error).__name__}: {error})") from error
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"backbone_weights: {os.fspath(path)!r} does not hold a state dict of tensors")
    return state


def load_matching(module, state, path, *, ignore_prefixes=()):
    """Load ``state`` into ``module`` strictly, except for keys under ``ignore_prefixes`` (a
    checkpoint's classification head); anything else that does not match is a ValueError listing
    the missing and unexpected keys (and the shape mismatches)."""
    own = module.state_dict()
    used = {k: v for k, v in state.items() if not k.startswith(tuple(ignore_prefixes))}
    # BatchNorm's num_batches_tracked came with torch 0.4.1: older checkpoints lack it, and
    # BatchNorm's own loading sets it to 0 then, as torchvision's models do.
    missing = sorted(k for k in set(own) - set(used) if not k.endswith(".num_batches_tracked"))
    unexpected = sorted(set(used) - set(own))
    shapes = sorted(f"{k}: file {tuple(used[k].shape)} vs model {tuple(own[k].shape)}"
                    for k in set(own) & set(used) if used[k].shape != own[k].shape)
    if missing or unexpected or shapes:
        def listing(keys):
            return ", ".join(keys[:20]) + (f", ... ({len(keys)} in all)" if len(keys) > 20 else "") if keys else "none"
        raise ValueError(f"backbone_weights: {os.fspath(path)!r} does not match {type(module).__name__}: "
                         f"missing keys: {listing(missing)}; unexpected keys: {listing(unexpected)}; "
                         f"shape mismatches: {listing(shapes)}")
    module.load_state_dict(used, strict=True)
