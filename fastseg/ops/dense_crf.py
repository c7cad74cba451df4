"""Fully-connected CRF mean-field inference: ``fastseg.dense_crf``.

The dense CRF of Kraehenbuehl & Koltun ("Efficient Inference in Fully Connected CRFs with Gaussian
Edge Potentials", NIPS 2011), as DeepLab v1/v2 use it to sharpen segmentation maps, with its
Gaussian message passing done on the permutohedral lattice (Adams, Baek & Davis, "Fast
High-Dimensional Filtering Using the Permutohedral Lattice", Eurographics 2010). The semantics are
those of the reference densecrf implementation (and of pydensecrf, whose drop-in replacement is
``fastseg.crf``): same features, same kernel normalisations, same compatibility conventions, and the
same lattice, so the results agree to float precision.

Mean field is differentiable (with respect to the scores and the compatibilities, hence the
kernel weights): the backward replays the iterations in reverse with the lattice filter's exact
transpose, as CRF-as-RNN does (Zheng et al., "Conditional Random Fields as Recurrent Neural
Networks", ICCV 2015); ``fastseg.nn.DenseCRF(learnable=True)`` is that layer.
"""
import functools
import math
import numbers
import warnings
from typing import List, Optional

import torch
from torch import Tensor

from .. import _backends
from .._checks import FLOAT_DTYPES, all_finite, check_in_graph, check_tensor, value_range
from ._reference import dense_crf as reference

__all__ = ["dense_crf", "permutohedral_filter", "NORMALIZATIONS"]

OP = "dense_crf"

#: Normalisation names and their densecrf codes.
NORMALIZATIONS = {"none": 0, "before": 1, "after": 2, "symmetric": 3}
UNARIES = ("logits", "energy", "probs")
_IMPLEMENTED = ("reference", "cpp", "triton")
_GAUSSIAN_KEYS = {"sxy", "compat", "normalization"}
_BILATERAL_KEYS = {"sxy", "srgb", "compat", "normalization"}


def dense_crf(
    scores,
    image=None,
    *,
    iterations=5,
    gaussian=dict(sxy=3, compat=3),
    bilateral=dict(sxy=80, srgb=13, compat=10),
    unary="logits",
    clip=1e-5,
    checkpoint=False,
    backend="auto",
):
    """Dense-CRF mean-field inference: refine per-pixel label scores with an image.

    Kraehenbuehl & Koltun (NIPS 2011): the unary energy is U = -log p; Q starts as softmax(-U) and
    each of ``iterations`` updates sets Q = softmax(-(U + sum_m C_m F_m(Q))), where F_m is the
    normalised Gaussian filter of kernel m, computed on the permutohedral lattice (Adams, Baek &
    Davis, Eurographics 2010) built once per image. Two kernels, as in the paper and densecrf:

    * ``gaussian`` (smoothness) over the features (x / sxy, y / sxy);
    * ``bilateral`` (appearance) over (x / sxy, y / sxy, c_1 / srgb, ..., c_C / srgb).

    Args:
        scores: (B, L, H, W) or (L, H, W) float scores for L >= 2 labels, finite; read as
            ``unary``: 'logits' (p = softmax(scores)), 'energy' (U = scores, densecrf's
            setUnaryEnergy) or 'probs' (U = -log(max(scores, clip)), as pydensecrf's
            unary_from_softmax).
        image: (B, C, H, W) or (C, H, W) reference image with any C (RGB is C = 3): uint8, or float
            in the same units as ``srgb`` (densecrf's default srgb=13 is meant for 0..255). Only
            needed when ``bilateral`` is on.
        iterations: number of mean-field updates (>= 0).
        gaussian: dict(sxy=3, compat=3, normalization='symmetric'), or None to drop the kernel.
            ``sxy`` is a number or (sx, sy).
        bilateral: dict(sxy=80, srgb=13, compat=10, normalization='symmetric'), or None. ``srgb`` is
            a number or one per image channel.
        compat (in either dict): the label compatibility, as densecrf takes it: a number w is the
            Potts model (energy -w F(Q)_l: agreeing labels are rewarded); a length-L vector w is
            densecrf's diagonal compatibility (energy +w_l F(Q)_l: note the opposite sign); an
            (L, L) matrix C adds (C + C^T)/2 @ F(Q).
        normalization (in either dict): 'symmetric' (default), 'before', 'after' or 'none' (or
            densecrf's codes 3, 1, 2, 0).
        clip: the smallest probability ``unary='probs'`` takes the log of.
        checkpoint: how the backward gets the iterates Q_0 .. Q_T it needs. False (default): the
            forward keeps them all, (iterations + 1) x B x L x H x W floats until backward. True:
            only the inputs and Q are kept and the backward recomputes the iterates (as
            torch.utils.checkpoint trades compute for memory). Either way the gradients are the
            same; with no gradient needed the forward is the one fused mean-field call.
        backend: 'auto' ('cpp' on CPU, 'triton' on CUDA), 'reference', 'cpp' or 'triton' (CUDA
            tensors; CPU tensors under TRITON_INTERPRET=1, for tests). The triton backend builds
            each image's lattices once per call and filters the whole batch in one set of launches.

    Returns:
        Q, float32 marginals of scores' shape and device (float64 for float64 scores on the
        reference backend, the oracle of the gradient checks).

    Gradients: Q is differentiable with respect to ``scores`` (every ``unary`` mode) and every
    ``compat`` given as a tensor (a 0-d tensor is the kernel's Potts weight, so kernel weights are
    learnable too; see ``fastseg.nn.DenseCRF(learnable=True)``). The backward runs the mean-field
    iterations in reverse (Zheng et al., ICCV 2015), one transposed lattice filter per kernel and
    iteration. The image and the kernel widths (sxy, srgb) are constants: an image that requires
    grad is an error (pass ``image.detach()``).

    Example:
        >>> images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
        >>> model = fastseg.models.deeplab_v3(num_classes=21).eval()
        >>> logits = model(images.float() / 255)["out"]    # (B, 21, H, W); fastseg.models return dicts
        >>> q = fastseg.dense_crf(logits, images)           # marginals (B, 21, H, W)
        >>> labels = q.argmax(1)
    """
    check_tensor(OP, "scores", scores, ndims=(3, 4), dtypes=FLOAT_DTYPES)
    batched = scores.dim() == 4
    shape = tuple(scores.shape)
    L = shape[-3]
    if L < 2:
        raise ValueError(f"{OP}: scores must have at least 2 labels (dimension -3), got shape {shape}")
    if shape[-1] == 0 or shape[-2] == 0:
        raise ValueError(f"{OP}: scores has an empty spatial dimension: shape {shape}")
    iterations, gaussian, bilateral = check_options(iterations, gaussian, bilateral, unary, checkpoint)
    if bilateral is not None and image is None:
        raise ValueError(f"{OP}: image is required by the bilateral kernel (pass bilateral=None to drop it)")
    image_range = _check_image(image, scores) if image is not None else None
    impl = _backends.select(OP, backend, scores.device, implemented=_IMPLEMENTED)
    # float64 stays float64 on the reference (gradcheck's oracle); the C++ and Triton kernels are float32.
    dtype = reference.compute_dtype(scores.dtype) if impl == "reference" else torch.float32

    # The C++ kernel checks for non-finite scores while it packs them (a pass of its own here cost
    # 0.5 ms of a 500x375 call); the other backends, and probabilities' range, are checked here.
    checked_by_kernel = impl == "cpp" and unary != "probs"
    if scores.numel() > 0 and not checked_by_kernel:
        if _backends.tracing():
            check_in_graph(scores.isfinite().all(), f"{OP}: scores contains non-finite values (nan or inf)")
            if unary == "probs":
                check_in_graph(((scores >= 0) & (scores <= 1)).all(), f"{OP}: unary='probs' needs scores in [0, 1]")
        else:
            low, high = value_range(scores)  # one pass for both checks
            if not (math.isfinite(low) and math.isfinite(high)):
                raise ValueError(f"{OP}: scores contains non-finite values (nan or inf)")
            if unary == "probs" and (low < 0 or high > 1):
                raise ValueError(f"{OP}: unary='probs' needs scores in [0, 1], got values in [{low:.4g}, {high:.4g}]")
    if not (isinstance(clip, numbers.Real) and 0 < clip <= 1):
        raise ValueError(f"{OP}: clip must be in (0, 1], got {clip!r}")

    if not batched:
        scores = scores.unsqueeze(0)
        image = image.unsqueeze(0) if image is not None else None
    scores = scores.to(dtype)
    # Energies U, or for logits -logits: it differs from U = -log_softmax(logits) by a per-pixel
    # constant, which mean field never sees (every update is a softmax over the labels).
    if unary == "probs":
        U, sign = -torch.log(scores.clamp(min=clip)), 1.0
    else:
        U, sign = scores, (-1.0 if unary == "logits" else 1.0)
    H, W = shape[-2:]
    features, compats, norms = [], [], []
    if gaussian is not None:
        sx, sy = _pair("gaussian['sxy']", gaussian.get("sxy", 3))
        _check_feature_scale(impl, 2, max((W - 1) / sx, (H - 1) / sy))
        features.append(position_features(H, W, sx, sy, device=scores.device).unsqueeze(0))
        compats.append(compat_matrix("gaussian['compat']", gaussian.get("compat", 3), L, scores.device, dtype))
        norms.append(normalization_code("gaussian['normalization']", gaussian.get("normalization", "symmetric")))
    if bilateral is not None:
        sx, sy = _pair("bilateral['sxy']", bilateral.get("sxy", 80))
        srgb = _per_channel("bilateral['srgb']", bilateral.get("srgb", 13), image.shape[1])
        if image_range is not None:
            colour = max(map(abs, image_range)) / min(srgb)
            _check_feature_scale(impl, 2 + image.shape[1], max((W - 1) / sx, (H - 1) / sy, colour))
            if image.is_floating_point() and 0 <= image_range[0] and image_range[1] <= 1 < min(srgb):
                warnings.warn(
                    f"{OP}: the float image's values lie in [0, 1] but bilateral['srgb'] = {min(srgb):g} is in the "
                    f"image's units (densecrf's default 13 means 0..255), so the colour term can hardly tell colours "
                    f"apart; pass the image scaled to 0..255 (or as uint8), or srgb in 0..1 units", stacklevel=2)
        features.append(bilateral_features(image, sx, sy, srgb))
        compats.append(compat_matrix("bilateral['compat']", bilateral.get("compat", 10), L, scores.device, dtype))
        norms.append(normalization_code("bilateral['normalization']", bilateral.get("normalization", "symmetric")))
    Q = mean_field(U.contiguous(), features, compats, norms, iterations, impl=impl, unary_scale=sign,
                   checkpoint=checkpoint)
    return Q if batched else Q.squeeze(0)


def mean_field(unary, features, compats, normalizations, iterations, init=None, *, impl="cpp", unary_scale=1.0,
               checkpoint=False):
    """The op behind :func:`dense_crf`, without argument checks: energies unary_scale * unary
    (B, L, H, W) float32 (or float64 on the reference); per kernel features (B or 1, D, H, W)
    float32 (divided by their standard deviations), an (L, L) compatibility and a normalisation
    code; optional init Q (B, L, H, W). Differentiable with respect to unary, compats and init."""
    dtype = reference.compute_dtype(unary.dtype) if impl == "reference" else torch.float32
    args = (
        unary.to(dtype).contiguous(), [f.to(torch.float32).contiguous() for f in features],
        [c.to(dtype) for c in compats], [int(n) for n in normalizations], int(iterations),
        init.to(dtype).contiguous() if init is not None else None, float(unary_scale),
    )
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (unary, init, *compats))
    if needs_grad and torch._C._are_functorch_transforms_active():
        # PyTorch's autograd for an op with list arguments (compat) takes no torch.func transform.
        raise NotImplementedError(f"{OP}: torch.func's grad, vjp and jacrev do not take dense_crf; "
                                  "torch.autograd.grad and .backward() do")
    if needs_grad and not checkpoint:
        # Every iterate comes out of the forward and is kept for the backward.
        return torch.ops.fastseg.dense_crf_iterates(*args, impl)[-1]
    # By name: torch.ops.fastseg.dense_crf exists only when fastseg._C loaded.
    op = getattr(torch.ops.fastseg, {"reference": "dense_crf_reference", "triton": "dense_crf_triton"}.get(
        impl, "dense_crf"))
    # needs_grad, not _backends.call's own test: the compatibilities that may require grad sit in a list.
    return op(*args) if needs_grad else _backends.call(op, None, *args)


def permutohedral_filter(values, features, normalization="symmetric", *, transpose=False, backend="auto"):
    """The normalised Gaussian filter one dense-CRF kernel applies: for values (B, C, *) and
    features (B or 1, D, *) (already divided by their standard deviations), approximately
    ``sum_j exp(-|f_i - f_j|^2 / 2) v_j`` normalised as ``normalization`` says, on the
    permutohedral lattice (Adams, Baek & Davis 2010). float32 result of values' shape (float64
    for float64 values on the reference backend); differentiable with respect to values.

    ``transpose=True`` applies the exact transpose of that linear map, pre * F^T(post * v): the
    lattice's blur does not commute across its directions and the normalisations 'before' and
    'after' are not symmetric, so F^T differs from F; <F(x), y> == <x, F^T(y)>.
    """
    op = "permutohedral_filter"
    check_tensor(op, "values", values, dtypes=FLOAT_DTYPES)
    check_tensor(op, "features", features, dtypes=FLOAT_DTYPES)
    if values.dim() < 2 or features.dim() != values.dim() or features.shape[2:] != values.shape[2:] \
            or features.shape[0] not in (1, values.shape[0]):
        raise ValueError(f"{op}: values (B, C, *) and features (B or 1, D, *) must agree, got shapes "
                         f"{tuple(values.shape)} and {tuple(features.shape)}")
    code = normalization_code("normalization", normalization)
    if not isinstance(transpose, bool):
        raise TypeError(f"{op}: transpose must be a bool, got {type(transpose).__name__}")
    impl = _backends.select(op, backend, values.device, implemented=_IMPLEMENTED)
    dtype = reference.compute_dtype(values.dtype) if impl == "reference" else torch.float32
    values, features = values.to(dtype).contiguous(), features.to(torch.float32).contiguous()
    op = getattr(torch.ops.fastseg, {"reference": "permutohedral_filter_reference",
                                     "triton": "permutohedral_filter_triton"}.get(impl, "permutohedral_filter"))
    return _backends.call(op, None, values, features, code, transpose)


# --- features and parameters ---------------------------------------------------------------------


def position_features(H, W, sx, sy, device=None):
    """(2, H, W) float32: (x / sx, y / sy), x the column and y the row index (densecrf's order)."""
    xs = torch.arange(W, dtype=torch.float32, device=device) / sx
    ys = torch.arange(H, dtype=torch.float32, device=device) / sy
    return torch.stack([xs.expand(H, W), ys.unsqueeze(1).expand(H, W)])


def bilateral_features(image, sx, sy, srgb):
    """(B, 2 + C, H, W) float32: (x / sx, y / sy, c_1 / srgb_1, ..., c_C / srgb_C)."""
    B, C, H, W = image.shape
    pos = position_features(H, W, sx, sy, device=image.device).unsqueeze(0).expand(B, 2, H, W)
    scale = torch.tensor(srgb, dtype=torch.float32, device=image.device).view(1, C, 1, 1)
    return torch.cat([pos, image.to(torch.float32) / scale], 1)


def compat_matrix(name, compat, L, device=None, dtype=torch.float32):
    """densecrf's label compatibility as an (L, L) matrix C (energy adds C F(Q)): a number w is
    Potts (-w I), a vector w the diagonal diag(w), a matrix itself. A tensor keeps its autograd
    history (a 0-d tensor is a learnable Potts weight)."""
    if isinstance(compat, numbers.Real) and not isinstance(compat, bool):
        if not math.isfinite(compat):
            raise ValueError(f"{OP}: {name} must be finite, got {compat!r}")
        return -float(compat) * torch.eye(L, dtype=dtype, device=device)
    if isinstance(compat, bool) or (isinstance(compat, torch.Tensor) and compat.dtype == torch.bool):
        raise TypeError(f"{OP}: {name} must be a number, a vector of L={L} or an (L, L) = ({L}, {L}) "
                        f"matrix, got a bool")
    if isinstance(compat, torch.Tensor) and device is not None and compat.device != torch.device(device):
        raise ValueError(f"{OP}: {name} is on {compat.device} but scores is on {device}; move it there")
    try:
        c = torch.as_tensor(compat, dtype=dtype, device=device)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"{OP}: {name} must be a number, a vector of L={L} or an (L, L) = ({L}, {L}) "
                        f"matrix, got {type(compat).__name__}") from None
    if c.dim() != 0 and c.shape not in ((L,), (L, L)):
        raise ValueError(f"{OP}: {name} must be a number, a vector of L={L} or an (L, L) = ({L}, {L}) "
                         f"matrix, got shape {tuple(c.shape)}")
    if _backends.tracing():
        check_in_graph(c.isfinite().all(), f"{OP}: {name} must be finite")
    elif not all_finite(c):
        raise ValueError(f"{OP}: {name} must be finite")
    if c.dim() == 0:
        return -c * torch.eye(L, dtype=dtype, device=device)
    return torch.diag(c) if c.dim() == 1 else c


def normalization_code(name, value, op=OP):
    if isinstance(value, str) and value in NORMALIZATIONS:
        return NORMALIZATIONS[value]
    if isinstance(value, numbers.Integral) and not isinstance(value, bool) and 0 <= int(value) <= 3:
        return int(value)
    raise ValueError(f"{op}: {name} must be one of {tuple(NORMALIZATIONS)} (or 0..3), got {value!r}")


def _check_feature_scale(impl, d, largest):
    """The lattice's integer coordinates grow as (d + 1)^2 x the largest feature: refuse features
    whose coordinates would leave int32 (a tiny sxy or srgb) with the message the C++ kernel, which
    checks each pixel's coordinates itself, gives."""
    if impl != "cpp" and not largest * (d + 1) ** 2 < 1e9:
        raise ValueError(f"{OP}: features must be finite and of magnitude below about 1e8 after scaling "
                         f"(is sxy or srgb tiny, or the image not finite?)")


def check_options(iterations, gaussian, bilateral, unary, checkpoint, name=OP):
    """The checks of :func:`dense_crf`'s options that need no tensor (also run by
    ``fastseg.nn.DenseCRF`` when it is built): returns (iterations, gaussian, bilateral)."""
    if unary not in UNARIES:
        raise ValueError(f"{name}: unary must be one of {UNARIES}, got {unary!r}")
    iterations = _check_iterations(iterations, name)
    gaussian = _check_kernel("gaussian", gaussian, _GAUSSIAN_KEYS, name)
    bilateral = _check_kernel("bilateral", bilateral, _BILATERAL_KEYS, name)
    if not isinstance(checkpoint, bool):
        raise TypeError(f"{name}: checkpoint must be a bool, got {type(checkpoint).__name__}")
    return iterations, gaussian, bilateral


def _check_iterations(iterations, name=OP):
    if not isinstance(iterations, numbers.Integral) or isinstance(iterations, bool):
        raise TypeError(f"{name}: iterations must be an int, got {type(iterations).__name__}")
    if iterations < 0:
        raise ValueError(f"{name}: iterations must be >= 0, got {iterations}")
    return int(iterations)


def _check_kernel(kernel_name, kernel, keys, name=OP):
    if kernel is None:
        return None
    if not isinstance(kernel, dict):
        raise TypeError(f"{name}: {kernel_name} must be a dict with keys {sorted(keys)} or None, "
                        f"got {type(kernel).__name__}")
    unknown = set(kernel) - keys
    if unknown:
        raise TypeError(f"{name}: {kernel_name} has unknown keys {sorted(unknown)} (expected {sorted(keys)})")
    if "sxy" in kernel:
        _pair(f"{kernel_name}['sxy']", kernel["sxy"], name)
    if "srgb" in kernel:  # one per image channel: the count is checked against the image
        srgb = kernel["srgb"].tolist() if isinstance(kernel["srgb"], torch.Tensor) else kernel["srgb"]
        for value in srgb if isinstance(srgb, (tuple, list)) else [srgb]:
            _positive(f"{kernel_name}['srgb']", value, name)
    if "normalization" in kernel:
        normalization_code(f"{kernel_name}['normalization']", kernel["normalization"], name)
    return kernel


def _positive(name, value, op=OP):
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise TypeError(f"{op}: {name} must be a number, got {type(value).__name__}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{op}: {name} must be > 0 and finite, got {value!r}")
    return float(value)


def _pair(name, value, op=OP):
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        value = (value, value)
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise TypeError(f"{op}: {name} must be a number or a pair (sx, sy), got {value!r}")
    return tuple(_positive(name, v, op) for v in value)


def _per_channel(name, value, C):
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        value = (value,) * C
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    if not isinstance(value, (tuple, list)) or len(value) != C:
        raise ValueError(f"{OP}: {name} must be a number or one per image channel (C={C}), got {value!r}")
    return [_positive(name, v) for v in value]


def _check_image(image, scores):
    check_tensor(OP, "image", image, ndims=(scores.dim(),))
    if image.dtype != torch.uint8 and not image.is_floating_point():
        raise TypeError(f"{OP}: image must be uint8 or floating point, got {str(image.dtype).replace('torch.', '')}")
    if image.shape[-2:] != scores.shape[-2:]:
        raise ValueError(f"{OP}: image has spatial size {tuple(image.shape[-2:])} but scores has "
                         f"{tuple(scores.shape[-2:])} (image {tuple(image.shape)}, scores {tuple(scores.shape)})")
    if scores.dim() == 4 and image.shape[0] != scores.shape[0]:
        raise ValueError(f"{OP}: image has batch {image.shape[0]} but scores has batch {scores.shape[0]}")
    if image.shape[-3] == 0:
        raise ValueError(f"{OP}: image has no channels: shape {tuple(image.shape)}")
    if image.shape[-3] > 62:
        raise ValueError(f"{OP}: image has {image.shape[-3]} channels; the bilateral lattice takes at most 62")
    if image.device != scores.device:
        raise ValueError(f"{OP}: scores is on {scores.device} but image is on {image.device}")
    value_bound = None  # (low, high) the image's values lie in, where known without a pass of its own
    if image.dtype == torch.uint8:
        value_bound = (0.0, 255.0)
    elif image.is_floating_point():
        message = f"{OP}: image contains non-finite values (nan or inf); a float image must be finite"
        if _backends.tracing():
            check_in_graph(image.isfinite().all(), message)
        elif image.numel() > 0:
            value_bound = value_range(image)
            if not all(map(math.isfinite, value_bound)):
                raise ValueError(message)
    # An integer image cannot require grad (torch refuses); a float one could, but the CRF has no
    # gradient with respect to its features: say so rather than silently return none.
    if image.requires_grad and torch.is_grad_enabled():
        raise ValueError(f"{OP}: image requires grad, but the dense CRF is not differentiable with respect to "
                         "the image (its bilateral features are constants); pass image.detach()")
    return value_bound


# --- custom ops: the reference as ops, every iterate, fake kernels --------------------------------
# The reference gets ops of the C++ ops' schemas so that one autograd formula serves both backends
# and torch.compile sees each as one opaque call (the Python lattice's unique() has a
# data-dependent size that cannot be traced).


def _per_image(tensor, b):
    return tensor[b if tensor.shape[0] > 1 else 0]


def _reference_mean_field(unary, features, compat, normalization, iterations, init, unary_scale, iterates):
    B, L, H, W = unary.shape
    if B == 0:  # torch.stack takes no empty list
        return unary.new_empty((iterations + 1, *unary.shape) if iterates else unary.shape)
    if unary_scale != 1.0:
        unary = unary * unary_scale
    out = []
    for b in range(B):
        feats = [_per_image(f, b).reshape(f.shape[1], -1) for f in features]
        start = init[b].reshape(L, -1) if init is not None else None
        Q = reference.mean_field(unary[b].reshape(L, -1), feats, compat, normalization, iterations, start,
                                 iterates=iterates)
        out.append(Q.reshape(*Q.shape[:-1], H, W))
    return torch.stack(out, 1 if iterates else 0)


@torch.library.custom_op("fastseg::dense_crf_reference", mutates_args=())
def _dense_crf_reference(
    unary: Tensor, features: List[Tensor], compat: List[Tensor], normalization: List[int], iterations: int,
    init: Optional[Tensor] = None, unary_scale: float = 1.0,
) -> Tensor:
    return _reference_mean_field(unary, features, compat, normalization, iterations, init, unary_scale, False)


@torch.library.custom_op("fastseg::permutohedral_filter_reference", mutates_args=())
def _permutohedral_filter_reference(values: Tensor, features: Tensor, normalization: int,
                                    transpose: bool = False) -> Tensor:
    B, C = values.shape[:2]
    if B == 0:
        return values.new_empty(values.shape)
    out = []
    for b in range(B):
        f = _per_image(features, b)
        v = reference.filter_lattice(values[b].reshape(C, -1).t(), f.reshape(f.shape[0], -1).t(), normalization,
                                     transpose=transpose)
        out.append(v.t().reshape(values.shape[1:]))
    return torch.stack(out)


@torch.library.custom_op("fastseg::dense_crf_iterates", mutates_args=())
def _dense_crf_iterates(
    unary: Tensor, features: List[Tensor], compat: List[Tensor], normalization: List[int], iterations: int,
    init: Optional[Tensor], unary_scale: float, impl: str,
) -> Tensor:
    """Every mean-field iterate Q_0 (the start), ..., Q_iterations: (iterations + 1, B, L, H, W)."""
    if impl == "reference":
        return _reference_mean_field(unary, features, compat, normalization, iterations, init, unary_scale, True)
    if impl == "triton":  # the lattices are built once for every iteration
        from ..kernels import dense_crf as kernels

        return kernels.mean_field(unary, features, compat, normalization, iterations, init, unary_scale, True)
    return torch.ops.fastseg.dense_crf_iterates_cpp(unary, features, compat, normalization, iterations, init,
                                                    unary_scale)


@torch.library.custom_op("fastseg::dense_crf_triton", mutates_args=())
def _dense_crf_triton(
    unary: Tensor, features: List[Tensor], compat: List[Tensor], normalization: List[int], iterations: int,
    init: Optional[Tensor] = None, unary_scale: float = 1.0,
) -> Tensor:
    from ..kernels import dense_crf as kernels

    return kernels.mean_field(unary, features, compat, normalization, iterations, init, unary_scale)


@torch.library.custom_op("fastseg::permutohedral_filter_triton", mutates_args=())
def _permutohedral_filter_triton(values: Tensor, features: Tensor, normalization: int,
                                 transpose: bool = False) -> Tensor:
    from ..kernels import dense_crf as kernels

    return kernels.permutohedral_filter(values, features, normalization, transpose)


@torch.library.custom_op("fastseg::dense_crf_backward_triton", mutates_args=())
def _dense_crf_backward_triton(
    grad: Tensor, iterates: Tensor, unary: Tensor, features: List[Tensor], compat: List[Tensor],
    normalization: List[int], iterations: int, init: Optional[Tensor], unary_scale: float,
) -> List[Tensor]:
    """The triton backend's whole reverse sweep on lattices built once: grad and iterates are
    (iterations + 1, B, L, H, W), or (1, B, L, H, W) for the last iterate alone (checkpoint: the
    others are recomputed here, on the same lattices). Returns [grad unary, grad init (empty
    without init), grad compat for each kernel]."""
    from ..kernels import dense_crf as kernels

    B = unary.shape[0]
    if B == 0:  # an empty batch: no lattice to build, nothing flows back
        grad_init = torch.zeros_like(init, dtype=torch.float32) if init is not None else unary.new_empty(0)
        return [torch.zeros_like(unary, dtype=torch.float32), grad_init] + [torch.zeros_like(c) for c in compat]
    filters = kernels.build_filters(features, B, normalization)
    if iterates.shape[0] == 1 and iterations > 0:
        earlier = kernels.mean_field(unary, features, compat, normalization, iterations - 1, init, unary_scale,
                                     True, filters=filters)
        iterates = torch.cat([earlier, iterates])
        grad_iterates = [None] * iterations + [grad[0]]
    else:
        grad_iterates = grad

    def transposed(kernel_filter):
        return lambda g: kernels.from_rows(kernel_filter(kernels.to_rows(g), transpose=True), g.shape)

    grad_unary, grad_compat, grad_init = _reverse_sweep(
        grad_iterates, iterates, [transposed(f) for f in filters], compat, unary_scale, init is not None)
    # With no iteration the gradient of init is grad itself: an output may not alias an input.
    grad_init = grad_init.clone() if grad_init is not None else unary.new_empty(0, dtype=torch.float32)
    return [grad_unary, grad_init] + grad_compat


@_dense_crf_reference.register_fake
def _fake_dense_crf_reference(unary, features, compat, normalization, iterations, init=None, unary_scale=1.0):
    return torch.empty(unary.shape, dtype=reference.compute_dtype(unary.dtype), device=unary.device)


@_permutohedral_filter_reference.register_fake
def _fake_permutohedral_filter_reference(values, features, normalization, transpose=False):
    return torch.empty(values.shape, dtype=reference.compute_dtype(values.dtype), device=values.device)


def _check_kernel_args(unary, features, compat, normalization, iterations, init):
    """The float32 kernels' argument checks (csrc/cpu/dense_crf.cpp's check_dense_crf_args, same
    messages), for their fake implementations: a raw op call that the kernel would refuse fails
    while torch.compile traces it, not when the compiled code runs."""
    if unary.dim() != 4:
        raise ValueError(f"{OP}: unary must be 4-D (B, L, H, W), got {unary.dim()}-D")
    if unary.dtype != torch.float32:
        raise TypeError(f"{OP}: unary must be float32, got {unary.dtype}")
    if not len(features) == len(compat) == len(normalization):
        raise ValueError(f"{OP}: features, compat and normalization must have one entry per kernel, got "
                         f"{len(features)}, {len(compat)} and {len(normalization)}")
    if iterations < 0:
        raise ValueError(f"{OP}: iterations must be >= 0, got {iterations}")
    B, L, H, W = unary.shape
    for k, (f, c, n) in enumerate(zip(features, compat, normalization)):
        if f.dim() != 4 or f.shape[0] not in (1, B) or tuple(f.shape[2:]) != (H, W):
            raise ValueError(f"{OP}: features[{k}] must be (B or 1, D, H, W) with (B, H, W) of unary "
                             f"{tuple(unary.shape)}, got {tuple(f.shape)}")
        if f.dtype != torch.float32:
            raise TypeError(f"{OP}: features[{k}] must be float32, got {f.dtype}")
        if tuple(c.shape) != (L, L):
            raise ValueError(f"{OP}: compat[{k}] must be (L, L) = ({L}, {L}), got {tuple(c.shape)}")
        if not 0 <= n <= 3:
            raise ValueError(f"{OP}: normalization[{k}] must be 0 (none), 1 (before), 2 (after) or 3 (symmetric), "
                             f"got {n}")
    if init is not None and (init.shape != unary.shape or init.dtype != torch.float32):
        raise ValueError(f"{OP}: init must be float32 of unary's shape {tuple(unary.shape)}, got {init.dtype} "
                         f"{tuple(init.shape)}")


def _check_filter_args(values, features, normalization):
    if values.dtype != torch.float32 or features.dtype != torch.float32:
        raise TypeError(f"permutohedral_filter: values and features must be float32, got {values.dtype} and "
                        f"{features.dtype}")
    if not 0 <= normalization <= 3:
        raise ValueError(f"permutohedral_filter: normalization must be 0 to 3, got {normalization}")


@_dense_crf_triton.register_fake
def _fake_dense_crf_triton(unary, features, compat, normalization, iterations, init=None, unary_scale=1.0):
    _check_kernel_args(unary, features, compat, normalization, iterations, init)
    return torch.empty(unary.shape, dtype=torch.float32, device=unary.device)


@_permutohedral_filter_triton.register_fake
def _fake_permutohedral_filter_triton(values, features, normalization, transpose=False):
    _check_filter_args(values, features, normalization)
    return torch.empty(values.shape, dtype=torch.float32, device=values.device)


@_dense_crf_backward_triton.register_fake
def _fake_dense_crf_backward_triton(grad, iterates, unary, features, compat, normalization, iterations, init,
                                    unary_scale):
    grad_init = torch.empty(init.shape if init is not None else (0,), dtype=torch.float32, device=unary.device)
    return [torch.empty(unary.shape, dtype=torch.float32, device=unary.device), grad_init] + [
        torch.empty(c.shape, dtype=c.dtype, device=c.device) for c in compat]


@_dense_crf_iterates.register_fake
def _fake_dense_crf_iterates(unary, features, compat, normalization, iterations, init, unary_scale, impl):
    dtype = reference.compute_dtype(unary.dtype) if impl == "reference" else torch.float32
    return torch.empty((iterations + 1, *unary.shape), dtype=dtype, device=unary.device)


if _backends.EXTENSION_LOADED:

    @torch.library.register_fake("fastseg::dense_crf")
    def _fake_dense_crf(unary, features, compat, normalization, iterations, init=None, unary_scale=1.0):
        _check_kernel_args(unary, features, compat, normalization, iterations, init)
        return torch.empty(unary.shape, dtype=torch.float32, device=unary.device)

    @torch.library.register_fake("fastseg::permutohedral_filter")
    def _fake_permutohedral_filter(values, features, normalization, transpose=False):
        _check_filter_args(values, features, normalization)
        return torch.empty(values.shape, dtype=torch.float32, device=values.device)

    @torch.library.register_fake("fastseg::dense_crf_iterates_cpp")
    def _fake_dense_crf_iterates_cpp(unary, features, compat, normalization, iterations, init=None, unary_scale=1.0):
        _check_kernel_args(unary, features, compat, normalization, iterations, init)
        return torch.empty((iterations + 1, *unary.shape), dtype=torch.float32, device=unary.device)

    torch.library.register_fake("fastseg::dense_crf_backward_cpp")(_fake_dense_crf_backward_triton)


# --- autograd: mean field in reverse -------------------------------------------------------------
#
# Forward, per kernel m with Cs_m = (C_m + C_m^T) / 2 and F_m its normalised filter over pixels:
#   Q_0 = softmax(-s U) (or init);  E_t = s U + sum_m Cs_m F_m(Q_{t-1});  Q_t = softmax(-E_t).
# Reverse sweep, t = T .. 1, from gQ_T (plus whatever reaches an iterate directly):
#   gE_t = Q_t * (<gQ_t, Q_t> - gQ_t)        (softmax backward, through the minus sign)
#   R_m = F_m^T(gE_t)                          (one transposed filter per kernel and iteration)
#   gQ_{t-1} += Cs_m^T R_m,  gCs_m += sum over pixels and images of R_m Q_{t-1}^T,  gU += s gE_t,
# from <gE, Cs F(Q)> = <F^T(Cs^T gE), Q> with F^T acting on pixels and Cs on labels (they commute),
# so each step needs L channels of F^T, not L^2. Then gU += s gE_0 through Q_0 = softmax(-s U), or
# g_init = gQ_0. The cpp and triton backends run this sweep as one op each (dense_crf_backward_cpp,
# dense_crf_backward_triton) that builds its K lattices once; on the reference the lattice is
# rebuilt by every filter call (T x K builds per backward).


def _softmax_of_negative_backward(grad, q):
    return q * ((grad * q).sum(1, keepdim=True) - grad)


def _reference_backward(grad_iterates, iterates, features, compat, normalization, unary_scale, has_init):
    """The reference backend's gradients (unary, compat list, init) from (T+1, B, L, H, W) iterates
    and their gradients (a (T+1, ...) tensor, or a list of T+1 with None where no gradient reaches
    an iterate)."""
    transpose_filter = torch.ops.fastseg.permutohedral_filter_reference
    filters = [functools.partial(lambda g, f, code: transpose_filter(g, f, code, True), f=f, code=code)
               for f, code in zip(features, normalization)]
    return _reverse_sweep(grad_iterates, iterates, filters, compat, unary_scale, has_init)


def _reverse_sweep(grad_iterates, iterates, transpose_filters, compat, unary_scale, has_init):
    """The sweep above, with one transposed filter (a callable on (B, L, H, W)) per kernel."""
    dtype = iterates.dtype
    sym = [0.5 * (c + c.t()).to(dtype) for c in compat]
    T = iterates.shape[0] - 1
    grad_q = grad_iterates[T]
    grad_energy_sum = torch.zeros_like(iterates[0])
    grad_sym = [torch.zeros_like(c) for c in sym]
    for t in range(T, 0, -1):
        grad_energy = _softmax_of_negative_backward(grad_q, iterates[t]).contiguous()
        grad_energy_sum += grad_energy
        grad_q = torch.zeros_like(grad_energy) if grad_iterates[t - 1] is None else grad_iterates[t - 1].clone()
        for m, transpose_filter in enumerate(transpose_filters):
            r = transpose_filter(grad_energy).to(dtype)
            grad_q += torch.einsum("lk,blhw->bkhw", sym[m], r)
            grad_sym[m] += torch.einsum("blhw,bkhw->lk", r, iterates[t - 1])
    grad_init = grad_q if has_init else None
    if not has_init:
        grad_energy_sum += _softmax_of_negative_backward(grad_q, iterates[0])
    grad_compat = [(0.5 * (g + g.t())).to(c.dtype) for g, c in zip(grad_sym, compat)]
    return grad_energy_sum * unary_scale, grad_compat, grad_init


def _setup_mean_field(ctx, inputs, output):
    unary, features, compat, normalization, iterations, init, unary_scale = inputs[:7]
    ctx.save_for_backward(unary, init, output, *features, *compat)
    ctx.meta = (len(features), list(normalization), iterations, unary_scale, init is not None)  # K, ..., has_init
    ctx.impl = inputs[7] if len(inputs) > 7 else None


def _saved(ctx):
    unary, init, output, *rest = ctx.saved_tensors
    K = ctx.meta[0]
    return unary, init, output, rest[:K], rest[K:]


def _per_input(ctx, grads):
    # One gradient per input the op was called with: the dispatcher drops trailing arguments left at
    # their default, and torch before 2.12 rejects a backward that returns more (seen with 2.11).
    return tuple(grads)[:len(ctx.needs_input_grad)]


def _grads(ctx, grad_unary, grad_compat, grad_init, n_extra=0):
    # One gradient per positional input, the Tensor[] ones as lists (None for every feature map).
    # Autograd compares the structure with the inputs': the normalizations, a list of strings, are
    # one leaf (None), unless the list is empty (no kernels), which is an empty list.
    needs = ctx.needs_input_grad
    K = ctx.meta[0]
    return _per_input(ctx, (grad_unary if needs[0] else None, [None] * K, grad_compat, None if K else [], None,
                            grad_init if len(needs) > 5 and needs[5] else None, None) + (None,) * n_extra)


def _fused_grads(ctx, backward_op, grad, iterates, n_extra=0):
    # The cpp and triton backends' sweep is one op (its lattices built once per backward).
    if torch.is_grad_enabled():  # create_graph=True: the sweep op has no derivative of its own
        raise NotImplementedError(
            f"{OP}: double backward (create_graph=True) is not implemented by the cpp and triton backends' "
            "reverse sweep (it would silently give zero); backend='reference' has it")
    unary, init, _, features, compat = _saved(ctx)
    _, normalization, iterations, unary_scale, has_init = ctx.meta
    grad_unary, grad_init, *grad_compat = backward_op(
        grad.contiguous(), iterates.contiguous(), unary, features, compat, normalization, iterations, init,
        unary_scale)
    grad_compat = [g.to(c.dtype) for g, c in zip(grad_compat, compat)]
    return _grads(ctx, grad_unary, grad_compat, grad_init if has_init else None, n_extra)


def _backward_op(impl):
    """The fused reverse-sweep op of a backend, or None (the reference runs the sweep in Python)."""
    if impl == "triton":
        return torch.ops.fastseg.dense_crf_backward_triton
    if impl == "cpp":
        return torch.ops.fastseg.dense_crf_backward_cpp
    return None


def _make_checkpointed_backward(impl):
    backward_op = _backward_op(impl)

    def backward(ctx, grad_q):
        # Only the inputs and Q_T were kept: recompute Q_0 .. Q_{T-1} (held only while this runs).
        unary, init, output, features, compat = _saved(ctx)
        _, normalization, iterations, unary_scale, has_init = ctx.meta
        if backward_op is not None:
            return _fused_grads(ctx, backward_op, grad_q.unsqueeze(0), output.unsqueeze(0))
        if iterations > 0:
            iterates = torch.ops.fastseg.dense_crf_iterates(
                unary, features, compat, normalization, iterations - 1, init, unary_scale, impl)
            iterates = torch.cat([iterates, output.unsqueeze(0)])
        else:
            iterates = output.unsqueeze(0)
        grad_iterates = [None] * (iterates.shape[0] - 1) + [grad_q]
        return _grads(ctx, *_reference_backward(grad_iterates, iterates, features, compat, normalization,
                                                unary_scale, has_init))
    return backward


def _iterates_backward(ctx, grad_iterates):
    unary, init, iterates, features, compat = _saved(ctx)
    backward_op = _backward_op(ctx.impl)
    if backward_op is not None:
        return _fused_grads(ctx, backward_op, grad_iterates, iterates, n_extra=1)
    _, normalization, _, unary_scale, has_init = ctx.meta
    return _grads(ctx, *_reference_backward(grad_iterates, iterates, features, compat, normalization,
                                            unary_scale, has_init), n_extra=1)


def _setup_filter(ctx, inputs, output):
    ctx.save_for_backward(inputs[1])
    ctx.normalization, ctx.transpose = inputs[2], inputs[3] if len(inputs) > 3 else False


def _make_filter_backward(op):
    def backward(ctx, grad):
        # The filter is linear in values: its gradient is the transposed filter of grad.
        (features,) = ctx.saved_tensors
        grad_values = _backends.call(op, None, grad.contiguous(), features, ctx.normalization, not ctx.transpose)
        return _per_input(ctx, (grad_values, None, None, None))
    return backward


torch.library.register_autograd("fastseg::dense_crf_reference", _make_checkpointed_backward("reference"),
                                setup_context=_setup_mean_field)
torch.library.register_autograd("fastseg::dense_crf_iterates", _iterates_backward, setup_context=_setup_mean_field)
torch.library.register_autograd("fastseg::dense_crf_triton", _make_checkpointed_backward("triton"),
                                setup_context=_setup_mean_field)
_backends.register_autograd("fastseg::permutohedral_filter_triton", _make_filter_backward(torch.ops.fastseg.permutohedral_filter_triton),
                           _setup_filter)
_backends.register_autograd("fastseg::permutohedral_filter_reference", _make_filter_backward(torch.ops.fastseg.permutohedral_filter_reference),
                           _setup_filter)
if _backends.EXTENSION_LOADED:
    torch.library.register_autograd("fastseg::dense_crf", _make_checkpointed_backward("cpp"),
                                    setup_context=_setup_mean_field)
    _backends.register_autograd("fastseg::permutohedral_filter", _make_filter_backward(torch.ops.fastseg.permutohedral_filter),
                               _setup_filter)
