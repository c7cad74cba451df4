"""Dense-CRF mean-field inference in plain PyTorch: the oracles of ``fastseg.dense_crf``.

Two references, both on any device:

* :func:`mean_field_bruteforce` builds every Gaussian kernel matrix explicitly (O(N^2) memory and
  time): the model of Kraehenbuehl & Koltun, "Efficient Inference in Fully Connected CRFs with
  Gaussian Edge Potentials" (NIPS 2011), with nothing approximated. Tiny images only.
* :func:`mean_field` filters with the permutohedral lattice of Adams, Baek & Davis, "Fast
  High-Dimensional Filtering Using the Permutohedral Lattice" (Eurographics 2010), exactly as the
  C++ kernel (csrc/cpu/dense_crf.cpp) does: same lattice, same blur, same order of blur
  directions, float32 (float64 for float64 values: the oracle of the gradient checks). The C++
  kernel matches it to float tolerance; it is also the fallback.

Conventions shared by every backend (those of the reference densecrf implementation):

* ``unary`` is the energy U = -log p, shape (L, N); Q starts as softmax(-U) over the labels.
* Each pairwise kernel m has features f (D, N) (already divided by their standard deviations), a
  label compatibility matrix C (L, L) and a normalisation. One iteration computes
  E = U + sum_m C_m @ F_m(Q) and Q = softmax(-E), where F_m is the normalised Gaussian filter
  ``F(v)_i = sum_j exp(-|f_i - f_j|^2 / 2) v_j`` (the pixel itself included, as in densecrf).
  A Potts weight w is C = -w I (it rewards agreeing labels), a per-label vector w is C = diag(w)
  and a matrix is used symmetrised, (C + C^T) / 2.
* Normalisations, with n = F(1): 0 none (the raw filter), 1 ``before`` (F(v / n)), 2 ``after``
  (F(v) / n), 3 ``symmetric`` (F(v / sqrt n) / sqrt n, the default).
* The lattice filter is S^T B_d ... B_0 S (splat, one blur per direction, slice). Each B_j is
  symmetric, but they do not commute on the sparse lattice (a missing neighbour counts as zero), so
  the filter's exact transpose blurs in the reverse order: ``transpose=True``. The normalised
  filter post * F(pre * v) has the transpose pre * F^T(post * v) (pre and post from the forward's
  n = F(1)); mean-field backward applies it to the energies' gradients.
"""
import math

import torch

NO_NORMALIZATION, NORMALIZE_BEFORE, NORMALIZE_AFTER, NORMALIZE_SYMMETRIC = 0, 1, 2, 3


class PermutohedralLattice:
    """The permutohedral lattice of features ``(N, d)``: splat, blur, slice (Adams et al. 2010).

    Each point is lifted onto the plane x . 1 = 0 of R^(d+1) (scaled so that one blur pass per
    lattice direction with weights (1/2, 1, 1/2) approximates a Gaussian of standard deviation 1 in
    feature space), and splatted onto the d+1 vertices of its enclosing simplex with barycentric
    weights. Only lattice points some feature touches exist; a blur neighbour that does not exist
    counts as zero.

    Attributes:
        offsets: (N, d+1) int64, lattice point of each of a feature's simplex vertices.
        weights: (N, d+1) float, the matching barycentric weights (each row sums to 1).
        neighbours: (d+1, M, 2) int64, the two blur neighbours of every lattice point along every
            direction, or M (a zero row) where the neighbour does not exist.
        size: M, the number of lattice points.

    The lattice is built in float32 from float32 features, as the C++ kernel builds it; splat, blur
    and slice run in the values' dtype.
    """

    def __init__(self, features):
        features = features.to(torch.float32)
        N, d = features.shape
        device = features.device
        self.d = d
        # Scale so that the lattice's blur is a unit Gaussian in feature space (Adams et al. 2010,
        # section 3.1): sqrt(2/3) (d+1), spread over the elevation's d directions.
        inv_std = math.sqrt(2.0 / 3.0) * (d + 1)
        i = torch.arange(d, dtype=torch.float64, device=device)
        scale = (inv_std / torch.sqrt((i + 1) * (i + 2))).to(torch.float32)
        cf = features * scale
        # Elevate onto x . 1 = 0: e_0 = s_0, e_j = s_j - j cf_{j-1}, with s_j = sum_{i>=j} cf_i.
        # One float32 add at a time, as the kernels do (torch.cumsum accumulates float32 in float64
        # on the CPU, which rounds differently and so can pick another simplex near a boundary).
        s = torch.zeros(N, d + 1, dtype=torch.float32, device=device)  # s_0 .. s_d
        for i in range(d - 1, -1, -1):
            s[:, i] = s[:, i + 1] + cf[:, i]
        j = torch.arange(1, d + 1, dtype=torch.float32, device=device)
        elevated = torch.cat([s[:, :1], s[:, 1:] - j * cf], 1)  # (N, d+1)

        # The nearest remainder-0 lattice point (coordinates multiples of d+1), ties rounding down.
        down_factor = torch.tensor(1.0 / (d + 1), dtype=torch.float32)
        v = elevated * down_factor
        up = torch.ceil(v) * (d + 1)
        down = torch.floor(v) * (d + 1)
        rem0 = torch.where(up - elevated < elevated - down, up, down)
        total = torch.round(rem0.sum(1) / (d + 1)).to(torch.int64)
        # Rank of each coordinate's residual, largest first; of two equal ones the later is larger.
        diff = elevated - rem0
        a, b = diff.unsqueeze(2), diff.unsqueeze(1)  # [n, i, j]
        idx = torch.arange(d + 1, device=device)
        before = (idx.unsqueeze(0) < idx.unsqueeze(1)).unsqueeze(0)  # j < i
        rank = ((b > a) | ((b == a) & before)).sum(2)
        # Walk onto the plane: move the coordinates with the extreme residuals by d+1.
        total_ = total.unsqueeze(1)
        pos = total_ > 0
        neg = total_ < 0
        shift_down = pos & (rank >= d + 1 - total_)
        shift_up = neg & (rank < -total_)
        rank = torch.where(shift_down, rank - (d + 1 - total_), rank)
        rank = torch.where(shift_up, rank + (d + 1 + total_), rank)
        rank = torch.where((pos & ~shift_down) | (neg & ~shift_up), rank + total_, rank)
        rem0 = rem0 - (d + 1) * shift_down.to(rem0.dtype) + (d + 1) * shift_up.to(rem0.dtype)

        # Barycentric coordinates of the point in its simplex.
        delta = (elevated - rem0) * down_factor
        bary = torch.zeros(N, d + 2, dtype=torch.float32, device=device)
        bary.scatter_add_(1, d - rank, delta)
        bary.scatter_add_(1, d + 1 - rank, -delta)
        bary[:, 0] += 1.0 + bary[:, d + 1]
        self.weights = bary[:, : d + 1].contiguous()

        # Vertex k of the simplex: rem0 + canonical_k permuted by rank, where canonical_k has k in
        # its first d+1-k coordinates and k-(d+1) in the rest. Only the first d coordinates are
        # kept: the last one follows from x . 1 = 0.
        rem0i = rem0.to(torch.int64)
        k = torch.arange(d + 1, device=device).view(1, d + 1, 1)
        r = rank[:, :d].unsqueeze(1)  # (N, 1, d)
        keys = rem0i[:, :d].unsqueeze(1) + torch.where(r <= d - k, k, k - (d + 1))  # (N, d+1, d)
        lattice_keys, inverse = torch.unique(keys.reshape(-1, d), dim=0, return_inverse=True)
        M = lattice_keys.shape[0]
        self.size = M
        self.offsets = inverse.reshape(N, d + 1)

        # Blur neighbours along direction j: key -/+ (d+1) e_j - 1... i.e. +-(-1, .., d, .., -1).
        step = torch.full((d + 1, d), -1, dtype=torch.int64, device=device)
        step[torch.arange(d), torch.arange(d)] = d
        candidates = torch.stack([lattice_keys.unsqueeze(0) - step.unsqueeze(1),
                                  lattice_keys.unsqueeze(0) + step.unsqueeze(1)], 2)  # (d+1, M, 2, d)
        everything = torch.cat([lattice_keys, candidates.reshape(-1, d)], 0)
        _, inv = torch.unique(everything, dim=0, return_inverse=True)
        lookup = torch.full((int(inv.max()) + 1,), M, dtype=torch.int64, device=device)
        lookup[inv[:M]] = torch.arange(M, device=device)
        self.neighbours = lookup[inv[M:]].reshape(d + 1, M, 2)
        self.alpha = 1.0 / (1.0 + 2.0 ** (-d))

    def splat(self, values):
        """(N, C) -> (M, C): each value spread onto its simplex's vertices."""
        C = values.shape[1]
        out = values.new_zeros(self.size, C)
        weights = self.weights.to(values.dtype)
        contributions = (weights.unsqueeze(2) * values.unsqueeze(1)).reshape(-1, C)
        return out.index_add_(0, self.offsets.reshape(-1), contributions)

    def blur(self, lattice_values, reverse=False):
        """(M, C) -> (M, C): (1/2, 1, 1/2) along each of the d+1 lattice directions in turn,
        0..d, or d..0 with ``reverse`` (the transpose of the forward blur)."""
        for j in (reversed(range(self.d + 1)) if reverse else range(self.d + 1)):
            padded = torch.cat([lattice_values, lattice_values.new_zeros(1, lattice_values.shape[1])])
            n = self.neighbours[j]
            lattice_values = lattice_values + 0.5 * (padded[n[:, 0]] + padded[n[:, 1]])
        return lattice_values

    def slice(self, lattice_values):
        """(M, C) -> (N, C): each feature's value interpolated from its simplex's vertices."""
        gathered = lattice_values[self.offsets]  # (N, d+1, C)
        return self.alpha * (self.weights.to(lattice_values.dtype).unsqueeze(2) * gathered).sum(1)

    def filter(self, values, transpose=False):
        """Approximately sum_j exp(-|f_i - f_j|^2 / 2) values_j, for (N, C) values; ``transpose``
        applies the exact transpose of that linear map (blur directions in reverse order)."""
        return self.slice(self.blur(self.splat(values), reverse=transpose))


def _normalisers(raw_norm, normalization):
    """(pre, post) per-pixel scales with F_normalised(v) = post * F(pre * v), from n = F(1)."""
    if normalization == NO_NORMALIZATION:
        ones = torch.ones_like(raw_norm)
        return ones, ones
    if normalization == NORMALIZE_SYMMETRIC:
        s = 1.0 / torch.sqrt(raw_norm + 1e-20)
        return s, s
    s = 1.0 / (raw_norm + 1e-20)
    if normalization == NORMALIZE_BEFORE:
        return s, torch.ones_like(raw_norm)
    if normalization == NORMALIZE_AFTER:
        return torch.ones_like(raw_norm), s
    raise ValueError(f"unknown normalization {normalization!r}")


def filter_bruteforce(values, features, normalization=NORMALIZE_SYMMETRIC):
    """The exact normalised Gaussian filter: values (N, C), features (N, D) -> (N, C)."""
    f = features.to(torch.float64)
    kernel = torch.exp(-0.5 * torch.cdist(f, f).square())
    raw_norm = kernel.sum(1, keepdim=True)
    pre, post = _normalisers(raw_norm, normalization)
    return (post * (kernel @ (pre * values.to(torch.float64)))).to(values.dtype)


def compute_dtype(dtype):
    """The dtype the reference computes in for values of ``dtype``: float64 stays (gradient
    checks), everything else runs in float32 as the C++ kernel does."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def filter_lattice(values, features, normalization=NORMALIZE_SYMMETRIC, lattice=None, transpose=False):
    """The lattice's normalised filter: values (N, C), features (N, D) -> (N, C); ``transpose``
    applies its exact transpose, pre * F^T(post * v)."""
    dtype = compute_dtype(values.dtype)
    lattice = lattice if lattice is not None else PermutohedralLattice(features)
    raw_norm = lattice.filter(torch.ones_like(values[:, :1], dtype=dtype))
    pre, post = _normalisers(raw_norm, normalization)
    if transpose:
        pre, post = post, pre
    return post * lattice.filter(pre * values.to(dtype), transpose=transpose)


def _symmetrised(compat):
    return 0.5 * (compat + compat.transpose(0, 1))


def mean_field(unary, features, compats, normalizations, iterations, init=None, *, iterates=False):
    """Mean-field inference with lattice filtering, one image.

    Args:
        unary: (L, N) float energies U = -log p.
        features: list of (D_m, N) float feature images, one per pairwise kernel.
        compats: list of (L, L) compatibility matrices (see the module docstring).
        normalizations: list of ints, 0 none, 1 before, 2 after, 3 symmetric.
        iterations: number of mean-field updates.
        init: optional (L, N) starting Q; softmax(-unary) by default.
        iterates: return every iterate Q_0 (the start), ..., Q_iterations, stacked.

    Returns:
        Q, (L, N) marginals (or (iterations + 1, L, N) with ``iterates``), float32, or float64
        for a float64 unary.
    """
    dtype = compute_dtype(unary.dtype)
    U = unary.to(dtype).t()  # (N, L)
    filters = []
    for f, compat, normalization in zip(features, compats, normalizations):
        lattice = PermutohedralLattice(f.t())
        raw_norm = lattice.filter(torch.ones(U.shape[0], 1, dtype=dtype, device=U.device))
        pre, post = _normalisers(raw_norm, normalization)
        filters.append((lattice, pre, post, _symmetrised(compat.to(dtype))))
    Q = torch.softmax(-U, 1) if init is None else init.to(dtype).t()
    history = [Q]
    for _ in range(iterations):
        energy = U.clone()
        for lattice, pre, post, compat in filters:
            energy += (post * lattice.filter(pre * Q)) @ compat.t()
        Q = torch.softmax(-energy, 1)
        history.append(Q)
    if iterates:
        return torch.stack(history).transpose(1, 2).contiguous()
    return Q.t().contiguous()


def mean_field_bruteforce(unary, features, compats, normalizations, iterations, init=None):
    """Mean-field inference with the exact Gaussian kernels (float64), one tiny image; as
    :func:`mean_field` otherwise."""
    U = unary.to(torch.float64).t()
    Q = torch.softmax(-U, 1) if init is None else init.to(torch.float64).t()
    for _ in range(iterations):
        energy = U.clone()
        for f, compat, normalization in zip(features, compats, normalizations):
            compat = _symmetrised(compat.to(torch.float64))
            energy += filter_bruteforce(Q, f.t(), normalization) @ compat.t()
        Q = torch.softmax(-energy, 1)
    return Q.t().to(torch.float32).contiguous()


def kl_divergence(Q, unary, features, compats, normalizations):
    """densecrf's KL-divergence estimate of Q (L, N): sum Q log Q + sum Q U + sum Q C F(Q)."""
    Q = Q.to(torch.float32)
    kl = (Q * torch.log(Q.clamp_min(1e-20))).sum() + (Q * unary.to(torch.float32)).sum()
    for f, compat, normalization in zip(features, compats, normalizations):
        filtered = filter_lattice(Q.t(), f.t(), normalization)  # (N, L)
        kl += (Q.t() * (filtered @ _symmetrised(compat.to(torch.float32)).t())).sum()
    return kl
