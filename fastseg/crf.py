"""pydensecrf-compatible interface to ``fastseg.dense_crf``: switch with one import change,

    import fastseg.crf as dcrf                      # was: import pydensecrf.densecrf as dcrf
    from fastseg.crf import unary_from_softmax      # was: from pydensecrf.utils import ...

Same classes, method names, arguments, constants and conventions as pydensecrf (Kraehenbuehl &
Koltun's densecrf, NIPS 2011): ``DenseCRF2D(width, height, n_labels)``, unaries as (L, N) float32
energies, images as (H, W, C) uint8 arrays, Q returned as an (L, N) float32 array. Inference runs on
fastseg's multi-threaded permutohedral-lattice kernel (Adams, Baek & Davis, Eurographics 2010).
NumPy arrays and CPU tensors are both accepted.
"""
import numbers
import sys

import numpy as np
import torch

from ._checks import all_finite
from .ops import dense_crf as _dense_crf_function  # noqa: F401  (makes sure the op is registered)

_ops = sys.modules["fastseg.ops.dense_crf"]

__all__ = [
    "DenseCRF", "DenseCRF2D", "unary_from_labels", "unary_from_softmax", "softmax_to_unary",
    "create_pairwise_gaussian", "create_pairwise_bilateral",
    "NO_NORMALIZATION", "NORMALIZE_BEFORE", "NORMALIZE_AFTER", "NORMALIZE_SYMMETRIC",
    "CONST_KERNEL", "DIAG_KERNEL", "FULL_KERNEL",
]

NO_NORMALIZATION, NORMALIZE_BEFORE, NORMALIZE_AFTER, NORMALIZE_SYMMETRIC = 0, 1, 2, 3
# The energy that stands for +inf: exp(-1e30) is 0 in float32, and sums with it stay finite.
_HARD_CONSTRAINT = 1e30
# Kernel types only matter for learning the kernel parameters, which inference never does.
CONST_KERNEL, DIAG_KERNEL, FULL_KERNEL = 0, 1, 2


def _as_tensor(name, value, dtype=torch.float32):
    """A CPU tensor of its own (as pydensecrf copies its inputs: changing the caller's array later
    must not change the model), contiguous."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", dtype, copy=True).contiguous()
    try:
        return torch.tensor(np.ascontiguousarray(value), dtype=dtype)
    except (TypeError, ValueError) as error:
        raise TypeError(f"{name} must be an array, got {type(value).__name__} ({error})") from None


def _numbers(value):
    """NumPy arrays and scalars (pydensecrf takes sxy=np.array([3, 5])) as Python numbers / lists."""
    return value.tolist() if isinstance(value, (np.ndarray, np.generic)) else value


def _widths(value):
    """Kernel standard deviations as pydensecrf takes them: it divides the features by them, and
    the Gaussian exp(-|f_i - f_j|^2 / 2) of features divided by -s equals the one divided by s, so a
    negative width means its magnitude (zero, NaN and inf stay errors)."""
    value = _numbers(value)
    if isinstance(value, (list, tuple)):
        return type(value)(_widths(v) for v in value)
    return abs(value) if isinstance(value, numbers.Real) and not isinstance(value, bool) else value


class DenseCRF:
    """A dense CRF over ``n_pixels`` arbitrary points with ``n_labels`` labels (pydensecrf's
    ``DenseCRF``). Pairwise kernels take features of shape (D, N)."""

    def __init__(self, n_pixels, n_labels):
        if int(n_labels) < 1:
            raise ValueError(f"DenseCRF: n_labels must be >= 1, got {n_labels}")
        self.N, self.L = int(n_pixels), int(n_labels)
        self._shape = (1, self.N)  # the (H, W) the op sees
        self._unary = None
        self._features, self._compats, self._norms = [], [], []

    # -- model ---------------------------------------------------------------------------------
    def setUnaryEnergy(self, unary):
        """unary: (L, N) float32 energies, -log p."""
        U = _as_tensor("unary", unary)
        if U.shape != (self.L, self.N):
            raise ValueError(f"setUnaryEnergy: unary must have shape (n_labels, n_pixels) = "
                             f"({self.L}, {self.N}), got {tuple(U.shape)}")
        # +inf energies are hard constraints (unary_from_softmax(p, clip=None) of a one-hot p): a large
        # finite energy gives the same Q (exactly 0 for the label), as long as a pixel keeps a label.
        hard = U == float("inf")
        if hard.any():
            if hard.all(0).any():
                raise ValueError("setUnaryEnergy: a pixel has an infinite energy for every label")
            U = U.masked_fill(hard, _HARD_CONSTRAINT)
        if not all_finite(U):
            raise ValueError("setUnaryEnergy: unary contains NaN or -inf")
        self._unary = U.reshape(1, self.L, *self._shape).contiguous()

    def addPairwiseEnergy(self, features, compat, kernel=DIAG_KERNEL, normalization=NORMALIZE_SYMMETRIC):
        """features: (D, N) float32, already divided by the kernel's standard deviations."""
        f = _as_tensor("features", features)
        if f.dim() != 2 or f.shape[1] != self.N:
            raise ValueError(f"addPairwiseEnergy: features must have shape (D, n_pixels={self.N}), got {tuple(f.shape)}")
        self._add(f.reshape(1, f.shape[0], *self._shape), compat, normalization)

    def _add(self, features, compat, normalization):
        if not all_finite(features):
            raise ValueError("pairwise features contain non-finite values")
        self._features.append(features.contiguous())
        self._compats.append(_ops.compat_matrix("compat", compat, self.L))
        self._norms.append(_ops.normalization_code("normalization", normalization))

    # -- inference -----------------------------------------------------------------------------
    def _run(self, iterations, init=None):
        if self._unary is None:
            raise RuntimeError("call setUnaryEnergy before inference")
        if self.L == 1:  # a distribution over one label is 1 whatever the energies (pydensecrf too)
            return np.ones((1, self.N), np.float32)
        Q = _ops.mean_field(self._unary, self._features, self._compats, self._norms, iterations, init,
                            impl=_ops._backends.select("DenseCRF", "auto", torch.device("cpu"),
                                                       implemented=_ops._IMPLEMENTED))
        return Q.reshape(self.L, self.N).numpy()

    def inference(self, n_iterations):
        """Q after ``n_iterations`` mean-field steps from softmax(-unary): (L, N) float32."""
        return self._run(int(n_iterations))

    def startInference(self):
        """(Q, tmp1, tmp2) with Q = softmax(-unary); step with ``stepInference(Q, tmp1, tmp2)``."""
        return self._run(0), np.empty(0, np.float32), np.empty(0, np.float32)

    def stepInference(self, Q, tmp1=None, tmp2=None):
        """One mean-field step, updating Q ((L, N) float32 array) in place."""
        start = _as_tensor("Q", Q).reshape(1, self.L, *self._shape).contiguous()
        np.copyto(Q, self._run(1, start).reshape(np.shape(Q)))

    def klDivergence(self, Q):
        """densecrf's estimate of KL(Q || P) up to a constant: sum Q log Q + sum Q U + sum Q C F(Q)."""
        q = _as_tensor("Q", Q).reshape(self.L, self.N)
        U = self._unary.reshape(self.L, self.N)
        kl = (q * torch.log(q.clamp_min(1e-20))).sum(dtype=torch.float64) + (q * U).sum(dtype=torch.float64)
        for f, compat, norm in zip(self._features, self._compats, self._norms):
            filtered = _ops.permutohedral_filter(q.reshape(1, self.L, *self._shape), f, norm)
            C = 0.5 * (compat + compat.t())
            kl += (q * (C @ filtered.reshape(self.L, self.N))).sum(dtype=torch.float64)
        return float(kl)


class DenseCRF2D(DenseCRF):
    """A dense CRF over a width x height image (pydensecrf's ``DenseCRF2D(W, H, n_labels)``);
    pixel i = y * W + x."""

    def __init__(self, width, height, n_labels):
        super().__init__(int(width) * int(height), n_labels)
        self.W, self.H = int(width), int(height)
        self._shape = (self.H, self.W)

    def addPairwiseGaussian(self, sxy, compat, kernel=DIAG_KERNEL, normalization=NORMALIZE_SYMMETRIC):
        """Smoothness kernel over (x / sx, y / sy); sxy a number or (sx, sy)."""
        sx, sy = _ops._pair("sxy", _widths(sxy))
        self._add(_ops.position_features(self.H, self.W, sx, sy).unsqueeze(0), compat, normalization)

    def addPairwiseBilateral(self, sxy, srgb, rgbim, compat, kernel=DIAG_KERNEL, normalization=NORMALIZE_SYMMETRIC):
        """Appearance kernel over (x / sx, y / sy, c / srgb) for an (H, W, C) image (C = 3 for RGB)."""
        image = _as_tensor("rgbim", rgbim, dtype=None) if not isinstance(rgbim, torch.Tensor) else rgbim.detach().cpu()
        if image.dim() == 2:
            image = image.unsqueeze(-1)
        if image.dim() != 3 or tuple(image.shape[:2]) != (self.H, self.W):
            raise ValueError(f"addPairwiseBilateral: rgbim must be (H, W, C) = ({self.H}, {self.W}, C), "
                             f"got {tuple(image.shape)}")
        sx, sy = _ops._pair("sxy", _widths(sxy))
        srgb = _ops._per_channel("srgb", _widths(srgb), image.shape[2])
        feats = _ops.bilateral_features(image.permute(2, 0, 1).unsqueeze(0), sx, sy, srgb)
        self._add(feats, compat, normalization)


def unary_from_labels(labels, n_labels, gt_prob, zero_unsure=True):
    """(n_labels, N) float32 energies from a label map: -log gt_prob for a pixel's label and
    -log((1 - gt_prob) / (n_labels - 1)) for the others. With ``zero_unsure`` label 0 means
    "unknown" (uniform energy -log(1/n_labels)) and labels 1..n_labels are the classes."""
    labels = np.asarray(labels).reshape(-1).astype(np.int64)  # uint8 maps: 0 - 1 must not wrap
    if not 0 < gt_prob < 1:
        raise ValueError(f"unary_from_labels: gt_prob must be in (0, 1), got {gt_prob}")
    n_labels = int(n_labels)
    classes = labels - 1 if zero_unsure else labels
    known = classes >= 0
    if np.any(classes[known] >= n_labels):
        raise ValueError(f"unary_from_labels: labels go up to {int(labels.max())} but n_labels is {n_labels}")
    U = np.full((n_labels, labels.size), -np.log((1.0 - gt_prob) / (n_labels - 1)), dtype=np.float32)
    U[classes[known], np.flatnonzero(known)] = -np.log(gt_prob)
    if zero_unsure:
        U[:, ~known] = -np.log(1.0 / n_labels)
    return U


def unary_from_softmax(sm, scale=None, clip=1e-5):
    """(L, N) float32 energies -log p from probabilities sm (L, ...). ``scale`` in (0, 1] first
    mixes p with the uniform distribution (p = scale p + (1 - scale) / L); ``clip`` is the
    smallest probability taken the log of (None: no clipping)."""
    sm = np.asarray(sm, dtype=np.float64)
    L = sm.shape[0]
    if scale is not None:
        if not 0 < scale <= 1:
            raise ValueError(f"unary_from_softmax: scale must be in (0, 1], got {scale}")
        sm = scale * sm + (1 - scale) / L
    if clip is not None:
        sm = np.clip(sm, clip, 1.0)
    return (-np.log(sm)).reshape(L, -1).astype(np.float32)


def softmax_to_unary(sm, GT_PROB=1):
    """pydensecrf's older name: ``unary_from_softmax(sm)`` (its GT_PROB is unused there too)."""
    return unary_from_softmax(sm)


def _grid(shape, sdims):
    """(len(shape), N) float32: each pixel's index along each axis (row-major order) divided by that
    axis's standard deviation."""
    if len(sdims) != len(shape):
        raise ValueError(f"sdims has {len(sdims)} entries for {len(shape)} dimensions {tuple(shape)}")
    axes = np.meshgrid(*(np.arange(n, dtype=np.float32) for n in shape), indexing="ij")
    return np.stack([a.reshape(-1) / np.float32(s) for a, s in zip(axes, sdims)])


def create_pairwise_gaussian(sdims, shape):
    """Features of the smoothness kernel for ``DenseCRF.addPairwiseEnergy``: (len(shape), N) float32
    positions divided by ``sdims`` (one per dimension, e.g. (sy, sx) for (H, W))."""
    return _grid(tuple(int(n) for n in shape), _numbers(sdims))


def create_pairwise_bilateral(sdims, schan, img, chdim=-1):
    """Features of the appearance kernel for ``DenseCRF.addPairwiseEnergy``: positions divided by
    ``sdims`` then the image's channels divided by ``schan`` (a number or one per channel), (D, N)
    float32. ``chdim``: the image's channel axis; -1 for an image without one (a single channel)."""
    img = np.asarray(img, dtype=np.float32)
    channels = img[np.newaxis] if chdim == -1 else np.moveaxis(img, chdim, 0)
    schan = _numbers(schan)
    scale = np.full(channels.shape[0], schan, dtype=np.float32) if np.isscalar(schan) else \
        np.asarray(schan, dtype=np.float32)
    if scale.shape != (channels.shape[0],):
        raise ValueError(f"schan has {scale.size} entries for {channels.shape[0]} channels")
    colour = (channels / scale.reshape(-1, *([1] * (channels.ndim - 1)))).reshape(channels.shape[0], -1)
    return np.concatenate([_grid(channels.shape[1:], _numbers(sdims)), colour]).astype(np.float32)
