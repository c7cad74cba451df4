// Max-unpooling fused into the following convolution on the CPU: SegNet's decoder (Badrinarayanan,
// Kendall & Cipolla, TPAMI 2017), y = act(scale * conv(unpool(values, indices), w) + shift + res).
//
// Eager PyTorch writes the whole unpooled map (four times the pooled one, 75% zeros), reads it back
// for the convolution, then spends a pass each on BatchNorm and ReLU. Here the output is made in
// bands of rows of one image: the unpooled rows a band needs (its rows plus the kernel's halo, zero
// rows where the band reaches into the padding) are built in a small channels_last buffer from the
// pooled values and their indices, convolved by at::convolution (oneDNN), and the epilogue writes
// the band's result into the output once. The unpooled map never exists in full: peak memory is the
// output plus one band (input and convolution) per thread. Layers whose weights exceed 4 MiB (512
// channels) instead unpool and convolve whole (see unpool_conv2d_cpu: there the weights, not the
// small map, dominate the traffic).
//
// The bands run in one parallel region, each thread taking the next band and doing all of its
// steps, with oneDNN single-threaded inside: measured on this 2-core VM under load, that was
// 1.3-2x faster than running the bands one after another with every step multithreaded (each
// parallel region's barrier costs a scheduler slice when a thread is preempted), and it keeps a
// band in its thread's cache from being built to being finished.
//
// Building a band scatters the pooled rows whose windows reach it, which is right when every index
// lies in the rows of its own pooling window, as max_pool2d guarantees; one scan of the indices
// checks that first and finds out-of-range indices. When some index leaves its window the kernel falls back to the whole unpooled map
// (zero-fill and scatter in flat order, the later of two entries winning, like max_unpool2d), then
// one convolution and the same epilogue.
#include <ATen/OpMathType.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <vector>

#include "atrous.h"
#include "half_convert.h"
#include "unpool.h"

namespace fastseg {
namespace {

// Unpooled input rows per band are chosen so that one band holds about this many bytes (or half
// the weights' size, see unpool_conv2d_cpu): small enough to stay in cache between being built and
// being convolved, large enough that oneDNN's per-call costs and the halo rows built twice stay
// small. Measured on SegNet's decoder shapes (interleaved with eager, loaded 2-core VM): 4- to
// 32-row bands were within ~15% of each other at 64-256 channels, all ahead of eager.
constexpr int64_t kBandBytes = 1 << 20;
constexpr int64_t kMinBandRows = 4;
// Output rows per band, at least, where bands convolve through the winograd path: 8 rows of 3-row
// tiles, so that its GEMMs have 8 x W / 3 rows.
constexpr int64_t kWinogradBandRows = 24;
// Weights above this size go through the whole-map route (see unpool_conv2d_cpu).
constexpr int64_t kWholeMapWeightBytes = 4 << 20;

struct UnpoolConvGeometry {
  UnpoolGeometry pool;  // pooled h x w (pool.H, pool.W) -> unpooled H x W (pool.Ho, pool.Wo)
  int64_t B, C, O, kH, kW, pH, pW, dH, dW, Hout, Wout;
  bool channels_last;
};

// Where pooled element (b, c, ph, pw) lives: values and indices share one memory format.
struct PooledLayout {
  int64_t sb, sc, sh, sw;
  PooledLayout(int64_t C, int64_t h, int64_t w, bool channels_last)
      : sb(C * h * w), sc(channels_last ? 1 : h * w), sh(channels_last ? w * C : w), sw(channels_last ? C : 1) {}
};

// Builds the unpooled rows [first_row, first_row + rows) of every image into band, (B, rows, W, C)
// channels_last whatever the pooled layout (oneDNN's fast layout); rows outside [0, H) are the
// convolution's zero padding. Scatters the pooled rows whose windows reach the band, in flat order
// so that of two entries naming one position the later wins; the scan proved every index lies in
// its own window's rows, so only those pooled rows can write there. An entry whose position falls
// outside the band (a window cut by the band's edge) goes to a scratch slot rather than being
// branched around. When windows do not overlap vertically (kH <= sH, SegNet's 2x2/2) each pooled
// row owns the rows from its window's top to the next window's top (the first and last rows own
// the margins) and zeroes and fills them on its own, one parallel task per (image, pooled row).
template <typename T>
void build_band(const T* x, const int64_t* idx, T* band, const UnpoolGeometry& g, int64_t B, int64_t C,
                const PooledLayout& L, bool pooled_channels_last, int64_t first_row, int64_t rows) {
  const int64_t W = g.Wo, row_len = W * C, band_image = rows * row_len;
  const int64_t lo = std::max<int64_t>(first_row, 0), hi = std::min<int64_t>(first_row + rows, g.Ho);
  // Padding rows (and the whole band when it lies in the padding).
  for (int64_t b = 0; b < B; ++b) {
    T* image = band + b * band_image;
    if (lo >= hi) {
      std::memset(image, 0, sizeof(T) * band_image);
      continue;
    }
    std::memset(image, 0, sizeof(T) * (lo - first_row) * row_len);
    std::memset(image + (hi - first_row) * row_len, 0, sizeof(T) * (first_row + rows - hi) * row_len);
  }
  if (lo >= hi) return;
  const uint64_t limit = uint64_t(rows * W);
  auto scatter_row = [&](int64_t b, int64_t ph, T* image, T& scratch) {
    const int64_t base = b * L.sb + ph * L.sh;
    const int64_t origin = first_row * W;  // flat position of the band's first element
    if (pooled_channels_last) {
      const int64_t* irow = idx + base;
      const T* xrow = x + base;
      for (int64_t pw = 0; pw < g.W; ++pw) {
        for (int64_t c = 0; c < C; ++c) {
          const uint64_t pos = uint64_t(irow[pw * C + c] - origin);
          *(pos < limit ? image + pos * C + c : &scratch) = xrow[pw * C + c];
        }
      }
    } else {
      for (int64_t c = 0; c < C; ++c) {
        const int64_t* irow = idx + base + c * L.sc;
        const T* xrow = x + base + c * L.sc;
        for (int64_t pw = 0; pw < g.W; ++pw) {
          const uint64_t pos = uint64_t(irow[pw] - origin);
          *(pos < limit ? image + pos * C + c : &scratch) = xrow[pw];
        }
      }
    }
  };
  if (g.kH <= g.sH) {
    auto top = [&](int64_t p) { return std::min(std::max<int64_t>(p * g.sH - g.pH, 0), g.Ho); };
    auto owner = [&](int64_t row) { return std::clamp<int64_t>(div_floor(row + g.pH, g.sH), 0, g.H - 1); };
    const int64_t ph0 = owner(lo), n = owner(hi - 1) - ph0 + 1;
    const int64_t grain = std::max<int64_t>(1, 8192 / std::max<int64_t>(g.sH * row_len, 1));
    at::parallel_for(0, B * n, grain, [&](int64_t u0, int64_t u1) {
      T scratch;
      for (int64_t u = u0; u < u1; ++u) {
        const int64_t b = u / n, ph = ph0 + u % n;
        const int64_t r0 = std::max(ph == 0 ? 0 : top(ph), lo), r1 = std::min(ph == g.H - 1 ? g.Ho : top(ph + 1), hi);
        T* image = band + b * band_image;
        if (r1 > r0) std::memset(image + (r0 - first_row) * row_len, 0, sizeof(T) * (r1 - r0) * row_len);
        scatter_row(b, ph, image, scratch);
      }
    });
  } else {
    // Overlapping windows: pooled rows of one image share output rows, so they run in order.
    int64_t ph0, unused, ph1;
    UnpoolGeometry::covering(lo, g.kH, g.sH, g.pH, g.H, ph0, unused);
    UnpoolGeometry::covering(hi - 1, g.kH, g.sH, g.pH, g.H, unused, ph1);
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      T scratch;
      for (int64_t b = b0; b < b1; ++b) {
        T* image = band + b * band_image;
        std::memset(image + (lo - first_row) * row_len, 0, sizeof(T) * (hi - lo) * row_len);
        for (int64_t ph = ph0; ph <= ph1; ++ph) scatter_row(b, ph, image, scratch);
      }
    });
  }
}

// The fallback's whole unpooled map (B, C, H, W) channels_last: zero-fill, then scatter in flat
// order (later entries win).
template <typename T>
void scatter_all(const T* x, const int64_t* idx, T* out, const UnpoolGeometry& g, int64_t B, int64_t C,
                 const PooledLayout& L) {
  const int64_t out_image = g.Ho * g.Wo * C;
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      T* o = out + b * out_image;
      std::memset(o, 0, sizeof(T) * out_image);
      for (int64_t c = 0; c < C; ++c) {
        for (int64_t ph = 0; ph < g.H; ++ph) {
          for (int64_t pw = 0; pw < g.W; ++pw) {
            const int64_t k = b * L.sb + c * L.sc + ph * L.sh + pw * L.sw;
            o[idx[k] * C + c] = x[k];
          }
        }
      }
    }
  });
}

// Writes act(a * conv + b + residual) for output rows [r0, r0 + R), conv being those rows'
// convolution (B, O, R, Wout) channels_last, into out (channels_last or NCHW, the residual alike).
// a and b are scale and shift with the missing ones as 1 and 0. Tasks [u0, u1) of (image, output
// row), each Wout x O elements read in the band's channels_last order; Cvt converts the elements
// (half_convert.h).
template <typename scalar_t, typename Cvt, bool kResidual, bool kRelu>
FASTSEG_ALWAYS_INLINE scalar_t epilogue_value(scalar_t s, at::opmath_type<scalar_t> a, at::opmath_type<scalar_t> b,
                                              const scalar_t* r) {
  using acc_t = at::opmath_type<scalar_t>;
  acc_t v = Cvt::load(s) * a + b;
  if (kResidual) v += Cvt::load(*r);
  if (kRelu) v = relu_value(v);
  return Cvt::store(v);
}

template <typename scalar_t, typename Cvt, bool kResidual, bool kRelu>
FASTSEG_ALWAYS_INLINE void epilogue_tasks(const scalar_t* src, scalar_t* y, const at::opmath_type<scalar_t>* ap,
                                          const at::opmath_type<scalar_t>* bp, const scalar_t* res,
                                          const UnpoolConvGeometry& g, int64_t R, int64_t r0, int64_t u0, int64_t u1) {
  const int64_t O = g.O, Wout = g.Wout, len = Wout * O;
  for (int64_t u = u0; u < u1; ++u) {
    const int64_t bi = u / R, i = u % R;
    const scalar_t* s = src + u * len;
    if (g.channels_last) {
      const int64_t dst = (bi * g.Hout + r0 + i) * len;
      for (int64_t p = 0; p < Wout; ++p) {
        for (int64_t o = 0; o < O; ++o) {
          const int64_t e = p * O + o;
          y[dst + e] = epilogue_value<scalar_t, Cvt, kResidual, kRelu>(s[e], ap[o], bp[o], res + dst + e);
        }
      }
    } else {
      // NCHW output: a transpose of the cache-resident row; each output run is written in order.
      for (int64_t o = 0; o < O; ++o) {
        const int64_t dst = ((bi * O + o) * g.Hout + r0 + i) * Wout;
        for (int64_t p = 0; p < Wout; ++p) {
          y[dst + p] = epilogue_value<scalar_t, Cvt, kResidual, kRelu>(s[p * O + o], ap[o], bp[o], res + dst + p);
        }
      }
    }
  }
}

#if FASTSEG_HAVE_AVX2_CLONE
// Half types with F16C conversions: c10's per-element ones cost more than the convolution saved.
template <typename scalar_t, bool kResidual, bool kRelu>
FASTSEG_TARGET_F16C void epilogue_tasks_f16c(const scalar_t* src, scalar_t* y, const float* ap, const float* bp,
                                             const scalar_t* res, const UnpoolConvGeometry& g, int64_t R, int64_t r0,
                                             int64_t u0, int64_t u1) {
  epilogue_tasks<scalar_t, HalfConvert<scalar_t>, kResidual, kRelu>(src, y, ap, bp, res, g, R, r0, u0, u1);
}
#endif

template <typename scalar_t, bool kResidual, bool kRelu>
void epilogue_rows(const at::Tensor& conv, at::Tensor& out, const std::vector<at::opmath_type<scalar_t>>& a,
                   const std::vector<at::opmath_type<scalar_t>>& b, const at::Tensor& residual,
                   const UnpoolConvGeometry& g, int64_t r0) {
  const int64_t R = conv.size(2), len = g.Wout * g.O;
  const scalar_t* res = kResidual ? residual.const_data_ptr<scalar_t>() : nullptr;
  const scalar_t* src = conv.const_data_ptr<scalar_t>();
  scalar_t* y = out.mutable_data_ptr<scalar_t>();
  at::parallel_for(0, g.B * R, std::max<int64_t>(1, 16384 / std::max<int64_t>(len, 1)), [&](int64_t u0, int64_t u1) {
#if FASTSEG_HAVE_AVX2_CLONE
    if constexpr (kIsHalfType<scalar_t>) {
      if (cpu_has_f16c()) {
        epilogue_tasks_f16c<scalar_t, kResidual, kRelu>(src, y, a.data(), b.data(), res, g, R, r0, u0, u1);
        return;
      }
    }
#endif
    epilogue_tasks<scalar_t, Convert<scalar_t>, kResidual, kRelu>(src, y, a.data(), b.data(), res, g, R, r0, u0,
                                                                  u1);
  });
}

void epilogue(const at::Tensor& conv, at::Tensor& out, const at::Tensor& scale, const at::Tensor& shift,
              const at::Tensor& residual, bool relu, const UnpoolConvGeometry& g, int64_t r0) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "unpool_conv2d_epilogue", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    std::vector<acc_t> a(g.O, acc_t(1)), b(g.O, acc_t(0));
    for (int64_t o = 0; o < g.O; ++o) {
      if (scale.defined()) a[o] = scale.const_data_ptr<acc_t>()[o];
      if (shift.defined()) b[o] = shift.const_data_ptr<acc_t>()[o];
    }
    const bool has_res = residual.defined();
    if (has_res && relu) epilogue_rows<scalar_t, true, true>(conv, out, a, b, residual, g, r0);
    else if (has_res) epilogue_rows<scalar_t, true, false>(conv, out, a, b, residual, g, r0);
    else if (relu) epilogue_rows<scalar_t, false, true>(conv, out, a, b, residual, g, r0);
    else epilogue_rows<scalar_t, false, false>(conv, out, a, b, residual, g, r0);
  });
}

void check_unpool_conv2d_args(const at::Tensor& values, const at::Tensor& indices, const at::Tensor& weight,
                              const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& shift,
                              const std::optional<at::Tensor>& residual, at::IntArrayRef padding,
                              at::IntArrayRef dilation) {
  TORCH_CHECK_VALUE(weight.dim() == 4 && weight.size(1) == values.size(1),
                    "unpool_conv2d: weight has shape ", weight.sizes(), ", expecting (O, ", values.size(1),
                    ", kH, kW) for values with ", values.size(1), " channels");
  TORCH_CHECK_TYPE(weight.scalar_type() == values.scalar_type(), "unpool_conv2d: weight has dtype ",
                   weight.scalar_type(), " but values has ", values.scalar_type());
  TORCH_CHECK_VALUE(padding.size() == 2 && dilation.size() == 2 && padding[0] >= 0 && padding[1] >= 0 &&
                        dilation[0] > 0 && dilation[1] > 0,
                    "unpool_conv2d: padding must be 2 non-negative ints and dilation 2 positive ones, got ",
                    padding, " and ", dilation);
  const int64_t O = weight.size(0);
  for (const auto* t : {&scale, &shift}) {
    if (t->has_value()) {
      TORCH_CHECK_VALUE((*t)->dim() == 1 && (*t)->size(0) == O, "unpool_conv2d: scale and shift must have shape (",
                        O, "), got ", (*t)->sizes());
      TORCH_CHECK_TYPE((*t)->scalar_type() == values.scalar_type(), "unpool_conv2d: scale/shift dtype ",
                       (*t)->scalar_type(), " differs from values' ", values.scalar_type());
    }
  }
  if (residual.has_value()) {
    TORCH_CHECK_TYPE(residual->scalar_type() == values.scalar_type(), "unpool_conv2d: residual dtype ",
                     residual->scalar_type(), " differs from values' ", values.scalar_type());
  }
}

at::Tensor unpool_conv2d_cpu(const at::Tensor& values, const at::Tensor& indices, const at::Tensor& weight,
                             const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& shift,
                             const std::optional<at::Tensor>& residual, at::IntArrayRef kernel_size,
                             at::IntArrayRef stride, at::IntArrayRef pool_padding, c10::SymIntArrayRef output_size,
                             at::IntArrayRef padding, at::IntArrayRef dilation, bool relu, int64_t band_rows) {
  const int64_t H = output_size[0].expect_int(), W = output_size[1].expect_int();
  check_max_unpool2d_args(values, indices, kernel_size, stride, pool_padding, H, W);
  check_unpool_conv2d_args(values, indices, weight, scale, shift, residual, padding, dilation);
  TORCH_CHECK_VALUE(band_rows >= 0, "unpool_conv2d: band_rows must be >= 0, got ", band_rows);
  const auto format = output_memory_format(values);
  UnpoolConvGeometry g;
  g.channels_last = format == at::MemoryFormat::ChannelsLast;
  g.B = values.size(0); g.C = values.size(1); g.O = weight.size(0);
  g.kH = weight.size(2); g.kW = weight.size(3);
  g.pH = padding[0]; g.pW = padding[1]; g.dH = dilation[0]; g.dW = dilation[1];
  g.Hout = H + 2 * g.pH - g.dH * (g.kH - 1);
  g.Wout = W + 2 * g.pW - g.dW * (g.kW - 1);
  TORCH_CHECK_VALUE(g.Hout > 0 && g.Wout > 0, "unpool_conv2d: the output would be empty (", g.Hout, "x", g.Wout, ")");
  if (residual.has_value()) {
    TORCH_CHECK_VALUE(residual->sizes() == at::IntArrayRef({g.B, g.O, g.Hout, g.Wout}), "unpool_conv2d: residual has shape ",
                      residual->sizes(), ", expecting (", g.B, ", ", g.O, ", ", g.Hout, ", ", g.Wout, ")");
  }
  const at::Tensor x = values.contiguous(format);
  const at::Tensor idx = indices.contiguous(format);
  g.pool = unpool_geometry(x, kernel_size, stride, pool_padding, H, W, g.channels_last);
  at::Tensor out = at::empty({g.B, g.O, g.Hout, g.Wout}, values.options().memory_format(format));
  if (out.numel() == 0) return out;

  const auto acc_type = at::toOpMathType(values.scalar_type());
  const at::Tensor sc = scale.has_value() ? scale->to(acc_type).contiguous() : at::Tensor();
  const at::Tensor sh = shift.has_value() ? shift->to(acc_type).contiguous() : at::Tensor();
  const at::Tensor res = residual.has_value() ? residual->contiguous(format) : at::Tensor();

  UnpoolStatus status = kInWindow;
  if (x.numel() > 0) {
    int64_t bad = 0;
    // "In window" checks rows only, which is all the row gather needs.
    status = scan_slabs(idx.const_data_ptr<int64_t>(), g.pool, nullptr, bad);
    TORCH_CHECK_INDEX(status != kOutOfRange, "unpool_conv2d: indices contains ", bad, ", outside the output plane of ",
                      H, "x", W, " (valid: 0 to ", H * W - 1, ")");
  }
  const PooledLayout L(g.C, x.size(2), x.size(3), g.channels_last);
  // Bands (and their convolutions) are channels_last for either input format: oneDNN's fast layout
  // (an NCHW float32 convolution took 2-4x as long here); the epilogue writes the output's format.
  const auto band_options = values.options().memory_format(at::MemoryFormat::ChannelsLast);
  // Wide layers run fastseg's max_unpool2d and then its atrous_conv2d (one multithreaded
  // convolution in the input's layout, the same fused epilogue) instead of bands: each band's
  // convolution streams all of the weights, and with 9 MiB of them (512 x 512 x 3 x 3) that cost
  // more than the map's round trip saves. Measured on the idle 2-core VM, bands against this route:
  // 0.88-0.95x at 512 channels, 1.05-1.36x at 64-256 channels (weights at most 2.25 MiB). At 512
  // channels SegNet's maps are small (5.3 MiB at 45x60); where they are large the bands stay.
  // band_rows > 0 forces bands (tests).
  static auto conv_op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("fastseg::atrous_conv2d", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                            const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, at::IntArrayRef,
                            at::IntArrayRef, at::IntArrayRef, int64_t, bool, c10::string_view)>();
  if (status == kInWindow && band_rows == 0 && weight.nbytes() > kWholeMapWeightBytes) {
    static auto unpool_op = c10::Dispatcher::singleton()
                                .findSchemaOrThrow("fastseg::max_unpool2d", "")
                                .typed<at::Tensor(const at::Tensor&, const at::Tensor&, at::IntArrayRef,
                                                  at::IntArrayRef, at::IntArrayRef, c10::SymIntArrayRef)>();
    at::Tensor unpooled = unpool_op.call(x, idx, kernel_size, stride, pool_padding, output_size);
    return conv_op.call(unpooled, weight.contiguous(format), scale, shift, residual, {1, 1}, padding, dilation, 1,
                        relu, "auto");
  }
  // Bands convolve through atrous_conv2d's winograd path where it would take it for the band
  // (3x3 float32 layers of 256+ channels; measured below), otherwise through at::convolution.
  const int64_t halo = g.dH * (g.kH - 1);
  const int64_t wino_rows = std::min<int64_t>(g.Hout, kWinogradBandRows);
  const bool winograd = values.scalar_type() == at::kFloat &&
                        atrous_takes_winograd(1, g.C, wino_rows + halo, W, g.O, g.kH, g.kW, {0, g.pW}, dilation, true);
  // In the bands' memory format: at::convolution would otherwise copy it to that format per band;
  // the winograd path reads (O, C, kH, kW) weights, detached so that it keeps their transforms for
  // the next band even when autograd will update them (see atrous.cpp).
  const at::Tensor w =
      weight.contiguous(winograd ? at::MemoryFormat::Contiguous : at::MemoryFormat::ChannelsLast).detach();
  if (status == kOutOfWindow) {
    at::Tensor unpooled = at::empty({g.B, g.C, H, W}, band_options);
    dispatch_by_element_size(x.element_size(), [&](auto tag) {
      using T = decltype(tag);
      scatter_all(static_cast<const T*>(x.const_data_ptr()), idx.const_data_ptr<int64_t>(),
                  static_cast<T*>(unpooled.mutable_data_ptr()), g.pool, g.B, g.C, L);
    });
    const at::Tensor conv = at::convolution(unpooled, w, std::nullopt, {1, 1}, padding, dilation, false, {0, 0}, 1)
                                .contiguous(at::MemoryFormat::ChannelsLast);
    epilogue(conv, out, sc, sh, res, relu, g, 0);
    return out;
  }
  // One parallel region: each thread claims (image, row band) tasks and builds, convolves
  // (oneDNN runs single-threaded inside a parallel region) and finishes each on its own.
  const int threads = at::get_num_threads();
  int64_t rows = band_rows;
  if (rows == 0) {
    // Each band's convolution reorders the weights into oneDNN's blocked layout: with wide layers
    // (512 x 512 x 3 x 3 is 9 MiB) a band must be large enough to amortise that (measured: 4-row
    // bands at 512 channels took 1.25x as long as 23-row ones), while narrow layers do best with
    // small cache-resident bands. At least one task per thread.
    const int64_t row_bytes = std::max<int64_t>(g.C * W * x.element_size(), 1);
    const int64_t budget = std::max<int64_t>(kBandBytes, w.nbytes() / 2);
    rows = std::max<int64_t>(kMinBandRows, budget / row_bytes - halo);
    if (winograd) rows = std::max(rows, kWinogradBandRows);  // GEMMs of enough rows
    rows = std::min(rows, div_ceil(g.Hout, div_ceil(int64_t(threads), g.B)));
  }
  rows = std::min(rows, g.Hout);
  const int64_t bands = div_ceil(g.Hout, rows), tasks = g.B * bands;
  std::atomic<int64_t> next{0};
  UnpoolConvGeometry g1 = g;
  g1.B = 1;
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    for (int64_t t = next++; t < tasks; t = next++) {
      const int64_t bi = t / bands, r0 = (t % bands) * rows, n = std::min(rows, g.Hout - r0);
      at::Tensor band = at::empty({1, g.C, n + halo, W}, band_options);
      dispatch_by_element_size(x.element_size(), [&](auto tag) {
        using T = decltype(tag);
        const T* xp = static_cast<const T*>(x.const_data_ptr()) + bi * L.sb;
        T* dp = static_cast<T*>(band.mutable_data_ptr());
        if (x.numel() == 0) {
          std::memset(dp, 0, band.nbytes());
        } else {
          build_band(xp, idx.const_data_ptr<int64_t>() + bi * L.sb, dp, g.pool, 1, g.C, L, g.channels_last,
                     r0 - g.pH, n + halo);
        }
      });
      const at::Tensor conv =
          winograd ? conv_op.call(band, w, std::nullopt, std::nullopt, std::nullopt, {1, 1}, {0, g.pW}, dilation, 1,
                                  false, "winograd")
                   : at::convolution(band, w, std::nullopt, {1, 1}, {0, g.pW}, dilation, false, {0, 0}, 1)
                         .contiguous(at::MemoryFormat::ChannelsLast);
      at::Tensor out_b = out.narrow(0, bi, 1);
      epilogue(conv, out_b, sc, sh, res.defined() ? res.narrow(0, bi, 1) : res, relu, g1, r0);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastseg, CPU, m) {
  m.impl("unpool_conv2d", &unpool_conv2d_cpu);
}

}  // namespace fastseg
