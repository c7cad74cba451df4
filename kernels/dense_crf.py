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
normalisations are the reference's. Not yet wired to a backend: the mean-field loop on the device
is the next step of issue 4. float32.
"""
import torch
import triton
import triton.language as tl

from ..ops._reference import dense_crf as reference

BLOCK_ROWS = 64


@triton.jit
def _splat_kernel(values_ptr, offsets_ptr, weights_ptr, lattice_ptr, N, C, D1,
                  BLOCK_ROWS: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    row_mask = rows < N
    mask = row_mask[:, None] & (cols < C)[None, :]
    v = tl.load(values_ptr + rows[:, None] * C + cols[None, :], mask=mask, other=0.0)
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
def _slice_kernel(lattice_ptr, offsets_ptr, weights_ptr, out_ptr, N, C, D1, alpha,
                  BLOCK_ROWS: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    row_mask = rows < N
    mask = row_mask[:, None] & (cols < C)[None, :]
    acc = tl.zeros([BLOCK_ROWS, BLOCK_C], dtype=tl.float32)
    for k in range(D1):
        vertex = tl.load(offsets_ptr + rows * D1 + k, mask=row_mask, other=0)
        w = tl.load(weights_ptr + rows * D1 + k, mask=row_mask, other=0.0)
        acc += w[:, None] * tl.load(lattice_ptr + vertex[:, None] * C + cols[None, :], mask=mask, other=0.0)
    tl.store(out_ptr + rows[:, None] * C + cols[None, :], alpha * acc, mask=mask)


def _grid(rows, C, block_c):
    return (triton.cdiv(rows, BLOCK_ROWS), triton.cdiv(C, block_c))


def lattice_filter(values, lattice, transpose=False):
    """The raw lattice filter S^T B S of values (N, C) float32 on a built ``PermutohedralLattice``
    (``transpose``: blur directions d..0, the exact transpose). Returns (N, C) float32."""
    values = values.to(torch.float32).contiguous()
    N, C = values.shape
    M, D1 = lattice.size, lattice.d + 1
    block_c = min(triton.next_power_of_2(C), 64)
    offsets = lattice.offsets.contiguous()
    weights = lattice.weights.to(torch.float32).contiguous()
    # Row M stays zero in both buffers: the missing-neighbour target of the blur.
    src = values.new_zeros(M + 1, C)
    dst = values.new_zeros(M + 1, C)
    _splat_kernel[_grid(N, C, block_c)](values, offsets, weights, src, N, C, D1, BLOCK_ROWS=BLOCK_ROWS,
                                        BLOCK_C=block_c)
    for j in (reversed(range(D1)) if transpose else range(D1)):
        neighbours = lattice.neighbours[j].contiguous()
        _blur_kernel[_grid(M, C, block_c)](src, neighbours, dst, M, C, BLOCK_ROWS=BLOCK_ROWS, BLOCK_C=block_c)
        src, dst = dst, src
    out = torch.empty_like(values)
    _slice_kernel[_grid(N, C, block_c)](src, offsets, weights, out, N, C, D1, float(lattice.alpha),
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
    return post * lattice_filter(pre * values.to(torch.float32), lattice, transpose=transpose)
