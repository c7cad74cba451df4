"""Atrous convolution with a fused epilogue in Triton: the ``triton`` backend of
``fastseg.atrous_conv2d`` (Yu & Koltun 2016; Chen et al., DeepLab v2 2017 and v3 2017).

Implicit GEMM: the output pixels (B * Ho * Wo) are the GEMM's M, the output channels of a group its
N and (tap, input channel) its K. No im2col buffer is built: each K step loads a (BLOCK_M, BLOCK_K)
tile straight from the NHWC input at the tap's dilated offset, ih = oh * sH - pH + i * dH, masking
the pixels whose tap lands in the zero padding, and multiplies it on tensor cores (tl.dot, fp32
accumulation) with a (BLOCK_K, BLOCK_N) tile of the weights packed as (kH, kW, C / groups, O).
The epilogue (scale, shift, residual, ReLU) is applied to the accumulator before the one store,
into the output in the input's memory format.

With UNPOOL the input is a max-unpooled map that is never stored (``fastseg.unpool_conv2d``, the
launcher in kernels/unpool_conv.py): x_ptr holds the pooled values (B, Hp, Wp, C) NHWC and idx_ptr
their indices, and the loader rebuilds the unpooled pixel (ih, iw) from the one pooled cell whose
non-overlapping window holds it, (ph, pw) = ((ih + upH) // usH, (iw + upW) // usW): its value where
its index names (ih, iw), zero elsewhere.
"""
import os

import torch
import triton
import triton.language as tl

from .._layout import output_memory_format

_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
if _INTERPRETED:
    # The interpreter runs every autotune candidate: one small tile keeps the CPU tests quick. It
    # also feeds bfloat16 tiles to tl.dot as raw 16-bit integers, so they are widened first (UPCAST).
    _CONFIGS = [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16}, num_warps=1)]
else:
    _CONFIGS = [
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 32}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=8, num_stages=2),
        triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 16}, num_warps=2, num_stages=2),
    ]


def _prune_configs(configs, named_args, **kwargs):
    # float64 has no tensor-core dot: the kernel forms a (BLOCK_M, BLOCK_K, BLOCK_N) product in
    # registers, so only the smallest tile is sane (the large ones take 10-16 s each to compile).
    if kwargs.get("IS_FP64", named_args.get("IS_FP64")):
        return [min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_K"])]
    return configs


@triton.autotune(configs=_CONFIGS, key=["M", "Cg", "Og", "kH", "kW", "IS_FP64", "UNPOOL", "FP32_DOT"],
                 prune_configs_by={"early_config_prune": _prune_configs})
@triton.jit
def _atrous_conv_kernel(
    x_ptr, w_ptr, out_ptr, scale_ptr, shift_ptr, res_ptr,
    M, H, W, C, Ho, Wo, O, Cg, Og, kH, kW, sH, sW, pH, pW, dH, dW,
    out_sb, out_so, out_sp,
    idx_ptr, Hp, Wp, usH, usW, upH, upW,
    HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, HAS_RES: tl.constexpr, RELU: tl.constexpr,
    IS_FP64: tl.constexpr, UPCAST: tl.constexpr, UNPOOL: tl.constexpr, FP32_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    g = tl.program_id(2)
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # output channel within the group
    m_ok = offs_m < M
    n_ok = offs_n < Og
    HWo = Ho * Wo
    b = offs_m // HWo
    p = offs_m % HWo
    oh = p // Wo
    ow = p % Wo
    o = g * Og + offs_n
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float64 if IS_FP64 else tl.float32)
    for tap in range(0, kH * kW):
        i = tap // kW
        j = tap % kW
        ih = oh * sH - pH + i * dH
        iw = ow * sW - pW + j * dW
        inside = m_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        if UNPOOL:
            ph = (ih + upH) // usH
            pw = (iw + upW) // usW
            inside = inside & (ph < Hp) & (pw < Wp)  # rows/cols past the last window stay zero
            row = ((b * Hp + ph) * Wp + pw) * C + g * Cg
            target = ih * W + iw
        else:
            row = ((b * H + ih) * W + iw) * C + g * Cg
        for k0 in range(0, Cg, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_ok = offs_k < Cg
            a = tl.load(x_ptr + row[:, None] + offs_k[None, :], mask=inside[:, None] & k_ok[None, :], other=0.0)
            if UNPOOL:
                at = tl.load(idx_ptr + row[:, None] + offs_k[None, :], mask=inside[:, None] & k_ok[None, :], other=-1)
                a = tl.where(at == target[:, None], a, tl.zeros_like(a))
            wk = tl.load(
                w_ptr + (tap * Cg + offs_k)[:, None].to(tl.int64) * O + o[None, :],
                mask=k_ok[:, None] & n_ok[None, :], other=0.0,
            )
            if IS_FP64:
                acc += tl.sum(a[:, :, None] * wk[None, :, :], axis=1)
            elif UPCAST:
                acc = tl.dot(a.to(tl.float32), wk.to(tl.float32), acc)
            else:  # FP32_DOT only matters for float32 tiles: "tf32" or "tf32x3" (see fp32_dot())
                acc = tl.dot(a, wk, acc, input_precision=FP32_DOT)
    if HAS_SCALE:
        acc = acc * tl.load(scale_ptr + o, mask=n_ok, other=0.0).to(acc.dtype)[None, :]
    if HAS_SHIFT:
        acc = acc + tl.load(shift_ptr + o, mask=n_ok, other=0.0).to(acc.dtype)[None, :]
    out_off = (b * out_sb + p * out_sp)[:, None] + (o.to(tl.int64) * out_so)[None, :]
    mask = m_ok[:, None] & n_ok[None, :]
    if HAS_RES:
        acc = acc + tl.load(res_ptr + out_off, mask=mask, other=0.0).to(acc.dtype)
    if RELU:
        acc = tl.where(acc < 0.0, 0.0, acc)  # as torch.relu: NaN stays NaN
    tl.store(out_ptr + out_off, acc.to(out_ptr.dtype.element_ty), mask=mask)


def fp32_dot():
    """How tl.dot multiplies float32 tiles, following torch's switch for float32 convolutions as
    F.conv2d does: TF32 (10-bit mantissa; measured on an H200, 2026-11-26: relative error
    2.9e-4..4.4e-4 on DeepLab shapes, ~1e-3 for gcn_conv2d's two chained convolutions, and the
    tests' tiny float32 cases failed their 5e-4 bound) while torch.backends.cudnn.allow_tf32 is on
    (PyTorch's default), else "tf32x3" (three TF32 products per product: about float32 accuracy,
    still on tensor cores)."""
    return "tf32" if torch.backends.cudnn.allow_tf32 else "tf32x3"


def output_strides(fmt, O, Ho, Wo):
    """(batch, channel, pixel) element strides of a (B, O, Ho, Wo) output in memory format fmt."""
    if fmt == torch.channels_last:
        return O * Ho * Wo, 1, O
    return O * Ho * Wo, Ho * Wo, 1


def atrous_conv2d(input, weight, scale, shift, residual, stride, padding, dilation, groups, relu, memory_format=None):
    """Launcher: input (B, C, H, W), weight (O, C / groups, kH, kW) -> (B, O, Ho, Wo) in input's
    memory format (or ``memory_format``); scale/shift (O) or None, residual (B, O, Ho, Wo) or None."""
    fmt = output_memory_format(input) if memory_format is None else memory_format
    B, C, H, W = input.shape
    O, Cg, kH, kW = weight.shape
    (sH, sW), (pH, pW), (dH, dW) = stride, padding, dilation
    Ho = (H + 2 * pH - dH * (kH - 1) - 1) // sH + 1
    Wo = (W + 2 * pW - dW * (kW - 1) - 1) // sW + 1
    out = torch.empty((B, O, Ho, Wo), dtype=input.dtype, device=input.device, memory_format=fmt)
    M = B * Ho * Wo
    if M == 0:
        return out
    x = input.contiguous(memory_format=torch.channels_last)  # NHWC: a pixel's channels are a K row
    w = weight.permute(2, 3, 1, 0).contiguous()  # (kH, kW, Cg, O)
    res = residual.contiguous(memory_format=fmt) if residual is not None else out
    # The kernel reads scale / shift at unit stride (a bias slice or an expanded scale is not).
    scale = scale.contiguous() if scale is not None else None
    shift = shift.contiguous() if shift is not None else None
    out_sb, out_so, out_sp = output_strides(fmt, O, Ho, Wo)
    Og = O // groups
    dummy = out
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(Og, meta["BLOCK_N"]), groups)
    _atrous_conv_kernel[grid](
        x, w, out, scale if scale is not None else dummy, shift if shift is not None else dummy, res,
        M, H, W, C, Ho, Wo, O, Cg, Og, kH, kW, sH, sW, pH, pW, dH, dW, out_sb, out_so, out_sp,
        dummy, 1, 1, 1, 1, 0, 0,
        HAS_SCALE=scale is not None, HAS_SHIFT=shift is not None, HAS_RES=residual is not None, RELU=relu,
        IS_FP64=input.dtype == torch.float64, UPCAST=_INTERPRETED and input.dtype == torch.bfloat16, UNPOOL=False,
        FP32_DOT=fp32_dot(),
    )
    return out
