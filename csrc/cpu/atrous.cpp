// Atrous (dilated) convolution with a fused epilogue on the CPU (Yu & Koltun 2016; Chen et al.,
// DeepLab v2, TPAMI 2017, and v3, 2017): y = act(scale * conv(x, w) + shift + residual).
//
// Three paths. "conv" calls at::convolution (oneDNN for float32/bfloat16) and applies the whole
// epilogue in one in-place pass, where eager PyTorch spends a pass per BatchNorm, add and ReLU.
// "winograd" (3x3, stride 1, any rate; below) turns the convolution into minimal-filtering tiles
// whose products are GEMMs (fastseg's own kernels for float32: AVX2, and AVX-512 on Intel), the
// epilogue fused into the output transform. "taps" splits the output plane into rectangles over
// which the set of in-image taps is constant, packs only those taps' input pixels and multiplies
// them with ATen's GEMM, one GEMM per kernel row.
//
// Measured on a 2-core EPYC (AVX2): oneDNN's convolution already skips the taps that fall
// into the zero padding (256->256 3x3 at 65x65, channels_last: rate 36 takes 0.4x the time of
// rate 1, the in-image fraction), so skipping them alone does not beat it (the taps path lost by
// 1.2-4x on float32); multiplying less does: the winograd path takes 1.3-3x less time than
// oneDNN on DeepLab's 256..2048-channel layers and 1.2-2x on 64..128-channel ones; on a 2-core
// AVX-512 Xeon, with the AVX-512 GEMM, 1.2-2.6x on 256..2048-channel ones
// (benchmarks/RESULTS.md). "auto" takes "winograd"
// for float32 where winograd_pays() (enough channels, products saved and GEMM rows), "taps" for
// float64 with groups == 1 (oneDNN has no float64 kernel and ATen's fallback loop is slow), and
// "conv" otherwise (float16, bfloat16, grouped and depthwise convolutions, strides, other kernels).
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

#include "atrous.h"
#include "common.h"
#include "half_convert.h"
#include "weight_cache.h"

#if FASTSEG_HAVE_AVX2_CLONE
#include <immintrin.h>
#endif

namespace fastseg {
namespace {

// Pixels packed per GEMM block: sized so that the packed input block (pixels x taps x C) stays
// within a few MiB, and at least enough rows to keep the GEMM efficient.
constexpr int64_t kPackBytes = 4 << 20;
constexpr int64_t kMinBlockPixels = 128;

// A run of output positions [begin, end) along one axis over which the taps [tap_begin, tap_end)
// land inside the input and the others in the padding.
struct Span {
  int64_t begin, end, tap_begin, tap_end;
};

// Splits an output axis of n_out positions by where each tap t (input position o*s - p + t*d)
// enters and leaves [0, n_in).
std::vector<Span> split_axis(int64_t n_in, int64_t n_out, int64_t k, int64_t s, int64_t p, int64_t d) {
  std::vector<int64_t> lo(k), hi(k), cuts = {0, n_out};
  for (int64_t t = 0; t < k; ++t) {
    lo[t] = std::clamp<int64_t>(div_ceil(p - t * d, s), 0, n_out);
    hi[t] = std::clamp<int64_t>(div_floor(n_in - 1 + p - t * d, s) + 1, 0, n_out);
    cuts.push_back(lo[t]);
    cuts.push_back(hi[t]);
  }
  std::sort(cuts.begin(), cuts.end());
  cuts.erase(std::unique(cuts.begin(), cuts.end()), cuts.end());
  std::vector<Span> spans;
  for (size_t i = 0; i + 1 < cuts.size(); ++i) {
    const int64_t a = cuts[i], b = cuts[i + 1];
    int64_t t0 = k, t1 = 0;
    for (int64_t t = 0; t < k; ++t) {
      if (lo[t] <= a && a < hi[t]) {
        t0 = std::min(t0, t);
        t1 = std::max(t1, t + 1);
      }
    }
    if (t0 >= t1) t0 = t1 = 0;
    spans.push_back({a, b, t0, t1});
  }
  return spans;
}

// The epilogue's operands, as float pointers (or null) with the output's layout.
template <typename acc_t>
struct Epilogue {
  const acc_t* scale;
  const acc_t* shift;
  bool relu;

  inline acc_t apply(acc_t v, int64_t o) const {
    if (scale) v *= scale[o];
    if (shift) v += shift[o];
    return v;
  }
};

// Output geometry: element (b, o, pixel) lives at b * batch_stride + o * channel_stride +
// pixel * pixel_stride, for both memory formats.
struct OutLayout {
  int64_t batch_stride, channel_stride, pixel_stride;
  OutLayout(int64_t O, int64_t HW, bool channels_last)
      : batch_stride(O * HW), channel_stride(channels_last ? 1 : HW), pixel_stride(channels_last ? O : 1) {}
};

// --- the "conv" path: at::convolution, then the epilogue in one in-place pass --------------------

// Rows [r0, r1) of the layout's innermost dimension: (b, pixel) rows of O channels for NHWC,
// (b, o) planes for NCHW.
template <typename scalar_t, typename Cvt>
FASTSEG_ALWAYS_INLINE void epilogue_rows(scalar_t* y, const scalar_t* res, const at::opmath_type<scalar_t>* sc,
                                         const at::opmath_type<scalar_t>* sh, bool relu, bool channels_last,
                                         int64_t O, int64_t len, int64_t r0, int64_t r1) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t r = r0; r < r1; ++r) {
    scalar_t* row = y + r * len;
    const scalar_t* rrow = res ? res + r * len : nullptr;
    if (channels_last) {
      for (int64_t o = 0; o < len; ++o) {
        acc_t v = Cvt::load(row[o]);
        if (sc) v *= sc[o];
        if (sh) v += sh[o];
        if (rrow) v += Cvt::load(rrow[o]);
        if (relu) v = relu_value(v);
        row[o] = Cvt::store(v);
      }
    } else {
      const int64_t o = r % O;
      const acc_t a = sc ? sc[o] : acc_t(1), b = sh ? sh[o] : acc_t(0);
      for (int64_t i = 0; i < len; ++i) {
        acc_t v = Cvt::load(row[i]) * a + b;
        if (rrow) v += Cvt::load(rrow[i]);
        if (relu) v = relu_value(v);
        row[i] = Cvt::store(v);
      }
    }
  }
}

#if FASTSEG_HAVE_AVX2_CLONE
// BFloat16's conversions are integer operations, which the compiler vectorises in epilogue_rows.
FASTSEG_TARGET_F16C void epilogue_rows_f16c(at::BFloat16* y, const at::BFloat16* res, const float* sc,
                                            const float* sh, bool relu, bool channels_last, int64_t O, int64_t len,
                                            int64_t r0, int64_t r1) {
  epilogue_rows<at::BFloat16, BFloat16Bits>(y, res, sc, sh, relu, channels_last, O, len, r0, r1);
}

// Half's conversions the compiler keeps scalar (GCC 12, _Float16): here 8 at a time with F16C
// intrinsics, the rest one by one as in epilogue_rows.
FASTSEG_TARGET_F16C void epilogue_rows_f16c(at::Half* y, const at::Half* res, const float* sc, const float* sh,
                                            bool relu, bool channels_last, int64_t O, int64_t len, int64_t r0,
                                            int64_t r1) {
  const __m256 zero = _mm256_setzero_ps();
  for (int64_t r = r0; r < r1; ++r) {
    at::Half* row = y + r * len;
    const at::Half* rrow = res ? res + r * len : nullptr;
    const int64_t o = r % O;  // NCHW: the plane's channel
    const __m256 a = _mm256_set1_ps(sc && !channels_last ? sc[o] : 1.f);
    const __m256 b = _mm256_set1_ps(sh && !channels_last ? sh[o] : 0.f);
    int64_t i = 0;
    for (; i + 8 <= len; i += 8) {
      __m256 v = load_half8(row + i);
      if (channels_last) {
        if (sc) v = _mm256_mul_ps(v, _mm256_loadu_ps(sc + i));
        if (sh) v = _mm256_add_ps(v, _mm256_loadu_ps(sh + i));
      } else {
        v = _mm256_fmadd_ps(v, a, b);
      }
      if (rrow) v = _mm256_add_ps(v, load_half8(rrow + i));
      if (relu) v = _mm256_max_ps(zero, v);  // the second operand where v is NaN or -0, as relu_value
      _mm_storeu_si128(reinterpret_cast<__m128i*>(row + i), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
    }
    for (; i < len; ++i) {
      float v = HalfBits::load(row[i]);
      if (channels_last) {
        if (sc) v *= sc[i];
        if (sh) v += sh[i];
      } else {
        v = v * (sc ? sc[o] : 1.f) + (sh ? sh[o] : 0.f);
      }
      if (rrow) v += HalfBits::load(rrow[i]);
      if (relu) v = relu_value(v);
      row[i] = HalfBits::store(v);
    }
  }
}
#endif

template <typename scalar_t>
void epilogue_in_place(at::Tensor& out, const at::Tensor& scale, const at::Tensor& shift,
                       const at::Tensor& residual, bool relu, bool channels_last) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = out.size(0), O = out.size(1), HW = out.size(2) * out.size(3);
  const acc_t* sc = scale.defined() ? scale.const_data_ptr<acc_t>() : nullptr;
  const acc_t* sh = shift.defined() ? shift.const_data_ptr<acc_t>() : nullptr;
  const scalar_t* res = residual.defined() ? residual.const_data_ptr<scalar_t>() : nullptr;
  scalar_t* y = out.mutable_data_ptr<scalar_t>();
  const int64_t rows = channels_last ? B * HW : B * O, len = channels_last ? O : HW;
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(len, 1)), [&](int64_t r0, int64_t r1) {
#if FASTSEG_HAVE_AVX2_CLONE
    if constexpr (kIsHalfType<scalar_t>) {
      if (cpu_has_f16c()) {
        epilogue_rows_f16c(y, res, sc, sh, relu, channels_last, O, len, r0, r1);
        return;
      }
    }
#endif
    epilogue_rows<scalar_t, Convert<scalar_t>>(y, res, sc, sh, relu, channels_last, O, len, r0, r1);
  });
}

// --- the "taps" path ------------------------------------------------------------------------------

// Packing and the epilogue run on the calling thread: between two multithreaded GEMMs, a parallel
// region of our own left OpenMP's threads spinning against MKL's and made the path 5x slower on
// this 2-core machine (measured); both passes are a few percent of the GEMM's work.
template <typename F>
inline void serial_for(int64_t begin, int64_t end, F&& f) {
  f(begin, end);
}

struct ConvGeometry {
  int64_t B, C, H, W, O, Ho, Wo, kH, kW, sH, sW, pH, pW, dH, dW;
};

// The geometry of a (B, C, H, W) input convolved by (O, C / groups, kH, kW) weights; Ho or Wo <= 0
// when the output would be empty.
ConvGeometry conv_geometry(int64_t B, int64_t C, int64_t H, int64_t W, int64_t O, int64_t kH, int64_t kW,
                           at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation) {
  ConvGeometry g;
  g.B = B; g.C = C; g.H = H; g.W = W; g.O = O; g.kH = kH; g.kW = kW;
  g.sH = stride[0]; g.sW = stride[1]; g.pH = padding[0]; g.pW = padding[1]; g.dH = dilation[0]; g.dW = dilation[1];
  g.Ho = div_floor(H + 2 * g.pH - g.dH * (kH - 1) - 1, g.sH) + 1;
  g.Wo = div_floor(W + 2 * g.pW - g.dW * (kW - 1) - 1, g.sW) + 1;
  return g;
}

// One output rectangle (rows x cols of every image) with its in-image taps: packs the input pixels
// of kernel row i's taps for a block of pixels, multiplies with that kernel row's weights and
// accumulates; then applies the epilogue and writes the block out.
template <typename scalar_t>
void taps_rectangle(const scalar_t* x, const at::Tensor& w_rows, scalar_t* y, const scalar_t* res,
                    const Epilogue<scalar_t>& ep, const ConvGeometry& g, const Span& R, const Span& Cs,
                    bool channels_last) {
  const int64_t rows = R.end - R.begin, cols = Cs.end - Cs.begin;
  const int64_t per_image = rows * cols, total = g.B * per_image;
  const int64_t nj = Cs.tap_end - Cs.tap_begin, ni = nj == 0 ? 0 : R.tap_end - R.tap_begin;
  const int64_t K = nj * g.C;
  const OutLayout L(g.O, g.Ho * g.Wo, channels_last);
  const int64_t block = std::max<int64_t>(kMinBlockPixels, kPackBytes / std::max<int64_t>(K * sizeof(scalar_t), 1));
  const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<scalar_t>::value);
  const int64_t cap = std::min(block, total);
  at::Tensor packed = ni > 0 ? at::empty({cap, K}, opts) : at::Tensor();
  // NCHW output: accumulate (O, pixels) so that the epilogue writes along output rows; NHWC:
  // (pixels, O) so that it writes along channels.
  at::Tensor acc = channels_last ? at::empty({cap, g.O}, opts) : at::empty({g.O, cap}, opts);
  for (int64_t m0 = 0; m0 < total; m0 += block) {
    const int64_t m = std::min(block, total - m0);
    at::Tensor a = channels_last ? acc.narrow(0, 0, m) : acc.narrow(1, 0, m);
    for (int64_t ii = 0; ii < ni; ++ii) {
      const int64_t i = R.tap_begin + ii;
      at::Tensor p = packed.narrow(0, 0, m);
      scalar_t* pk = p.mutable_data_ptr<scalar_t>();
      serial_for(0, m, [&](int64_t q0, int64_t q1) {
        for (int64_t q = q0; q < q1; ++q) {
          const int64_t idx = m0 + q, b = idx / per_image, rc = idx % per_image;
          const int64_t oh = R.begin + rc / cols, ow = Cs.begin + rc % cols;
          const int64_t ih = oh * g.sH - g.pH + i * g.dH;
          const scalar_t* src = x + ((b * g.H + ih) * g.W) * g.C;
          for (int64_t jj = 0; jj < nj; ++jj) {
            const int64_t iw = ow * g.sW - g.pW + (Cs.tap_begin + jj) * g.dW;
            std::memcpy(pk + q * K + jj * g.C, src + iw * g.C, sizeof(scalar_t) * g.C);
          }
        }
      });
      // Kernel row i, taps [tap_begin, tap_end): rows (i, j, c) of the (kH * kW * C, O) weights.
      at::Tensor wi = w_rows.narrow(0, (i * g.kW + Cs.tap_begin) * g.C, K);
      if (channels_last) {
        if (ii == 0) at::mm_out(a, p, wi); else a.addmm_(p, wi);
      } else {
        if (ii == 0) at::mm_out(a, wi.t(), p.t()); else a.addmm_(wi.t(), p.t());
      }
    }
    const scalar_t* ap = ni > 0 ? a.const_data_ptr<scalar_t>() : nullptr;
    const int64_t lda = channels_last ? g.O : a.stride(0);
    serial_for(0, m, [&](int64_t q0, int64_t q1) {
      for (int64_t q = q0; q < q1; ++q) {
        const int64_t idx = m0 + q, b = idx / per_image, rc = idx % per_image;
        const int64_t pixel = (R.begin + rc / cols) * g.Wo + Cs.begin + rc % cols;
        const int64_t base = b * L.batch_stride + pixel * L.pixel_stride;
        for (int64_t o = 0; o < g.O; ++o) {
          scalar_t v = ap ? (channels_last ? ap[q * lda + o] : ap[o * lda + q]) : scalar_t(0);
          v = ep.apply(v, o);
          const int64_t pos = base + o * L.channel_stride;
          if (res) v += res[pos];
          if (ep.relu) v = relu_value(v);
          y[pos] = v;
        }
      }
    });
  }
}

template <typename scalar_t>
void taps_conv(const at::Tensor& x_nhwc, const at::Tensor& weight, at::Tensor& out, const at::Tensor& scale,
               const at::Tensor& shift, const at::Tensor& residual, bool relu, const ConvGeometry& g,
               const std::vector<Span>& rows, const std::vector<Span>& cols, bool channels_last) {
  // (kH, kW, C, O): each kernel row's taps are one contiguous (kW * C, O) slab.
  const at::Tensor w_rows = weight.permute({2, 3, 1, 0}).contiguous().view({g.kH * g.kW * g.C, g.O});
  const Epilogue<scalar_t> ep{scale.defined() ? scale.const_data_ptr<scalar_t>() : nullptr,
                              shift.defined() ? shift.const_data_ptr<scalar_t>() : nullptr, relu};
  const scalar_t* res = residual.defined() ? residual.const_data_ptr<scalar_t>() : nullptr;
  const scalar_t* x = x_nhwc.const_data_ptr<scalar_t>();
  scalar_t* y = out.mutable_data_ptr<scalar_t>();
  for (const auto& R : rows) {
    for (const auto& Cs : cols) {
      taps_rectangle<scalar_t>(x, w_rows, y, res, ep, g, R, Cs, channels_last);
    }
  }
}

// --- the "winograd" path --------------------------------------------------------------------------
//
// A 3x3 convolution at rate d (stride 1) is d x d interleaved undilated ones: outputs r, r + d,
// r + 2d, ... of an axis read inputs r - p, r - p + d, ... (the space-to-batch view of atrous
// convolution, Chen et al. 2017). Each such run of L outputs is cut into tiles of 1 to 3 outputs,
// and each tile computed with the fewest products that its in-image inputs allow, by Winograd's
// minimal filtering algorithms (Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks",
// CVPR 2016): y = AT [(G w) * (BT x)] per axis, with
//   F(3,3): 3 outputs from 5 products (interpolation points 0, 1, -1, -2, infinity);
//   F(2,3): 2 outputs from 4 products (points 0, 1, -1, infinity);
//   a 2-output tile whose outer inputs both lie in the padding (runs of two at large rates):
//     m1 = w1 (x1 + x2), m2 = (w2 - w1) x2, m3 = (w0 - w1) x1; y0 = m1 + m2, y1 = m1 + m3;
//   a 1-output tile: its in-image taps, directly.
// A dynamic programme per run picks the cut with the fewest products. A 2-D tile is a row tile
// times a column tile, its products the outer product of the two axes' (G w) rows. Every product
// that uses the same pair of G rows, over a block of tiles, is one GEMM (tiles x C) x (C x O): the
// convolution becomes an input-transform pass, a GEMM per pair and an output-transform pass that
// applies the epilogue, per block (winograd_conv says how blocks are cut and run). Against the in-image taps (what oneDNN multiplies), F(3,3) tiles
// take 25 products for 49..81 and the 3-product pairs 9 for 16.

// One tile kind along an axis: m outputs from m + 2 inputs (rate-d apart) with alpha products.
// G rows are scaled to a largest entry of +1 (the factor moves into AT) so that equal rows of
// different kinds share one weight transform and one GEMM.
struct TileKind {
  int m = 0, alpha = 0;
  double BT[5][5] = {}, G[5][3] = {}, AT[3][5] = {};
};

enum : int { kF33 = 0, kF23 = 1, kPair = 2, kDirect = 3 };  // kDirect + 4 * a + b: taps [a, b)
constexpr int kNumKinds = kDirect + 16;

TileKind normalise(TileKind k) {
  for (int e = 0; e < k.alpha; ++e) {
    double s = 0;
    for (int t = 0; t < 3; ++t) {
      if (std::abs(k.G[e][t]) > std::abs(s)) s = k.G[e][t];
    }
    for (int t = 0; t < 3; ++t) k.G[e][t] /= s;
    for (int j = 0; j < k.m; ++j) k.AT[j][e] *= s;
  }
  return k;
}

template <int M, int A>
TileKind make_kind(const double (&BT)[A][M + 2], const double (&G)[A][3], const double (&AT)[M][A]) {
  TileKind k;
  k.m = M;
  k.alpha = A;
  for (int e = 0; e < A; ++e) {
    for (int i = 0; i < M + 2; ++i) k.BT[e][i] = BT[e][i];
    for (int t = 0; t < 3; ++t) k.G[e][t] = G[e][t];
    for (int j = 0; j < M; ++j) k.AT[j][e] = AT[j][e];
  }
  return normalise(k);
}

const std::vector<TileKind>& tile_kinds() {
  static const std::vector<TileKind> kinds = [] {
    std::vector<TileKind> v(kNumKinds);
    v[kF33] = make_kind<3, 5>(
        {{-2, -1, 2, 1, 0}, {0, 2, 3, 1, 0}, {0, -2, 1, 1, 0}, {0, -1, 0, 1, 0}, {0, -2, -1, 2, 1}},
        {{-1. / 2, 0, 0}, {1. / 6, 1. / 6, 1. / 6}, {1. / 2, -1. / 2, 1. / 2}, {-1. / 6, 1. / 3, -2. / 3}, {0, 0, 1}},
        {{1, 1, 1, 1, 0}, {0, 1, -1, -2, 0}, {0, 1, 1, 4, 1}});
    v[kF23] = make_kind<2, 4>({{-1, 0, 1, 0}, {0, 1, 1, 0}, {0, -1, 1, 0}, {0, -1, 0, 1}},
                              {{-1, 0, 0}, {1. / 2, 1. / 2, 1. / 2}, {1. / 2, -1. / 2, 1. / 2}, {0, 0, 1}},
                              {{1, 1, 1, 0}, {0, 1, -1, 1}});
    v[kPair] = make_kind<2, 3>({{0, 1, 1, 0}, {0, 0, 1, 0}, {0, 1, 0, 0}}, {{0, 1, 0}, {0, -1, 1}, {1, -1, 0}},
                               {{1, 1, 0}, {1, 0, 1}});
    for (int a = 0; a <= 3; ++a) {
      for (int b = a; b <= 3; ++b) {
        TileKind& k = v[kDirect + 4 * a + b];
        k.m = 1;
        k.alpha = b - a;
        for (int e = 0; e < k.alpha; ++e) {
          k.BT[e][a + e] = 1;
          k.G[e][a + e] = 1;
          k.AT[0][e] = 1;
        }
      }
    }
    return v;
  }();
  return kinds;
}

// One tile along an axis: outputs out0 + j * d (j < m), inputs in0 + k * d (k < m + 2).
struct AxisTile {
  int64_t out0, in0;
  int kind;
};

// An axis cut into tiles; element e of tile t (one of its kind's products) uses the G row
// grow[first[t] + e] of the shared registry.
struct AxisPlan {
  std::vector<AxisTile> tiles;
  std::vector<int64_t> first;
  std::vector<int> grow;
  int64_t products = 0, direct_taps = 0;  // sum of alpha over tiles; in-image taps over outputs
};

// Distinct G rows (after normalisation) of both axes: a product's weight transform is a pair.
struct GRows {
  std::vector<std::array<double, 3>> rows;
  int id(const double (&g)[3]) {
    for (size_t i = 0; i < rows.size(); ++i) {
      if (rows[i][0] == g[0] && rows[i][1] == g[1] && rows[i][2] == g[2]) return static_cast<int>(i);
    }
    rows.push_back({g[0], g[1], g[2]});
    return static_cast<int>(rows.size()) - 1;
  }
};

AxisPlan plan_axis(int64_t n_in, int64_t n_out, int64_t p, int64_t d, GRows& grows) {
  const auto& kinds = tile_kinds();
  AxisPlan plan;
  for (int64_t r = 0; r < std::min(d, n_out); ++r) {
    const int64_t L = (n_out - r + d - 1) / d, base = r - p;
    auto valid = [&](int64_t k) { return base + k * d >= 0 && base + k * d < n_in; };
    // The kind and product count of a tile of m outputs starting at run position j.
    auto choose = [&](int64_t j, int m) -> std::pair<int, int> {
      if (m == 3) return {kF33, 5};
      if (m == 2) return !valid(j) && !valid(j + 3) ? std::pair<int, int>{kPair, 3} : std::pair<int, int>{kF23, 4};
      int a = 0, b = 0;
      while (a < 3 && !valid(j + a)) ++a;
      b = a;
      while (b < 3 && valid(j + b)) ++b;
      return {kDirect + 4 * a + b, b - a};
    };
    std::vector<int64_t> best(L + 1, 0);
    std::vector<int> step(L + 1, 0);
    for (int64_t j = L - 1; j >= 0; --j) {
      best[j] = INT64_MAX;
      for (int m = 3; m >= 1; --m) {  // ties keep the larger tile: fewer tiles, less transform work
        if (j + m > L) continue;
        const int64_t cost = choose(j, m).second + best[j + m];
        if (cost < best[j]) {
          best[j] = cost;
          step[j] = m;
        }
      }
    }
    for (int64_t j = 0; j < L; j += step[j]) {
      const auto [kind, alpha] = choose(j, step[j]);
      plan.first.push_back(static_cast<int64_t>(plan.grow.size()));
      plan.tiles.push_back({r + j * d, base + j * d, kind});
      for (int e = 0; e < alpha; ++e) plan.grow.push_back(grows.id(kinds[kind].G[e]));
      plan.products += alpha;
    }
    for (int64_t j = 0; j < L; ++j) {
      for (int t = 0; t < 3; ++t) plan.direct_taps += valid(j + t);
    }
  }
  plan.first.push_back(static_cast<int64_t>(plan.grow.size()));
  return plan;
}

// When 'auto' takes the winograd path for float32, from measurements against oneDNN here
// (benchmarks/RESULTS.md): on at least this many input and output channels, and when the in-image
// taps outnumber the products, each GEMM counted kWinogradGemmRows rows more (a small GEMM still
// reads its whole weight transform), by kWinogradMinSaving: more for channels_last inputs, where
// oneDNN is at its best (with blocks per thread, 33x33 maps at rate 24, saving 1.27x at batch 1
// and 1.44x at batch 8 by this count, ran 1.12-1.29x faster at 256..2048 channels, 41x41 at rate
// 24 1.27x, 25x25 at rate 18 1.07x, 17x17 at rate 12 level; 256 channels at 33x33, rate 12,
// saves 1.13x and ran 0.76x), less for NCHW ones, which oneDNN reorders (8x256x33x33 at rate 24
// ran 2.4x faster as winograd). Machines without AVX2 (MKL's GEMMs) from 256 in and 128 out (with
// MKL, 128 -> 128 was level, 32 and 64 channels and 2048 -> 21 lost up to 2x).
constexpr int64_t kWinogradMinInChannels = 256;
constexpr int64_t kWinogradMinOutChannels = 128;
// With the packed GEMM kernel (AVX2), from 64 in and 16 out for channels_last inputs: 128 -> 128
// ran 1.25-2.07x faster than oneDNN (65x65 rate 12 to 180x180 rate 1), 64 -> 64 1.15-1.54x, 128 <->
// 64 1.44x, 1024 -> 64 1.45x, 2048 -> 21 (DeepLab v2's classifier) at 65x65 rate 12 4.05x, 512 -> 21
// 1.36x; 32 -> 32 lost (0.9x at 180x180). Under 64 outputs the GEMMs are small beside the input
// transform, so the saving must reach kWinogradMinSavingFewOutputs (2048 -> 21 at 33x33, rate 24,
// saves 1.27x and ran 0.92x). NCHW inputs (transposed in and out) from 64 in and 64 out: 64 -> 64
// and 128 -> 128 ran 1.47-1.66x faster than oneDNN (64x64 to 180x180), 128 -> 64 at rate 4 1.09x;
// with 21 outputs 0.72-1.39x, 32 -> 32 0.75x.
constexpr int64_t kWinogradPackedMinInChannels = 64;
constexpr int64_t kWinogradPackedMinOutChannels = 16;
constexpr int64_t kWinogradPackedMinOutChannelsNchw = 64;
constexpr int64_t kWinogradFewOutputs = 64;
constexpr double kWinogradMinSavingFewOutputs = 1.5;
constexpr double kWinogradGemmRows = 32;
// When the weights change on every call (training), each GEMM's weight transform is computed anew,
// costing about this many GEMM rows (2048 -> 256 at 65x65: 60-95 ms for rate 24's 64 transforms;
// freshly drawn weights on each call, transformed and cached every time, ran rate 12 1.2-1.6x
// faster than oneDNN and rate 24 0.8x; uncached, with this count, rate 24 goes to oneDNN).
constexpr double kWinogradTransformRows = 128;
// Nor where the weight transforms (nG^2 x C x O values) would outgrow this: 2048 -> 2048 at nG = 5
// needs 400 MiB of them, kept in memory beside oneDNN-sized weights of 144 MiB.
constexpr int64_t kWinogradMaxTransformBytes = int64_t(256) << 20;
constexpr double kWinogradMinSavingChannelsLast = 1.25;
constexpr double kWinogradMinSavingNchw = 1.2;
// With gemm_packed_avx512 on an Intel AVX-512 CPU (a 2-vCPU Xeon with AMX, 2026-11-29), in both
// layouts from 64 in and 64 out channels: 252 geometries, every one saving at least 0.9 by this
// count, ran 0.85-4.11x oneDNN's speed, the ten under 1.0x with 64 or 96 outputs at 33x33 to
// 129x129 (0.85-0.98x); 17x17 at rate 4 or 12 (savings 0.90-0.94) ran 1.2-2.3x, 33x33 at rate 12
// (1.13) 1.04-1.98x, 25x25 at rate 18 (1.16) 1.2-1.8x. Fewer than 64 outputs too (16 or more; a
// second sweep, 2026-11-29 afternoon): channels_last layers of 64..2048 -> 21..48 channels at
// 17x17 (saving 0.90-0.94) ran 1.35-1.77x, at 33x33 rate 12 (1.13) 1.04-1.24x, those the old 1.5
// already took 0.95-1.52x; NCHW ones (otherwise from 64 outputs) at 128..256 input channels
// 1.10-1.44x (128 -> 32 at 129x129 rate 6 0.98x), at 64 input channels 1.18-2.13x up to 33x33
// maps but 0.68-1.01x on larger ones, at 512 and 2048 0.75-1.28x: see winograd_few_outputs_nchw.
constexpr double kWinogradMinSavingWideFma = 0.9;
// Except where oneDNN runs few outputs at full vector width: channels_last layers with 16, 32 or 48
// outputs from more than kWinogradSmallMapMaxInChannels input channels, on maps larger than this,
// ran 0.52-1.17x oneDNN's speed (1024 and 2048 -> 16/32/48 at 33x33 and 65x65, rates 12..24, 36
// geometries: 32 under 1.0x, also with a saving of 1.5 by count), while 21, 24 and 40 outputs, which
// oneDNN runs partly empty, ran 0.96-1.35x and 17x17 maps 1.15-2.0x. Those go to oneDNN.
constexpr int64_t kWinogradTinyMap = 17 * 17;
// A small map: at most this many output pixels per image (the rules below).
constexpr int64_t kWinogradSmallMap = 33 * 33;
// NCHW layers with fewer than kWinogradPackedMinOutChannelsNchw outputs take the winograd path on
// Intel AVX-512 from kWinogradPackedMinOutChannels outputs with this many input channels or fewer,
// and at least kWinogradFewOutputsNchwMinInChannels of them or a small map.
constexpr int64_t kWinogradFewOutputsNchwMaxInChannels = 256;
constexpr int64_t kWinogradFewOutputsNchwMinInChannels = 128;
// On small maps the count above undervalues the winograd path (each GEMM's kWinogradGemmRows weigh
// as much as the few products): on Intel AVX-512, 17x17 at rate 6 (saving 0.54) and 25x25 at rate
// 12 (0.75) ran 1.03-1.82x oneDNN's speed channels_last at 64..512 input channels and 21..256
// outputs; NCHW 1.12-2.38x at 64..256 -> 21..64, but 0.90-1.04x at 17x17 rate 6 with 128 or 256
// outputs (benchmarks/RESULTS.md). So with transforms kept, small maps take it channels_last up to
// kWinogradSmallMapMaxInChannels input channels (2048 and 1024 -> 21..32 ran 0.94x there), NCHW up
// to half that and under kWinogradSmallMapNchwMaxOut outputs.
constexpr int64_t kWinogradSmallMapMaxInChannels = 512;
constexpr int64_t kWinogradSmallMapNchwMaxOut = 128;

// Channels per pass of a tile's transforms: its 5 x 5 intermediate rows stay in L1.
constexpr int64_t kTransformBlock = 128;
// Blocks on their own threads pay where the weight transforms are small: two threads each running
// their GEMMs on their own blocks, products kept in cache from transform to GEMM to output, ran
// 1.1-1.2x faster than both threads on each GEMM of all tiles at 256 channels; at 2048 channels
// each block reads 50+ MiB of weight transforms again and ran 1.1x slower, so there one block.
constexpr int64_t kWinogradBlockMaxChannels = 512;
constexpr int64_t kWinogradMinBlockProducts = 256;
// Products per block of tiles (0: one block of all tiles), and input channels per chunk of a
// block's input transform (the GEMMs accumulate the chunks). FASTSEG_WINOGRAD_BLOCK_PRODUCTS and
// FASTSEG_WINOGRAD_CHUNK_CHANNELS override them, read on every call (tests change them in-process).
int64_t winograd_block_products() { return env_setting("FASTSEG_WINOGRAD_BLOCK_PRODUCTS", 1600, 0); }
int64_t winograd_chunk_channels() { return env_setting("FASTSEG_WINOGRAD_CHUNK_CHANNELS", 512, 1); }
// Transformed inputs larger than this, about the L3 cache, are written with non-temporal stores
// (store_row): 2048 -> 256 channels at 65x65 ran 1.18x faster at rate 12 (118 MiB of them), at
// 33x33 rate 2 (25 MiB) 1.09x, DeepLab v3's ASPP 1.10x.
constexpr int64_t kWinogradStreamBytes = int64_t(16) << 20;

// Grow-only scratch buffers per thread: the transforms' buffers run to hundreds of MiB for 2048
// channels, and fresh ones would be page-faulted in (zeroed by the kernel) on every call.
template <typename scalar_t>
scalar_t* workspace(int which, int64_t numel) {
  thread_local std::array<at::Tensor, 5> buffers;  // V, P; an NCHW call's input and output; U uncached
  at::Tensor& t = buffers[which];
  const int64_t bytes = numel * int64_t(sizeof(scalar_t));
  // Under torch's deterministic mode with uninitialised-memory filling (the tests' poisoning), a
  // fresh buffer each call, so that a product slot the transforms forgot shows up as NaN.
  const auto& ctx = at::globalContext();
  const bool poisoning = ctx.deterministicAlgorithms() && ctx.deterministicFillUninitializedMemory();
  if (!t.defined() || t.numel() < bytes || poisoning) t = at::empty({std::max<int64_t>(bytes, 64)}, at::kByte);
  return reinterpret_cast<scalar_t*>(t.mutable_data_ptr<uint8_t>());
}

// --- the blocks' GEMM kernel ------------------------------------------------------------------------
//
// In a block, each pair's product rows meet their weight transform once: MKL packed that transform
// again on every call (19% of `perf`'s samples over a 256-channel layer's calls, read cold from
// L3), so float32 on AVX2 machines multiplies with this kernel instead, reading transforms packed
// once per weights: per pair, panels of kGemmPanel output channels, each C rows of kGemmPanel
// values (zero past O). Against MKL on the same blocks: 1.14-1.30x faster layers at 256 and 512
// channels; in the one block of 2048-channel layers, its rows split between the threads, 2048->256
// layers 1.09-1.16x, DeepLab v3's ASPP 1.04-1.17x.
constexpr int64_t kGemmPanel = 16;
constexpr int kGemmRows = 6;  // rows per register tile: 12 accumulators of 8 lanes

inline int64_t padded_out_channels(int64_t O) { return (O + kGemmPanel - 1) / kGemmPanel * kGemmPanel; }

// Whether float32 GEMMs run on gemm_packed_avx512: Intel's AVX-512 parts, where it was measured
// (full-width FMA units). Zen 4 splits each 512-bit FMA in two 256-bit halves, so the kernel could
// gain little there over gemm_packed_avx2; it keeps that kernel and its thresholds until measured.
inline bool wide_fma() {
#if FASTSEG_HAVE_AVX2_CLONE
  static const bool intel = __builtin_cpu_is("intel");
  return cpu_has_avx512() && intel;
#else
  return false;
#endif
}

// U[(R, Q)] = sum_ij GR[i] GQ[j] w[:, :, i, j] for every pair of G rows, from the (O, C, 3, 3)
// weights: per row R, TR[j] = sum_i GR[i] w[:, :, i, j], then U[(R, Q)] = sum_j GQ[j] TR[j].
// Laid out as (nG^2, O, C), or packed for the GEMM kernels as (nG^2, O / kGemmPanel (rounded up),
// C, kGemmPanel), zero past O. Training recomputes them on every call, so each value is written
// once, in its final layout (computed as (pairs, O, C) and then packed, with a zero-fill, a copy
// and a transpose, 2048 -> 256 channels at 65x65, rate 24's 64 pairs, took 175 ms; measured).
// With `scratch`, U lives in this thread's workspace (valid until the next call here) instead of
// fresh memory: training's transforms of 2048 -> 256 channels are 134 MiB, whose page faults alone
// took 44 ms a call (measured).
template <typename scalar_t>
at::Tensor compute_weight_transforms(const at::Tensor& weight, const std::vector<std::array<double, 3>>& grows,
                                     bool packed, bool scratch) {
  const int64_t O = weight.size(0), C = weight.size(1), n = O * C, nG = static_cast<int64_t>(grows.size());
  // The taps' (O, C) planes, or (C, O) ones when packed: a panel's kGemmPanel outputs are adjacent.
  const at::Tensor wt = weight.permute({2, 3, packed ? 1 : 0, packed ? 0 : 1}).contiguous();
  const int64_t Op = packed ? padded_out_channels(O) : O, panels = Op / kGemmPanel;
  const std::vector<int64_t> sizes = packed ? std::vector<int64_t>{nG * nG, panels, C, kGemmPanel}
                                            : std::vector<int64_t>{nG * nG, O, C};
  at::Tensor U = scratch ? at::from_blob(workspace<scalar_t>(4, nG * nG * Op * C), sizes, weight.options())
                         : at::empty(sizes, weight.options());
  const scalar_t* w = wt.const_data_ptr<scalar_t>();
  scalar_t* u = U.mutable_data_ptr<scalar_t>();
  if (packed) {
    // Row (panel, c) of every pair: kGemmPanel outputs of input channel c, from the row's 9 x
    // kGemmPanel weights, with TR in registers (one pass over each plane of U, none over TR).
    at::parallel_for(0, panels * C, 64, [&](int64_t a, int64_t b) {
      for (int64_t row = a; row < b; ++row) {
        const int64_t o0 = (row / C) * kGemmPanel, c = row % C, m = std::min(kGemmPanel, O - o0);
        scalar_t wr[9][kGemmPanel] = {};
        for (int ij = 0; ij < 9; ++ij) std::copy(w + ij * n + c * O + o0, w + ij * n + c * O + o0 + m, wr[ij]);
        for (int64_t R = 0; R < nG; ++R) {
          scalar_t tr_row[3][kGemmPanel];
          for (int j = 0; j < 3; ++j) {
            for (int64_t l = 0; l < kGemmPanel; ++l) {
              tr_row[j][l] = scalar_t(grows[R][0]) * wr[j][l] + scalar_t(grows[R][1]) * wr[3 + j][l] +
                             scalar_t(grows[R][2]) * wr[6 + j][l];
            }
          }
          for (int64_t Q = 0; Q < nG; ++Q) {
            const scalar_t q0 = scalar_t(grows[Q][0]), q1 = scalar_t(grows[Q][1]), q2 = scalar_t(grows[Q][2]);
            scalar_t* d = u + ((R * nG + Q) * panels * C + row) * kGemmPanel;
            for (int64_t l = 0; l < kGemmPanel; ++l) d[l] = q0 * tr_row[0][l] + q1 * tr_row[1][l] + q2 * tr_row[2][l];
          }
        }
      }
    });
    return U;
  }
  at::Tensor tr = at::empty({3, n}, weight.options());
  scalar_t* t = tr.mutable_data_ptr<scalar_t>();
  for (int64_t R = 0; R < nG; ++R) {
    const scalar_t r0 = scalar_t(grows[R][0]), r1 = scalar_t(grows[R][1]), r2 = scalar_t(grows[R][2]);
    at::parallel_for(0, n, 1 << 14, [&](int64_t a, int64_t b) {
      for (int j = 0; j < 3; ++j) {
        const scalar_t *w0 = w + j * n, *w1 = w + (3 + j) * n, *w2 = w + (6 + j) * n;
        for (int64_t k = a; k < b; ++k) t[j * n + k] = r0 * w0[k] + r1 * w1[k] + r2 * w2[k];
      }
      for (int64_t Q = 0; Q < nG; ++Q) {
        const scalar_t q0 = scalar_t(grows[Q][0]), q1 = scalar_t(grows[Q][1]), q2 = scalar_t(grows[Q][2]);
        scalar_t* dst = u + (R * nG + Q) * n;
        for (int64_t k = a; k < b; ++k) dst[k] = q0 * t[k] + q1 * t[n + k] + q2 * t[2 * n + k];
      }
    });
  }
  return U;
}

#if FASTSEG_HAVE_AVX2_CLONE
// c[r][0:16] (+)= sum_k a[r * lda + k] b[k][0:16] for R rows.
template <int R>
FASTSEG_TARGET_AVX2 FASTSEG_ALWAYS_INLINE void gemm_tile_avx2(int64_t K, const float* a, int64_t lda, const float* b,
                                                              float* c, int64_t ldc, bool accumulate) {
  __m256 acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    const __m256 b0 = _mm256_loadu_ps(b + k * kGemmPanel), b1 = _mm256_loadu_ps(b + k * kGemmPanel + 8);
    for (int r = 0; r < R; ++r) {
      const __m256 av = _mm256_broadcast_ss(a + r * lda + k);
      acc[r][0] = _mm256_fmadd_ps(av, b0, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(av, b1, acc[r][1]);
    }
  }
  for (int r = 0; r < R; ++r) {  // the partial sum of these K terms added to C's
    if (accumulate) {
      acc[r][0] = _mm256_add_ps(acc[r][0], _mm256_loadu_ps(c + r * ldc));
      acc[r][1] = _mm256_add_ps(acc[r][1], _mm256_loadu_ps(c + r * ldc + 8));
    }
    _mm256_storeu_ps(c + r * ldc, acc[r][0]);
    _mm256_storeu_ps(c + r * ldc + 8, acc[r][1]);
  }
}

// C (M x Op, row pitch ldc) (+)= A (M x K, row pitch lda) B, B packed as above (K rows a panel,
// panel pitch ldb values). Each register tile sums kGemmDepth terms at a time and adds them to C:
// float32 rounding then stays near MKL's (2048 channels: 1.3e-6 against float64, MKL 1.5e-6, one
// running sum over all 2048 terms 4.6e-6), at no measurable cost.
constexpr int64_t kGemmDepth = 128;

// R rows of C over a panel, over all of K, kGemmDepth terms at a time.
template <int R>
FASTSEG_TARGET_AVX2 FASTSEG_ALWAYS_INLINE void gemm_rows_avx2(int64_t K, const float* a, int64_t lda, const float* panel,
                                                              float* c, int64_t ldc, bool accumulate) {
  for (int64_t k0 = 0; k0 < K; k0 += kGemmDepth) {
    gemm_tile_avx2<R>(std::min(kGemmDepth, K - k0), a + k0, lda, panel + k0 * kGemmPanel, c, ldc, accumulate || k0 > 0);
  }
}

FASTSEG_TARGET_AVX2 inline void gemm_packed_avx2(int64_t M, int64_t Op, int64_t K, const float* a, int64_t lda,
                                                 const float* b, int64_t ldb, float* c, int64_t ldc, bool accumulate) {
  for (int64_t n0 = 0; n0 < Op; n0 += kGemmPanel) {
    const float* panel = b + (n0 / kGemmPanel) * ldb;
    int64_t i = 0;
    for (; i + kGemmRows <= M; i += kGemmRows) {
      gemm_rows_avx2<kGemmRows>(K, a + i * lda, lda, panel, c + i * ldc + n0, ldc, accumulate);
    }
    const float* ai = a + i * lda;
    float* ci = c + i * ldc + n0;
    switch (M - i) {
      case 5: gemm_rows_avx2<5>(K, ai, lda, panel, ci, ldc, accumulate); break;
      case 4: gemm_rows_avx2<4>(K, ai, lda, panel, ci, ldc, accumulate); break;
      case 3: gemm_rows_avx2<3>(K, ai, lda, panel, ci, ldc, accumulate); break;
      case 2: gemm_rows_avx2<2>(K, ai, lda, panel, ci, ldc, accumulate); break;
      case 1: gemm_rows_avx2<1>(K, ai, lda, panel, ci, ldc, accumulate); break;
      default: break;
    }
  }
}

// The same product on AVX-512, for the same packed layout: a register tile of 12 rows by two
// panels (24 accumulators of 16 lanes, of the 32 registers), so each B vector serves 12 rows and
// each broadcast of A two panels. Loops run depth-chunk, row tile, panel pair: a row tile's
// kGemmDepth x 12 values of A stay in L1 while it meets every panel, and B's chunk (kGemmDepth x
// Op) stays in L2 for all row tiles. (The AVX2 kernel's panel-outer order re-read all of A per
// panel from L2/L3; its 8-lane registers hold a tile too small to keep up here.)
constexpr int kGemmRowsAvx512 = 12;

template <int R, int NP>
FASTSEG_TARGET_AVX512 FASTSEG_ALWAYS_INLINE void gemm_tile_avx512(int64_t K, const float* a, int64_t lda,
                                                                  const float* b, int64_t ldb, float* c, int64_t ldc,
                                                                  bool accumulate) {
  __m512 acc[R][NP];
  for (int r = 0; r < R; ++r) {
    for (int n = 0; n < NP; ++n) acc[r][n] = _mm512_setzero_ps();
  }
  for (int64_t k = 0; k < K; ++k) {
    __m512 bv[NP];
    for (int n = 0; n < NP; ++n) bv[n] = _mm512_loadu_ps(b + n * ldb + k * kGemmPanel);
    for (int r = 0; r < R; ++r) {
      const __m512 av = _mm512_set1_ps(a[r * lda + k]);
      for (int n = 0; n < NP; ++n) acc[r][n] = _mm512_fmadd_ps(av, bv[n], acc[r][n]);
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int n = 0; n < NP; ++n) {
      float* cr = c + r * ldc + n * kGemmPanel;
      _mm512_storeu_ps(cr, accumulate ? _mm512_add_ps(acc[r][n], _mm512_loadu_ps(cr)) : acc[r][n]);
    }
  }
}

// R rows of C over every panel, for one depth chunk.
template <int R>
FASTSEG_TARGET_AVX512 FASTSEG_ALWAYS_INLINE void gemm_row_tile_avx512(int64_t Op, int64_t K, const float* a, int64_t lda,
                                                                      const float* b, int64_t ldb, float* c,
                                                                      int64_t ldc, bool accumulate) {
  int64_t n0 = 0;
  for (; n0 + 2 * kGemmPanel <= Op; n0 += 2 * kGemmPanel) {
    gemm_tile_avx512<R, 2>(K, a, lda, b + (n0 / kGemmPanel) * ldb, ldb, c + n0, ldc, accumulate);
  }
  if (n0 < Op) gemm_tile_avx512<R, 1>(K, a, lda, b + (n0 / kGemmPanel) * ldb, ldb, c + n0, ldc, accumulate);
}

FASTSEG_TARGET_AVX512 inline void gemm_packed_avx512(int64_t M, int64_t Op, int64_t K, const float* a, int64_t lda,
                                                     const float* b, int64_t ldb, float* c, int64_t ldc,
                                                     bool accumulate) {
  for (int64_t k0 = 0; k0 < K; k0 += kGemmDepth) {
    const int64_t kn = std::min(kGemmDepth, K - k0);
    const bool acc = accumulate || k0 > 0;
    const float* ak = a + k0;
    const float* bk = b + k0 * kGemmPanel;
    int64_t i = 0;
    for (; i + kGemmRowsAvx512 <= M; i += kGemmRowsAvx512) {
      gemm_row_tile_avx512<kGemmRowsAvx512>(Op, kn, ak + i * lda, lda, bk, ldb, c + i * ldc, ldc, acc);
    }
    const float* ai = ak + i * lda;
    float* ci = c + i * ldc;
    switch (M - i) {
      case 11: gemm_row_tile_avx512<11>(Op, kn, ai, lda, bk, ldb, ci, ldc, acc); break;
      case 10: gemm_row_tile_avx512<10>(Op, kn, ai, lda, bk, ldb, ci, ldc, acc); break;
      case 9: gemm_row_tile_avx512<9>(Op, kn, ai, lda, bk, ldb, ci, ldc, acc); break;
      case 8: gemm_row_tile_avx512<8>(Op, kn, ai, lda, bk, ldb, ci, ldc, acc); break;
      case 7: gemm_row_tile_avx512<7>(Op, kn, ai, lda, bk, ldb, ci, ldc, acc); break;
      case 6: gemm_row_tile_avx512<6>(Op, kn, ai, lda, bk, ldb, ci, ldc, acc); break;
      case 5: gemm_row_tile_avx512<5>(Op, kn, ai, lda, bk, ldb, ci, ldc, acc); break;
      case 4: gemm_row_tile_avx512<4>(Op, kn, ai, lda, bk, ldb, ci, ldc, acc); break;
      case 3: gemm_row_tile_avx512<3>(Op, kn, ai, lda, bk, ldb, ci, ldc, acc); break;
      case 2: gemm_row_tile_avx512<2>(Op, kn, ai, lda, bk, ldb, ci, ldc, acc); break;
      case 1: gemm_row_tile_avx512<1>(Op, kn, ai, lda, bk, ldb, ci, ldc, acc); break;
      default: break;
    }
  }
}

// C (+)= A B, packed B, on AVX2 or (wide_fma) AVX-512.
inline void gemm_packed(int64_t M, int64_t Op, int64_t K, const float* a, int64_t lda, const float* b, int64_t ldb,
                        float* c, int64_t ldc, bool accumulate) {
  if (wide_fma()) return gemm_packed_avx512(M, Op, K, a, lda, b, ldb, c, ldc, accumulate);
  gemm_packed_avx2(M, Op, K, a, lda, b, ldb, c, ldc, accumulate);
}
#endif

// The weight cache's key for a transform: the layout, then the transform's rows.
inline std::vector<double> transform_cache_key(const GRows& grows, bool packed) {
  std::vector<double> key{packed ? 1.0 : 0.0};
  for (const auto& row : grows.rows) key.insert(key.end(), row.begin(), row.end());
  return key;
}

// The weight transforms, kept per weights; packed for the blocks' GEMM kernel where it runs.
template <typename scalar_t>
at::Tensor weight_transforms(const at::Tensor& weight, const GRows& grows, bool cached, bool packed) {
  if (!cached) return compute_weight_transforms<scalar_t>(weight, grows.rows, packed, /*scratch=*/true);
  auto derive = [&] { return compute_weight_transforms<scalar_t>(weight, grows.rows, packed, /*scratch=*/false); };
  return DerivedWeightCache::get("atrous_conv2d", weight, transform_cache_key(grows, packed), derive);
}

// A tile's input pixels (null: padding) and where its products' inputs go, C values each.
template <typename scalar_t>
struct TileIO {
  const scalar_t* src[5][5];
  scalar_t* dst[5][5];
  bool stream;  // store dst with non-temporal stores (float, AVX2, 32-byte aligned rows)
};

// A transformed row's store. Where the products far outgrow the caches (2048 channels: 100+ MiB),
// non-temporal stores skip reading each line before writing it.
template <typename scalar_t>
FASTSEG_ALWAYS_INLINE void store_row(scalar_t* dst, const scalar_t* row, int64_t n, bool) {
  std::copy(row, row + n, dst);
}

// Orders a thread's streamed stores before other threads read them.
inline void store_fence() {
#if FASTSEG_HAVE_AVX2_CLONE
  _mm_sfence();
#endif
}

#if FASTSEG_HAVE_AVX2_CLONE
FASTSEG_TARGET_AVX2 inline void store_row_avx2(float* dst, const float* row, int64_t n, bool stream) {
  if (!stream || reinterpret_cast<uintptr_t>(dst) % 32 != 0 || n % 8 != 0) return store_row(dst, row, n, false);
  for (int64_t c = 0; c < n; c += 8) _mm256_stream_ps(dst + c, _mm256_loadu_ps(row + c));
}
FASTSEG_TARGET_AVX2 inline void store_row_avx2(double* dst, const double* row, int64_t n, bool) {
  store_row(dst, row, n, false);
}
#endif

// acc (=|+=) coef * s over n values: a sum's first term assigns (no zero-fill: with a run-time
// length that is a memset call per row), the others add.
template <typename scalar_t>
FASTSEG_ALWAYS_INLINE void add_term(scalar_t* acc, scalar_t coef, const scalar_t* s, int64_t n, bool first) {
  if (first) {
    for (int64_t i = 0; i < n; ++i) acc[i] = coef * s[i];
  } else {
    for (int64_t i = 0; i < n; ++i) acc[i] += coef * s[i];
  }
}

// dst[er][ec] = sum_kr sum_kc BT_row[er][kr] BT_col[ec][kc] src[kr][kc]: rows first, a block of
// channels at a time with the intermediate rows in L1. (Holding a tile's transform in registers
// one vector of channels at a time measured slower here: 50 streams of 32 bytes defeat the
// prefetchers; the pass is bound by memory, not arithmetic: it ran no faster on two threads.)
template <typename scalar_t, typename Store>
FASTSEG_ALWAYS_INLINE void transform_input_tile_impl(const TileKind& KR, const TileKind& KC,
                                                     const TileIO<scalar_t>& io, int64_t C, Store store) {
  if (KR.alpha == 1 && KC.alpha == 1 && KR.m == 1 && KC.m == 1) {  // one in-image tap: a copy
    int ar = 0, ac = 0;
    while (KR.BT[0][ar] == 0) ++ar;
    while (KC.BT[0][ac] == 0) ++ac;
    store(io.dst[0][0], io.src[ar][ac], C, io.stream);
    return;
  }
  scalar_t tmp[5][5][kTransformBlock];  // [er][kc]
  scalar_t row[kTransformBlock];         // a streamed row's values before its store
  bool tmp_zero[5];
  for (int64_t c0 = 0; c0 < C; c0 += kTransformBlock) {
    const int64_t cb = std::min(kTransformBlock, C - c0);
    for (int er = 0; er < KR.alpha; ++er) {
      for (int kc = 0; kc < KC.m + 2; ++kc) {
        bool first = true;
        for (int kr = 0; kr < KR.m + 2; ++kr) {
          const scalar_t coef = scalar_t(KR.BT[er][kr]);
          if (coef == 0 || !io.src[kr][kc]) continue;
          add_term(tmp[er][kc], coef, io.src[kr][kc] + c0, cb, first);
          first = false;
        }
        tmp_zero[kc] = first;
      }
      for (int ec = 0; ec < KC.alpha; ++ec) {
        // Straight into V unless streamed (a stored copy of the row would be one more pass).
        scalar_t* out = io.stream ? row : io.dst[er][ec] + c0;
        bool first = true;
        for (int kc = 0; kc < KC.m + 2; ++kc) {
          const scalar_t coef = scalar_t(KC.BT[ec][kc]);
          if (coef == 0 || tmp_zero[kc]) continue;
          add_term(out, coef, tmp[er][kc], cb, first);
          first = false;
        }
        if (first) {  // all of the product's inputs in the padding: zero, not a stale row
          for (int64_t c = 0; c < cb; ++c) out[c] = scalar_t(0);
        }
        if (io.stream) store(io.dst[er][ec] + c0, row, cb, true);
      }
    }
  }
}

template <typename scalar_t>
void transform_input_tile_base(const TileKind& KR, const TileKind& KC, const TileIO<scalar_t>& io, int64_t C) {
  transform_input_tile_impl(KR, KC, io, C, store_row<scalar_t>);
}

#if FASTSEG_HAVE_AVX2_CLONE
template <typename scalar_t>
FASTSEG_TARGET_AVX2 void transform_input_tile_avx2(const TileKind& KR, const TileKind& KC,
                                                   const TileIO<scalar_t>& io, int64_t C) {
  transform_input_tile_impl(KR, KC, io, C, [](scalar_t* d, const scalar_t* r, int64_t n, bool stream) {
    store_row_avx2(d, r, n, stream);
  });
}
#endif

template <typename scalar_t>
void transform_input_tile(const TileKind& KR, const TileKind& KC, const TileIO<scalar_t>& io, int64_t C) {
#if FASTSEG_HAVE_AVX2_CLONE
  if (cpu_has_avx2()) return transform_input_tile_avx2(KR, KC, io, C);
#endif
  transform_input_tile_base(KR, KC, io, C);
}

// One tile's outputs from its products, through the epilogue: y = (AT_row (x) AT_col) P, then
// scale, shift, residual and ReLU; out0 is the tile's first output pixel (O values a pixel, row
// pitch row, column pitch col), src[er][ec] its products.
template <typename scalar_t>
struct TileOut {
  const scalar_t* src[5][5];
  scalar_t* out0;
  const scalar_t* res0;  // null: no residual
  int64_t row, col;
};

// dst = relu(out * sc + sh + res), each optional, over n channels.
template <typename scalar_t>
FASTSEG_ALWAYS_INLINE void epilogue_row(scalar_t* out, scalar_t* dst, const scalar_t* res, const scalar_t* sc,
                                        const scalar_t* sh, bool relu, int64_t n) {
  if (sc) {
    for (int64_t o = 0; o < n; ++o) out[o] *= sc[o];
  }
  if (sh) {
    for (int64_t o = 0; o < n; ++o) out[o] += sh[o];
  }
  if (res) {
    for (int64_t o = 0; o < n; ++o) out[o] += res[o];
  }
  if (relu) {
    for (int64_t o = 0; o < n; ++o) dst[o] = relu_value(out[o]);
  } else {
    for (int64_t o = 0; o < n; ++o) dst[o] = out[o];
  }
}

template <typename scalar_t>
FASTSEG_ALWAYS_INLINE void transform_output_tile_impl(const TileKind& KR, const TileKind& KC, const TileOut<scalar_t>& io,
                                                      const scalar_t* sc, const scalar_t* sh, bool relu, int64_t O) {
  scalar_t tmp[5][3][kTransformBlock];  // [er][jc]
  scalar_t out[kTransformBlock];
  const bool zero = KR.alpha == 0 || KC.alpha == 0;  // every tap in the padding: the epilogue of 0
  const bool single = KR.alpha == 1 && KC.alpha == 1 && KR.m == 1 && KC.m == 1;  // y = P (AT = 1)
  for (int64_t o0 = 0; o0 < O; o0 += kTransformBlock) {
    const int64_t ob = std::min(kTransformBlock, O - o0);
    if (single) {
      std::copy(io.src[0][0] + o0, io.src[0][0] + o0 + ob, out);
      epilogue_row(out, io.out0 + o0, io.res0 ? io.res0 + o0 : nullptr, sc ? sc + o0 : nullptr, sh ? sh + o0 : nullptr,
                   relu, ob);
      continue;
    }
    bool tmp_zero[5][3];
    for (int er = 0; er < KR.alpha && !zero; ++er) {
      for (int jc = 0; jc < KC.m; ++jc) {
        bool first = true;
        for (int ec = 0; ec < KC.alpha; ++ec) {
          const scalar_t coef = scalar_t(KC.AT[jc][ec]);
          if (coef == 0) continue;
          add_term(tmp[er][jc], coef, io.src[er][ec] + o0, ob, first);
          first = false;
        }
        tmp_zero[er][jc] = first;
      }
    }
    for (int jr = 0; jr < KR.m; ++jr) {
      for (int jc = 0; jc < KC.m; ++jc) {
        bool first = true;
        for (int er = 0; er < KR.alpha && !zero; ++er) {
          const scalar_t coef = scalar_t(KR.AT[jr][er]);
          if (coef == 0 || tmp_zero[er][jc]) continue;
          add_term(out, coef, tmp[er][jc], ob, first);
          first = false;
        }
        if (first) {
          for (int64_t o = 0; o < ob; ++o) out[o] = scalar_t(0);
        }
        const int64_t at = jr * io.row + jc * io.col + o0;
        epilogue_row(out, io.out0 + at, io.res0 ? io.res0 + at : nullptr, sc ? sc + o0 : nullptr,
                     sh ? sh + o0 : nullptr, relu, ob);
      }
    }
  }
}

template <typename scalar_t>
void transform_output_tile_base(const TileKind& KR, const TileKind& KC, const TileOut<scalar_t>& io,
                                const scalar_t* sc, const scalar_t* sh, bool relu, int64_t O) {
  transform_output_tile_impl(KR, KC, io, sc, sh, relu, O);
}

#if FASTSEG_HAVE_AVX2_CLONE
template <typename scalar_t>
FASTSEG_TARGET_AVX2 void transform_output_tile_avx2(const TileKind& KR, const TileKind& KC, const TileOut<scalar_t>& io,
                                                    const scalar_t* sc, const scalar_t* sh, bool relu, int64_t O) {
  transform_output_tile_impl(KR, KC, io, sc, sh, relu, O);
}
#endif

template <typename scalar_t>
void transform_output_tile(const TileKind& KR, const TileKind& KC, const TileOut<scalar_t>& io, const scalar_t* sc,
                           const scalar_t* sh, bool relu, int64_t O) {
#if FASTSEG_HAVE_AVX2_CLONE
  if (cpu_has_avx2()) return transform_output_tile_avx2(KR, KC, io, sc, sh, relu, O);
#endif
  transform_output_tile_base(KR, KC, io, sc, sh, relu, O);
}

// Whether float32 products run on gemm_packed_avx2 (NCHW inputs transposed by transpose_strip_avx2):
// winograd_pays' thresholds and winograd_conv's weight layout both follow this one test.
inline bool packed_gemm() { return cpu_has_avx2(); }

template <typename scalar_t>
void winograd_conv(const at::Tensor& x_nhwc, const at::Tensor& weight, at::Tensor& y_nhwc, const at::Tensor& scale,
                   const at::Tensor& shift, const at::Tensor& res_nhwc, bool relu, const ConvGeometry& g,
                   bool cache_weights) {
  const auto& kinds = tile_kinds();
  GRows grows;
  const AxisPlan rows = plan_axis(g.H, g.Ho, g.pH, g.dH, grows);
  const AxisPlan cols = plan_axis(g.W, g.Wo, g.pW, g.dW, grows);
  const int64_t nG = static_cast<int64_t>(grows.rows.size()), nPairs = nG * nG, C = g.C, O = g.O;
  const int64_t nRT = static_cast<int64_t>(rows.tiles.size()), nCT = static_cast<int64_t>(cols.tiles.size());
  const int64_t n_tiles = g.B * nRT * nCT;
  const auto opts = x_nhwc.options();

  const scalar_t* x = x_nhwc.const_data_ptr<scalar_t>();
  scalar_t* y = y_nhwc.mutable_data_ptr<scalar_t>();
  const scalar_t* res = res_nhwc.defined() ? res_nhwc.const_data_ptr<scalar_t>() : nullptr;
  const scalar_t* sc = scale.defined() ? scale.const_data_ptr<scalar_t>() : nullptr;
  const scalar_t* sh = shift.defined() ? shift.const_data_ptr<scalar_t>() : nullptr;

  // Tile t = (image b, row tile i, column tile j), t = (b * nRT + i) * nCT + j, cut into blocks.
  // Up to kWinogradBlockMaxChannels input channels, blocks of about winograd_block_products()
  // products, as many per thread, each computed start to end on one thread; beyond it, one block
  // over all tiles, with both threads on each of its passes and GEMMs (see the constant).
  const int64_t total = g.B * rows.products * cols.products, threads = at::get_num_threads();
  const int64_t want = winograd_block_products();
  const bool per_thread = want > 0 && C <= kWinogradBlockMaxChannels && total >= threads * kWinogradMinBlockProducts;
  int64_t n_target = 1;
  if (per_thread) {
    n_target = std::max<int64_t>(1, (total + want / 2) / want);
    n_target = (n_target + threads - 1) / threads * threads;
  }
  const int64_t target = (total + n_target - 1) / n_target;
  std::vector<int64_t> block_first{0};
  int64_t in_block = 0;
  for (int64_t t = 0; t < n_tiles; ++t) {
    const int64_t i = (t / nCT) % nRT, j = t % nCT;
    in_block += (rows.first[i + 1] - rows.first[i]) * (cols.first[j + 1] - cols.first[j]);
    if (in_block >= target || t + 1 == n_tiles) {
      block_first.push_back(t + 1);
      in_block = 0;
    }
  }
  const int64_t n_blocks = static_cast<int64_t>(block_first.size()) - 1;
  const int64_t chunk = per_thread ? std::min(C, winograd_chunk_channels()) : C;

  // Weight transforms (pairs, O, C), or packed for gemm_packed_avx2 (float32 on AVX2).
  bool packed = false;
#if FASTSEG_HAVE_AVX2_CLONE
  packed = std::is_same_v<scalar_t, float> && packed_gemm();
#endif
  const at::Tensor U = weight_transforms<scalar_t>(weight, grows, cache_weights, packed);
  const scalar_t* u = U.const_data_ptr<scalar_t>();
  const int64_t ldp = packed ? padded_out_channels(O) : O;  // P's row pitch

  // A block: its tiles' input transforms (a chunk of input channels at a time), one GEMM per pair
  // of G rows over the block's products with that pair, accumulating the chunks, and the output
  // transforms with the epilogue. Inside a parallel region, at::parallel_for runs inline (and MKL,
  // for double or without AVX2, on one thread).
  auto run_block = [&](int64_t k) {
    const int64_t t0 = block_first[k], t1 = block_first[k + 1];
    // The block's products grouped by pair: tile t's product e (row-major over its kinds' alphas)
    // is row slot[first[t - t0] + e] of V and P; the pair's rows start at base[pair].
    std::vector<int64_t> count(nPairs, 0), first(t1 - t0 + 1, 0), pair_of, slot;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t i = (t / nCT) % nRT, j = t % nCT;
      first[t - t0] = static_cast<int64_t>(slot.size());
      for (int64_t er = rows.first[i]; er < rows.first[i + 1]; ++er) {
        for (int64_t ec = cols.first[j]; ec < cols.first[j + 1]; ++ec) {
          const int64_t pair = rows.grow[er] * nG + cols.grow[ec];
          pair_of.push_back(pair);
          slot.push_back(count[pair]++);
        }
      }
    }
    first[t1 - t0] = static_cast<int64_t>(slot.size());
    std::vector<int64_t> base(nPairs + 1, 0);
    for (int64_t q = 0; q < nPairs; ++q) base[q + 1] = base[q] + count[q];
    for (size_t e = 0; e < slot.size(); ++e) slot[e] += base[pair_of[e]];
    const int64_t products = base[nPairs];
    // Each pair's first tile of kGemmRows rows, counted over the pairs (the packed GEMMs' split).
    std::vector<int64_t> tile_first(nPairs + 1, 0);
    for (int64_t q = 0; q < nPairs; ++q) {
      tile_first[q + 1] = tile_first[q] + (count[q] + kGemmRows - 1) / kGemmRows;
    }
    scalar_t* v = workspace<scalar_t>(0, products * chunk);
    scalar_t* p = workspace<scalar_t>(1, products * ldp);
    const bool stream = products * chunk * int64_t(sizeof(scalar_t)) > kWinogradStreamBytes;

    for (int64_t c0 = 0; c0 < C; c0 += chunk) {
      const int64_t cn = std::min(chunk, C - c0);
      // Input transform: V[slot] = (BT_row (x) BT_col) x over the tile's (m + 2)^2 inputs.
      at::parallel_for(t0, t1, 1, [&](int64_t ta, int64_t tb) {
        for (int64_t t = ta; t < tb; ++t) {
          const int64_t b = t / nCT / nRT, i = (t / nCT) % nRT, j = t % nCT;
          const AxisTile &rt = rows.tiles[i], &ct = cols.tiles[j];
          const TileKind &KR = kinds[rt.kind], &KC = kinds[ct.kind];
          if (KR.alpha == 0 || KC.alpha == 0) continue;
          TileIO<scalar_t> io{};
          io.stream = stream;
          for (int kr = 0; kr < KR.m + 2; ++kr) {
            const int64_t iy = rt.in0 + kr * g.dH;
            if (iy < 0 || iy >= g.H) continue;
            for (int kc = 0; kc < KC.m + 2; ++kc) {
              const int64_t ix = ct.in0 + kc * g.dW;
              if (ix >= 0 && ix < g.W) io.src[kr][kc] = x + ((b * g.H + iy) * g.W + ix) * C + c0;
            }
          }
          const int64_t* s = slot.data() + first[t - t0];
          for (int er = 0; er < KR.alpha; ++er) {
            for (int ec = 0; ec < KC.alpha; ++ec) io.dst[er][ec] = v + s[er * KC.alpha + ec] * cn;
          }
          transform_input_tile(KR, KC, io, cn);
        }
        if (stream) store_fence();
      });
      // P[pair] (+)= V[pair] U[pair][:, chunk]^T.
#if FASTSEG_HAVE_AVX2_CLONE
      if constexpr (std::is_same_v<scalar_t, float>) {
        if (packed) {
          // Every pair's tiles of kGemmRows rows in one parallel region (inline where the block has
          // its own thread), each thread a run of them: one fork and join per chunk rather than one
          // per pair, which a busy core turns into a wait per pair, and each pair's weights read by
          // one thread.
          at::parallel_for(0, tile_first[nPairs], 1, [&](int64_t r0, int64_t r1) {
            for (int64_t q = 0; q < nPairs; ++q) {
              const int64_t a = std::max(r0, tile_first[q]), b = std::min(r1, tile_first[q + 1]);
              if (a >= b) continue;
              const int64_t m0 = (a - tile_first[q]) * kGemmRows;
              const int64_t m1 = std::min(count[q], (b - tile_first[q]) * kGemmRows);
              gemm_packed(m1 - m0, ldp, cn, v + (base[q] + m0) * cn, cn, u + q * ldp * C + c0 * kGemmPanel,
                          C * kGemmPanel, p + (base[q] + m0) * ldp, ldp, c0 > 0);
            }
          });
          continue;
        }
      }
#endif
      for (int64_t q = 0; q < nPairs; ++q) {
        if (count[q] == 0) continue;
        const at::Tensor a = at::from_blob(v + base[q] * cn, {count[q], cn}, opts);
        const at::Tensor bt = at::from_blob(const_cast<scalar_t*>(u) + q * O * C + c0, {cn, O}, {1, C}, opts);
        at::Tensor out = at::from_blob(p + base[q] * O, {count[q], O}, opts);
        if (c0 == 0) {
          at::mm_out(out, a, bt);
        } else {
          out.addmm_(a, bt);
        }
      }
    }

    // Output transform and epilogue.
    at::parallel_for(t0, t1, 1, [&](int64_t ta, int64_t tb) {
      for (int64_t t = ta; t < tb; ++t) {
        const int64_t b = t / nCT / nRT, i = (t / nCT) % nRT, j = t % nCT;
        const AxisTile &rt = rows.tiles[i], &ct = cols.tiles[j];
        const TileKind &KR = kinds[rt.kind], &KC = kinds[ct.kind];
        const int64_t pos = ((b * g.Ho + rt.out0) * g.Wo + ct.out0) * O;
        TileOut<scalar_t> io{};
        io.out0 = y + pos;
        io.res0 = res ? res + pos : nullptr;
        io.row = g.dH * g.Wo * O;
        io.col = g.dW * O;
        const int64_t* s = slot.data() + first[t - t0];
        for (int er = 0; er < KR.alpha; ++er) {
          for (int ec = 0; ec < KC.alpha; ++ec) io.src[er][ec] = p + s[er * KC.alpha + ec] * ldp;
        }
        transform_output_tile(KR, KC, io, sc, sh, relu, O);
      }
    });
  };

  if (n_blocks == 1) {
    run_block(0);
    return;
  }
  // Blocks handed out one at a time, to whichever thread is free.
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min(n_blocks, threads), 1, [&](int64_t, int64_t) {
    for (int64_t k = next++; k < n_blocks; k = next++) run_block(k);
  });
}

// dst (cols x rows) = src (rows x cols)^T for each of B matrices: NCHW <-> NHWC around the winograd
// path for float32 NCHW tensors, 8 x 8 blocks through AVX2 registers (ATen's copies took 1.9 ms each
// way at 256 x 65 x 65, a fifth of the call).
FASTSEG_ALWAYS_INLINE void transpose_scalar(const float* src, float* dst, int64_t rows, int64_t cols, int64_t i0,
                                            int64_t i1, int64_t j0, int64_t j1) {
  for (int64_t j = j0; j < j1; ++j) {
    for (int64_t i = i0; i < i1; ++i) dst[j * rows + i] = src[i * cols + j];
  }
}

#if FASTSEG_HAVE_AVX2_CLONE
FASTSEG_TARGET_AVX2 void transpose_strip_avx2(const float* src, float* dst, int64_t rows, int64_t cols, int64_t j0,
                                              int64_t j1) {
  int64_t i = 0;
  for (; i + 8 <= rows; i += 8) {
    int64_t j = j0;
    for (; j + 8 <= j1; j += 8) {
      __m256 r[8], t[8], u[8];
      for (int k = 0; k < 8; ++k) r[k] = _mm256_loadu_ps(src + (i + k) * cols + j);
      for (int k = 0; k < 8; k += 2) {
        t[k] = _mm256_unpacklo_ps(r[k], r[k + 1]);
        t[k + 1] = _mm256_unpackhi_ps(r[k], r[k + 1]);
      }
      for (int k = 0; k < 8; k += 4) {
        u[k] = _mm256_shuffle_ps(t[k], t[k + 2], _MM_SHUFFLE(1, 0, 1, 0));
        u[k + 1] = _mm256_shuffle_ps(t[k], t[k + 2], _MM_SHUFFLE(3, 2, 3, 2));
        u[k + 2] = _mm256_shuffle_ps(t[k + 1], t[k + 3], _MM_SHUFFLE(1, 0, 1, 0));
        u[k + 3] = _mm256_shuffle_ps(t[k + 1], t[k + 3], _MM_SHUFFLE(3, 2, 3, 2));
      }
      for (int k = 0; k < 4; ++k) {
        _mm256_storeu_ps(dst + (j + k) * rows + i, _mm256_permute2f128_ps(u[k], u[k + 4], 0x20));
        _mm256_storeu_ps(dst + (j + k + 4) * rows + i, _mm256_permute2f128_ps(u[k], u[k + 4], 0x31));
      }
    }
    transpose_scalar(src, dst, rows, cols, i, i + 8, j, j1);
  }
  transpose_scalar(src, dst, rows, cols, i, rows, j0, j1);
}
#endif

void transpose_batched(const float* src, float* dst, int64_t B, int64_t rows, int64_t cols) {
  constexpr int64_t kStrip = 64;  // columns per task
  const int64_t strips = (cols + kStrip - 1) / kStrip;
  at::parallel_for(0, B * strips, 1, [&](int64_t a, int64_t b) {
    for (int64_t t = a; t < b; ++t) {
      const float* s = src + (t / strips) * rows * cols;
      float* d = dst + (t / strips) * rows * cols;
      const int64_t j0 = (t % strips) * kStrip, j1 = std::min(cols, j0 + kStrip);
#if FASTSEG_HAVE_AVX2_CLONE
      if (cpu_has_avx2()) {
        transpose_strip_avx2(s, d, rows, cols, j0, j1);
        continue;
      }
#endif
      transpose_scalar(s, d, rows, cols, 0, rows, j0, j1);
    }
  });
}

// Whether the winograd path applies, and whether it beats oneDNN's convolution (below).
bool winograd_possible(const ConvGeometry& g, int64_t groups, at::ScalarType type) {
  return groups == 1 && g.kH == 3 && g.kW == 3 && g.sH == 1 && g.sW == 1 &&
         (type == at::kFloat || type == at::kDouble);
}

// Whether an NCHW layer with fewer than kWinogradPackedMinOutChannelsNchw outputs is one whose
// winograd path ran faster than oneDNN on Intel AVX-512 (kWinogradMinSavingWideFma's sweep).
bool winograd_few_outputs_nchw(const ConvGeometry& g) {
  return wide_fma() && g.C <= kWinogradFewOutputsNchwMaxInChannels &&
         (g.C >= kWinogradFewOutputsNchwMinInChannels || g.Ho * g.Wo <= kWinogradSmallMap);
}

// cold: the weight transforms are computed on this call. band: g is a band of a larger map
// (unpool_conv's), whose GEMMs are paid per band: no small-map rule.
bool winograd_pays(const ConvGeometry& g, bool channels_last, bool cold, bool band = false) {
  const bool packed = packed_gemm();
  if (packed ? g.C < kWinogradPackedMinInChannels || g.O < kWinogradPackedMinOutChannels
             : g.C < kWinogradMinInChannels || g.O < kWinogradMinOutChannels) {
    return false;
  }
  if (packed && !channels_last && g.O < kWinogradPackedMinOutChannelsNchw && !winograd_few_outputs_nchw(g)) {
    return false;
  }
  if (packed && wide_fma() && channels_last && g.O < kWinogradFewOutputs && g.O % 16 == 0 &&
      g.C > kWinogradSmallMapMaxInChannels && (band || g.Ho * g.Wo > kWinogradTinyMap)) {
    return false;  // a band is part of a larger map
  }
  GRows grows;
  const AxisPlan rows = plan_axis(g.H, g.Ho, g.pH, g.dH, grows);
  const AxisPlan cols = plan_axis(g.W, g.Wo, g.pW, g.dW, grows);
  const double gemms = double(grows.rows.size()) * double(grows.rows.size());
  const double stored_out = double(packed ? padded_out_channels(g.O) : g.O);  // panels are padded to 16
  if (gemms * double(g.C) * stored_out * sizeof(float) > double(kWinogradMaxTransformBytes)) return false;
  const bool small_map_pays =
      channels_last ? g.C <= kWinogradSmallMapMaxInChannels
                    : g.C <= kWinogradSmallMapMaxInChannels / 2 && g.O < kWinogradSmallMapNchwMaxOut;
  if (packed && wide_fma() && !cold && !band && g.Ho * g.Wo <= kWinogradSmallMap && small_map_pays) return true;
  const double per_gemm = kWinogradGemmRows + (cold ? kWinogradTransformRows : 0.0);
  const double cost = g.B * double(rows.products) * double(cols.products) + per_gemm * gemms;
  const double taps = g.B * double(rows.direct_taps) * double(cols.direct_taps);
  double saving = channels_last ? kWinogradMinSavingChannelsLast : kWinogradMinSavingNchw;
  if (packed && g.O < kWinogradFewOutputs) saving = kWinogradMinSavingFewOutputs;
  if (packed && wide_fma()) saving = kWinogradMinSavingWideFma;
  return taps >= saving * cost;
}

// Whether the float32 weight transforms of this geometry would stay in the weight cache.
bool transforms_likely_kept(const ConvGeometry& g, const at::Tensor& weight) {
  GRows grows;
  plan_axis(g.H, g.Ho, g.pH, g.dH, grows);
  plan_axis(g.W, g.Wo, g.pW, g.dW, grows);
  const bool packed = packed_gemm();
  const int64_t nG = static_cast<int64_t>(grows.rows.size());
  const int64_t bytes = nG * nG * (packed ? padded_out_channels(g.O) : g.O) * g.C * int64_t(sizeof(float));
  return DerivedWeightCache::likely_kept("atrous_conv2d", weight, transform_cache_key(grows, packed), bytes);
}

void check_atrous_conv2d_args(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& scale,
                              const std::optional<at::Tensor>& shift, const std::optional<at::Tensor>& residual,
                              at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                              int64_t groups) {
  TORCH_CHECK_VALUE(input.dim() == 4, "atrous_conv2d: input must be 4-D (B, C, H, W), got ", input.dim(), "-D");
  TORCH_CHECK_VALUE(weight.dim() == 4, "atrous_conv2d: weight must be 4-D (O, C / groups, kH, kW), got ",
                    weight.dim(), "-D");
  TORCH_CHECK_TYPE(at::isFloatingType(input.scalar_type()) && weight.scalar_type() == input.scalar_type(),
                   "atrous_conv2d: input and weight must share a floating-point dtype, got ",
                   input.scalar_type(), " and ", weight.scalar_type());
  TORCH_CHECK_VALUE(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2,
                    "atrous_conv2d: stride, padding and dilation must have 2 elements each");
  TORCH_CHECK_VALUE(stride[0] > 0 && stride[1] > 0 && dilation[0] > 0 && dilation[1] > 0,
                    "atrous_conv2d: stride and dilation must be positive, got ", stride, " and ", dilation);
  TORCH_CHECK_VALUE(padding[0] >= 0 && padding[1] >= 0, "atrous_conv2d: padding must be non-negative, got ", padding);
  TORCH_CHECK_VALUE(groups > 0 && input.size(1) % groups == 0 && weight.size(0) % groups == 0 &&
                        weight.size(1) * groups == input.size(1),
                    "atrous_conv2d: weight has shape ", weight.sizes(), " but input has ", input.size(1),
                    " channels and groups = ", groups);
  TORCH_CHECK_VALUE(input.size(1) > 0, "atrous_conv2d: input has no channels: shape ", input.sizes());
  const int64_t O = weight.size(0);
  for (const auto* t : {&scale, &shift}) {
    if (t->has_value()) {
      TORCH_CHECK_VALUE((*t)->dim() == 1 && (*t)->size(0) == O, "atrous_conv2d: scale and shift must have shape (",
                        O, "), got ", (*t)->sizes());
      TORCH_CHECK_TYPE((*t)->scalar_type() == input.scalar_type(), "atrous_conv2d: scale/shift dtype ",
                       (*t)->scalar_type(), " differs from input's ", input.scalar_type());
    }
  }
  if (residual.has_value()) {
    TORCH_CHECK_TYPE(residual->scalar_type() == input.scalar_type(), "atrous_conv2d: residual dtype ",
                     residual->scalar_type(), " differs from input's ", input.scalar_type());
  }
}

at::Tensor atrous_conv2d_cpu(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& scale,
                             const std::optional<at::Tensor>& shift, const std::optional<at::Tensor>& residual,
                             at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                             bool relu, c10::string_view algorithm) {
  check_atrous_conv2d_args(input, weight, scale, shift, residual, stride, padding, dilation, groups);
  const ConvGeometry g = conv_geometry(input.size(0), input.size(1), input.size(2), input.size(3), weight.size(0),
                                       weight.size(2), weight.size(3), stride, padding, dilation);
  TORCH_CHECK_VALUE(g.Ho > 0 && g.Wo > 0, "atrous_conv2d: the output would be empty (", g.Ho, "x", g.Wo, ")");
  const auto format = output_memory_format(input);
  const bool channels_last = format == at::MemoryFormat::ChannelsLast;
  if (residual.has_value()) {
    TORCH_CHECK_VALUE(residual->sizes() == at::IntArrayRef({g.B, g.O, g.Ho, g.Wo}), "atrous_conv2d: residual has shape ",
                      residual->sizes(), ", expecting (", g.B, ", ", g.O, ", ", g.Ho, ", ", g.Wo, ")");
  }
  TORCH_CHECK_VALUE(algorithm == "auto" || algorithm == "auto_training" || algorithm == "taps" ||
                        algorithm == "conv" || algorithm == "winograd",
                    "atrous_conv2d: algorithm must be 'auto', 'auto_training', 'taps', 'winograd' or 'conv', got '",
                    std::string(algorithm), "'");
  const auto type = input.scalar_type();
  const bool taps_possible = groups == 1 && (type == at::kFloat || type == at::kDouble);
  TORCH_CHECK_VALUE(algorithm != "taps" || taps_possible,
                    "atrous_conv2d: the taps algorithm needs groups == 1 and float32 or float64, got groups = ",
                    groups, " and ", type);
  TORCH_CHECK_VALUE(algorithm != "winograd" || winograd_possible(g, groups, type),
                    "atrous_conv2d: the winograd algorithm needs a 3x3 kernel, stride 1, groups == 1 and float32 or "
                    "float64, got kernel ", g.kH, "x", g.kW, ", stride ", stride, ", groups = ", groups, " and ", type);
  if (g.B == 0) return at::empty({0, g.O, g.Ho, g.Wo}, input.options().memory_format(format));

  // The epilogue's scale and shift in the accumulation type, the residual in the output's layout.
  const auto acc_type = at::toOpMathType(type);
  const at::Tensor sc = scale.has_value() ? scale->to(acc_type).contiguous() : at::Tensor();
  const at::Tensor sh = shift.has_value() ? shift->to(acc_type).contiguous() : at::Tensor();

  // 'auto_training' (what fastseg.atrous_conv2d passes when autograd will update the weights): the
  // weights change on every call, so their winograd transforms are neither looked up nor kept, and
  // the path is chosen with their cost counted.
  const bool training = algorithm == "auto_training";
  const bool automatic = algorithm == "auto" || training;
  bool use_winograd = algorithm == "winograd";
  if (automatic) {
    use_winograd = type == at::kFloat && winograd_possible(g, groups, type) &&
                   winograd_pays(g, channels_last, /*cold=*/training);
    // Inference counts on the transforms staying cached: where the cache has no room for them
    // (a model's layers outgrowing its budget), each call would recompute them.
    if (use_winograd && !training && !transforms_likely_kept(g, weight)) {
      use_winograd = winograd_pays(g, channels_last, /*cold=*/true);
    }
  }
  // The residual in the layout its path reads: channels_last for winograd, the output's otherwise.
  const auto res_format = use_winograd ? at::MemoryFormat::ChannelsLast : format;
  const at::Tensor res = residual.has_value() ? residual->contiguous(res_format) : at::Tensor();
  if (use_winograd) {
    if (type == at::kFloat && !channels_last && input.is_contiguous()) {
      // NCHW float32: transposed into and out of per-thread buffers kept between calls.
      const int64_t in_numel = g.B * g.C * g.H * g.W, out_numel = g.B * g.O * g.Ho * g.Wo;
      float* xb = workspace<float>(2, in_numel);
      float* yb = workspace<float>(3, out_numel);
      transpose_batched(input.const_data_ptr<float>(), xb, g.B, g.C, g.H * g.W);
      const at::Tensor x = at::from_blob(xb, {g.B, g.C, g.H, g.W}, {g.C * g.H * g.W, 1, g.W * g.C, g.C}, input.options());
      at::Tensor y = at::from_blob(yb, {g.B, g.O, g.Ho, g.Wo}, {g.O * g.Ho * g.Wo, 1, g.Wo * g.O, g.O}, input.options());
      winograd_conv<float>(x, weight.contiguous(), y, sc, sh, res, relu, g, /*cache_weights=*/!training);
      at::Tensor out = at::empty({g.B, g.O, g.Ho, g.Wo}, input.options());
      transpose_batched(yb, out.mutable_data_ptr<float>(), g.B, g.Ho * g.Wo, g.O);
      return out;
    }
    const at::Tensor x = input.contiguous(at::MemoryFormat::ChannelsLast);
    at::Tensor out = at::empty({g.B, g.O, g.Ho, g.Wo}, input.options().memory_format(at::MemoryFormat::ChannelsLast));
    AT_DISPATCH_FLOATING_TYPES(type, "atrous_conv2d_winograd", [&] {
      winograd_conv<scalar_t>(x, weight.contiguous(), out, sc, sh, res, relu, g, /*cache_weights=*/!training);
    });
    return out.contiguous(format);
  }
  bool use_taps = algorithm == "taps";
  if (automatic) use_taps = taps_possible && type == at::kDouble;
  if (use_taps) {
    const auto rows = split_axis(g.H, g.Ho, g.kH, g.sH, g.pH, g.dH);
    const auto cols = split_axis(g.W, g.Wo, g.kW, g.sW, g.pW, g.dW);
    const at::Tensor x = input.contiguous(at::MemoryFormat::ChannelsLast);
    at::Tensor out = at::empty({g.B, g.O, g.Ho, g.Wo}, input.options().memory_format(format));
    AT_DISPATCH_FLOATING_TYPES(type, "atrous_conv2d_taps", [&] {
      taps_conv<scalar_t>(x, weight.contiguous(), out, sc, sh, res, relu, g, rows, cols, channels_last);
    });
    return out;
  }
  at::Tensor out = at::convolution(input, weight, std::nullopt, stride, padding, dilation, false, {0, 0}, groups)
                       .contiguous(format);
  if (sc.defined() || sh.defined() || res.defined() || relu) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, type, "atrous_conv2d_epilogue", [&] {
      epilogue_in_place<scalar_t>(out, sc, sh, res, relu, channels_last);
    });
  }
  return out;
}

}  // namespace

bool atrous_takes_winograd(int64_t B, int64_t C, int64_t H, int64_t W, int64_t O, int64_t kH, int64_t kW,
                           at::IntArrayRef padding, at::IntArrayRef dilation, bool channels_last) {
  const ConvGeometry g = conv_geometry(B, C, H, W, O, kH, kW, {1, 1}, padding, dilation);
  return g.Ho > 0 && g.Wo > 0 && winograd_possible(g, 1, at::kFloat) &&
         winograd_pays(g, channels_last, /*cold=*/false, /*band=*/true);
}

TORCH_LIBRARY_IMPL(fastseg, CPU, m) {
  m.impl("atrous_conv2d", &atrous_conv2d_cpu);
}

}  // namespace fastseg
