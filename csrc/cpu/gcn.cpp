// Global Convolutional Network block on the CPU (Peng et al., "Large Kernel Matters -- Improve
// Semantic Segmentation by Global Convolutional Network", CVPR 2017, Fig. 2(b)):
//   out = conv_1xk(conv_kx1(x, w_l1) + b_l1, w_l2) + b_l2 + conv_kx1(conv_1xk(x, w_r1) + b_r1, w_r2) + b_r2
// with 'same' zero padding d * (k - 1) / 2 along each convolution's long axis.
//
// The rule (measured on this shared 2-core EPYC, side by side with eager, benchmarks/test_bench_gcn.py):
// nearly all the work is the two first convolutions, which both read the Cin-channel input. They
// become ONE GEMM that reads x once, P = [W_l1 taps ; W_r1 taps] (2 k Cmid x Cin) @ X_b (Cin x H W),
// every tap's partial product at every input pixel (MKL, through at::mm_out). Each middle map is then
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
// rounded once at the end; float32 and float64 run natively.
#include <torch/library.h>

#include <algorithm>

#include "common.h"

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
  TORCH_CHECK_VALUE(algorithm == "auto" || algorithm == "gemm" || algorithm == "conv",
                    "gcn_conv2d: algorithm must be 'auto', 'gemm' or 'conv', got '", std::string(algorithm), "'");
  TORCH_CHECK_VALUE(input.dim() == 4, "gcn_conv2d: input must be 4-D (B, Cin, H, W), got ", input.dim(), "-D");
  TORCH_CHECK_TYPE(at::isFloatingType(input.scalar_type()), "gcn_conv2d: input must be floating point, got ",
                   input.scalar_type());
  TORCH_CHECK_VALUE(w_l1.dim() == 4, "gcn_conv2d: w_l1 must be 4-D (Cmid, Cin, k, 1), got ", w_l1.dim(), "-D");
  TORCH_CHECK_VALUE(dilation >= 1, "gcn_conv2d: dilation must be >= 1, got ", dilation);
  const int64_t Cin = input.size(1), Cm = w_l1.size(0), k = w_l1.size(2);
  TORCH_CHECK_VALUE(k % 2 == 1, "gcn_conv2d: k must be odd, got w_l1 with shape ", w_l1.sizes());
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
  const bool use_conv = algorithm == "conv" || (algorithm == "auto" && !gemm_pays);
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
  AT_DISPATCH_FLOATING_TYPES(compute, "gcn_conv2d", [&] {
    gcn_forward<scalar_t>(x, cast(w_l1), cast(w_l2), cast(w_r1), cast(w_r2), cast_opt(b_l1), cast_opt(b_l2),
                          cast_opt(b_r1), cast_opt(b_r2), out, k, dilation, channels_last);
  });
  return type == compute ? out : out.to(type);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastseg, CPU, m) {
  m.impl("gcn_conv2d", &gcn_conv2d_cpu);
}

}  // namespace fastseg
