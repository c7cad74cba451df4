"""Values an inference layer derives from its parameters (a folded BatchNorm, weights packed or
padded for a kernel), kept between calls while the parameters are unchanged."""
import torch

from .. import _autocast, _backends


def cached(module, name, tensors, extra, compute):
    """``compute()``, kept on ``module`` under ``name`` while ``tensors`` are the same objects with the
    same storage at the same in-place version (and ``extra`` is equal): an eval-mode layer's folded
    BatchNorm and packed weights are otherwise several small kernels per call. In-place updates,
    optimiser steps and load_state_dict bump the version; writes through ``.data`` do not, and
    ``module.train()`` / ``.eval()`` drop every kept value. Nothing is kept while autograd records
    through a source or under tracing (fake tensors have no storage), nor from inference tensors
    (they have no version). Under ``torch.inference_mode`` the value is computed as a normal tensor:
    an inference tensor kept would fail a later call that autograd records."""
    recording = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    if recording or _backends.tracing() or any(t is not None and t.is_inference() for t in tensors):
        return compute()
    key = tuple(None if t is None else (id(t), t.data_ptr(), t._version) for t in tensors) + tuple(extra)
    memo = module.__dict__.setdefault("_kept", {})
    hit = memo.get(name)
    if hit is not None and hit[0] == key:
        return hit[1]
    if torch.is_inference_mode_enabled():
        with torch.inference_mode(False), torch.no_grad():
            value = compute()
    else:
        value = compute()
    memo[name] = (key, value, tuple(tensors))  # holding the sources keeps their ids unique
    return value


def autocasting(x):
    """Whether autocast is on for x's device: the layers then run PyTorch's own modules, which
    autocast casts, each to its own dtype (BatchNorm's statistics stay float32, for one)."""
    return isinstance(x, torch.Tensor) and _autocast.enabled(x.device.type)


def has_hooks(module):
    """Whether forward or backward hooks are registered on the module itself."""
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks)


def runs_submodules(layer, x):
    """Whether a layer runs its PyTorch submodules rather than fastseg's ops: under autocast (which
    casts their inputs; :func:`autocasting`), and where hooks would see only calls of the modules: a
    submodule's own hooks (a user's, or the observers torch.ao.quantization's prepare attaches,
    whose calibration would otherwise see no data) or global module hooks."""
    if autocasting(x):
        return True
    hooks = torch.nn.modules.module
    if hooks._global_forward_hooks or hooks._global_forward_pre_hooks:
        return True
    return any(has_hooks(m) for m in layer.modules() if m is not layer)


class KeepsDerived:
    """Drops the values ``cached`` kept whenever the mode is set."""

    def train(self, mode=True):
        self.__dict__.pop("_kept", None)
        return super().train(mode)
