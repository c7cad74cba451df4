// Max-unpooling: the geometry shared by the CPU and CUDA kernels.
//
// Both memory formats are handled as `slabs` independent slabs of `channels` interleaved
// channels: NCHW is B*C slabs of one channel, NHWC (channels_last) is B slabs of C channels. A
// pooled slab is H x W x channels, an output slab Ho x Wo x channels, and an index is a flat
// position in one channel's Ho x Wo output plane.
#pragma once

#include <algorithm>

#include "common.h"

namespace fastseg {

struct UnpoolGeometry {
  int64_t slabs, channels;
  int64_t H, W, Ho, Wo;
  int64_t kH, kW, sH, sW, pH, pW;

  // Pooled rows (or columns) whose window covers output row (column) o: [first, last], possibly
  // empty. A max_pool2d window of pooled row p spans output rows [p*s - pad, p*s - pad + k - 1].
  FASTSEG_HOST_DEVICE static void covering(
      int64_t o, int64_t k, int64_t s, int64_t pad, int64_t n, int64_t& first, int64_t& last) {
    first = div_ceil(o + pad - k + 1, s);
    first = first < 0 ? 0 : first;
    last = div_floor(o + pad, s);
    last = last > n - 1 ? n - 1 : last;
  }
};

// Result of scanning indices, ordered so that the worst status of a group is its maximum.
enum UnpoolStatus : uint8_t {
  kInWindow = 0,    // every index lies in its own pooling window: the single-pass gather applies
  kOutOfWindow = 1, // some index lies elsewhere in its plane: scatter, later entries winning
  kOutOfRange = 2,  // some index lies outside its plane: an error
};

#if !defined(__CUDACC__)
// Scans pooled rows [ph_begin, ph_end) of one slab's indices (csrc/cpu/unpool.cpp): kOutOfRange,
// with one offending value in bad_value, if an index lies outside the plane; else kOutOfWindow if
// one lies outside its window's rows; else kInWindow. Columns are not checked.
UnpoolStatus scan_pooled_rows(const int64_t* idx, const UnpoolGeometry& g, int64_t ph_begin, int64_t ph_end,
                              int64_t& bad_value);

// Scans every slab, rows split across threads: the worst status of all (kOutOfRange with one
// offending value in bad_value), and each slab's own in per_slab[s] where per_slab is given.
UnpoolStatus scan_slabs(const int64_t* idx, const UnpoolGeometry& g, uint8_t* per_slab, int64_t& bad_value);
#endif

inline UnpoolGeometry unpool_geometry(
    const at::Tensor& input, at::IntArrayRef kernel_size, at::IntArrayRef stride,
    at::IntArrayRef padding, int64_t Ho, int64_t Wo, bool channels_last) {
  const int64_t B = input.size(0), C = input.size(1);
  UnpoolGeometry g;
  g.slabs = channels_last ? B : B * C;
  g.channels = channels_last ? C : 1;
  g.H = input.size(2);
  g.W = input.size(3);
  g.Ho = Ho;
  g.Wo = Wo;
  g.kH = kernel_size[0];
  g.kW = kernel_size[1];
  g.sH = stride[0];
  g.sW = stride[1];
  g.pH = padding[0];
  g.pW = padding[1];
  return g;
}

// Argument checks shared by every backend's entry point. Python callers were already checked with
// friendlier messages (fastseg/ops/unpool.py); these guard direct calls of torch.ops.fastseg.*.
inline void check_max_unpool2d_args(
    const at::Tensor& input, const at::Tensor& indices, at::IntArrayRef kernel_size,
    at::IntArrayRef stride, at::IntArrayRef padding, int64_t Ho, int64_t Wo) {
  TORCH_CHECK_VALUE(input.dim() == 4, "max_unpool2d: input must be 4-D (B, C, H, W), got ",
                    input.dim(), "-D");
  TORCH_CHECK_VALUE(indices.sizes() == input.sizes(), "max_unpool2d: indices has shape ",
                    indices.sizes(), " but input has shape ", input.sizes());
  TORCH_CHECK_TYPE(indices.scalar_type() == at::kLong,
                   "max_unpool2d: indices must be int64, got ", indices.scalar_type());
  TORCH_CHECK_TYPE(at::isFloatingType(input.scalar_type()),
                   "max_unpool2d: input must be a floating-point tensor, got ",
                   input.scalar_type());
  TORCH_CHECK_VALUE(input.device() == indices.device(), "max_unpool2d: input is on ",
                    input.device(), " but indices is on ", indices.device());
  TORCH_CHECK_VALUE(kernel_size.size() == 2 && stride.size() == 2 && padding.size() == 2,
                    "max_unpool2d: kernel_size, stride and padding must have 2 elements each");
  TORCH_CHECK_VALUE(kernel_size[0] > 0 && kernel_size[1] > 0 && stride[0] > 0 && stride[1] > 0,
                    "max_unpool2d: kernel_size and stride must be positive, got ", kernel_size,
                    " and ", stride);
  TORCH_CHECK_VALUE(padding[0] >= 0 && padding[1] >= 0,
                    "max_unpool2d: padding must be non-negative, got ", padding);
  TORCH_CHECK_VALUE(Ho > 0 && Wo > 0, "max_unpool2d: output_size must be positive, got (", Ho,
                    ", ", Wo, ")");
}

inline void check_max_unpool2d_backward_args(const at::Tensor& grad_output,
                                             const at::Tensor& indices) {
  TORCH_CHECK_VALUE(indices.dim() == 4 && grad_output.dim() == 4,
                    "max_unpool2d_backward: grad_output and indices must be 4-D, got ",
                    grad_output.dim(), "-D and ", indices.dim(), "-D");
  TORCH_CHECK_VALUE(grad_output.size(0) == indices.size(0) && grad_output.size(1) == indices.size(1),
                    "max_unpool2d_backward: grad_output has shape ", grad_output.sizes(),
                    " but indices has shape ", indices.sizes());
  TORCH_CHECK_TYPE(indices.scalar_type() == at::kLong,
                   "max_unpool2d_backward: indices must be int64, got ", indices.scalar_type());
  TORCH_CHECK_VALUE(grad_output.device() == indices.device(),
                    "max_unpool2d_backward: grad_output is on ", grad_output.device(),
                    " but indices is on ", indices.device());
}

// Unpooling only moves bits: kernels are instantiated per element width (an unsigned integer type
// of that size), not per dtype.
template <typename F>
void dispatch_by_element_size(int64_t element_size, F&& f) {
  switch (element_size) {
    case 2: f(uint16_t{}); break;
    case 4: f(uint32_t{}); break;
    case 8: f(uint64_t{}); break;
    default: TORCH_CHECK(false, "max_unpool2d: unsupported element size ", element_size);
  }
}

[[noreturn]] inline void fail_index_out_of_range(int64_t value, int64_t Ho, int64_t Wo) {
  TORCH_CHECK_INDEX(false, "max_unpool2d: indices contains ", value,
                    ", outside the output plane of ", Ho, "x", Wo, " (valid: 0 to ",
                    Ho * Wo - 1, ")");
  __builtin_unreachable();
}

}  // namespace fastseg
