"""Max-unpooling fused into the next convolution in Triton: the ``triton`` backend of
``fastseg.unpool_conv2d`` (SegNet's decoder, Badrinarayanan et al., TPAMI 2017).

No second convolution engine: the implicit-GEMM kernel of kernels/atrous.py runs with UNPOOL, its
tile loader rebuilding each unpooled pixel from the pooled values and indices as it loads them, so
the unpooled map (four times the pooled one, 75% zeros) is never written or read. That needs each
unpooled pixel to lie in at most one pooling window (kernel_size <= stride, SegNet's 2x2/2) and
every index in its own window, which one scan of the indices checks (the scan of kernels/unpool.py);
other poolings and indices take max-unpooling followed by the atrous kernel.
"""
import torch
import triton

from .._layout import output_memory_format
from ..ops._reference.unpool import raise_index_out_of_range
from . import atrous, unpool


def unpool_conv2d(values, indices, weight, scale, shift, residual, kernel_size, stride, pool_padding, output_size,
                  padding, dilation, relu):
    """Launcher: values/indices (B, C, h, w), weight (O, C, kH, kW) -> (B, O, Ho, Wo) in values'
    memory format, Ho = H + 2 pH - dH (kH - 1) for the unpooled H x W = output_size."""
    fmt = output_memory_format(values)
    B, C, h, w = values.shape
    O, _, kH, kW = weight.shape
    H, W = output_size
    (pH, pW), (dH, dW) = padding, dilation
    Ho, Wo = H + 2 * pH - dH * (kH - 1), W + 2 * pW - dW * (kW - 1)
    out = torch.empty((B, O, Ho, Wo), dtype=values.dtype, device=values.device, memory_format=fmt)
    M = B * Ho * Wo
    if M == 0:
        return out
    x = values.contiguous(memory_format=torch.channels_last)  # NHWC: a pooled pixel's channels are a K row
    idx = indices.contiguous(memory_format=torch.channels_last)
    (pkH, pkW), (psH, psW), (ppH, ppW) = kernel_size, stride, pool_padding
    status = unpool.IN_WINDOW
    if x.numel():
        flag = torch.zeros(1, dtype=torch.int32, device=x.device)
        n = idx.numel()
        unpool._scan_kernel[(triton.cdiv(n, unpool.BLOCK),)](
            idx, flag, n, h, w, H, W, C, pkH, pkW, psH, psW, ppH, ppW, BLOCK=unpool.BLOCK,
            IDX64=unpool.needs_int64(idx),
        )
        status = int(flag.item())  # the one host sync: decides the path and reports bad indices
    if status == unpool.OUT_OF_RANGE:
        raise_index_out_of_range(idx, H, W)
    if status == unpool.OUT_OF_WINDOW or pkH > psH or pkW > psW or x.numel() == 0:
        unpooled = unpool.max_unpool2d(values, indices, kernel_size, stride, pool_padding, output_size)
        return atrous.atrous_conv2d(unpooled, weight, scale, shift, residual, [1, 1], padding, dilation, 1, relu)
    wk = weight.permute(2, 3, 1, 0).contiguous()  # (kH, kW, C, O)
    res = residual.contiguous(memory_format=fmt) if residual is not None else out
    scale = scale.contiguous() if scale is not None else None  # read at unit stride
    shift = shift.contiguous() if shift is not None else None
    out_sb, out_so, out_sp = atrous.output_strides(fmt, O, Ho, Wo)
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(O, meta["BLOCK_N"]), 1)
    atrous._atrous_conv_kernel[grid](
        x, wk, out, scale if scale is not None else out, shift if shift is not None else out, res,
        M, H, W, C, Ho, Wo, O, C, O, kH, kW, 1, 1, pH, pW, dH, dW, out_sb, out_so, out_sp,
        idx, h, w, psH, psW, ppH, ppW,
        HAS_SCALE=scale is not None, HAS_SHIFT=shift is not None, HAS_RES=residual is not None, RELU=relu,
        IS_FP64=values.dtype == torch.float64, UPCAST=atrous._INTERPRETED and values.dtype == torch.bfloat16,
        UNPOOL=True, FP32_DOT=atrous.fp32_dot(),
    )
    return out
