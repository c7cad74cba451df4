"""Fully-connected CRF mean-field inference: ``fastseg.dense_crf``.

The dense CRF of Kraehenbuehl & Koltun ("Efficient Inference in Fully Connected CRFs with Gaussian
Edge Potentials", NIPS 2011), as DeepLab v1/v2 use it to sharpen segmentation maps, with its
Gaussian message passing done on the permutohedral lattice (Adams, Baek & Davis, "Fast
High-Dimensional Filtering Using the Permutohedral Lattice", Eurographics 2010). The semantics are
those of the reference densecrf implementation (and of pydensecrf, whose drop-in replacement is
``fastseg.crf``): same features, same kernel normalisations, same compatibility conventions, and the
same lattice, so the results agree to float precision.
"""
import math
import numbers

import torch

from .. import _backends
from .._checks import FLOAT_DTYPES, check_tensor
from ._reference import dense_crf as reference

__all__ = ["dense_crf", "permutohedral_filter", "NORMALIZATIONS"]

OP = "dense_crf"

#: Normalisation names and their densecrf codes.
NORMALIZATIONS = {"none": 0, "before": 1, "after": 2, "symmetric": 3}
UNARIES = ("logits", "energy", "probs")
_IMPLEMENTED = ("reference", "cpp")
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
        backend: 'auto' ('cpp' on CPU; 'reference' elsewhere, until the GPU kernel lands),
            'reference' or 'cpp'.

    Returns:
        Q, float32 marginals of scores' shape and device (not differentiable).

    Example:
        >>> logits = model(images)                       # (B, 21, H, W)
        >>> q = fastseg.dense_crf(logits, images_uint8)  # images (B, 3, H, W) uint8
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
    if unary not in UNARIES:
        raise ValueError(f"{OP}: unary must be one of {UNARIES}, got {unary!r}")
    iterations = _check_iterations(iterations)
    gaussian = _check_kernel("gaussian", gaussian, _GAUSSIAN_KEYS)
    bilateral = _check_kernel("bilateral", bilateral, _BILATERAL_KEYS)
    if bilateral is not None:
        if image is None:
            raise ValueError(f"{OP}: image is required by the bilateral kernel (pass bilateral=None to drop it)")
        _check_image(image, scores)
    elif image is not None:
        _check_image(image, scores)
    impl = _backends.select(OP, backend, scores.device, implemented=_IMPLEMENTED)

    if not torch.compiler.is_compiling():
        if not bool(torch.isfinite(scores).all()):
            raise ValueError(f"{OP}: scores contains non-finite values (nan or inf)")
        if unary == "probs" and bool(((scores < 0) | (scores > 1)).any()):
            raise ValueError(f"{OP}: unary='probs' needs scores in [0, 1], got values in "
                             f"[{scores.min().item():.4g}, {scores.max().item():.4g}]")
    if not (isinstance(clip, numbers.Real) and 0 < clip <= 1):
        raise ValueError(f"{OP}: clip must be in (0, 1], got {clip!r}")

    if not batched:
        scores = scores.unsqueeze(0)
        image = image.unsqueeze(0) if image is not None else None
    scores = scores.to(torch.float32)
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
        features.append(position_features(H, W, sx, sy, device=scores.device).unsqueeze(0))
        compats.append(compat_matrix("gaussian['compat']", gaussian.get("compat", 3), L, scores.device))
        norms.append(normalization_code("gaussian['normalization']", gaussian.get("normalization", "symmetric")))
    if bilateral is not None:
        sx, sy = _pair("bilateral['sxy']", bilateral.get("sxy", 80))
        srgb = _per_channel("bilateral['srgb']", bilateral.get("srgb", 13), image.shape[1])
        features.append(bilateral_features(image, sx, sy, srgb))
        compats.append(compat_matrix("bilateral['compat']", bilateral.get("compat", 10), L, scores.device))
        norms.append(normalization_code("bilateral['normalization']", bilateral.get("normalization", "symmetric")))
    Q = mean_field(U.contiguous(), features, compats, norms, iterations, impl=impl, unary_scale=sign)
    return Q if batched else Q.squeeze(0)


def mean_field(unary, features, compats, normalizations, iterations, init=None, *, impl="cpp", unary_scale=1.0):
    """The op behind :func:`dense_crf`, without argument checks: energies unary_scale * unary
    (B, L, H, W) float32; per kernel features (B or 1, D, H, W) float32 (divided by their standard
    deviations), an (L, L) compatibility and a normalisation code; optional init Q (B, L, H, W)."""
    if impl == "reference":
        if unary_scale != 1.0:
            unary = unary * unary_scale
        B, L, H, W = unary.shape
        out = []
        for b in range(B):
            feats = [f[b if f.shape[0] > 1 else 0].reshape(f.shape[1], -1) for f in features]
            start = init[b].reshape(L, -1) if init is not None else None
            Q = reference.mean_field(unary[b].reshape(L, -1), feats, compats, normalizations, iterations, start)
            out.append(Q.reshape(L, H, W))
        return torch.stack(out)
    return torch.ops.fastseg.dense_crf(
        unary, [f.contiguous() for f in features], [c.to(torch.float32) for c in compats],
        list(normalizations), int(iterations), init.contiguous() if init is not None else None,
        float(unary_scale),
    )


def permutohedral_filter(values, features, normalization="symmetric", *, backend="auto"):
    """The normalised Gaussian filter one dense-CRF kernel applies: for values (B, C, *) and
    features (B or 1, D, *) (already divided by their standard deviations), approximately
    ``sum_j exp(-|f_i - f_j|^2 / 2) v_j`` normalised as ``normalization`` says, on the
    permutohedral lattice (Adams, Baek & Davis 2010). float32 result of values' shape."""
    op = "permutohedral_filter"
    check_tensor(op, "values", values, dtypes=FLOAT_DTYPES)
    check_tensor(op, "features", features, dtypes=FLOAT_DTYPES)
    if values.dim() < 2 or features.dim() != values.dim() or features.shape[2:] != values.shape[2:] \
            or features.shape[0] not in (1, values.shape[0]):
        raise ValueError(f"{op}: values (B, C, *) and features (B or 1, D, *) must agree, got shapes "
                         f"{tuple(values.shape)} and {tuple(features.shape)}")
    code = normalization_code("normalization", normalization)
    impl = _backends.select(op, backend, values.device, implemented=_IMPLEMENTED)
    values, features = values.to(torch.float32), features.to(torch.float32)
    if impl == "reference":
        B, C = values.shape[:2]
        out = []
        for b in range(B):
            f = features[b if features.shape[0] > 1 else 0]
            out.append(reference.filter_lattice(values[b].reshape(C, -1).t(), f.reshape(f.shape[0], -1).t(), code)
                       .t().reshape(values.shape[1:]))
        return torch.stack(out)
    return torch.ops.fastseg.permutohedral_filter(values.contiguous(), features.contiguous(), code)


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


def compat_matrix(name, compat, L, device=None):
    """densecrf's label compatibility as an (L, L) float32 matrix C (energy adds C F(Q)):
    a number w is Potts (-w I), a vector w the diagonal diag(w), a matrix itself."""
    if isinstance(compat, numbers.Real) and not isinstance(compat, bool):
        if not math.isfinite(compat):
            raise ValueError(f"{OP}: {name} must be finite, got {compat!r}")
        return -float(compat) * torch.eye(L, dtype=torch.float32, device=device)
    try:
        c = torch.as_tensor(compat, dtype=torch.float32, device=device)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"{OP}: {name} must be a number, a vector of L={L} or an (L, L) = ({L}, {L}) "
                        f"matrix, got {type(compat).__name__}") from None
    if c.dim() == 0:
        return compat_matrix(name, float(c), L, device)
    if c.shape not in ((L,), (L, L)):
        raise ValueError(f"{OP}: {name} must be a number, a vector of L={L} or an (L, L) = ({L}, {L}) "
                         f"matrix, got shape {tuple(c.shape)}")
    if not torch.compiler.is_compiling() and not bool(torch.isfinite(c).all()):
        raise ValueError(f"{OP}: {name} must be finite")
    return torch.diag(c) if c.dim() == 1 else c


def normalization_code(name, value):
    if isinstance(value, str) and value in NORMALIZATIONS:
        return NORMALIZATIONS[value]
    if isinstance(value, numbers.Integral) and not isinstance(value, bool) and 0 <= int(value) <= 3:
        return int(value)
    raise ValueError(f"{OP}: {name} must be one of {tuple(NORMALIZATIONS)} (or 0..3), got {value!r}")


def _check_iterations(iterations):
    if not isinstance(iterations, numbers.Integral) or isinstance(iterations, bool):
        raise TypeError(f"{OP}: iterations must be an int, got {type(iterations).__name__}")
    if iterations < 0:
        raise ValueError(f"{OP}: iterations must be >= 0, got {iterations}")
    return int(iterations)


def _check_kernel(name, kernel, keys):
    if kernel is None:
        return None
    if not isinstance(kernel, dict):
        raise TypeError(f"{OP}: {name} must be a dict with keys {sorted(keys)} or None, got {type(kernel).__name__}")
    unknown = set(kernel) - keys
    if unknown:
        raise TypeError(f"{OP}: {name} has unknown keys {sorted(unknown)} (expected {sorted(keys)})")
    return kernel


def _positive(name, value):
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise TypeError(f"{OP}: {name} must be a number, got {type(value).__name__}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{OP}: {name} must be > 0 and finite, got {value!r}")
    return float(value)


def _pair(name, value):
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        value = (value, value)
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise TypeError(f"{OP}: {name} must be a number or a pair (sx, sy), got {value!r}")
    return tuple(_positive(name, v) for v in value)


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
    if image.is_floating_point() and not torch.compiler.is_compiling() and not bool(torch.isfinite(image).all()):
        raise ValueError(f"{OP}: image contains non-finite values (nan or inf); a float image must be finite")


# --- custom ops: fake kernels --------------------------------------------------------------------

if _backends.EXTENSION_LOADED:

    @torch.library.register_fake("fastseg::dense_crf")
    def _fake_dense_crf(unary, features, compat, normalization, iterations, init=None, unary_scale=1.0):
        return torch.empty(unary.shape, dtype=torch.float32, device=unary.device)

    @torch.library.register_fake("fastseg::permutohedral_filter")
    def _fake_permutohedral_filter(values, features, normalization, transpose=False):
        return torch.empty(values.shape, dtype=torch.float32, device=values.device)
