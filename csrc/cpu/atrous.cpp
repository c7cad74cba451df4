// Atrous (dilated) convolution with a fused epilogue on the CPU (Yu & Koltun 2016; Chen et al.,
// DeepLab v2, TPAMI 2017, and v3, 2017): y = act(scale * conv(x, w) + shift + residual).
//
// Two paths. "conv" calls at::convolution (oneDNN for float32/bfloat16) and applies the whole
// epilogue in one in-place pass, where eager PyTorch spends a pass per BatchNorm, add and ReLU.
// "taps" splits the output plane into rectangles over which the set of in-image taps is constant
// (a range of kernel rows times a range of kernel columns, since the input position grows with
// the tap index), packs only those taps' input pixels and multiplies them with ATen's GEMM (MKL),
// one GEMM per kernel row, then applies the epilogue to the cache-resident block and writes it
// once in the output's memory format: the taps that fall into the zero padding at large rates on
// small maps (60% of them at rate 36 on 65x65) are never multiplied.
//
// Measured on this machine (2-core EPYC, side by side with eager in benchmarks/test_bench_atrous.py):
// oneDNN's convolution already skips the padded taps (256->256 3x3 at 65x65, channels_last: rate 36 takes
// 0.4x the time of rate 1, the in-image fraction), and the taps path's packing and per-row GEMMs
// lose to it by 1.2-4x on float32. So "auto" takes "conv" for float32, float16, bfloat16 and
// grouped/depthwise convolutions, and "taps" only for float64 with groups == 1, which oneDNN does
// not handle (ATen falls back to a slow direct loop there; MKL's dgemm is much faster).
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "common.h"

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

template <typename scalar_t>
void epilogue_in_place(at::Tensor& out, const at::Tensor& scale, const at::Tensor& shift,
                       const at::Tensor& residual, bool relu, bool channels_last) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = out.size(0), O = out.size(1), HW = out.size(2) * out.size(3);
  const OutLayout L(O, HW, channels_last);
  const acc_t* sc = scale.defined() ? scale.const_data_ptr<acc_t>() : nullptr;
  const acc_t* sh = shift.defined() ? shift.const_data_ptr<acc_t>() : nullptr;
  const scalar_t* res = residual.defined() ? residual.const_data_ptr<scalar_t>() : nullptr;
  scalar_t* y = out.mutable_data_ptr<scalar_t>();
  // Rows of the layout's innermost dimension: (b, o) planes for NCHW, (b, pixel) rows for NHWC.
  const int64_t rows = channels_last ? B * HW : B * O, len = channels_last ? O : HW;
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(len, 1)), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      scalar_t* row = y + r * len;
      const scalar_t* rrow = res ? res + r * len : nullptr;
      if (channels_last) {
        for (int64_t o = 0; o < len; ++o) {
          acc_t v = acc_t(row[o]);
          if (sc) v *= sc[o];
          if (sh) v += sh[o];
          if (rrow) v += acc_t(rrow[o]);
          if (relu) v = v > acc_t(0) ? v : acc_t(0);
          row[o] = scalar_t(v);
        }
      } else {
        const int64_t o = r % O;
        const acc_t a = sc ? sc[o] : acc_t(1), b = sh ? sh[o] : acc_t(0);
        for (int64_t i = 0; i < len; ++i) {
          acc_t v = acc_t(row[i]) * a + b;
          if (rrow) v += acc_t(rrow[i]);
          if (relu) v = v > acc_t(0) ? v : acc_t(0);
          row[i] = scalar_t(v);
        }
      }
    }
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
          if (ep.relu) v = v > scalar_t(0) ? v : scalar_t(0);
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
  ConvGeometry g;
  g.B = input.size(0); g.C = input.size(1); g.H = input.size(2); g.W = input.size(3);
  g.O = weight.size(0); g.kH = weight.size(2); g.kW = weight.size(3);
  g.sH = stride[0]; g.sW = stride[1]; g.pH = padding[0]; g.pW = padding[1]; g.dH = dilation[0]; g.dW = dilation[1];
  g.Ho = (g.H + 2 * g.pH - g.dH * (g.kH - 1) - 1) / g.sH + 1;
  g.Wo = (g.W + 2 * g.pW - g.dW * (g.kW - 1) - 1) / g.sW + 1;
  TORCH_CHECK_VALUE(g.Ho > 0 && g.Wo > 0, "atrous_conv2d: the output would be empty (", g.Ho, "x", g.Wo, ")");
  const auto format = output_memory_format(input);
  const bool channels_last = format == at::MemoryFormat::ChannelsLast;
  if (residual.has_value()) {
    TORCH_CHECK_VALUE(residual->sizes() == at::IntArrayRef({g.B, g.O, g.Ho, g.Wo}), "atrous_conv2d: residual has shape ",
                      residual->sizes(), ", expecting (", g.B, ", ", g.O, ", ", g.Ho, ", ", g.Wo, ")");
  }
  TORCH_CHECK_VALUE(algorithm == "auto" || algorithm == "taps" || algorithm == "conv",
                    "atrous_conv2d: algorithm must be 'auto', 'taps' or 'conv', got '", std::string(algorithm), "'");
  const auto type = input.scalar_type();
  const bool taps_possible = groups == 1 && (type == at::kFloat || type == at::kDouble);
  TORCH_CHECK_VALUE(algorithm != "taps" || taps_possible,
                    "atrous_conv2d: the taps algorithm needs groups == 1 and float32 or float64, got groups = ",
                    groups, " and ", type);
  if (g.B == 0) return at::empty({0, g.O, g.Ho, g.Wo}, input.options().memory_format(format));

  // The epilogue's scale and shift in the accumulation type, the residual in the output's layout.
  const auto acc_type = at::toOpMathType(type);
  const at::Tensor sc = scale.has_value() ? scale->to(acc_type).contiguous() : at::Tensor();
  const at::Tensor sh = shift.has_value() ? shift->to(acc_type).contiguous() : at::Tensor();
  const at::Tensor res = residual.has_value() ? residual->contiguous(format) : at::Tensor();

  bool use_taps = algorithm == "taps";
  if (algorithm == "auto") use_taps = taps_possible && type == at::kDouble;
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

TORCH_LIBRARY_IMPL(fastseg, CPU, m) {
  m.impl("atrous_conv2d", &atrous_conv2d_cpu);
}

}  // namespace fastseg
