// Small pieces shared by every op and backend.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdlib>
#include <string>

#if defined(__GNUC__)
#define FASTSEG_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define FASTSEG_ALWAYS_INLINE inline
#endif

// CPU hot loops are compiled more than once, for the baseline ISA and for AVX2+FMA
// (FASTSEG_TARGET_AVX2 on an entry point that inlines an always-inline body; dense_crf's, unpool's
// and gcn's FFTs also for AVX-512, FASTSEG_TARGET_AVX512 / _WIDE; atrous's GEMM has AVX-512
// intrinsics), and picked at run time by cpu_isa(): the extension is built
// without -march=native so that one wheel runs everywhere.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__CUDACC__)
#define FASTSEG_HAVE_AVX2_CLONE 1
#define FASTSEG_TARGET_AVX2 __attribute__((target("avx2,fma")))
// AVX-512VL for its 32 vector registers; the code's vectors stay 256 bits wide, and so do the
// compiler's own loops (prefer-vector-width=256: 512-bit instructions lower the clock of some Intel
// server parts; level with 512-bit loops on this project's Zen 4 VM).
// FASTSEG_TARGET_AVX512_WIDE: the same with 512-bit loops, for code whose loops run 16 floats at a
// time: with gcn's batched FFTs compiled so, whole gcn_conv2d calls ran 1.05-1.21x faster than
// with their AVX2 clone on a 2-vCPU AVX-512 Xeon (2026-11-29).
#if defined(__clang__)  // Clang's target attribute has no prefer-vector-width
#define FASTSEG_TARGET_AVX512 __attribute__((target("avx2,fma,avx512f,avx512vl,avx512bw,avx512dq")))
#define FASTSEG_TARGET_AVX512_WIDE FASTSEG_TARGET_AVX512
#else
#define FASTSEG_TARGET_AVX512 \
  __attribute__((target("avx2,fma,avx512f,avx512vl,avx512bw,avx512dq,prefer-vector-width=256")))
#define FASTSEG_TARGET_AVX512_WIDE \
  __attribute__((target("avx2,fma,avx512f,avx512vl,avx512bw,avx512dq,prefer-vector-width=512")))
#endif
#else
#define FASTSEG_HAVE_AVX2_CLONE 0
#endif

#ifdef __CUDACC__
#define FASTSEG_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FASTSEG_HOST_DEVICE inline
#endif

namespace fastseg {

// The memory format an op's output takes: eager PyTorch's (suggest_memory_format), channels_last
// when the input's strides are ordered as NHWC (a channel slice of a channels_last tensor too),
// NCHW otherwise. fastseg/_layout.py applies the same rule to fake tensors, so keep them in step.
inline at::MemoryFormat output_memory_format(const at::Tensor& t) {
  return t.dim() == 4 && t.suggest_memory_format() == at::MemoryFormat::ChannelsLast ? at::MemoryFormat::ChannelsLast
                                                                                      : at::MemoryFormat::Contiguous;
}

// ReLU exactly as torch.relu: NaN stays NaN (a comparison with NaN is false) and -0 stays -0;
// `v > 0 ? v : 0` (or max(v, 0)) would turn a NaN into 0 and hide it.
template <typename T>
FASTSEG_HOST_DEVICE T relu_value(T v) {
  return v < T(0) ? T(0) : v;
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

// The widest clone this CPU runs, capped by the environment variable FASTSEG_CPU_ISA ("base",
// "avx2" or "avx512", read once), so that tests can run every clone on one machine.
enum class CpuIsa { kBase = 0, kAvx2 = 1, kAvx512 = 2 };
inline CpuIsa cpu_isa() {
  static const CpuIsa isa = [] {
    CpuIsa best = CpuIsa::kBase;
#if FASTSEG_HAVE_AVX2_CLONE
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) best = CpuIsa::kAvx2;
    if (best == CpuIsa::kAvx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq")) {
      best = CpuIsa::kAvx512;
    }
#endif
    const char* cap = std::getenv("FASTSEG_CPU_ISA");
    if (cap == nullptr || cap[0] == '\0') return best;
    const std::string name(cap);
    TORCH_CHECK_VALUE(name == "base" || name == "avx2" || name == "avx512",
                      "FASTSEG_CPU_ISA must be base, avx2 or avx512, got '", name, "'");
    const CpuIsa limit = name == "base" ? CpuIsa::kBase : name == "avx2" ? CpuIsa::kAvx2 : CpuIsa::kAvx512;
    return std::min(best, limit);
  }();
  return isa;
}
inline bool cpu_has_avx2() { return cpu_isa() >= CpuIsa::kAvx2; }
inline bool cpu_has_avx512() { return cpu_isa() >= CpuIsa::kAvx512; }
#endif

}  // namespace fastseg
