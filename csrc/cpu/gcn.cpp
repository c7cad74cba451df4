// Global Convolutional Network block on the CPU (Peng et al., "Large Kernel Matters -- Improve
// Semantic Segmentation by Global Convolutional Network", CVPR 2017, Fig. 2(b)):
//   out = conv_1xk(conv_kx1(x, w_l1) + b_l1, w_l2) + b_l2 + conv_kx1(conv_1xk(x, w_r1) + b_r1, w_r2) + b_r2
// with 'same' zero padding d * (k - 1) / 2 along each convolution's long axis.
//
// Three routes. The FFT route (below, "The FFT route") takes large kernels: every stage of the paper
// at k = 15, 1.8-2.9x eager here. The two direct routes take the rest (short kernels on small maps,
// float64). Their rule (measured on this shared 2-core EPYC, side by side with eager,
// benchmarks/test_bench_gcn.py): nearly all the work is the two first convolutions, which both
// read the Cin-channel input. They become ONE GEMM that reads x once, P = [W_l1 taps ; W_r1 taps]
// (2 k Cmid x Cin) @ X_b (Cin x H W), every tap's partial product at every input pixel (MKL, through
// at::mm_out). Each middle map is then
// a shift-and-add of P's k per-tap planes (vertical shifts for the left branch, horizontal for the
// right; taps that fall outside the image are skipped, which is exactly zero padding), starting from
// its bias. The two second convolutions (Cmid -> Cout, k taps: 1-8% of the FLOPs at Cmid = Cout = 21, Cin 2048..256)
// run as direct row-by-row loops accumulating into one output that starts as b_l2 + b_r2, so the
// final add never makes a pass of its own. Per image: one multithreaded GEMM, everything else serial
// on the calling thread. Eager PyTorch runs five parallel operators (four oneDNN convolutions and an
// add); on this loaded machine each extra parallel region costs scheduler ticks (a 3 MFLOP at::mm
// measured 12-16 ms median), and a parallel region of our own between MKL calls left OpenMP threads
// spinning against MKL's (atrous.cpp). Measured: at::mm for the second convolutions, plus ATen's
// permuted copy_ for the weight packing, made the 2048-channel 16x16 case 2.2x slower than this.
//
// float16/bfloat16 inputs are computed in float32 (15+ tap sums would lose too much in 16 bits) and
// rounded once at the end; float32 and float64 run natively (float64 never by FFT).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "common.h"
#include "fft.h"
#include "weight_cache.h"

namespace fastseg {
namespace {

// The serial passes are compiled twice, for AVX2 + FMA and for the baseline, and picked at load time
// (the package is built without -march=native).
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define FASTSEG_CLONES __attribute__((target_clones("arch=haswell", "default")))
#else
#define FASTSEG_CLONES
#endif
#define FASTSEG_INLINE __attribute__((always_inline)) inline

// dst (C planes of H x W) += sum over taps t of src's plane (t * C + c) shifted by s_t = t * d - pad
// along one axis: dst[h][w] += src_t[h + s_t][w] (vertical) or src_t[h][w + s_t] (horizontal), for
// the (h, w) whose source pixel is inside the image (the others read zero padding).
template <typename T>
FASTSEG_INLINE void shift_add_planes(const T* src, T* dst, int64_t C, int64_t H, int64_t W, int64_t k, int64_t d,
                                     bool vertical) {
  const int64_t HW = H * W, pad = d * (k - 1) / 2;
  for (int64_t c = 0; c < C; ++c) {
    T* dp = dst + c * HW;
    for (int64_t t = 0; t < k; ++t) {
      const int64_t s = t * d - pad;
      const T* sp = src + (t * C + c) * HW;
      if (vertical) {
        const int64_t h0 = std::max<int64_t>(0, -s), h1 = std::min<int64_t>(H, H - s);
        if (h0 >= h1) continue;
        // Whole rows move together: one contiguous run of (h1 - h0) * W elements.
        T* __restrict__ a = dp + h0 * W;
        const T* __restrict__ b = sp + (h0 + s) * W;
        const int64_t n = (h1 - h0) * W;
        for (int64_t i = 0; i < n; ++i) a[i] += b[i];
      } else {
        const int64_t w0 = std::max<int64_t>(0, -s), w1 = std::min<int64_t>(W, W - s);
        if (w0 >= w1) continue;
        for (int64_t h = 0; h < H; ++h) {
          T* __restrict__ a = dp + h * W + w0;
          const T* __restrict__ b = sp + h * W + w0 + s;
          for (int64_t i = 0; i < w1 - w0; ++i) a[i] += b[i];
        }
      }
    }
  }
}

// out (Co planes of H x W) += the k-tap convolution of mid (Cm planes) along one axis, with tap t's
// (Co, Cm) weights at w2 + t * Co * Cm. Row by row, so that the k source rows of every channel stay
// in cache while all Co outputs of the row are accumulated.
template <typename T>
FASTSEG_INLINE void small_conv(const T* mid, const T* w2, T* out, int64_t Cm, int64_t Co, int64_t H, int64_t W,
                               int64_t k, int64_t d, bool vertical) {
  const int64_t HW = H * W, pad = d * (k - 1) / 2;
  for (int64_t h = 0; h < H; ++h) {
    for (int64_t o = 0; o < Co; ++o) {
      T* __restrict__ y = out + o * HW + h * W;
      for (int64_t t = 0; t < k; ++t) {
        const int64_t s = t * d - pad;
        int64_t w0 = 0, w1 = W;
        const T* row;
        if (vertical) {
          if (h + s < 0 || h + s >= H) continue;
          row = mid + (h + s) * W;
        } else {
          w0 = std::max<int64_t>(0, -s), w1 = std::min<int64_t>(W, W - s);
          if (w0 >= w1) continue;
          row = mid + h * W + s;
        }
        const T* wt = w2 + (t * Co + o) * Cm;
        for (int64_t c = 0; c < Cm; ++c) {
          const T a = wt[c];
          const T* __restrict__ x = row + c * HW;
          for (int64_t w = w0; w < w1; ++w) y[w] += a * x[w];
        }
      }
    }
  }
}

// Fills each of the C planes of dst (pixels each) with the sum of the given per-channel biases (or 0).
template <typename T>
FASTSEG_INLINE void fill_bias(T* dst, int64_t C, int64_t pixels, const T* b1, const T* b2) {
  for (int64_t c = 0; c < C; ++c) {
    const T v = (b1 ? b1[c] : T(0)) + (b2 ? b2[c] : T(0));
    std::fill(dst + c * pixels, dst + (c + 1) * pixels, v);
  }
}

template <typename T>
struct Image {
  const T* P;  // (2 k Cm, H, W): the first GEMM's per-tap products, left taps then right taps
  T* mid;      // (2 Cm, H, W) scratch: left then right middle maps
  const T *w2l, *w2r;  // (k, Co, Cm) taps of the second convolutions
  const T *Ql, *Qr;    // (k Co, H, W) per-tap products of the second convolutions, or null: direct loops
  const T *b_l1, *b_l2, *b_r1, *b_r2;  // or null
  T* out;        // (Co, H, W) planar, or (H, W, Co) when channels_last
  T* planar;     // (Co, H, W) scratch when channels_last
  int64_t Cm, Co, H, W, k, d;
  bool channels_last;
};

// The middle maps from P by shift-and-add, starting from b_l1 / b_r1.
template <typename T>
FASTSEG_INLINE void middle_maps_impl(const Image<T>& g) {
  const int64_t HW = g.H * g.W, kCm = g.k * g.Cm;
  T *ml = g.mid, *mr = g.mid + g.Cm * HW;
  fill_bias<T>(ml, g.Cm, HW, g.b_l1, nullptr);
  fill_bias<T>(mr, g.Cm, HW, g.b_r1, nullptr);
  shift_add_planes<T>(g.P, ml, g.Cm, g.H, g.W, g.k, g.d, /*vertical=*/true);
  shift_add_planes<T>(g.P + kCm * HW, mr, g.Cm, g.H, g.W, g.k, g.d, /*vertical=*/false);
}

// Both second convolutions accumulated into one output that starts as b_l2 + b_r2 (the final add,
// fused): shift-and-adds of Ql / Qr when the GEMMs made them, direct loops over mid otherwise.
template <typename T>
FASTSEG_INLINE void output_impl(const Image<T>& g) {
  const int64_t HW = g.H * g.W;
  T* o = g.channels_last ? g.planar : g.out;
  fill_bias<T>(o, g.Co, HW, g.b_l2, g.b_r2);
  if (g.Ql) {
    shift_add_planes<T>(g.Ql, o, g.Co, g.H, g.W, g.k, g.d, /*vertical=*/false);
    shift_add_planes<T>(g.Qr, o, g.Co, g.H, g.W, g.k, g.d, /*vertical=*/true);
  } else {
    small_conv<T>(g.mid, g.w2l, o, g.Cm, g.Co, g.H, g.W, g.k, g.d, /*vertical=*/false);
    small_conv<T>(g.mid + g.Cm * HW, g.w2r, o, g.Cm, g.Co, g.H, g.W, g.k, g.d, /*vertical=*/true);
  }
  if (g.channels_last) {
    for (int64_t p = 0; p < HW; ++p) {
      for (int64_t c = 0; c < g.Co; ++c) g.out[p * g.Co + c] = o[c * HW + p];
    }
  }
}

FASTSEG_CLONES void middle_maps(const Image<float>& g) { middle_maps_impl<float>(g); }
FASTSEG_CLONES void middle_maps(const Image<double>& g) { middle_maps_impl<double>(g); }
FASTSEG_CLONES void output(const Image<float>& g) { output_impl<float>(g); }
FASTSEG_CLONES void output(const Image<double>& g) { output_impl<double>(g); }

// Second convolutions with at most this many Cmid x Cout channel pairs run as direct serial loops
// (the paper's 21 x 21: a few % of the work, not worth a parallel region); wider ones (a 256 -> 256
// block) go through MKL like the first, as Q = W_2 taps (k Cout x Cmid) @ mid plus shift-and-adds.
constexpr int64_t kMaxDirectChannelPairs = 64 * 64;

// Packs a (O, I, k, 1) or (O, I, 1, k) weight, contiguous, as dst (k, O, I): row t * O + o holds
// tap t's (o, :). A serial loop: ATen's permuted copy_ was measured at several ms for the
// 21 x 2048 x 15 weights (and is one more parallel region).
template <typename T>
void pack_taps(T* dst, const at::Tensor& w) {
  const int64_t O = w.size(0), I = w.size(1), k = w.size(2) * w.size(3);
  const T* src = w.const_data_ptr<T>();
  // Each destination row written contiguously: writing the k rows of one (o, i) at once put k
  // streams O * I * 4 bytes apart, a multiple of 4 KiB at Cin = 2048 (all in the same L1 sets).
  for (int64_t o = 0; o < O; ++o) {
    for (int64_t t = 0; t < k; ++t) {
      const T* __restrict__ s = src + o * I * k + t;
      T* __restrict__ r = dst + (t * O + o) * I;
      for (int64_t i = 0; i < I; ++i) r[i] = s[i * k];
    }
  }
}

template <typename T>
const T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

// Every intermediate is planar (a plane per tap and channel) whatever x's layout: for channels_last
// x the GEMM reads X_b as a transposed operand (measured as fast as the pixel-major product here),
// the shift-and-adds stay unit-stride along image rows, and only the small Cout-channel result is
// transposed on its way out. MKL runs the one big GEMM per image; the rest is serial (see the
// header): on this loaded 2-core machine every extra multithreaded call cost whole scheduler ticks
// (a 3 MFLOP at::mm measured at 12-16 ms median), more than the serial work it would split.
template <typename T>
void gcn_forward(const at::Tensor& x, const at::Tensor& w_l1, const at::Tensor& w_l2, const at::Tensor& w_r1,
                 const at::Tensor& w_r2, const at::Tensor& b_l1, const at::Tensor& b_l2, const at::Tensor& b_r1,
                 const at::Tensor& b_r2, at::Tensor& out, int64_t k, int64_t d, bool channels_last) {
  const int64_t B = x.size(0), Cin = x.size(1), H = x.size(2), W = x.size(3), HW = H * W;
  const int64_t Cm = w_l1.size(0), Co = out.size(1), kCm = k * Cm;
  const auto opts = x.options().memory_format(at::MemoryFormat::Contiguous);
  at::Tensor w1 = at::empty({2 * kCm, Cin}, opts);  // [W_l1 taps ; W_r1 taps]
  at::Tensor w2 = at::empty({2, k * Co, Cm}, opts);
  pack_taps<T>(w1.mutable_data_ptr<T>(), w_l1);
  pack_taps<T>(w1.mutable_data_ptr<T>() + kCm * Cin, w_r1);
  pack_taps<T>(w2.mutable_data_ptr<T>(), w_l2);
  pack_taps<T>(w2.mutable_data_ptr<T>() + k * Co * Cm, w_r2);
  at::Tensor P = at::empty({2 * kCm, HW}, opts), mid = at::empty({2 * Cm, HW}, opts);
  at::Tensor planar = channels_last ? at::empty({Co, HW}, opts) : at::Tensor();
  const bool gemm_second = Cm * Co > kMaxDirectChannelPairs;
  at::Tensor Q = gemm_second ? at::empty({2, k * Co, HW}, opts) : at::Tensor();
  at::Tensor w2v = w2.view({2, k * Co, Cm});
  Image<T> g{P.const_data_ptr<T>(), mid.mutable_data_ptr<T>(), w2.const_data_ptr<T>(),
             w2.const_data_ptr<T>() + k * Co * Cm, gemm_second ? Q.const_data_ptr<T>() : nullptr,
             gemm_second ? Q.const_data_ptr<T>() + k * Co * HW : nullptr, ptr_or_null<T>(b_l1),
             ptr_or_null<T>(b_l2), ptr_or_null<T>(b_r1), ptr_or_null<T>(b_r2), nullptr,
             channels_last ? planar.mutable_data_ptr<T>() : nullptr, Cm, Co, H, W, k, d, channels_last};
  for (int64_t b = 0; b < B; ++b) {
    // P (2 k Cm, HW) = W1 @ X_b: every tap's product at every input pixel, x read once. For NHWC x,
    // X_b is the transposed view with strides (1, Cin): no copy.
    at::mm_out(P, w1, x[b].view({Cin, HW}));
    middle_maps(g);
    if (gemm_second) {
      at::Tensor ql = Q[0], qr = Q[1];
      at::mm_out(ql, w2v[0], mid.narrow(0, 0, Cm));
      at::mm_out(qr, w2v[1], mid.narrow(0, Cm, Cm));
    }
    g.out = out.mutable_data_ptr<T>() + b * Co * HW;
    output(g);
  }
}

// ---- The FFT route ---------------------------------------------------------------------------------
// Both first convolutions are products in the frequency domain along their long axis, and so are
// the second ones, whose axis is the other: with x's 2-D spectrum X, the left branch is
// L = H_l(kw) G_l(kh) X(kh, kw) and the right R = H_r(kh) G_r(kw) X(kh, kw), where G (Cmid x Cin) and
// H (Cout x Cmid) are the taps' spectra, a matrix per frequency. Each branch is computed as
//   1. a real FFT of x along its first axis (fft.h, zero-padded to n >= size + pad so the circular
//      convolution equals the zero-padded one on the image), written bins-outermost;
//   2. per bin, one complex GEMM over Cin (MKL's cgemm through at::bmm);
//   3. an FFT of the Cmid-channel result along the other axis, per bin a Cmid -> Cout complex GEMM,
//      and the inverse transforms (torch.fft: these move only Cmid and Cout channels).
// Per output pixel and branch, step 2 costs about 4 (n / 2 + 1) / size real multiply-adds per
// (Cmid, Cin) pair (2.3 at 128 and 64 px, 3.1 at 32, 3.3 at 16) where the direct convolution costs
// k (15 in the paper). Float32 only (half and bfloat16 inputs computed in float32): the
// transforms' rounding is about 3e-7 relative here.

// The 16-sequence transform batches of one image, compiled for AVX-512 (512-bit loops: a batch's 16
// lanes one vector), AVX2 + FMA and the baseline.
struct SpectraJobs {
  const float* x;  // one image: (Cin, H, W) planar or (H, W, Cin) channels_last
  int64_t Cin, H, W;
  bool channels_last;
  const fft::Plan *ph, *pw;  // along H (left branch) and along W (right branch)
  float *XL, *XR;            // complex spectra, see spectra()
  int64_t left_jobs() const { return channels_last ? W * div_ceil(Cin, 16) : Cin * div_ceil(W, 16); }
  int64_t right_jobs() const { return channels_last ? H * div_ceil(Cin, 16) : Cin * div_ceil(H, 16); }
};

FASTSEG_ALWAYS_INLINE void run_spectra_jobs_impl(const SpectraJobs& s, int64_t j0, int64_t j1) {
  const int64_t Cin = s.Cin, H = s.H, W = s.W, nl = s.left_jobs(), nr = s.right_jobs(), n2 = 2 * std::min(nl, nr);
  fft::Scratch scratch(std::max(s.ph->n, s.pw->n));
  for (int64_t j = j0; j < j1; ++j) {
    fft::Batch b;
    // Left and right jobs alternate (they differ in cost), then the longer list's rest.
    const bool left = j < n2 ? j % 2 == 0 : nl > nr;
    const int64_t i = j < n2 ? j / 2 : j - n2 + n2 / 2;
    if (s.channels_last) {
      // 16 channels at one pixel column (left) or row (right): contiguous lanes.
      const int64_t groups = div_ceil(Cin, 16), c0 = (i % groups) * 16, at = i / groups;
      b.lane = 1, b.lanes = std::min<int64_t>(16, Cin - c0);
      if (left) {
        b.src = s.x + at * Cin + c0, b.step = W * Cin, b.len = H;
        b.dst = s.XL + 2 * (at * Cin + c0), b.bin_stride = W * Cin;
      } else {
        b.src = s.x + at * W * Cin + c0, b.step = Cin, b.len = W;
        b.dst = s.XR + 2 * (at * Cin + c0), b.bin_stride = H * Cin;
      }
    } else if (left) {
      // 16 neighbouring columns of one channel, down the image.
      const int64_t groups = div_ceil(W, 16), w0 = (i % groups) * 16, c = i / groups;
      b.src = s.x + c * H * W + w0, b.step = W, b.lane = 1, b.lanes = std::min<int64_t>(16, W - w0), b.len = H;
      b.dst = s.XL + 2 * (c * W + w0), b.bin_stride = Cin * W;
    } else {
      // 16 rows of one channel, along the rows.
      const int64_t groups = div_ceil(H, 16), h0 = (i % groups) * 16, c = i / groups;
      b.src = s.x + (c * H + h0) * W, b.step = 1, b.lane = W, b.lanes = std::min<int64_t>(16, H - h0), b.len = W;
      b.dst = s.XR + 2 * (c * H + h0), b.bin_stride = Cin * H;
    }
    fft::real_fft16(left ? *s.ph : *s.pw, b, scratch);
  }
}

#if FASTSEG_HAVE_AVX2_CLONE
FASTSEG_TARGET_AVX2 void run_spectra_jobs_avx2(const SpectraJobs& s, int64_t j0, int64_t j1) {
  run_spectra_jobs_impl(s, j0, j1);
}
FASTSEG_TARGET_AVX512_WIDE void run_spectra_jobs_avx512(const SpectraJobs& s, int64_t j0, int64_t j1) {
  run_spectra_jobs_impl(s, j0, j1);
}
#endif
void run_spectra_jobs_base(const SpectraJobs& s, int64_t j0, int64_t j1) { run_spectra_jobs_impl(s, j0, j1); }

// x's half spectra along H (XL) and along W (XR), bins outermost: XL (n_h/2+1, Cin, W) and XR
// (n_w/2+1, Cin, H) for a planar image, XL (n_h/2+1, W, Cin) and XR (n_w/2+1, H, Cin) for
// channels_last, so the step-2 GEMMs read every bin's matrix in place either way.
void spectra(const SpectraJobs& s) {
  const int64_t jobs = s.left_jobs() + s.right_jobs();
  at::parallel_for(0, jobs, 1, [&](int64_t j0, int64_t j1) {
#if FASTSEG_HAVE_AVX2_CLONE
    if (cpu_has_avx512()) return run_spectra_jobs_avx512(s, j0, j1);
    if (cpu_has_avx2()) return run_spectra_jobs_avx2(s, j0, j1);
#endif
    run_spectra_jobs_base(s, j0, j1);
  });
}

// The spectra of a k-tap cross-correlation's weights w (O, I, k), as the n-point DFT of the taps
// flipped and placed circularly (tap t at index (pad - t d) mod n), bins 0 .. bins-1. Returned
// complex, (bins, O, I) contiguous. Blocks of (o, i) pairs at a time: their taps transposed into L1,
// then every bin's cos/sin-weighted sum of them (k is too short an inner dimension for MKL's GEMMs:
// at::mm with the table ran several times slower).
template <typename T>
FASTSEG_ALWAYS_INLINE void taps_spectrum_block(const T* w, const T* tab, T* out, int64_t j0, int64_t j1, int64_t k,
                                               int64_t bins, int64_t OI) {
  constexpr int64_t kBlock = 128;
  std::vector<T> block(size_t(k * kBlock));
  T* taps = block.data();
  T re[kBlock], im[kBlock];
  for (int64_t b0 = j0; b0 < j1; b0 += kBlock) {
    const int64_t nb = std::min(kBlock, j1 - b0);
    for (int64_t j = 0; j < nb; ++j) {
      for (int64_t t = 0; t < k; ++t) taps[t * kBlock + j] = w[(b0 + j) * k + t];
    }
    for (int64_t f = 0; f < bins; ++f) {
      for (int64_t j = 0; j < kBlock; ++j) re[j] = 0, im[j] = 0;
      for (int64_t t = 0; t < k; ++t) {
        const T c = tab[(2 * f) * k + t], sn = tab[(2 * f + 1) * k + t];
        const T* __restrict__ row = taps + t * kBlock;
        for (int64_t j = 0; j < kBlock; ++j) re[j] += c * row[j], im[j] += sn * row[j];
      }
      T* __restrict__ o = out + 2 * (f * OI + b0);
      for (int64_t j = 0; j < nb; ++j) o[2 * j] = re[j], o[2 * j + 1] = im[j];
    }
  }
}
FASTSEG_CLONES void taps_spectrum_block(const float* w, const float* tab, float* out, int64_t j0, int64_t j1,
                                        int64_t k, int64_t bins, int64_t OI) {
  taps_spectrum_block<float>(w, tab, out, j0, j1, k, bins, OI);
}

at::Tensor compute_taps_spectrum(const at::Tensor& w, int64_t d, int64_t n, int64_t bins) {
  const int64_t O = w.size(0), I = w.size(1), k = w.size(2) * w.size(3), pad = d * (k - 1) / 2, OI = O * I;
  std::vector<float> tab(size_t(2 * bins * k));  // row (f, 0): cos, row (f, 1): sin
  for (int64_t t = 0; t < k; ++t) {
    const int64_t j = ((pad - t * d) % n + n) % n;
    for (int64_t f = 0; f < bins; ++f) {
      const double a = -2.0 * M_PI * double((f * j) % n) / double(n);
      tab[(2 * f) * k + t] = float(std::cos(a));
      tab[(2 * f + 1) * k + t] = float(std::sin(a));
    }
  }
  at::Tensor spec = at::empty({bins, O, I}, w.options().dtype(at::kComplexFloat));
  const float* wp = w.const_data_ptr<float>();
  float* out = reinterpret_cast<float*>(spec.mutable_data_ptr());
  at::parallel_for(0, OI, 1024, [&](int64_t j0, int64_t j1) {
    taps_spectrum_block(wp, tab.data(), out, j0, j1, k, bins, OI);
  });
  return spec;
}

// The same, kept between calls for unchanged weights (weight_cache.h): at 2048 input channels the
// spectra of w_l1 and w_r1 cost as much as the GEMMs that use them.
at::Tensor taps_spectrum(const at::Tensor& w, int64_t d, int64_t n, int64_t bins, bool cached) {
  if (!cached) return compute_taps_spectrum(w, d, n, bins);
  return DerivedWeightCache::get("gcn_conv2d", w, {double(d), double(n), double(bins)},
                                 [&] { return compute_taps_spectrum(w, d, n, bins); });
}

// The n-point DFT, bins 0 .. bins-1, of the indicator of [0, len): the spectrum of a bias that
// covers the image and not its zero padding. The geometric sum in closed form, in double:
// (1 - z^len) / (1 - z) with z = exp(-2 pi i f / n), and len at f = 0 (bins <= n / 2 + 1 < n).
at::Tensor box_spectrum(int64_t len, int64_t n, int64_t bins) {
  at::Tensor s = at::empty({bins, 2}, at::TensorOptions().dtype(at::kFloat));
  float* p = s.mutable_data_ptr<float>();
  p[0] = float(len), p[1] = 0.f;
  for (int64_t f = 1; f < bins; ++f) {
    const double a = -2.0 * M_PI * double(f) / double(n), b = -2.0 * M_PI * double((f * len) % n) / double(n);
    const double nr = 1.0 - std::cos(b), ni = -std::sin(b), dr = 1.0 - std::cos(a), di = -std::sin(a);
    const double den = dr * dr + di * di;
    p[2 * f] = float((nr * dr + ni * di) / den), p[2 * f + 1] = float((ni * dr - nr * di) / den);
  }
  return at::view_as_complex(s);
}

// Steps 2 and 3 of one branch: Y (F1, Lo, Cm) = per bin X_bin (Lo x Cin) @ G_bin (Cin x Cm), plus
// the first bias; then the FFT along the other (spatial, length Lo) axis, the Cm -> Co GEMM per bin
// of that axis, and both inverse transforms. Returns the branch's output (Lo, L1, Co), real.
at::Tensor branch(const at::Tensor& X, const at::Tensor& G, const at::Tensor& Hs, const at::Tensor& b1, int64_t L1,
                  int64_t n1, int64_t Lo, int64_t no) {
  at::Tensor Y = at::bmm(X, G);
  if (b1.defined()) {
    const int64_t F1 = Y.size(0);
    Y.add_(box_spectrum(L1, n1, F1).view({F1, 1, 1}) * b1.to(at::kComplexFloat).view({1, 1, -1}));
  }
  at::Tensor Z = at::fft_fft(Y, no, 1).transpose(0, 1).contiguous();  // (no, F1, Cm)
  at::Tensor O = at::bmm(Z, Hs);                                        // (no, F1, Co)
  at::Tensor o = at::fft_ifft(O, std::nullopt, 0).narrow(0, 0, Lo);     // (Lo, F1, Co)
  return at::fft_irfft(o, n1, 1).narrow(1, 0, L1);                      // (Lo, L1, Co)
}

constexpr int64_t kMaxKeptWorkspaceBytes = int64_t(256) << 20;

void gcn_forward_fft(const at::Tensor& x, const at::Tensor& w_l1, const at::Tensor& w_l2, const at::Tensor& w_r1,
                     const at::Tensor& w_r2, const at::Tensor& b_l1, const at::Tensor& b_l2, const at::Tensor& b_r1,
                     const at::Tensor& b_r2, at::Tensor& out, int64_t k, int64_t d, bool channels_last,
                     bool cache_weights) {
  const int64_t B = x.size(0), Cin = x.size(1), H = x.size(2), W = x.size(3), pad = d * (k - 1) / 2;
  const fft::Plan ph(fft::good_length(H + pad)), pw(fft::good_length(W + pad));
  const int64_t Fh = ph.n / 2 + 1, Fw = pw.n / 2 + 1;
  const bool c = cache_weights;
  // Each bin's matrix transposed (I x O), the right operand of the GEMMs: a view.
  const at::Tensor Gl = taps_spectrum(w_l1, d, ph.n, Fh, c).transpose(1, 2);
  const at::Tensor Gr = taps_spectrum(w_r1, d, pw.n, Fw, c).transpose(1, 2);
  const at::Tensor Hl = taps_spectrum(w_l2, d, pw.n, pw.n, c).transpose(1, 2);
  const at::Tensor Hr = taps_spectrum(w_r2, d, ph.n, ph.n, c).transpose(1, 2);
  // The spectra (a little more than x, twice) live in a buffer kept between calls: fresh pages for
  // them cost about as much as the transforms that fill them (a page fault per 4 KiB).
  // Up to kMaxKeptWorkspaceBytes (per calling thread); larger ones are allocated per call.
  static thread_local at::Tensor kept;
  const int64_t need = Fh * Cin * W + Fw * Cin * H;
  at::Tensor workspace = kept;
  if (!workspace.defined() || workspace.numel() < need) {
    kept = at::Tensor();
    workspace = at::empty({need}, x.options().dtype(at::kComplexFloat));
    if (need * 8 <= kMaxKeptWorkspaceBytes) kept = workspace;
  }
  at::Tensor XL = workspace.narrow(0, 0, Fh * Cin * W).view({Fh, Cin * W});
  at::Tensor XR = workspace.narrow(0, Fh * Cin * W, Fw * Cin * H).view({Fw, Cin * H});
  // Every bin's left operand as (pixels x Cin): a transposed view of the planar layout.
  const at::Tensor XLm = channels_last ? XL.view({Fh, W, Cin}) : XL.view({Fh, Cin, W}).transpose(1, 2);
  const at::Tensor XRm = channels_last ? XR.view({Fw, H, Cin}) : XR.view({Fw, Cin, H}).transpose(1, 2);
  const float* xp = x.const_data_ptr<float>();
  for (int64_t b = 0; b < B; ++b) {
    SpectraJobs jobs{xp + b * Cin * H * W, Cin, H, W, channels_last, &ph, &pw,
                     reinterpret_cast<float*>(XL.mutable_data_ptr()), reinterpret_cast<float*>(XR.mutable_data_ptr())};
    spectra(jobs);
    const at::Tensor left = branch(XLm, Gl, Hl, b_l1, H, ph.n, W, pw.n);   // (W, H, Co)
    const at::Tensor right = branch(XRm, Gr, Hr, b_r1, W, pw.n, H, ph.n);  // (H, W, Co)
    at::Tensor o = out[b].permute({1, 2, 0});                               // (H, W, Co)
    at::add_out(o, right, left.transpose(0, 1));
    if (b_l2.defined()) o.add_(b_l2);
    if (b_r2.defined()) o.add_(b_r2);
  }
}

// Multiplications of the direct first convolutions (k per pixel and (Cmid, Cin) pair, per branch)
// over those of the FFT route's GEMMs (4 per complex multiply-add, n / 2 + 1 bins along one axis
// times the other axis' pixels, per branch).
double fft_saving(int64_t k, int64_t d, int64_t H, int64_t W) {
  const int64_t pad = d * (k - 1) / 2;
  const double bins_h = double(fft::good_length(H + pad) / 2 + 1), bins_w = double(fft::good_length(W + pad) / 2 + 1);
  return double(k) / (2.0 * (bins_h / double(H) + bins_w / double(W)));
}
// fastseg/ops/gcn.py's _fft_backward_pays restates this rule for the backward: change both together.
constexpr double kFftMinSaving = 3.0;
constexpr int64_t kFftMinInChannels = 6;

void check_weight(const at::Tensor& w, const char* name, int64_t O, int64_t I, int64_t kh, int64_t kw,
                  const at::Tensor& x) {
  TORCH_CHECK_VALUE(w.dim() == 4 && w.size(0) == O && w.size(1) == I && w.size(2) == kh && w.size(3) == kw,
                    "gcn_conv2d: ", name, " has shape ", w.sizes(), ", expecting (", O, ", ", I, ", ", kh, ", ", kw, ")");
  TORCH_CHECK_TYPE(w.scalar_type() == x.scalar_type(), "gcn_conv2d: ", name, " has dtype ", w.scalar_type(),
                   " but input has dtype ", x.scalar_type());
}

void check_bias(const std::optional<at::Tensor>& b, const char* name, int64_t C, const at::Tensor& x) {
  if (!b.has_value()) return;
  TORCH_CHECK_VALUE(b->dim() == 1 && b->size(0) == C, "gcn_conv2d: ", name, " has shape ", b->sizes(),
                    ", expecting (", C, ")");
  TORCH_CHECK_TYPE(b->scalar_type() == x.scalar_type(), "gcn_conv2d: ", name, " has dtype ", b->scalar_type(),
                   " but input has dtype ", x.scalar_type());
}

at::Tensor gcn_conv2d_cpu(const at::Tensor& input, const at::Tensor& w_l1, const at::Tensor& w_l2,
                          const at::Tensor& w_r1, const at::Tensor& w_r2, const std::optional<at::Tensor>& b_l1,
                          const std::optional<at::Tensor>& b_l2, const std::optional<at::Tensor>& b_r1,
                          const std::optional<at::Tensor>& b_r2, int64_t dilation, c10::string_view algorithm) {
  TORCH_CHECK_VALUE(algorithm == "auto" || algorithm == "auto_training" || algorithm == "gemm" ||
                        algorithm == "conv" || algorithm == "fft",
                    "gcn_conv2d: algorithm must be 'auto', 'auto_training', 'gemm', 'conv' or 'fft', got '",
                    std::string(algorithm), "'");
  // 'auto_training' (what fastseg.gcn_conv2d passes when autograd will update the weights): 'auto',
  // without keeping the weights' spectra (they change on every call).
  const bool training = algorithm == "auto_training";
  if (training) algorithm = "auto";
  TORCH_CHECK_VALUE(input.dim() == 4, "gcn_conv2d: input must be 4-D (B, Cin, H, W), got ", input.dim(), "-D");
  TORCH_CHECK_TYPE(at::isFloatingType(input.scalar_type()), "gcn_conv2d: input must be floating point, got ",
                   input.scalar_type());
  TORCH_CHECK_VALUE(w_l1.dim() == 4, "gcn_conv2d: w_l1 must be 4-D (Cmid, Cin, k, 1), got ", w_l1.dim(), "-D");
  TORCH_CHECK_VALUE(dilation >= 1, "gcn_conv2d: dilation must be >= 1, got ", dilation);
  const int64_t Cin = input.size(1), Cm = w_l1.size(0), k = w_l1.size(2);
  TORCH_CHECK_VALUE(k % 2 == 1, "gcn_conv2d: k must be odd, got w_l1 with shape ", w_l1.sizes());
  TORCH_CHECK_VALUE(Cin > 0 && Cm > 0, "gcn_conv2d: input and w_l1 must have channels, got shapes ", input.sizes(),
                    " and ", w_l1.sizes());
  TORCH_CHECK_VALUE(w_l2.dim() == 4, "gcn_conv2d: w_l2 must be 4-D (Cout, Cmid, 1, k), got ", w_l2.dim(), "-D");
  const int64_t Co = w_l2.size(0);
  check_weight(w_l1, "w_l1", Cm, Cin, k, 1, input);
  check_weight(w_l2, "w_l2", Co, Cm, 1, k, input);
  check_weight(w_r1, "w_r1", Cm, Cin, 1, k, input);
  check_weight(w_r2, "w_r2", Co, Cm, k, 1, input);
  check_bias(b_l1, "b_l1", Cm, input);
  check_bias(b_r1, "b_r1", Cm, input);
  check_bias(b_l2, "b_l2", Co, input);
  check_bias(b_r2, "b_r2", Co, input);

  const auto format = output_memory_format(input);
  const bool channels_last = format == at::MemoryFormat::ChannelsLast;
  const int64_t B = input.size(0), H = input.size(2), W = input.size(3);
  const auto type = input.scalar_type();
  const auto compute = (type == at::kDouble) ? at::kDouble : at::kFloat;
  if (B == 0 || H == 0 || W == 0 || Co == 0) return at::zeros({B, Co, H, W}, input.options().memory_format(format));

  // The "conv" route: oneDNN's four convolutions, the add in place. It wins where the per-tap products
  // outgrow the input (2 k Cmid > Cin: at 256 channels, 128x128, P is 2.5x the size of x and its
  // write and shift-add streams cost more than the one shared read of x saves; measured 0.55x eager
  // there, and 0.6x on a 256 -> 256 block, against 1.3-1.6x on the 2048- and 1024-channel stages).
  // On an NCHW input oneDNN also reorders x for each of its two first convolutions, so the GEMM
  // still wins up to P = 1.5 x (k = 15, Cmid = 21, 64x64, NCHW, benchmarks/interleaved.py gcn, idle:
  // Cin 512 (P = 1.23 x) 1.24x eager in two runs of three, 1.03x in the other; Cin 448 1.16x; Cin 384
  // (1.64 x) 0.91x); on channels_last, where oneDNN reads x as it is, the 512-channel stage loses (0.87x).
  const bool gemm_pays = channels_last ? 2 * k * Cm <= Cin : 2 * 2 * k * Cm <= 3 * Cin;
  // The "fft" route (float32, float16 and bfloat16) wins wherever its per-bin GEMMs multiply at
  // least kFftMinSaving times fewer numbers than the direct first convolutions (fft_saving), and that
  // is every stage of the paper's network (k = 15: 4.6x at 16 px, 4.8x at 32, 6.5x at 64, 6.6x at
  // 128). Measured (benchmarks/RESULTS.md): 1.6-3.3x eager at 2048..256 channels and 16..128 px;
  // k = 7 at 16x16 (saving 2.2) lost to the GEMM route (0.82x), k = 7 at 64x64 (3.0) ran level with
  // oneDNN on channels_last, k = 15 at 8x8 (3.3) won.
  // Below kFftMinInChannels input channels the route's own transforms (of the Cmid- and Cout-channel
  // maps) outweigh what the first convolutions save: 3 and 4 channels into Cmid = Cout = 21 at
  // 512x512 ran at 0.81-0.92x oneDNN's speed, 6 and 8 channels at 1.05-1.09x.
  const bool use_fft = algorithm == "fft" ||
                       (algorithm == "auto" && compute == at::kFloat && Cin >= kFftMinInChannels &&
                        fft_saving(k, dilation, H, W) >= kFftMinSaving);
  if (use_fft) {
    TORCH_CHECK_TYPE(compute == at::kFloat, "gcn_conv2d: algorithm 'fft' computes in float32; input has dtype ",
                     type);
  }
  const bool use_conv = !use_fft && (algorithm == "conv" || (algorithm == "auto" && !gemm_pays));
  if (use_conv) {
    const int64_t p = dilation * (k - 1) / 2;
    auto conv = [&](const at::Tensor& t, const at::Tensor& w, const std::optional<at::Tensor>& b, bool tall) {
      return at::convolution(t, w, b, {1, 1}, tall ? at::IntArrayRef{p, 0} : at::IntArrayRef{0, p},
                             tall ? at::IntArrayRef{dilation, 1} : at::IntArrayRef{1, dilation}, false, {0, 0}, 1);
    };
    at::Tensor out = conv(conv(input, w_l1, b_l1, true), w_l2, b_l2, false);
    out.add_(conv(conv(input, w_r1, b_r1, false), w_r2, b_r2, true));
    return out.contiguous(format);
  }

  auto cast = [&](const at::Tensor& t) { return t.to(compute).contiguous(); };
  auto cast_opt = [&](const std::optional<at::Tensor>& t) { return t.has_value() ? cast(*t) : at::Tensor(); };
  const at::Tensor x = input.to(compute).contiguous(channels_last ? at::MemoryFormat::ChannelsLast
                                                                   : at::MemoryFormat::Contiguous);
  at::Tensor out = at::empty({B, Co, H, W}, x.options().memory_format(format));
  if (use_fft) {
    gcn_forward_fft(x, cast(w_l1), cast(w_l2), cast(w_r1), cast(w_r2), cast_opt(b_l1), cast_opt(b_l2), cast_opt(b_r1),
                    cast_opt(b_r2), out, k, dilation, channels_last, /*cache_weights=*/!training);
  } else {
    AT_DISPATCH_FLOATING_TYPES(compute, "gcn_conv2d", [&] {
      gcn_forward<scalar_t>(x, cast(w_l1), cast(w_l2), cast(w_r1), cast(w_r2), cast_opt(b_l1), cast_opt(b_l2),
                            cast_opt(b_r1), cast_opt(b_r2), out, k, dilation, channels_last);
    });
  }
  return type == compute ? out : out.to(type);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastseg, CPU, m) {
  m.impl("gcn_conv2d", &gcn_conv2d_cpu);
}

}  // namespace fastseg
