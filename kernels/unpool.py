"""Max-unpooling in Triton: the ``triton`` backend of ``fastseg.max_unpool2d``.

Same plan as the CUDA kernel (csrc/cuda/unpool.cu): one scan of the indices decides the path; on
the fast path every output element gathers its value from the few pooled cells whose windows
cover it, so each element is written exactly once, without atomics or a zero-fill. Indices that
leave their pooling window take a deterministic scatter: an atomic max picks, for each output
position, the latest entry in flat order pointing at it (ATen's CPU semantics), then a gather.

Both memory formats are addressed as slabs of interleaved channels: NCHW is B*C slabs of one
channel, channels_last is B slabs of C channels (see csrc/unpool.h).

Index arithmetic is int32 unless a tensor has 2^31 elements or more (IDX64): the kernels divide
every element's offset several times, and 64-bit division is a long software sequence on NVIDIA
GPUs (an H200 run spent ~1.3 ms on 11 M elements, 5x ATen's unpooling, with it everywhere).
"""
import torch
import triton
import triton.language as tl

from .._layout import output_memory_format
from ..ops._reference.unpool import raise_index_out_of_range

BLOCK = 1024
IN_WINDOW, OUT_OF_WINDOW, OUT_OF_RANGE = 0, 1, 2
# The same codes as the kernels see them: compiled Triton reads only constexpr globals (the
# interpreter reads any, so only a GPU run showed this).
_IN_WINDOW = tl.constexpr(IN_WINDOW)
_OUT_OF_WINDOW = tl.constexpr(OUT_OF_WINDOW)
_OUT_OF_RANGE = tl.constexpr(OUT_OF_RANGE)


@triton.jit
def _offsets(BLOCK: tl.constexpr, IDX64: tl.constexpr):
    pid = tl.program_id(0)
    if IDX64:
        pid = pid.to(tl.int64)
    return pid * BLOCK + tl.arange(0, BLOCK)


@triton.jit
def _scan_kernel(idx_ptr, status_ptr, n, H, W, Ho, Wo, C, kH, kW, sH, sW, pH, pW, BLOCK: tl.constexpr,
                 IDX64: tl.constexpr):
    offs = _offsets(BLOCK, IDX64)
    mask = offs < n
    v = tl.load(idx_ptr + offs, mask=mask, other=0)
    spatial = offs // C
    pw = spatial % W
    ph = (spatial // W) % H
    out_of_range = (v < 0) | (v >= Ho * Wo)
    v = tl.where(out_of_range, 0, v).to(offs.dtype)  # an in-plane index fits the offsets' type
    row = v // Wo
    col = v - row * Wo
    top = ph * sH - pH
    left = pw * sW - pW
    in_window = (row >= top) & (row < top + kH) & (col >= left) & (col < left + kW)
    status = tl.where(out_of_range, _OUT_OF_RANGE, tl.where(in_window, _IN_WINDOW, _OUT_OF_WINDOW))
    status = tl.where(mask, status, _IN_WINDOW)
    tl.atomic_max(status_ptr, tl.max(status, axis=0))


@triton.jit
def _gather_kernel(
    x_ptr, idx_ptr, out_ptr, n, H, W, Ho, Wo, C, kH, kW, sH, sW, pH, pW,
    CAND_H: tl.constexpr, CAND_W: tl.constexpr, BLOCK: tl.constexpr, IDX64: tl.constexpr,
):
    offs = _offsets(BLOCK, IDX64)
    mask = offs < n
    c = offs % C
    spatial = offs // C
    ow = spatial % Wo
    t = spatial // Wo
    oh = t % Ho
    slab = t // Ho
    # Pooled cells whose windows cover (oh, ow): rows [ph_first, ph_last], cols [pw_first, pw_last].
    ph_last = tl.minimum((oh + pH) // sH, H - 1)
    ph_first = tl.maximum((oh + pH - kH + 1 + sH - 1) // sH, 0)  # numerator >= -kH + 1 + sH - 1
    pw_last = tl.minimum((ow + pW) // sW, W - 1)
    pw_first = tl.maximum((ow + pW - kW + 1 + sW - 1) // sW, 0)
    target = oh * Wo + ow
    base = slab * H * W * C + c
    value = tl.zeros([BLOCK], dtype=out_ptr.dtype.element_ty)
    found = offs < 0
    # Latest flat order first: the first match is the entry ATen's sequential scatter keeps.
    for dh in tl.static_range(CAND_H):
        ph = ph_last - dh
        for dw in tl.static_range(CAND_W):
            pw = pw_last - dw
            valid = mask & (ph >= ph_first) & (pw >= pw_first) & (~found)
            at = base + (ph * W + pw) * C
            v = tl.load(idx_ptr + at, mask=valid, other=-1)
            hit = valid & (v == target)
            value = tl.where(hit, tl.load(x_ptr + at, mask=hit, other=0.0), value)
            found = found | hit
    tl.store(out_ptr + offs, value, mask=mask)


@triton.jit
def _elect_kernel(idx_ptr, winner_ptr, n, HW, Ho, Wo, C, BLOCK: tl.constexpr, IDX64: tl.constexpr):
    offs = _offsets(BLOCK, IDX64)
    mask = offs < n
    c = offs % C
    k = (offs // C) % HW
    slab = offs // (C * HW)
    v = tl.load(idx_ptr + offs, mask=mask, other=0).to(offs.dtype)  # the scan found every index in its plane
    position = slab * Ho * Wo * C + v * C + c
    tl.atomic_max(winner_ptr + position, k.to(tl.int32), mask=mask)


@triton.jit
def _winner_gather_kernel(x_ptr, winner_ptr, out_ptr, n, HW, Ho, Wo, C, BLOCK: tl.constexpr, IDX64: tl.constexpr):
    offs = _offsets(BLOCK, IDX64)
    mask = offs < n
    c = offs % C
    slab = offs // (C * Ho * Wo)
    w = tl.load(winner_ptr + offs, mask=mask, other=-1)
    hit = mask & (w >= 0)
    value = tl.load(x_ptr + slab * HW * C + w.to(offs.dtype) * C + c, mask=hit, other=0.0)
    tl.store(out_ptr + offs, value, mask=mask)


@triton.jit
def _backward_kernel(grad_ptr, idx_ptr, grad_in_ptr, status_ptr, n, HW, plane, C, BLOCK: tl.constexpr,
                     IDX64: tl.constexpr):
    offs = _offsets(BLOCK, IDX64)
    mask = offs < n
    c = offs % C
    slab = offs // (C * HW)
    v = tl.load(idx_ptr + offs, mask=mask, other=0)
    ok = (v >= 0) & (v < plane)
    v = tl.where(ok, v, 0).to(offs.dtype)
    g = tl.load(grad_ptr + slab * plane * C + v * C + c, mask=mask & ok, other=0.0)
    tl.store(grad_in_ptr + offs, g, mask=mask)
    tl.atomic_max(status_ptr, tl.max(tl.where(mask & ~ok, _OUT_OF_RANGE, _IN_WINDOW), axis=0))


def needs_int64(*tensors):
    """Whether element offsets into any of ``tensors`` (or one block past the end) can pass int32."""
    return max(t.numel() for t in tensors) + BLOCK >= 2 ** 31


def _slabs(t, channels_last):
    """(slabs, interleaved channels) of a 4-D tensor in the given format."""
    B, C = t.shape[:2]
    return (B, C) if channels_last else (B * C, 1)


def max_unpool2d(input, indices, kernel_size, stride, padding, output_size):
    """Launcher: input/indices (B, C, H, W), output (B, C, Ho, Wo) in input's memory format."""
    fmt = output_memory_format(input)
    x = input.contiguous(memory_format=fmt)
    idx = indices.contiguous(memory_format=fmt)
    B, C, H, W = x.shape
    Ho, Wo = output_size
    out = torch.empty((B, C, Ho, Wo), dtype=x.dtype, device=x.device, memory_format=fmt)
    if out.numel() == 0:
        return out
    _, Ci = _slabs(x, fmt == torch.channels_last)
    (kH, kW), (sH, sW), (pH, pW) = kernel_size, stride, padding
    status = torch.zeros(1, dtype=torch.int32, device=x.device)
    n_in = x.numel()
    idx64 = needs_int64(x, out)
    _scan_kernel[(triton.cdiv(n_in, BLOCK),)](idx, status, n_in, H, W, Ho, Wo, Ci, kH, kW, sH, sW, pH, pW, BLOCK=BLOCK,
                                              IDX64=idx64)
    worst = int(status.item())  # the one host sync: decides the path and reports bad indices
    if worst == OUT_OF_RANGE:
        raise_index_out_of_range(idx, Ho, Wo)
    n_out = out.numel()
    grid = (triton.cdiv(n_out, BLOCK),)
    if worst == IN_WINDOW:
        _gather_kernel[grid](
            x, idx, out, n_out, H, W, Ho, Wo, Ci, kH, kW, sH, sW, pH, pW,
            CAND_H=triton.cdiv(kH, sH), CAND_W=triton.cdiv(kW, sW), BLOCK=BLOCK, IDX64=idx64,
        )
    else:
        winner = torch.full(out.shape, -1, dtype=torch.int32, device=x.device).contiguous(memory_format=fmt)
        _elect_kernel[(triton.cdiv(n_in, BLOCK),)](idx, winner, n_in, H * W, Ho, Wo, Ci, BLOCK=BLOCK, IDX64=idx64)
        _winner_gather_kernel[grid](x, winner, out, n_out, H * W, Ho, Wo, Ci, BLOCK=BLOCK, IDX64=idx64)
    return out


def max_unpool2d_backward(grad_output, indices):
    """Launcher: grad_input (B, C, H, W) = grad_output gathered at indices."""
    fmt = output_memory_format(indices)
    idx = indices.contiguous(memory_format=fmt)
    grad = grad_output.contiguous(memory_format=fmt)
    grad_input = torch.empty(idx.shape, dtype=grad.dtype, device=grad.device, memory_format=fmt)
    n = idx.numel()
    if n == 0:
        return grad_input
    _, Ci = _slabs(idx, fmt == torch.channels_last)
    H, W = idx.shape[2:]
    Ho, Wo = grad.shape[2:]
    status = torch.zeros(1, dtype=torch.int32, device=idx.device)
    _backward_kernel[(triton.cdiv(n, BLOCK),)](grad, idx, grad_input, status, n, H * W, Ho * Wo, Ci, BLOCK=BLOCK,
                                               IDX64=needs_int64(idx, grad))
    if int(status.item()) == OUT_OF_RANGE:
        raise_index_out_of_range(idx, Ho, Wo)
    return grad_input
