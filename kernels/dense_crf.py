"""Permutohedral-lattice filtering in Triton: the start of the GPU path of ``fastseg.dense_crf``.

The lattice (Adams, Baek & Davis, "Fast High-Dimensional Filtering Using the Permutohedral
Lattice", Eurographics 2010) is built by the plain-PyTorch reference, ``PermutohedralLattice``:
sort/unique over the simplex vertices' keys, so it runs on any device, with no hash table. These
kernels do the per-call work on it, each over a block of rows x a block of channels:

* splat: every pixel adds weight x value to its d+1 simplex vertices (atomic adds);
* blur: along one lattice direction, v + (left + right) / 2; a missing neighbour points at an
  extra zero row M, so the loads need no mask beyond the block's;
* slice: every pixel gathers its d+1 vertices, weighted, times the lattice's alpha.

The blur directions run 0..d, or d..0 for the exact transpose (see the reference module), and the
normalisations are the reference's. float32.

The 'triton' backend of ``fastseg.dense_crf`` and ``fastseg.permutohedral_filter`` runs on
:class:`BatchLattice`: every image's lattice is built once per call (the reference's sort/unique
on the device) and the B lattices are concatenated, vertex numbers offset by the lattices before
them and every missing neighbour pointed at one shared zero row, so a filter of the whole batch is
one splat, d+1 blurs and one slice launch, whatever B. Mean field keeps Q pixel-major, (B*N, L):
the splat scales by the normalisation's ``pre`` and the slice by ``post`` as they load and store;
the slices of every kernel land side by side in one buffer, and one kernel does the compatibility
mixing (a blocked fp32 matmul), the unary add and the exp-normalise (online softmax over label
blocks). Labels are blocked
(BLOCK_C columns per program), so L is unbounded at compile time. Indexing is int64 (row and
vertex numbers times channels can pass 2^31 on large batches).
"""
import torch
import triton
import triton.language as tl

from ..ops._reference import dense_crf as reference

BLOCK_ROWS = 64


@triton.jit
def _splat_kernel(values_ptr, scale_ptr, offsets_ptr, weights_ptr, lattice_ptr, N, C, D1,
                  HAS_SCALE: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    row_mask = rows < N
    mask = row_mask[:, None] & (cols < C)[None, :]
    v = tl.load(values_ptr + rows[:, None] * C + cols[None, :], mask=mask, other=0.0)
    if HAS_SCALE:  # the normalisation's per-pixel pre-scale, applied as the values load
        v = v * tl.load(scale_ptr + rows, mask=row_mask, other=0.0)[:, None]
    for k in range(D1):
        vertex = tl.load(offsets_ptr + rows * D1 + k, mask=row_mask, other=0)
        w = tl.load(weights_ptr + rows * D1 + k, mask=row_mask, other=0.0)
        tl.atomic_add(lattice_ptr + vertex[:, None] * C + cols[None, :], w[:, None] * v, mask=mask)


@triton.jit
def _blur_kernel(src_ptr, neighbours_ptr, dst_ptr, M, C, BLOCK_ROWS: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    row_mask = rows < M
    mask = row_mask[:, None] & (cols < C)[None, :]
    left = tl.load(neighbours_ptr + rows * 2, mask=row_mask, other=0)
    right = tl.load(neighbours_ptr + rows * 2 + 1, mask=row_mask, other=0)
    centre = tl.load(src_ptr + rows[:, None] * C + cols[None, :], mask=mask, other=0.0)
    a = tl.load(src_ptr + left[:, None] * C + cols[None, :], mask=mask, other=0.0)
    b = tl.load(src_ptr + right[:, None] * C + cols[None, :], mask=mask, other=0.0)
    tl.store(dst_ptr + rows[:, None] * C + cols[None, :], centre + 0.5 * (a + b), mask=mask)


@triton.jit
def _slice_kernel(lattice_ptr, offsets_ptr, weights_ptr, scale_ptr, out_ptr, N, C, D1, alpha, out_stride,
                  HAS_SCALE: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    row_mask = rows < N
    mask = row_mask[:, None] & (cols < C)[None, :]
    acc = tl.zeros([BLOCK_ROWS, BLOCK_C], dtype=tl.float32)
    for k in range(D1):
        vertex = tl.load(offsets_ptr + rows * D1 + k, mask=row_mask, other=0)
        w = tl.load(weights_ptr + rows * D1 + k, mask=row_mask, other=0.0)
        acc += w[:, None] * tl.load(lattice_ptr + vertex[:, None] * C + cols[None, :], mask=mask, other=0.0)
    acc = alpha * acc
    if HAS_SCALE:  # the normalisation's per-pixel post-scale
        acc = acc * tl.load(scale_ptr + rows, mask=row_mask, other=0.0)[:, None]
    tl.store(out_ptr + rows[:, None] * out_stride + cols[None, :], acc, mask=mask)


@triton.jit
def _mix_softmax_kernel(filtered_ptr, mix_ptr, unary_ptr, out_ptr, N, KL, L, unary_scale,
                        BLOCK_ROWS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_L: tl.constexpr):
    # Q = softmax(-(s U + filtered @ mix)) over the labels, for a block of rows: the compatibility
    # mixing of every kernel at once (filtered is (N, K*L), the kernels' filters side by side; mix
    # the stacked (K*L, L) Cs_m^T), then the exp-normalise, blocked over labels so L is unbounded:
    # pass 1 writes the negated energies and keeps a running max and sum (online softmax), pass 2
    # normalises them in place.
    rows = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_mask = rows < N
    running_max = tl.full([BLOCK_ROWS], float("-inf"), dtype=tl.float32)
    running_sum = tl.zeros([BLOCK_ROWS], dtype=tl.float32)
    for l0 in range(0, L, BLOCK_L):
        labels = l0 + tl.arange(0, BLOCK_L)
        label_mask = labels < L
        acc = tl.zeros([BLOCK_ROWS, BLOCK_L], dtype=tl.float32)
        for k0 in range(0, KL, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_mask = ks < KL
            a = tl.load(filtered_ptr + rows[:, None] * KL + ks[None, :], mask=row_mask[:, None] & k_mask[None, :],
                        other=0.0)
            b = tl.load(mix_ptr + ks[:, None] * L + labels[None, :], mask=k_mask[:, None] & label_mask[None, :],
                        other=0.0)
            acc += tl.dot(a, b, input_precision="ieee")  # fp32 products: the 1e-5 tolerance holds
        mask = row_mask[:, None] & label_mask[None, :]
        u = tl.load(unary_ptr + rows[:, None] * L + labels[None, :], mask=mask, other=0.0)
        x = tl.where(mask, -(unary_scale * u + acc), float("-inf"))
        tl.store(out_ptr + rows[:, None] * L + labels[None, :], x, mask=mask)
        new_max = tl.maximum(running_max, tl.max(x, 1))
        new_max = tl.where(row_mask, new_max, 0.0)  # rows past N: keep exp() finite
        running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(x - new_max[:, None]), 1)
        running_max = new_max
    running_sum = tl.where(row_mask, running_sum, 1.0)
    for l0 in range(0, L, BLOCK_L):
        labels = l0 + tl.arange(0, BLOCK_L)
        mask = row_mask[:, None] & (labels < L)[None, :]
        x = tl.load(out_ptr + rows[:, None] * L + labels[None, :], mask=mask, other=0.0)
        q = tl.exp(x - running_max[:, None]) / running_sum[:, None]
        tl.store(out_ptr + rows[:, None] * L + labels[None, :], q, mask=mask)


def _grid(rows, C, block_c):
    return (triton.cdiv(rows, BLOCK_ROWS), triton.cdiv(C, block_c))


def lattice_filter(values, lattice, transpose=False, pre=None, post=None, out=None):
    """The raw lattice filter S^T B S of values (N, C) float32 on a built ``PermutohedralLattice``
    or :class:`BatchLattice` (``transpose``: blur directions d..0, the exact transpose); ``pre``
    and ``post`` (N,) float32 scale the rows on the way in and out. Returns (N, C) float32, in
    ``out`` if given (an (N, C) view with unit column stride, e.g. columns of a wider buffer)."""
    values = values.to(torch.float32).contiguous()
    N, C = values.shape
    M, D1 = lattice.size, lattice.d + 1
    block_c = min(triton.next_power_of_2(C), 64)
    offsets = lattice.offsets.contiguous()
    weights = lattice.weights.to(torch.float32).contiguous()
    pre = pre.contiguous() if pre is not None else None
    post = post.contiguous() if post is not None else None
    # Row M stays zero in both buffers: the missing-neighbour target of the blur.
    src = values.new_zeros(M + 1, C)
    dst = values.new_zeros(M + 1, C)
    _splat_kernel[_grid(N, C, block_c)](values, pre if pre is not None else values, offsets, weights, src, N, C,
                                        D1, HAS_SCALE=pre is not None, BLOCK_ROWS=BLOCK_ROWS, BLOCK_C=block_c)
    for j in (reversed(range(D1)) if transpose else range(D1)):
        neighbours = lattice.neighbours[j].contiguous()
        _blur_kernel[_grid(M, C, block_c)](src, neighbours, dst, M, C, BLOCK_ROWS=BLOCK_ROWS, BLOCK_C=block_c)
        src, dst = dst, src
    # Not empty_like: an (N, 1) values tensor may have strides (1, N), which contiguous() keeps.
    out = torch.empty((N, C), dtype=torch.float32, device=values.device) if out is None else out
    assert out.shape == (N, C) and out.stride(1) == 1
    _slice_kernel[_grid(N, C, block_c)](src, offsets, weights, post if post is not None else values, out, N, C, D1,
                                        float(lattice.alpha), out.stride(0), HAS_SCALE=post is not None,
                                        BLOCK_ROWS=BLOCK_ROWS, BLOCK_C=block_c)
    return out


def filter_lattice(values, features, normalization=reference.NORMALIZE_SYMMETRIC, lattice=None, transpose=False):
    """The normalised filter, as the reference's ``filter_lattice``: values (N, C), features
    (N, D) -> (N, C) float32; ``transpose`` applies pre * F^T(post * v)."""
    lattice = lattice if lattice is not None else reference.PermutohedralLattice(features)
    ones = torch.ones(values.shape[0], 1, dtype=torch.float32, device=values.device)
    pre, post = reference._normalisers(lattice_filter(ones, lattice), normalization)
    if transpose:
        pre, post = post, pre
    return lattice_filter(values, lattice, transpose=transpose, pre=pre.reshape(-1), post=post.reshape(-1))


class BatchLattice:
    """The lattices of a batch's B images as one: features (B or 1, D, *) float32 -> a lattice
    over B * N points (image-major) with ``offsets``, ``weights``, ``neighbours``, ``size``, ``d``
    and ``alpha`` as ``PermutohedralLattice`` has them, so one launch filters every image.

    Each distinct image's lattice is built once, on the features' device, by the reference's
    sort/unique (two unique() calls and one max() are its host syncs, per build; one build for the
    whole batch would need a batch-index key column in the reference's keys); features shared by
    the batch (B=1, as the gaussian kernel's positions) build one lattice, repeated with offset
    vertex numbers.
    """

    def __init__(self, features, batch):
        features = features.to(torch.float32)
        D = features.shape[1]
        flat = features.reshape(features.shape[0], D, -1).transpose(1, 2)  # (B or 1, N, D)
        lattices = [reference.PermutohedralLattice(f) for f in flat]
        if len(lattices) == 1:
            lattices = lattices * batch
        self.d, self.alpha = D, lattices[0].alpha
        self.size = sum(lattice.size for lattice in lattices)
        offsets, neighbours, base = [], [], 0
        for lattice in lattices:
            offsets.append(lattice.offsets + base)
            n = lattice.neighbours
            # An image's missing neighbour (its own row M_b) becomes the batch's one zero row.
            neighbours.append(torch.where(n == lattice.size, self.size, n + base))
            base += lattice.size
        self.offsets = torch.cat(offsets)
        self.weights = torch.cat([lattice.weights for lattice in lattices]).to(torch.float32)
        self.neighbours = torch.cat(neighbours, 1)


class NormalisedFilter:
    """One dense-CRF kernel on a :class:`BatchLattice`: post * F(pre * v) on (B * N, C) rows,
    and its exact transpose; n = F(1) is computed once, here."""

    def __init__(self, features, batch, normalization):
        self.lattice = BatchLattice(features, batch)
        ones = torch.ones(self.lattice.offsets.shape[0], 1, dtype=torch.float32, device=features.device)
        pre, post = reference._normalisers(lattice_filter(ones, self.lattice), normalization)
        self.pre, self.post = pre.reshape(-1).contiguous(), post.reshape(-1).contiguous()

    def __call__(self, values, transpose=False, out=None):
        pre, post = (self.post, self.pre) if transpose else (self.pre, self.post)
        return lattice_filter(values, self.lattice, transpose=transpose, pre=pre, post=post, out=out)


def to_rows(x):
    """(B, C, *) -> (B * N, C) float32, pixel-major: the kernels' layout."""
    B, C = x.shape[:2]
    return x.to(torch.float32).reshape(B, C, -1).transpose(1, 2).reshape(-1, C).contiguous()


def from_rows(rows, shape):
    """(B * N, C) -> (B, C, *) of ``shape``, contiguous."""
    B, C = shape[:2]
    return rows.reshape(B, -1, C).transpose(1, 2).reshape(shape).contiguous()


def permutohedral_filter(values, features, normalization, transpose=False):
    """values (B, C, *), features (B or 1, D, *) -> the normalised filter of each image, (B, C, *)
    float32, the whole batch in one set of launches."""
    if values.shape[0] == 0:
        return values.new_empty(values.shape, dtype=torch.float32)
    return from_rows(NormalisedFilter(features, values.shape[0], normalization)(to_rows(values), transpose),
                     values.shape)


def build_filters(features, batch, normalizations):
    """One :class:`NormalisedFilter` per kernel: the lattices of a mean-field call, built once."""
    return [NormalisedFilter(f, batch, code) for f, code in zip(features, normalizations)]


def mean_field(unary, features, compats, normalizations, iterations, init=None, unary_scale=1.0, iterates=False,
               filters=None):
    """Mean field as the reference's, on the whole batch: energies unary_scale * unary (B, L, *),
    per kernel features (B or 1, D, *), (L, L) compatibilities, normalisation codes; optional
    init (B, L, *). Returns Q (B, L, *) float32, or every iterate (iterations + 1, B, L, *)."""
    B, L = unary.shape[:2]
    if B == 0:  # no lattice to build
        shape = (iterations + 1, *unary.shape) if iterates else unary.shape
        return unary.new_empty(shape, dtype=torch.float32)
    filters = filters if filters is not None else build_filters(features, B, normalizations)
    U = to_rows(unary)
    # energy = s U + sum_m F_m(Q) @ Cs_m^T, Cs the symmetrised compatibility: the kernels' filters
    # are sliced side by side into one (B*N, K*L) buffer and mixed by the stacked Cs_m^T at once.
    mix = torch.cat([(0.5 * (c + c.t())).t().to(torch.float32) for c in compats] or [U.new_zeros(0, L)])
    Q = torch.softmax(U * -unary_scale, 1) if init is None else to_rows(init)
    filtered = U.new_empty(U.shape[0], len(filters) * L)
    history = [Q]
    for _ in range(iterations):
        for m, kernel_filter in enumerate(filters):
            kernel_filter(Q, out=filtered[:, m * L:(m + 1) * L])
        Q = torch.empty_like(U)
        if filters:
            _mix_softmax_kernel[(triton.cdiv(U.shape[0], BLOCK_ROWS),)](
                filtered, mix, U, Q, U.shape[0], filtered.shape[1], L, float(unary_scale), BLOCK_ROWS=BLOCK_ROWS,
                BLOCK_K=32, BLOCK_L=32)
        else:
            Q = torch.softmax(U * -unary_scale, 1)
        history.append(Q)
    if iterates:
        return torch.stack([from_rows(q, unary.shape) for q in history])
    return from_rows(Q, unary.shape)
