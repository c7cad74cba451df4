// float16 / bfloat16 <-> float32 conversions for the CPU epilogues (atrous.cpp, unpool_conv.cpp).
//
// c10's Half and BFloat16 convert through per-element helpers that the compiler neither vectorises
// nor, in a build for the baseline ISA, maps to F16C: atrous_conv2d's float16 epilogue took 3.3 ms
// on 2x256x65x65 that way, eager's three ATen passes 0.24 ms. Inside FASTSEG_TARGET_F16C code,
// HalfBits converts through _Float16 (vcvtph2ps / vcvtps2ph) and BFloat16Bits through the bits (the
// compiler vectorises those), both rounding to nearest even as c10 does (bfloat16: NaN to 0x7FC0).
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "common.h"

#if FASTSEG_HAVE_AVX2_CLONE
#include <immintrin.h>
#endif

namespace fastseg {

// Any scalar type through c10's own conversions (the baseline clones, float32 and float64).
template <typename scalar_t>
struct Convert {
  using acc_t = at::opmath_type<scalar_t>;
  static FASTSEG_ALWAYS_INLINE acc_t load(scalar_t v) { return acc_t(v); }
  static FASTSEG_ALWAYS_INLINE scalar_t store(acc_t v) { return scalar_t(v); }
};

#if FASTSEG_HAVE_AVX2_CLONE
#define FASTSEG_TARGET_F16C __attribute__((target("avx2,fma,f16c")))

// Whether the F16C clones may run (FASTSEG_CPU_ISA=base turns them off with the AVX2 ones).
inline bool cpu_has_f16c() {
  static const bool f16c = __builtin_cpu_supports("f16c");
  return cpu_has_avx2() && f16c;
}

struct HalfBits {
  static FASTSEG_ALWAYS_INLINE float load(at::Half v) {
    _Float16 h;
    std::memcpy(&h, &v.x, sizeof(h));
    return float(h);
  }
  static FASTSEG_ALWAYS_INLINE at::Half store(float v) {
    const _Float16 h = static_cast<_Float16>(v);
    uint16_t bits;
    std::memcpy(&bits, &h, sizeof(bits));
    return at::Half(bits, at::Half::from_bits());
  }
};

struct BFloat16Bits {
  static FASTSEG_ALWAYS_INLINE float load(at::BFloat16 v) {
    const uint32_t bits = uint32_t(v.x) << 16;
    float f;
    std::memcpy(&f, &bits, sizeof(f));
    return f;
  }
  static FASTSEG_ALWAYS_INLINE at::BFloat16 store(float v) {
    uint32_t bits;
    std::memcpy(&bits, &v, sizeof(bits));
    const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
    return at::BFloat16(uint16_t(v != v ? 0x7FC0u : rounded), at::BFloat16::from_bits());
  }
};

// The F16C conversion of each half type.
template <typename scalar_t>
using HalfConvert = std::conditional_t<std::is_same_v<scalar_t, at::Half>, HalfBits, BFloat16Bits>;

// 8 float16 values as floats (GCC 12 keeps _Float16 conversions scalar in its own loops).
FASTSEG_TARGET_F16C FASTSEG_ALWAYS_INLINE __m256 load_half8(const at::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
#endif

template <typename scalar_t>
constexpr bool kIsHalfType = std::is_same_v<scalar_t, at::Half> || std::is_same_v<scalar_t, at::BFloat16>;

}  // namespace fastseg
