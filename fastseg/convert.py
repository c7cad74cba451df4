"""``fastseg.convert``: rewrite an existing model onto fastseg's kernels, without retraining.

Three rewrites, in this order:

1. ASPP blocks of torchvision (``torchvision.models.segmentation.deeplabv3.ASPP``) and of
   segmentation_models_pytorch (``segmentation_models_pytorch.decoders.deeplabv3.decoder.ASPP``)
   become ``fastseg.nn.ASPP`` (v3: 1x1 branch, atrous 3x3 branches, image pooling, 1x1 projection,
   each conv + BatchNorm + ReLU; Chen et al., "Rethinking Atrous Convolution for Semantic Image
   Segmentation", 2017) with the same weights. The separable variant (depthwise + pointwise
   branches, DeepLabV3Plus's default in segmentation_models_pytorch) has no exact fastseg.nn.ASPP
   form: merging the two convolutions into one dense 3x3 would be ~9x the work, so it is left (its
   pointwise conv + BN + ReLU chains are still fused by step 2).
   ``nn.MaxUnpool2d`` modules become ``fastseg.nn.MaxUnpool2d``.
2. Every submodule that traces with ``torch.fx`` (the whole model where it can, else its children
   one by one, recursively: module-level replacement where tracing fails) has its graph searched for
   ``Conv2d -> [BatchNorm2d] -> [+ residual] -> [ReLU]`` chains whose intermediate results have no
   other user; each becomes one :class:`FusedConv2d` (one ``fastseg.atrous_conv2d`` call, BatchNorm
   folded into the per-channel scale and shift, the residual add and ReLU in its epilogue).
3. In those graphs, ``torch.nn.functional.max_unpool2d`` calls become ``fastseg.max_unpool2d``.

torch.fx records the code as it runs on Proxies: a forward whose Python branches depend on tensor
values fails to trace (and falls back to its children); one that branches on a result's Python type
would be recorded wrongly, which convert detects for poolings with ``return_indices=True`` (a
forward that tests ``isinstance(y, tuple)`` on a pool's result) and then does not use the graph.
fastseg.nn layers and fastseg ops stay single calls in a traced graph.

A pattern is replaced only where fastseg's kernel was measured no slower than eager PyTorch on the
model's device (:data:`NOT_SLOWER`); elsewhere it is left and the report says why.
"""
import copy
import dataclasses
import importlib
import math
import operator
import sys

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from . import nn as fnn
from ._backends import check_name, tracing
from .nn._kept import has_hooks, runs_submodules
from .nn.atrous import eager_conv, fold_batch_norm, folds_batch_norm, fusable_residual
from .ops.atrous import _IMPLEMENTED as ATROUS_BACKENDS
from .ops.atrous import atrous_conv2d, atrous_output_size
from .ops.dense_crf import dense_crf
from .ops.gcn import gcn_conv2d
from .ops.unpool import max_unpool2d

__all__ = ["convert", "ConversionReport", "FusedConv2d", "NOT_SLOWER"]

#: Patterns measured no slower than eager PyTorch, per device type (benchmarks/RESULTS.md,
#: "fastseg.convert"). The fused conv runs ATen's convolution and then its whole epilogue in one
#: pass, where eager spends a pass per BatchNorm, add and ReLU, so every epilogue pattern gains on
#: the CPU; a conv alone has nothing to fuse and is never replaced. On CUDA (an H200, 2026-11-27,
#: RESULTS.md "GPU") only the ASPP block: fastseg.nn.ASPP v3 ran 1.04-1.97x eager in float16 and
#: 1.14-1.25x in float32 (2048 -> 256 at 65x65, batch 1 and 8), while the fused conv chains lost at
#: batch 1 (0.47-0.70x on three of nine DeepLab shapes: host time per call).
NOT_SLOWER = {
    "cpu": frozenset({"conv+bn", "conv+bn+relu", "conv+bn+add", "conv+bn+add+relu", "conv+relu", "conv+add",
                      "conv+add+relu", "aspp", "max_unpool2d"}),
    "cuda": frozenset({"aspp"}),
}

#: Below this many output elements a FusedConv2d runs eagerly: the fused call's Python argument
#: checks and BatchNorm folding cost ~0.1 ms (measured: 1x1 conv + BN + ReLU 2048->256 on a 1x1 map
#: 0.12 ms eager vs 0.21 ms fused), more than the output passes it saves on a map this small (~1 MB).
EAGER_BELOW = 1 << 18

_RELU_FUNCTIONS = (F.relu, torch.relu, torch.relu_, torch.nn.functional.relu_)
_ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)


@dataclasses.dataclass
class Replacement:
    """One rewrite: where (a module path; '' is the model), what pattern, into what."""

    path: str
    pattern: str
    into: str


@dataclasses.dataclass
class Left:
    """Something convert saw and did not rewrite, and why."""

    path: str
    what: str
    reason: str


@dataclasses.dataclass
class ConversionReport:
    """What ``fastseg.convert`` replaced and what it left (and why). ``print(report)`` for a summary;
    ``replaced`` and ``left`` are lists of :class:`Replacement` / :class:`Left`; ``traced`` the module
    paths rewritten through torch.fx; ``device`` the device type the speed rules were taken for."""

    device: str = "cpu"
    replaced: list = dataclasses.field(default_factory=list)
    left: list = dataclasses.field(default_factory=list)
    traced: list = dataclasses.field(default_factory=list)

    def counts(self):
        """{pattern: number replaced}."""
        out = {}
        for r in self.replaced:
            out[r.pattern] = out.get(r.pattern, 0) + 1
        return out

    def __str__(self):
        lines = [f"fastseg.convert ({self.device}): {len(self.replaced)} replaced, {len(self.left)} left"]
        for pattern, n in sorted(self.counts().items()):
            lines.append(f"  replaced {n} x {pattern}")
        if self.traced:
            lines.append("  traced with torch.fx: " + ", ".join(p or "<model>" for p in self.traced))
        for r in self.replaced:
            lines.append(f"  + {r.path or '<model>'}: {r.pattern} -> {r.into}")
        for item in self.left:
            lines.append(f"  - {item.path or '<model>'}: {item.what} left: {item.reason}")
        return "\n".join(lines)


class FusedConv2d(nn.Module):
    """``relu(bn(conv(x)) + residual)``, each of bn, residual and relu optional, as one
    ``fastseg.atrous_conv2d`` call in eval mode (BatchNorm folded into scale and shift); outputs
    smaller than :data:`EAGER_BELOW` elements run the eager modules instead.

    Uses the original ``conv`` (nn.Conv2d) and ``bn`` (nn.BatchNorm2d or None) modules, so the
    weights are theirs; ``shared=True`` (what ``convert`` uses) leaves them registered where they
    already are and out of this module's parameters and state dict, so the converted model's state
    dict is the original's. In training mode it runs them eagerly, with exactly their semantics
    (batch statistics, running-stat updates). ``forward(x, residual=None)``; a residual whose shape,
    dtype or device differs from the output's (a broadcasting add) is added eagerly after the
    convolution.
    """

    def __init__(self, conv, bn=None, relu=False, backend="auto", *, shared=False):
        super().__init__()
        check_name("FusedConv2d", backend, ATROUS_BACKENDS)
        if shared:  # plain attributes: not submodules of this one
            self.__dict__["conv"], self.__dict__["bn"] = conv, bn
        else:
            self.conv, self.bn = conv, bn
        self.relu, self.backend, self.shared = bool(relu), backend, shared

    def _eager(self, x, residual):
        y = eager_conv(self.conv, x, runs_submodules(self, x))
        if self.bn is not None:
            y = self.bn(y)
        if residual is not None:
            y = y + residual
        return F.relu(y) if self.relu else y

    def forward(self, x, residual=None):
        c = self.conv
        # Eager where the BatchNorm normalises by the batch, and for unbatched input to a BatchNorm
        # (which refuses it; atrous_conv2d would not).
        if not folds_batch_norm(self) or runs_submodules(self, x) or (self.bn is not None and x.dim() != 4):
            return self._eager(x, residual)
        size = atrous_output_size(x.shape[-2:], c.kernel_size, c.stride, c.padding, c.dilation)
        # Too small to pay for the fused call's overhead: eager. Not in a traced graph, where the
        # branch on the size would become a guard (an exported program limited to one side of it).
        if not tracing() and x.dim() == 4 and x.shape[0] * c.out_channels * size[0] * size[1] < EAGER_BELOW:
            return self._eager(x, residual)
        scale = shift = None
        if self.bn is not None:
            scale, shift = fold_batch_norm(self.bn, x.dtype)
        late = None
        if residual is not None and not fusable_residual(c, x, residual):
            residual, late = None, residual
        if late is not None:
            y = atrous_conv2d(x, c.weight, c.bias, stride=c.stride, padding=c.padding, dilation=c.dilation,
                              groups=c.groups, scale=scale, shift=shift, backend=self.backend) + late
            return F.relu(y) if self.relu else y
        return atrous_conv2d(
            x, c.weight, c.bias, stride=c.stride, padding=c.padding, dilation=c.dilation, groups=c.groups,
            scale=scale, shift=shift, residual=residual, activation="relu" if self.relu else None,
            backend=self.backend,
        )

    def extra_repr(self):
        if self.shared:
            return f"{self.conv!r}, {self.bn!r}, relu={self.relu}, shared=True"
        return f"relu={self.relu}"


def convert(model, *, inplace=False, report=True):
    """Rewrite ``model`` (an nn.Module in eval mode) onto fastseg's fused kernels; same outputs.

    Replaces conv (+ BatchNorm) (+ residual add) (+ ReLU) chains, dilated or not, by
    :class:`FusedConv2d` (``fastseg.atrous_conv2d``, BatchNorm folded); torchvision's and
    segmentation_models_pytorch's ASPP blocks by ``fastseg.nn.ASPP``; ``nn.MaxUnpool2d`` modules and
    ``F.max_unpool2d`` calls by fastseg's. Uses torch.fx on every submodule that traces (the whole
    model where possible) and module-level replacement where tracing fails; see the module
    docstring. Only patterns measured no slower than eager on the model's device are replaced
    (:data:`NOT_SLOWER`; on CUDA the ASPP block only).

    Training mode is left alone: a model with any submodule in training mode is returned
    unconverted (BatchNorm folding needs its running statistics; call ``model.eval()`` first), and
    the report says so. The converted model is for inference: its fused modules run exact eager
    PyTorch if put back in training mode, but code traced by torch.fx keeps the Python branches it
    took in eval mode.

    Args:
        model: an nn.Module (CPU or CUDA; its first parameter's device picks the speed rules).
        inplace: False (default) converts a deep copy and leaves ``model`` untouched. True rewrites
            ``model`` itself and returns it.
        report: True (default) returns ``(converted, ConversionReport)``; False returns the model.

    Returns:
        The converted model (same inputs and outputs as ``model``; fp32 outputs equal up to rounding),
        the same object as ``model`` with ``inplace=True``. A module rewritten through torch.fx keeps
        its attributes, submodules and state dict; its class becomes a subclass whose forward is the
        rewritten graph, and the fused layers (sharing the original weights, adding no state-dict
        entries) live in its ``fastseg_fused`` ModuleDict. A replaced ASPP block's state-dict keys
        become fastseg.nn.ASPP's. The converted model pickles (``torch.save(model)``; loading it
        needs fastseg and the original model's classes importable) and deep-copies. With
        ``report=True`` also a :class:`ConversionReport` listing what was replaced and what was
        left and why.

    Example:
        >>> tv = torchvision.models.segmentation.deeplabv3_resnet50(weights=None, weights_backbone=None).eval()
        >>> fast, rep = fastseg.convert(tv)
        >>> print(rep)                       # doctest: +ELLIPSIS
        fastseg.convert (cpu): 55 replaced, 0 left
        ...
        >>> fast(torch.randn(1, 3, 512, 512))["out"].shape
        torch.Size([1, 21, 512, 512])
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert: model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(inplace, bool):
        raise TypeError(f"convert: inplace must be True or False, got {inplace!r}")
    if not isinstance(report, bool):
        raise TypeError(f"convert: report must be True or False, got {report!r}")
    param = next(iter(model.parameters()), None)
    device = param.device.type if param is not None else "cpu"
    rep = ConversionReport(device=device)
    allowed = NOT_SLOWER.get(device, frozenset())
    if not inplace:
        model = copy.deepcopy(model)
    training = [name for name, m in model.named_modules() if m.training]
    if training:
        rep.left.append(Left("", type(model).__name__, f"in training mode ({len(training)} submodules, e.g. "
                             f"{training[0] or '<model>'!r}): convert rewrites eval-mode models only; call "
                             "model.eval() first"))
    elif not allowed:
        rep.left.append(Left("", type(model).__name__, f"no fastseg kernel has been measured no slower than "
                             f"eager PyTorch on {device} yet (fastseg.convert.NOT_SLOWER)"))
    else:
        _replace_modules(model, "", rep, allowed)
        model = _fuse(model, "", rep, allowed)
        if getattr(model, "use_kernels", True) is False and hasattr(model, "set_use_kernels"):
            model.set_use_kernels(False)  # a fastseg model on its references: the fused layers too
    return (model, rep) if report else model


# --- step 1: module-level replacement of ASPP blocks and MaxUnpool2d ----------------------------


def _replace_modules(module, prefix, rep, allowed):
    for name, child in list(module.named_children()):
        path = f"{prefix}.{name}" if prefix else name
        new = None
        hooked = has_hooks(child) if type(child) is nn.MaxUnpool2d else (
            _is_zoo_aspp(child) and any(has_hooks(m) for m in child.modules()))
        if hooked:
            rep.left.append(Left(path, type(child).__name__, _HOOKED))
        elif type(child) is nn.MaxUnpool2d:
            if "max_unpool2d" in allowed:
                new = fnn.MaxUnpool2d(child.kernel_size, child.stride, child.padding)
                rep.replaced.append(Replacement(path, "max_unpool2d", "fastseg.nn.MaxUnpool2d"))
        elif _is_zoo_aspp(child):
            new, reason = _aspp_from(child)
            if new is not None and "aspp" not in allowed:
                new, reason = None, "not measured no slower on this device"
            if new is None:
                rep.left.append(Left(path, f"{type(child).__module__}.ASPP", reason))
            else:
                rep.replaced.append(Replacement(path, "aspp", f"fastseg.nn.ASPP (rates {new[0].rates})"))
        if new is not None:
            setattr(module, name, new.train(child.training))  # new modules start in training mode
        else:
            _replace_modules(child, path, rep, allowed)


_HOOKED = "has module hooks, which the replacement would not run"


def _is_zoo_aspp(module):
    return type(module).__name__ == "ASPP" and type(module).__module__ in (
        "torchvision.models.segmentation.deeplabv3", "segmentation_models_pytorch.decoders.deeplabv3.decoder")


def _conv_bn_relu_parts(seq, kernel_size):
    """(conv, bn) of a Sequential(Conv2d, BatchNorm2d, ReLU) whose conv is fastseg.nn.ASPP-shaped:
    stride 1, no groups, zero padding equal to its dilation (3x3) or none (1x1); else None."""
    mods = list(seq) if isinstance(seq, nn.Sequential) else []
    if len(mods) != 3 or type(mods[0]) is not nn.Conv2d or type(mods[1]) is not nn.BatchNorm2d \
            or type(mods[2]) is not nn.ReLU:
        return None
    conv, bn = mods[0], mods[1]
    pad = conv.dilation if kernel_size == 3 else (0, 0)
    if (conv.kernel_size != (kernel_size, kernel_size) or conv.stride != (1, 1) or conv.groups != 1
            or conv.padding != pad or conv.padding_mode != "zeros" or conv.dilation[0] != conv.dilation[1]
            or not _foldable(bn)):
        return None
    return conv, bn


def _aspp_from(aspp):
    """(nn.Sequential(fastseg.nn.ASPP, dropout), None) with the zoo ASPP's own modules, or (None, why not)."""
    convs, project = list(getattr(aspp, "convs", [])), getattr(aspp, "project", None)
    if len(convs) < 3 or not isinstance(project, nn.Sequential) or len(project) != 4:
        return None, "unexpected structure (expecting convs = 1x1, atrous 3x3s, pooling; project)"
    pooling = convs[-1]
    first = _conv_bn_relu_parts(convs[0], 1)
    atrous = [_conv_bn_relu_parts(c, 3) for c in convs[1:-1]]
    pool_parts = (_conv_bn_relu_parts(nn.Sequential(*list(pooling)[1:]), 1)
                  if isinstance(pooling, nn.Sequential) and len(pooling) == 4
                  and isinstance(pooling[0], nn.AdaptiveAvgPool2d) and pooling[0].output_size in (1, (1, 1)) else None)
    proj = _conv_bn_relu_parts(project[:3], 1)
    if any(type(c[0]).__name__ == "SeparableConv2d" for c in convs[1:-1] if isinstance(c, nn.Sequential)):
        return None, ("separable atrous branches (depthwise + pointwise) have no exact fastseg.nn.ASPP form: "
                      "one dense 3x3 instead would be ~9x the work; their pointwise conv+BN+ReLU are fused instead")
    if first is None or None in atrous or pool_parts is None or proj is None or not isinstance(project[3], nn.Dropout):
        return None, "a branch is not conv + BatchNorm (running stats) + ReLU of the ASPP shape"
    in_ch, out_ch = first[0].in_channels, first[0].out_channels
    rates = tuple(c.dilation[0] for c, _ in atrous)
    new = fnn.ASPP(in_ch, out_ch, version="v3", rates=rates, image_pooling=True)
    pairs = list(zip(new.branches, [first] + atrous)) + [(new.pooling, pool_parts), (new.project, proj)]
    for layer, (conv, bn) in pairs:
        if conv.in_channels != layer.conv.in_channels or conv.out_channels != layer.conv.out_channels:
            return None, "branch channel counts differ from fastseg.nn.ASPP's"
        layer.conv, layer.bn = conv, bn
    return nn.Sequential(new.to(first[0].weight.device), project[3]), None


def _foldable(bn):
    return (type(bn) is nn.BatchNorm2d and bn.track_running_stats and bn.running_mean is not None
            and bn.running_var is not None)


# --- step 2 and 3: torch.fx graphs -----------------------------------------------------------


class _Tracer(torch.fx.Tracer):
    """torch.nn's leaves, plus fastseg's own layers and ops (their Python argument checks cannot
    take Proxies), which stay single calls in the graph; so do modules with hooks, which an inlined
    forward would skip (``_fuse`` converts inside them on their own)."""

    def __init__(self):
        # The package namespaces too, so that calls spelled fastseg.max_unpool2d(...) are wrapped.
        packages = (math, sys.modules[__package__], sys.modules[f"{__package__}.ops"])
        super().__init__(autowrap_modules=packages,
                         autowrap_functions=(atrous_conv2d, max_unpool2d, gcn_conv2d, dense_crf))

    def is_leaf_module(self, m, qualname):
        return self.is_layer(m, qualname) or has_hooks(m)

    def is_layer(self, m, qualname):
        """A torch.nn or fastseg layer: nothing inside it to rewrite."""
        return (type(m).__module__.startswith("fastseg.nn") or isinstance(m, FusedConv2d)
                or super().is_leaf_module(m, qualname))


def _fuse(module, path, rep, allowed):
    """``module`` with its conv chains fused: through torch.fx if it traces, else its children's one by one.

    A traced module keeps its identity, attributes, submodules and state dict, and its class becomes
    a subclass whose forward is the rewritten graph's code; the fused layers live in its
    ``fastseg_fused`` ModuleDict and share the original convolutions and BatchNorms, so calling an
    inner submodule directly still runs it as before."""
    if _Tracer().is_layer(module, path):
        return module
    if "fastseg_fused" in module._modules:
        rep.left.append(Left(path, type(module).__name__, "already converted"))
        return module
    try:
        graph = _Tracer().trace(module)
    except Exception as error:  # noqa: BLE001 - any tracing failure means module-level replacement
        graph = None
        why = f"{type(error).__name__}: {str(error).splitlines()[0][:120]}"
    if graph is not None:
        unsound = _tuple_used_as_tensor(module, graph)
        if unsound:
            where = f"{path}.{unsound}" if path else unsound
            graph, why = None, (f"{where} returns (values, indices) but the traced graph uses it whole: its forward "
                                "branches on the Python type of a result, which torch.fx cannot follow")
    if graph is not None:
        if _rewrite(module, graph, path, rep, allowed):
            graph.lint()
            code = graph.python_code(root_module="self")
            names = tuple((name, _reference(value)) for name, value in sorted(code.globals.items()))
            module.__class__ = _converted_class(type(module), code.src, names)
            rep.traced.append(path)
        for name, sub in _outermost_hooked(module):  # calls in the graph: converted on their own
            _fuse(sub, f"{path}.{name}" if path else name, rep, allowed)
        return module
    if _has_own_chains(module) or "returns (values, indices)" in why:
        rep.left.append(Left(path, type(module).__name__,
                             f"does not trace with torch.fx ({why}): conv/BN/ReLU calls in its own forward are "
                             "left; its children are converted one by one"))
    for name, child in list(module.named_children()):
        _fuse(child, f"{path}.{name}" if path else name, rep, allowed)
    return module


# The class of a module rewritten through torch.fx is made at conversion time: a subclass of the
# module's class whose forward is the graph's generated source. Pickle finds classes by name, so
# the class pickles as what it is made from (base class, source, the source's global names), and
# unpickling makes it again; one class per (base, source) in a process keeps type() stable across
# copies.
_CONVERTED_CLASSES = {}


def _reference(value):
    """A global name of generated code as something pickle can carry: modules by name (module
    objects do not pickle), anything else (functions, classes, constants) as itself."""
    return ("module", value.__name__) if isinstance(value, type(sys)) else ("value", value)


def _converted_class(base, source, names):
    key = (base, source)
    cls = _CONVERTED_CLASSES.get(key)
    if cls is None:
        namespace = {name: (importlib.import_module(ref) if kind == "module" else ref)
                     for name, (kind, ref) in names}
        exec(compile(source, f"<fastseg.convert: {base.__qualname__}>", "exec"), namespace)  # noqa: S102
        cls = type(base.__name__, (base,), {
            "forward": namespace["forward"], "__module__": __name__,
            "__qualname__": f"{base.__qualname__}_fastseg",
            "__doc__": f"{base.__qualname__} converted by fastseg.convert (forward rewritten by torch.fx).",
            "__reduce_ex__": _reduce_converted, "_fastseg_made_from": (base, source, names),
        })
        _CONVERTED_CLASSES[key] = cls
    return cls


def _new_converted(base, source, names):
    cls = _converted_class(base, source, names)
    return cls.__new__(cls)


def _reduce_converted(self, protocol):
    # object's reduction (state = the instance's __dict__, which nn.Module.__setstate__ takes),
    # with the made class replaced by the recipe that makes it again.
    return (_new_converted, type(self)._fastseg_made_from, self.__dict__.copy())


def _outermost_hooked(module):
    """(name, submodule) of the hooked submodules the tracer kept as calls, outermost first: not
    layers, nor inside a layer or another of them."""
    found, stop = [], []
    for name, sub in module.named_modules():
        if not name or any(name.startswith(f"{outer}.") for outer in stop):
            continue
        if _Tracer().is_layer(sub, name):
            stop.append(name)
        elif has_hooks(sub):
            found.append((name, sub))
            stop.append(name)
    return found


def _tuple_used_as_tensor(root, graph):
    """The path of a pooling with ``return_indices=True`` whose traced output is used other than by
    indexing: the code took a branch written for tensors (e.g. ``if isinstance(x, tuple)`` sees a
    Proxy), so the graph would not compute what the module does."""
    for node in graph.nodes:
        if node.op != "call_module":
            continue
        m = root.get_submodule(node.target)
        if getattr(m, "return_indices", False) and any(
                u.op != "call_function" or u.target is not operator.getitem for u in node.users):
            return node.target
    return None


def _has_own_chains(module):
    """Whether ``module`` directly holds a Conv2d next to a BatchNorm2d or ReLU (so its own forward
    probably chains them)."""
    kids = list(module.children())
    return any(type(k) is nn.Conv2d for k in kids) and any(isinstance(k, (nn.BatchNorm2d, nn.ReLU)) for k in kids)


def _single_user(node):
    return next(iter(node.users)) if len(node.users) == 1 else None


def _is_relu(node, modules):
    if node.op == "call_module":
        return type(modules.get(node.target)) is nn.ReLU
    if node.op == "call_function":
        return node.target in _RELU_FUNCTIONS and len(node.args) == 1
    return node.op == "call_method" and node.target in ("relu", "relu_") and len(node.args) == 1


def _is_identity(node, modules):
    return node.op == "call_module" and type(modules.get(node.target)) in (nn.Identity,)


def _add_other(node, operand):
    """The other operand of ``node`` if it is ``operand + other`` (or ``other + operand``) of two nodes."""
    if not ((node.op == "call_function" and node.target in _ADD_FUNCTIONS)
            or (node.op == "call_method" and node.target in ("add", "add_"))):
        return None
    if len(node.args) != 2 or node.kwargs:
        return None
    a, b = node.args
    other = b if a is operand else a if b is operand else None
    if other is None or other is operand or not isinstance(other, torch.fx.Node):
        return None
    if node.target in ("add_", operator.iadd) and a is not operand:
        return None  # other += conv_out mutates other: not a pure residual add
    return other


def _fusable_conv(conv):
    return (type(conv) is nn.Conv2d and conv.padding_mode == "zeros" and not isinstance(conv.padding, str)
            and conv.weight.is_floating_point())


def _rewrite(root, graph, path, rep, allowed):
    """Fuse the conv chains and swap the max_unpool2d calls in ``graph`` (traced from ``root``),
    installing the fused layers in ``root``; whether anything changed."""
    modules = dict(root.named_modules())
    fused_layers = nn.ModuleDict()
    changed = False
    for node in list(graph.nodes):
        where = f"{path}.{node.target}" if path and isinstance(node.target, str) else node.target
        if node.op == "call_function" and node.target is F.max_unpool2d:
            if "max_unpool2d" in allowed:
                node.target = max_unpool2d
                rep.replaced.append(Replacement(f"{path}:{node.name}" if path else node.name, "F.max_unpool2d",
                                                "fastseg.max_unpool2d"))
                changed = True
            continue
        if node.op != "call_module" or len(node.args) != 1 or node.kwargs:
            continue
        conv = modules.get(node.target)
        if type(conv) is not nn.Conv2d:
            continue
        if not _fusable_conv(conv):
            rep.left.append(Left(where, "Conv2d", "padding given as a string or a non-zero padding mode"))
            continue
        chain, bn, residual, relu, last = [node], None, None, False, node
        nxt = _single_user(last)
        while nxt is not None and _is_identity(nxt, modules):
            chain.append(nxt)
            last, nxt = nxt, _single_user(nxt)
        if nxt is not None and nxt.op == "call_module" and isinstance(modules.get(nxt.target), nn.BatchNorm2d) \
                and len(nxt.args) == 1 and not nxt.kwargs:
            if not _foldable(modules[nxt.target]):
                rep.left.append(Left(where, "Conv2d + BatchNorm2d", "BatchNorm2d without running statistics "
                                     "(it uses batch statistics in eval mode too): cannot fold"))
                continue
            if modules[nxt.target].num_features != conv.out_channels:
                continue
            bn = nxt
            chain.append(nxt)
            last, nxt = nxt, _single_user(nxt)
        if nxt is not None:
            other = _add_other(nxt, last)
            if other is not None:
                residual = other
                chain.append(nxt)
                last, nxt = nxt, _single_user(nxt)
        if nxt is not None and _is_relu(nxt, modules):
            relu = True
            chain.append(nxt)
            last = nxt
        if last is node:
            continue  # a conv alone: nothing to fuse
        pattern = "conv" + ("+bn" if bn is not None else "") + ("+add" if residual is not None else "") \
            + ("+relu" if relu else "")
        hooked = [n.target for n in chain if n.op == "call_module" and has_hooks(modules[n.target])]
        if hooked:
            rep.left.append(Left(where, pattern, f"{hooked[0]} {_HOOKED}"))
            continue
        if pattern not in allowed:
            rep.left.append(Left(where, pattern, f"not measured no slower than eager on {rep.device}"))
            continue
        fused = FusedConv2d(conv, modules[bn.target] if bn is not None else None, relu, shared=True)
        key = node.target.replace(".", "_")
        i = 0
        while key in fused_layers:  # a conv module called more than once: one fused layer per call
            i += 1
            key = f"{node.target.replace('.', '_')}_{i}"
        fused_layers[key] = fused
        target = f"fastseg_fused.{key}"
        with graph.inserting_before(last):
            new = graph.call_module(target, (node.args[0],) if residual is None else (node.args[0], residual))
        last.replace_all_uses_with(new)
        for dead in reversed(chain):
            graph.erase_node(dead)
        rep.replaced.append(Replacement(where, pattern, f"FusedConv2d {target}"))
        changed = True
    if changed:
        root.fastseg_fused = fused_layers.train(root.training)  # new modules start in training mode
        graph.lint()
    return changed
