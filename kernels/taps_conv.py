"""Convolutions as one GEMM over channels, then a shift-and-add over taps ("kn2row": Vasudevan,
Anderson & Gregg, "Parallel Multi Channel Convolution using General Matrix Multiplication",
ASAP 2017), for CUDA tensors.

A convolution out[p] = sum_t W_t x[p + s_t] (W_t the (O, C) matrix of tap t, s_t its offset, x zero
outside the map) is computed as G = x @ [W_0^T | W_1^T | ...], a (pixels, T * O) product that
cuBLAS runs at full width whatever O is, then out[p] = sum_t G[p + s_t, t-th block]: a pass that
reads T * O values per output pixel. It pays where O is small (a GCN block's 21 classes, DeepLab
v2's ASPP with one output per class), where cuDNN's kernels for such channel counts are slow and
the product G stays small; several convolutions of one input share one GEMM (their taps side by
side), taps that never meet the map (|offset| >= its size) are left out of the GEMM, and taps of
equal offset are merged (the centre taps of ASPP's branches).

``shift_add`` is the Triton pass; ``gcn_conv2d``, ``conv_sum`` and ``parallel_conv_bn_relu`` build
the GEMMs around it. Packing the weights for a GEMM is a few small kernels per call; the layers
(fastseg.nn.ASPP) keep their packs between calls.
"""
import collections
import functools

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .._layout import output_memory_format

_BLOCK_P, _BLOCK_O = 64, 32


@triton.jit
def _shift_add_kernel(
    g_ptr, out_ptr, bias_ptr, tap_ptr,
    HW, W, H, NP, O, T, g_slab, g_row,
    out_sg, out_sb, out_sp, out_so,
    HAS_BIAS: tl.constexpr, RELU: tl.constexpr, IS_FP64: tl.constexpr, BLOCK_P: tl.constexpr,
    BLOCK_O: tl.constexpr,
):
    # Program (pixel block, channel block, output group e). Tap t of group e is the row
    # tap_ptr[e, t] = (slab, dy, dx, column): out[e, p, o] += G[slab, p + dy * W + dx, column + o]
    # where (y + dy, x + dx) lies in the map.
    pid_p = tl.program_id(0)
    pid_o = tl.program_id(1)
    e = tl.program_id(2)
    p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    p_ok = p < NP
    o_ok = o < O
    b = p // HW
    r = p % HW
    y = r // W
    x = r % W
    acc = tl.zeros((BLOCK_P, BLOCK_O), dtype=tl.float64 if IS_FP64 else tl.float32)
    for t in range(T):
        row = tap_ptr + (e * T + t) * 4
        slab = tl.load(row)
        dy = tl.load(row + 1)
        dx = tl.load(row + 2)
        column = tl.load(row + 3)
        yy = y + dy
        xx = x + dx
        inside = p_ok & (yy >= 0) & (yy < H) & (xx >= 0) & (xx < W)
        q = (p + dy * W + dx).to(tl.int64)
        ptrs = g_ptr + slab.to(tl.int64) * g_slab + q[:, None] * g_row + (column + o)[None, :]
        acc += tl.load(ptrs, mask=inside[:, None] & o_ok[None, :], other=0.0).to(acc.dtype)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + e * O + o, mask=o_ok, other=0.0).to(acc.dtype)[None, :]
    if RELU:
        acc = tl.where(acc < 0.0, 0.0, acc)  # as torch.relu: NaN stays NaN
    out_off = e.to(tl.int64) * out_sg + (b.to(tl.int64) * out_sb + r.to(tl.int64) * out_sp)[:, None] \
        + (o.to(tl.int64) * out_so)[None, :]
    tl.store(out_ptr + out_off, acc.to(out_ptr.dtype.element_ty), mask=p_ok[:, None] & o_ok[None, :])


def shift_add(g, taps, out, bias, H, W, relu=False):
    """out[e, b, :, y, x] = bias[e] + sum over group e's taps (slab, dy, dx, column) of
    g[slab, pixel (b, y + dy, x + dx), column:column + O] (zero outside the map), then ReLU if
    ``relu``.

    g: (S, B * H * W, row) with unit column stride; taps: (E, T, 4) int32 on g's device;
    out: (E, B, O, H, W) in any strides; bias: (E, O) or None (float32, float64 for float64 g).
    Sums in float32 (float64 for float64 g)."""
    E, B, O = out.shape[:3]
    T = taps.shape[1]
    NP = B * H * W
    if NP == 0 or O == 0:
        return out
    assert g.stride(2) == 1 and taps.shape == (E, T, 4)
    grid = (triton.cdiv(NP, _BLOCK_P), triton.cdiv(O, _BLOCK_O), E)
    se, sb, so, sh, sw = out.stride()
    assert sh == W * sw, "output pixels must be evenly spaced (NCHW or NHWC)"
    _shift_add_kernel[grid](
        g, out, bias if bias is not None else out, taps,
        H * W, W, H, NP, O, T, g.stride(0), g.stride(1),
        se, sb, sw, so,
        HAS_BIAS=bias is not None, RELU=relu, IS_FP64=g.dtype == torch.float64, BLOCK_P=_BLOCK_P, BLOCK_O=_BLOCK_O,
    )
    return out


def _aligned(n):
    """n rounded up to a multiple of 8: each tap's block of GEMM columns (and each row of the GEMMs'
    operands) starts 16 bytes aligned in half precision, as cuBLAS's tensor-core kernels want."""
    return -(-n // 8) * 8


def _sum_dtype(dtype):
    """What the pass sums in (its bias's dtype)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _pixels_by_channels(x):
    """x (B, C, H, W) as (B, H * W, C) without a copy where its layout allows (channels_last is a
    plain row-major matrix, NCHW a transposed one, which cuBLAS reads as is)."""
    B, C, H, W = x.shape
    if x.is_contiguous(memory_format=torch.channels_last):
        return x.permute(0, 2, 3, 1).reshape(B, H * W, C)
    return x.reshape(B, C, H * W).transpose(1, 2)


def _gemm(x, w_cat):
    """(1, B * H * W, N): x (B, C, H, W) times w_cat (C, N)."""
    B, C, H, W = x.shape
    return torch.matmul(_pixels_by_channels(x), w_cat).view(1, B * H * W, w_cat.shape[1])


def _output(shape, like):
    """An empty (B, O, H, W) output in ``like``'s memory format."""
    return torch.empty(shape, dtype=like.dtype, device=like.device, memory_format=output_memory_format(like))


def _axis_taps(k, d, along_h, column0, width, slab=0):
    """Rows (slab, dy, dx, column) of a k-tap 'same' convolution along H or W, dilation d, its
    taps' output blocks of ``width`` columns from column0."""
    p = d * (k - 1) // 2
    return [(slab, t * d - p, 0, column0 + t * width) if along_h else (slab, 0, t * d - p, column0 + t * width)
            for t in range(k)]


@functools.lru_cache(maxsize=64)
def _tap_table(rows, device):
    """(E, T, 4) int32 on ``device`` from nested tuples of (slab, dy, dx, column) rows; the table
    depends on shapes alone, so it is made (and copied to the device) once per shape."""
    return torch.tensor(rows, dtype=torch.int32).to(device)


def gcn_conv2d(input, w_l1, w_l2, w_r1, w_r2, b_l1, b_l2, b_r1, b_r2, dilation):
    """The GCN block (Peng et al., CVPR 2017) as two GEMM + shift-add steps: both branches' first
    convolutions in one GEMM over Cin (2k taps of Cmid columns), one pass forming both middle maps,
    then one batched GEMM over Cmid (each branch's k taps of Cout) and one pass summing all 2k taps
    and both biases into the output."""
    B, Cin, H, W = input.shape
    Cmid, Cout, k, d, device = w_l1.shape[0], w_l2.shape[0], w_l1.shape[2], dilation, input.device
    Mp, Op = _aligned(Cmid), _aligned(Cout)
    sums = _sum_dtype(input.dtype)
    # Tap t's (Cin, Cmid) block at columns t * Mp, zero-padded to Mp columns: the k x 1 taps, then
    # the 1 x k ones. The pass writes all Mp channels of the middle maps (zeros past Cmid), so the
    # next GEMM's rows are aligned too.
    w1 = F.pad(torch.cat([w_l1[..., 0].permute(1, 2, 0), w_r1[:, :, 0, :].permute(1, 2, 0)], 1),
               (0, Mp - Cmid)).reshape(Cin, 2 * k * Mp)
    taps1 = _tap_table((tuple(_axis_taps(k, d, True, 0, Mp)), tuple(_axis_taps(k, d, False, k * Mp, Mp))), device)
    bias1 = None
    if b_l1 is not None or b_r1 is not None:
        bias1 = torch.zeros((2, Mp), dtype=sums, device=device)
        for i, b in enumerate((b_l1, b_r1)):
            if b is not None:
                bias1[i, :Cmid] = b
    # The middle maps (left, right) pixel-major whatever x's layout: the next GEMM's rows.
    mid = torch.empty((2, B, H, W, Mp), dtype=input.dtype, device=device)
    shift_add(_gemm(input, w1), taps1, mid.permute(0, 1, 4, 2, 3), bias1, H, W)
    # Second step: slab 0 the left middle map times its 1 x k taps, slab 1 the right one times its
    # k x 1 taps; all 2k taps and both biases sum into one output.
    w2 = F.pad(torch.stack([w_l2[:, :, 0, :].permute(1, 2, 0), w_r2[..., 0].permute(1, 2, 0)]),
               (0, Op - Cout, 0, 0, 0, Mp - Cmid)).reshape(2, Mp, k * Op)
    taps2 = _tap_table((tuple(_axis_taps(k, d, False, 0, Op, 0) + _axis_taps(k, d, True, 0, Op, 1)),), device)
    bias2 = None
    if b_l2 is not None or b_r2 is not None:
        bias2 = sum(b.to(sums) for b in (b_l2, b_r2) if b is not None).view(1, Cout)
    out = _output((B, Cout, H, W), input)
    shift_add(torch.bmm(mid.view(2, B * H * W, Mp), w2), taps2, out.unsqueeze(0), bias2, H, W)
    return out


def _tap_blocks(weight, dilation, H, W):
    """{(dy, dx): (O, C) weight} of a 'same' convolution (odd kernel), the taps that meet an H x W map
    only: never empty, as the centre tap (0, 0) meets every pixel."""
    (kH, kW), (dh, dw) = weight.shape[2:], dilation
    blocks = {}
    for i in range(kH):
        for j in range(kW):
            dy, dx = i * dh - dh * (kH - 1) // 2, j * dw - dw * (kW - 1) // 2
            if abs(dy) < H and abs(dx) < W:  # else it lands in the zero padding for every pixel
                blocks[dy, dx] = weight[:, :, i, j]
    return blocks


#: Weights packed for one of the GEMMs below: w_cat (C, T * O), the tap table (E, T, 4), the
#: pass's bias (E, O) or None, and the map size (H, W) the taps were chosen for.
Packed = collections.namedtuple("Packed", "w_cat taps bias hw")


def pack_sum(weights, dilations, bias, hw):
    """``conv_sum``'s packing (several small kernels and a host-to-device copy: a layer keeps it)."""
    H, W = hw
    merged = {}  # taps of equal offset add up
    for w, d in zip(weights, dilations):
        for offset, block in _tap_blocks(w, tuple(d), H, W).items():
            merged[offset] = merged[offset] + block if offset in merged else block
    O = weights[0].shape[0]
    bias = None if bias is None else bias.to(_sum_dtype(bias.dtype)).view(1, O)
    offsets, Op = list(merged), _aligned(O)
    w_cat = F.pad(torch.stack([merged[s].t() for s in offsets], 1), (0, Op - O)).reshape(weights[0].shape[1], -1)
    taps = _tap_table((tuple((0, dy, dx, t * Op) for t, (dy, dx) in enumerate(offsets)),), w_cat.device)
    return Packed(w_cat, taps, bias, (H, W))


def conv_sum(input, weights, dilations, bias=None, packed=None):
    """sum_i conv2d(input, weights[i], 'same' padding, dilation dilations[i]) + bias, stride 1:
    DeepLab v2's ASPP (Chen et al., TPAMI 2017). One GEMM over C for every tap that can meet the
    map, taps of equal offset merged (their weights summed), then one pass. ``packed``: the result
    of ``pack_sum`` for these arguments, if the caller kept it."""
    B, C, H, W = input.shape
    O = weights[0].shape[0]
    if packed is None or packed.hw != (H, W):
        packed = pack_sum(weights, dilations, bias, (H, W))
    out = _output((B, O, H, W), input)
    shift_add(_gemm(input, packed.w_cat), packed.taps, out.unsqueeze(0), packed.bias, H, W)
    return out


def pack_branches(weights, dilations, scales, shifts, hw):
    """``parallel_conv_bn_relu``'s packing (each branch's scale folded into its columns)."""
    H, W = hw
    O = weights[0].shape[0]
    Op = _aligned(O)
    per_branch = [_tap_blocks(w * s.view(-1, 1, 1, 1), tuple(d), H, W) for w, d, s in zip(weights, dilations, scales)]
    T = max(len(b) for b in per_branch)
    columns, rows = [], []
    for blocks in per_branch:
        row = []
        for dy, dx in blocks:
            row.append((0, dy, dx, len(columns) * Op))
            columns.append(blocks[dy, dx].t())
        # Unused rows of a shorter branch: an offset past the map, never read.
        rows.append(tuple(row + [(0, H, 0, 0)] * (T - len(row))))
    w_cat = F.pad(torch.stack(columns, 1), (0, Op - O)).reshape(weights[0].shape[1], -1)
    bias = torch.stack([s.to(_sum_dtype(s.dtype)) for s in shifts])
    return Packed(w_cat, _tap_table(tuple(rows), w_cat.device), bias, (H, W))


def parallel_conv_bn_relu(input, weights, dilations, scales, shifts, packed=None):
    """DeepLab v3's ASPP branches (Chen et al., 2017): relu(scale_i * conv_i(input) + shift_i) for
    'same' convolutions of one input (a 1x1 and 3x3s at several rates), concatenated along the
    channels: (B, n * O, H, W), channels_last. One GEMM over C for all branches' taps that meet the
    map (each branch's scale folded into its columns), then one pass writing each branch's channels
    of the concatenation with its shift and ReLU. ``packed``: ``pack_branches``' result, if kept."""
    B, C, H, W = input.shape
    O, n = weights[0].shape[0], len(weights)
    if packed is None or packed.hw != (H, W):
        packed = pack_branches(weights, dilations, scales, shifts, (H, W))
    out = torch.empty((B, H, W, n, O), dtype=input.dtype, device=input.device)
    shift_add(_gemm(input, packed.w_cat), packed.taps, out.permute(3, 0, 4, 1, 2), packed.bias, H, W, relu=True)
    return out.view(B, H, W, n * O).permute(0, 3, 1, 2)
