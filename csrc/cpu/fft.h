// Small batched FFTs for the CPU kernels: many real sequences of one length n = 2^a 3^b (n even),
// transformed 16 at a time with every arithmetic operation on vectors of 8 floats, so the work is
// SIMD whatever n is and wherever the sequences lie in memory (the caller gathers them).
//
// gcn.cpp uses it to take the Cin-channel input of a Global Convolutional Network block to the
// frequency domain along one image axis, writing the spectrum straight in the layout its GEMMs read
// (bins outermost); torch.fft on a non-last axis pads, transposes and copies several times over.
//
// The complex transform is the self-sorting (Stockham) decimation-in-frequency form with radix 4, 3
// and 2 passes between two buffers: for a pass of radix r on sub-transforms of length len = r m,
// element p + j m of every sub-transform is combined over j, twiddled by w_len^(p u), and written to
// slot r p + u, so the output comes out in natural order without a bit-reversal pass. Two real
// sequences a and b ride in one complex transform z = a + i b and are separated afterwards with
// A[k] = (Z[k] + conj Z[n-k]) / 2, B[k] = (Z[k] - conj Z[n-k]) / (2 i).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <utility>
#include <vector>

namespace fastseg {
namespace fft {

typedef float F8 __attribute__((vector_size(32)));

// True when n is even and has no prime factor above 3 (the lengths the passes handle).
inline bool supported_length(int64_t n) {
  if (n < 2 || n % 2) return false;
  while (n % 2 == 0) n /= 2;
  while (n % 3 == 0) n /= 3;
  return n == 1;
}

// The smallest supported length >= n.
inline int64_t good_length(int64_t n) {
  int64_t m = std::max<int64_t>(n, 2);
  while (!supported_length(m)) ++m;
  return m;
}

// Radices and twiddles of the passes for one length.
struct Plan {
  int64_t n = 0;
  std::vector<int> radices;            // pass order
  std::vector<float> twiddles;         // per pass: for p < m, u = 1 .. r-1: (cos, sin) of -2 pi p u / len
  std::vector<int64_t> twiddle_start;  // offset of each pass's twiddles

  explicit Plan(int64_t length) : n(length) {
    int64_t rest = n;
    while (rest % 4 == 0) radices.push_back(4), rest /= 4;
    while (rest % 3 == 0) radices.push_back(3), rest /= 3;
    while (rest % 2 == 0) radices.push_back(2), rest /= 2;
    int64_t len = n;
    for (int r : radices) {
      const int64_t m = len / r;
      twiddle_start.push_back(int64_t(twiddles.size()));
      for (int64_t p = 0; p < m; ++p) {
        for (int u = 1; u < r; ++u) {
          // The angle reduced exactly in integers, then taken in double: float32 twiddles to 1 ulp.
          const double a = -2.0 * M_PI * double((p * u) % len) / double(len);
          twiddles.push_back(float(std::cos(a)));
          twiddles.push_back(float(std::sin(a)));
        }
      }
      len = m;
    }
  }
};

#define FASTSEG_FFT_INLINE inline __attribute__((always_inline))

// A vector of 8 copies of v (a macro: a function returning F8 changes the ABI without AVX).
#define FASTSEG_SPLAT(v) (F8{} + (v))

// One complex transform of length plan.n on 8 lanes: (re, im) in natural order in, out in natural
// order in the buffer returned (either (re, im) or (re2, im2)).
FASTSEG_FFT_INLINE void complex_fft8(const Plan& plan, F8*& re, F8*& im, F8*& re2, F8*& im2) {
  int64_t len = plan.n, s = 1;
  F8 *xr = re, *xi = im, *yr = re2, *yi = im2;
  for (size_t pass = 0; pass < plan.radices.size(); ++pass) {
    const int r = plan.radices[pass];
    const int64_t m = len / r;
    const float* tw = plan.twiddles.data() + plan.twiddle_start[pass];
    for (int64_t p = 0; p < m; ++p, tw += 2 * (r - 1)) {
      if (r == 4) {
        const F8 c1 = FASTSEG_SPLAT(tw[0]), s1 = FASTSEG_SPLAT(tw[1]);
        const F8 c2 = FASTSEG_SPLAT(tw[2]), s2 = FASTSEG_SPLAT(tw[3]);
        const F8 c3 = FASTSEG_SPLAT(tw[4]), s3 = FASTSEG_SPLAT(tw[5]);
        for (int64_t q = 0; q < s; ++q) {
          const int64_t i0 = q + s * p, i1 = i0 + s * m, i2 = i1 + s * m, i3 = i2 + s * m;
          const F8 ar = xr[i0], ai = xi[i0], br = xr[i1], bi = xi[i1];
          const F8 cr = xr[i2], ci = xi[i2], dr = xr[i3], di = xi[i3];
          // y_u = sum_j a_j (-i)^(j u)
          const F8 t0r = ar + cr, t0i = ai + ci, t1r = ar - cr, t1i = ai - ci;
          const F8 t2r = br + dr, t2i = bi + di, t3r = br - dr, t3i = bi - di;
          const F8 y0r = t0r + t2r, y0i = t0i + t2i;
          const F8 y2r = t0r - t2r, y2i = t0i - t2i;
          const F8 y1r = t1r + t3i, y1i = t1i - t3r;  // t1 - i t3
          const F8 y3r = t1r - t3i, y3i = t1i + t3r;  // t1 + i t3
          const int64_t o = q + s * r * p;
          yr[o] = y0r, yi[o] = y0i;
          yr[o + s] = y1r * c1 - y1i * s1, yi[o + s] = y1r * s1 + y1i * c1;
          yr[o + 2 * s] = y2r * c2 - y2i * s2, yi[o + 2 * s] = y2r * s2 + y2i * c2;
          yr[o + 3 * s] = y3r * c3 - y3i * s3, yi[o + 3 * s] = y3r * s3 + y3i * c3;
        }
      } else if (r == 3) {
        const F8 c1 = FASTSEG_SPLAT(tw[0]), s1 = FASTSEG_SPLAT(tw[1]);
        const F8 c2 = FASTSEG_SPLAT(tw[2]), s2 = FASTSEG_SPLAT(tw[3]);
        const F8 h = FASTSEG_SPLAT(0.5f), k = FASTSEG_SPLAT(0.86602540378443864676f);  // sqrt(3) / 2
        for (int64_t q = 0; q < s; ++q) {
          const int64_t i0 = q + s * p, i1 = i0 + s * m, i2 = i1 + s * m;
          const F8 ar = xr[i0], ai = xi[i0], br = xr[i1], bi = xi[i1], cr = xr[i2], ci = xi[i2];
          const F8 sr = br + cr, si = bi + ci, dr = br - cr, di = bi - ci;
          const F8 mr = ar - h * sr, mi = ai - h * si;
          const F8 y1r = mr + k * di, y1i = mi - k * dr;  // m - i (sqrt 3 / 2) d
          const F8 y2r = mr - k * di, y2i = mi + k * dr;  // m + i (sqrt 3 / 2) d
          const int64_t o = q + s * r * p;
          yr[o] = ar + sr, yi[o] = ai + si;
          yr[o + s] = y1r * c1 - y1i * s1, yi[o + s] = y1r * s1 + y1i * c1;
          yr[o + 2 * s] = y2r * c2 - y2i * s2, yi[o + 2 * s] = y2r * s2 + y2i * c2;
        }
      } else {
        const F8 c1 = FASTSEG_SPLAT(tw[0]), s1 = FASTSEG_SPLAT(tw[1]);
        for (int64_t q = 0; q < s; ++q) {
          const int64_t i0 = q + s * p, i1 = i0 + s * m;
          const F8 ar = xr[i0], ai = xi[i0], br = xr[i1], bi = xi[i1];
          const F8 dr = ar - br, di = ai - bi;
          const int64_t o = q + s * r * p;
          yr[o] = ar + br, yi[o] = ai + bi;
          yr[o + s] = dr * c1 - di * s1, yi[o + s] = dr * s1 + di * c1;
        }
      }
    }
    std::swap(xr, yr);
    std::swap(xi, yi);
    len = m;
    s *= r;
  }
  re = xr, im = xi, re2 = yr, im2 = yi;
}

// r[c][j] <- r[j][c]: unpacks, then pair shuffles, then 128-bit halves (each a single AVX instruction).
FASTSEG_FFT_INLINE void transpose8x8(F8* r) {
  typedef int I8 __attribute__((vector_size(32)));
  const I8 unlo = {0, 8, 1, 9, 4, 12, 5, 13}, unhi = {2, 10, 3, 11, 6, 14, 7, 15};
  const I8 pairlo = {0, 1, 8, 9, 4, 5, 12, 13}, pairhi = {2, 3, 10, 11, 6, 7, 14, 15};
  const I8 halflo = {0, 1, 2, 3, 8, 9, 10, 11}, halfhi = {4, 5, 6, 7, 12, 13, 14, 15};
  F8 t[8], u[8];
  for (int k = 0; k < 4; ++k) {
    t[2 * k] = __builtin_shuffle(r[2 * k], r[2 * k + 1], unlo);
    t[2 * k + 1] = __builtin_shuffle(r[2 * k], r[2 * k + 1], unhi);
  }
  // t[0] = 00 10 01 11 | 04 14 05 15, t[1] = 02 12 03 13 | 06 16 07 17, t[2], t[3] the same for rows 2, 3 ...
  for (int k = 0; k < 2; ++k) {
    u[4 * k + 0] = __builtin_shuffle(t[4 * k], t[4 * k + 2], pairlo);      // 00 10 20 30 | 04 14 24 34
    u[4 * k + 1] = __builtin_shuffle(t[4 * k], t[4 * k + 2], pairhi);      // 01 11 21 31 | 05 15 25 35
    u[4 * k + 2] = __builtin_shuffle(t[4 * k + 1], t[4 * k + 3], pairlo);  // 02 ... | 06 ...
    u[4 * k + 3] = __builtin_shuffle(t[4 * k + 1], t[4 * k + 3], pairhi);  // 03 ... | 07 ...
  }
  for (int c = 0; c < 4; ++c) {
    r[c] = __builtin_shuffle(u[c], u[4 + c], halflo);
    r[c + 4] = __builtin_shuffle(u[c], u[4 + c], halfhi);
  }
}

// Where 16 real sequences of length len lie: sequence c's element i at src[c * lane + i * step] (c <
// lanes <= 16), and where their half spectra go: sequence c's bin f (f <= n / 2) at complex slot
// c + f * bin_stride of dst, interleaved (re, im) floats like std::complex<float>.
struct Batch {
  const float* src;
  int64_t step, lane, lanes, len;
  float* dst;
  int64_t bin_stride;
};

// Scratch for one thread: 4 buffers of n vectors (the ping-pong pair of re and im), 32-byte aligned
// by hand (std::vector does not promise more than 16 bytes here).
struct Scratch {
  std::vector<float> raw;
  F8* v;
  explicit Scratch(int64_t n) : raw(size_t(32 * n + 8)) {
    const uintptr_t a = reinterpret_cast<uintptr_t>(raw.data());
    v = reinterpret_cast<F8*>((a + 31) & ~uintptr_t(31));
  }
};

// The half spectra (bins 0 .. n/2, zero-padded to the plan's length) of one batch of real sequences.
FASTSEG_FFT_INLINE void real_fft16(const Plan& plan, const Batch& b, Scratch& scratch) {
  const int64_t n = plan.n, len = b.len;
  F8 *re = scratch.v, *im = re + n, *re2 = im + n, *im2 = re2 + n;
  // Gather: sequences 0-7 into the real parts, 8-15 into the imaginary parts.
  if (b.lane == 1 && b.lanes == 16) {
    for (int64_t i = 0; i < len; ++i) {
      const float* p = b.src + i * b.step;
      F8 a, c;
      __builtin_memcpy(&a, p, sizeof(F8));
      __builtin_memcpy(&c, p + 8, sizeof(F8));
      re[i] = a, im[i] = c;
    }
  } else if (b.step == 1 && b.lanes == 16) {
    // Sequences along rows (b.lane apart): 8 x 8 blocks transposed in registers.
    int64_t i = 0;
    for (; i + 8 <= len; i += 8) {
      for (int half = 0; half < 2; ++half) {
        F8 r[8];
        for (int c = 0; c < 8; ++c) __builtin_memcpy(&r[c], b.src + (half * 8 + c) * b.lane + i, sizeof(F8));
        transpose8x8(r);
        F8* dst = half ? im : re;
        for (int c = 0; c < 8; ++c) dst[i + c] = r[c];
      }
    }
    for (; i < len; ++i) {
      float v[16];
      for (int c = 0; c < 16; ++c) v[c] = b.src[c * b.lane + i];
      __builtin_memcpy(&re[i], v, sizeof(F8));
      __builtin_memcpy(&im[i], v + 8, sizeof(F8));
    }
  } else {
    // Sequence by sequence (each one's elements are usually contiguous), lanes of absent sequences 0.
    float* lanes = reinterpret_cast<float*>(re2);  // n >= len vectors of 16 floats across re2, im2
    for (int64_t c = 0; c < 16; ++c) {
      const float* p = b.src + c * b.lane;
      if (c < b.lanes) {
        for (int64_t i = 0; i < len; ++i) lanes[i * 16 + c] = p[i * b.step];
      } else {
        for (int64_t i = 0; i < len; ++i) lanes[i * 16 + c] = 0.f;
      }
    }
    for (int64_t i = 0; i < len; ++i) {
      __builtin_memcpy(&re[i], lanes + i * 16, sizeof(F8));
      __builtin_memcpy(&im[i], lanes + i * 16 + 8, sizeof(F8));
    }
  }
  for (int64_t i = len; i < n; ++i) re[i] = FASTSEG_SPLAT(0.f), im[i] = FASTSEG_SPLAT(0.f);
  complex_fft8(plan, re, im, re2, im2);
  // Separate the two real transforms and store them interleaved, bin by bin.
  const F8 h = FASTSEG_SPLAT(0.5f);
  for (int64_t f = 0; f <= n / 2; ++f) {
    const int64_t g = f == 0 ? 0 : n - f;
    const F8 zr = re[f], zi = im[f], wr = re[g], wi = im[g];
    const F8 ar = h * (zr + wr), ai = h * (zi - wi);  // first 8 sequences
    const F8 br = h * (zi + wi), bi = h * (wr - zr);  // last 8
    float* d = b.dst + 2 * f * b.bin_stride;
    typedef int I8 __attribute__((vector_size(32)));
    const I8 lo = {0, 8, 1, 9, 2, 10, 3, 11}, hi = {4, 12, 5, 13, 6, 14, 7, 15};
    const F8 out[4] = {__builtin_shuffle(ar, ai, lo), __builtin_shuffle(ar, ai, hi), __builtin_shuffle(br, bi, lo),
                       __builtin_shuffle(br, bi, hi)};
    if (b.lanes == 16) {
      for (int v = 0; v < 4; ++v) __builtin_memcpy(d + 8 * v, &out[v], sizeof(F8));
    } else {
      __builtin_memcpy(d, out, sizeof(float) * 2 * b.lanes);
    }
  }
}

#undef FASTSEG_FFT_INLINE
#undef FASTSEG_SPLAT

}  // namespace fft
}  // namespace fastseg
