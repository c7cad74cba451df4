// Small pieces shared by every op and backend.
#pragma once

#include <ATen/ATen.h>

#ifdef __CUDACC__
#define FASTSEG_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FASTSEG_HOST_DEVICE inline
#endif

namespace fastseg {

// The memory format an op's output takes: channels_last when the input is channels_last
// contiguous and not also NCHW contiguous (the two coincide when C == 1 or H == W == 1); NCHW
// otherwise. fastseg/_layout.py applies the same rule to fake tensors, so keep them in step.
inline at::MemoryFormat output_memory_format(const at::Tensor& t) {
  if (t.dim() == 4 && !t.is_contiguous() && t.is_contiguous(at::MemoryFormat::ChannelsLast)) {
    return at::MemoryFormat::ChannelsLast;
  }
  return at::MemoryFormat::Contiguous;
}

// floor(a / b) and ceil(a / b) for b > 0 and any sign of a (C++ division truncates toward zero).
FASTSEG_HOST_DEVICE int64_t div_floor(int64_t a, int64_t b) {
  return a >= 0 ? a / b : -((-a + b - 1) / b);
}
FASTSEG_HOST_DEVICE int64_t div_ceil(int64_t a, int64_t b) {
  return a >= 0 ? (a + b - 1) / b : -((-a) / b);
}

}  // namespace fastseg
