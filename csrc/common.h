// Small pieces shared by every op and backend.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdlib>

#if defined(__GNUC__)
#define FASTSEG_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define FASTSEG_ALWAYS_INLINE inline
#endif

// CPU hot loops are compiled twice, for the baseline ISA and for AVX2+FMA (FASTSEG_TARGET_AVX2 on an
// entry point that inlines an always-inline body), and picked at run time by cpu_has_avx2(): the
// extension is built without -march=native so that one wheel runs everywhere.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__CUDACC__)
#define FASTSEG_HAVE_AVX2_CLONE 1
#define FASTSEG_TARGET_AVX2 __attribute__((target("avx2,fma")))
#else
#define FASTSEG_HAVE_AVX2_CLONE 0
#endif

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

#if !defined(__CUDACC__)
// An integer setting from the environment, at least `minimum`, or `fallback` when unset.
inline int64_t env_setting(const char* name, int64_t fallback, int64_t minimum) {
  const char* s = std::getenv(name);
  return s ? std::max<int64_t>(minimum, std::atoll(s)) : fallback;
}

inline bool cpu_has_avx2() {
#if FASTSEG_HAVE_AVX2_CLONE
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
#else
  return false;
#endif
}
#endif

}  // namespace fastseg
