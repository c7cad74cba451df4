"""Which backends exist on this install, and which one an op call runs on.

Backends: ``reference`` (plain PyTorch, every device, the test oracle and the fallback), ``cpp``
(the compiled C++ kernels, CPU tensors), ``cuda`` (the compiled CUDA kernels, CUDA tensors),
``triton`` (Triton kernels, CUDA tensors; CPU tensors too under ``TRITON_INTERPRET=1``, for tests)
``cudnn`` (cuDNN's fused convolution + bias + add + ReLU through ATen, CUDA tensors) and ``aten``
(PyTorch's own kernel after fastseg's checks, every device: max_unpool2d).
"""
import functools
import importlib
import importlib.util
import os
import warnings

import torch

BACKENDS = ("reference", "cpp", "cuda", "triton", "cudnn", "aten")

# Which compiled backend 'auto' tries first on each device type; 'reference' always follows.
AUTO_ORDER = {"cpu": ("cpp",), "cuda": ("cuda", "triton")}


def _load_extension():
    if os.environ.get("FASTSEG_NO_EXTENSION") == "1":
        return "disabled by FASTSEG_NO_EXTENSION=1"
    try:
        importlib.import_module("fastseg._C")
    except ImportError as error:  # not built, or built against another torch (undefined symbols)
        return f"{type(error).__name__}: {error}"
    running = ".".join(torch.__version__.split("+")[0].split(".")[:2])
    built = getattr(torch.ops.fastseg, "_torch_version", None)
    built = built() if built is not None else "an older fastseg"
    if built != running:  # loaded, but another release's C++ ABI: a call could crash
        return f"it was built against torch {built}, and this is torch {running}"
    return None


#: Why fastseg._C is unusable, or None when it loaded.
EXTENSION_ERROR = _load_extension()
EXTENSION_LOADED = EXTENSION_ERROR is None
#: CUDA version the extension was compiled against (e.g. 13000), 0 without CUDA kernels.
CUDA_COMPILED = torch.ops.fastseg._cuda_version() if EXTENSION_LOADED else 0

TRITON_INSTALLED = importlib.util.find_spec("triton") is not None
TRITON_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

if not EXTENSION_LOADED:
    warnings.warn(
        f"fastseg: the compiled extension fastseg._C is not available ({EXTENSION_ERROR}). "
        "Every op falls back to its plain-PyTorch reference, which is correct but slow. "
        f"Rebuild it against torch {torch.__version__} with `pip install --no-build-isolation .`",
        RuntimeWarning,
        stacklevel=2,
    )


def cpu_isa():
    """The clone of the C++ CPU loops this process runs ('base', 'avx2' or 'avx512': the widest the
    CPU has, capped by the environment variable FASTSEG_CPU_ISA), or None without the extension."""
    return torch.ops.fastseg._cpu_isa() if EXTENSION_LOADED else None


def unavailable_reason(backend, device_type):
    """Why ``backend`` cannot run on ``device_type`` tensors here, or None if it can."""
    if backend in ("reference", "aten"):
        return None
    if backend == "cpp":
        if device_type != "cpu":
            return "the cpp backend runs on CPU tensors only"
        return None if EXTENSION_LOADED else f"fastseg._C did not load ({EXTENSION_ERROR})"
    if backend == "cuda":
        if device_type != "cuda":
            return "the cuda backend runs on CUDA tensors only"
        if not EXTENSION_LOADED:
            return f"fastseg._C did not load ({EXTENSION_ERROR})"
        return None if CUDA_COMPILED else "fastseg._C was built without CUDA (see FASTSEG_CUDA)"
    if backend == "triton":
        if not TRITON_INSTALLED:
            return "triton is not installed"
        if device_type == "cuda" or (device_type == "cpu" and TRITON_INTERPRETED):
            return None
        return "Triton runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1"
    if backend == "cudnn":
        if device_type != "cuda":
            return "the cudnn backend runs on CUDA tensors only"
        return None if torch.backends.cudnn.is_available() else "this torch has no cuDNN"
    raise ValueError(f"unknown backend {backend!r}")


# 'auto' on CUDA tensors per op, where it differs from AUTO_ORDER["cuda"]: the backends to try in
# order before 'reference'. Measured on an H200, 2026-11-26 (benchmarks/RESULTS.md, "GPU"): the
# Triton atrous_conv2d kernel ran 0.24-0.89x eager conv + BN + ReLU over 18 DeepLab cases (shape,
# dtype, layout), ASPP 0.43-0.87x, unpool_conv2d 0.20-0.44x, while cuDNN's own fused convolution
# + bias + ReLU with BatchNorm folded into the weights ran 0.86-1.41x; gcn_conv2d's four Triton
# convolutions 0.18-0.99x in float16 (gcn_conv2d's 'auto' on CUDA takes the Triton taps route for
# some float32 shapes: fastseg.ops.gcn.cuda_backend).
# max_unpool2d picks by layout and deterministic mode: fastseg.ops.unpool.cuda_backend.
# unpool_conv2d's 'cudnn' route is ATen's unpooling after a range check, then cuDNN's fused call.
AUTO_ON_CUDA = {"atrous_conv2d": ("cudnn",), "gcn_conv2d": (), "unpool_conv2d": ("cudnn",), "max_unpool2d": ()}


def check_name(owner, backend, implemented=BACKENDS):
    """A layer's ``backend`` argument checked when the layer is built (its op checks it again per
    call, with the device): 'auto' or one of ``implemented``."""
    if not isinstance(backend, str) or backend not in ("auto",) + tuple(implemented):
        raise ValueError(f"{owner}: backend must be 'auto' or one of {tuple(implemented)}, got {backend!r}")


def select(op, backend, device, implemented=BACKENDS):
    """The backend an ``op`` call on ``device`` runs on; a clear error if ``backend`` can't."""
    if backend not in ("auto",) + BACKENDS:
        raise ValueError(f"{op}: backend must be 'auto' or one of {tuple(implemented)}, got {backend!r}")
    if backend == "auto":
        order = AUTO_ON_CUDA.get(op) if device.type == "cuda" else None
        for candidate in AUTO_ORDER.get(device.type, ()) if order is None else order:
            if candidate in implemented and unavailable_reason(candidate, device.type) is None:
                return candidate
        return "reference"
    if backend not in implemented:
        raise ValueError(f"{op}: has no {backend!r} backend (it has {implemented})")
    reason = unavailable_reason(backend, device.type)
    if reason is not None:
        raise RuntimeError(f"{op}: backend {backend!r} is unavailable for {device.type} tensors: {reason}")
    return backend


def call(op, plain, *args):
    """``op(*args)`` for a fastseg custom op, by the cheapest route that gives the same result.

    Where the dispatcher adds nothing (no graph being traced, no functorch transform, autograd
    recording through no argument): ``plain(*args)``, the Python implementation behind a Python
    custom op, or for a C++ op (``plain`` None) ``op(*args)`` from below the Autograd dispatch key.
    A Python custom op's dispatch costs about 20 us per call on this project's 2-core VM (18 us over
    a 14 us convolution), and the Python autograd kernel of a C++ op (torch.library.register_autograd)
    about 6 us before it redispatches (max_unpool2d on a 4x4 map: 11.0 -> 5.4 us): on a GPU, host
    time that small calls wait on. Else ``op(*args)``.

    Forward-mode AD is refused: PyTorch gives a custom op without a forward-AD rule a zero (or no)
    tangent, silently.
    """
    if forward_ad_active(args):
        name = getattr(op, "_qualified_op_name", getattr(op, "__name__", str(op)))
        raise NotImplementedError(
            f"{name}: fastseg's custom ops do not implement forward-mode AD (torch.func.jvp, "
            "torch.autograd.forward_ad); reverse mode (.backward(), torch.autograd.grad) does")
    if torch._C._are_functorch_transforms_active():
        return _transformable(op._qualified_op_name).apply(*args)
    if tracing() or (
            torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)):
        return op(*args)
    if plain is not None:
        return plain(*args)
    with torch._C._AutoDispatchBelowAutograd():
        return op(*args)


#: Each custom op's autograd rule (backward, setup_context), by qualified name.
_AUTOGRAD_RULES = {}


def register_autograd(name, backward, setup_context):
    """``torch.library.register_autograd``, keeping the rule for torch.func transforms too: the
    autograd PyTorch builds for a custom op refuses them ("must override setup_context")."""
    torch.library.register_autograd(name, backward, setup_context=setup_context)
    _AUTOGRAD_RULES[name] = (backward, setup_context)


@functools.lru_cache(maxsize=None)
def _transformable(name):
    """The custom op ``name`` as an autograd.Function that torch.func's grad, vjp, jacrev and vmap
    take (vmap through PyTorch's per-sample fallback, as for the op itself)."""
    namespace, op_name = name.split("::")
    op = getattr(getattr(torch.ops, namespace), op_name)
    rule = _AUTOGRAD_RULES.get(name)
    if rule is None:  # an op without autograd (a backward op): the transforms may take it as it is
        return type(op_name, (), {"apply": staticmethod(op)})
    backward, setup_context = rule
    return type(op_name, (torch.autograd.Function,), {
        "forward": staticmethod(op),
        "setup_context": staticmethod(setup_context),
        "backward": staticmethod(backward),
        "generate_vmap_rule": True,
    })


def forward_ad_active(args):
    """Whether a tensor argument (or one in a list argument) carries a forward-mode tangent."""
    if torch.autograd.forward_ad._current_level < 0:  # no dual level open: the common case, one check
        return False
    from torch.autograd.forward_ad import unpack_dual

    tensors = [t for a in args for t in (a if isinstance(a, (list, tuple)) else (a,)) if isinstance(t, torch.Tensor)]
    return any(unpack_dual(t).tangent is not None for t in tensors)


def tracing():
    """Whether torch.compile, torch.export or torch.jit.trace is tracing the current call: a graph
    is being recorded, so values must come from the inputs (not a cache) and branches on shapes or
    values would be frozen into it."""
    is_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", None)
    return bool(is_compiling is not None and is_compiling()) or torch.jit.is_tracing()


def size_fixed(t):
    """Whether t's shape is fixed for this call, so that a choice made from it holds: not while
    torch.jit.trace records the call (it would freeze the choice for every later input, unguarded),
    nor with symbolic sizes (torch.compile's dynamic shapes, torch.export's dynamic dimensions);
    torch.compile guards the static sizes it specialises on."""
    return not torch.jit.is_tracing() and all(isinstance(n, int) for n in t.shape)
