// Max-unpooling on the CPU (SegNet's decoder, Badrinarayanan et al. 2017).
//
// ATen zero-fills the whole output and then scatters into it: two passes over an output four
// times the size of the input. Here each output row is zeroed and filled while it sits in cache
// and reaches memory once. That needs every index to lie in the rows of its own pooling window,
// which max_pool2d guarantees: a scan of each slab's indices checks it (and finds out-of-range
// indices), and a slab where it does not hold takes the plain zero-fill and scatter. Repeated
// indices resolve in flat order, the later entry winning, as ATen's CPU kernel does on one thread.
#include <ATen/Parallel.h>
#include <sys/mman.h>
#include <torch/library.h>

#include <atomic>
#include <cstring>
#include <vector>

#include "unpool.h"

namespace fastseg {
namespace {

// A large output is written exactly once, so its page faults dominate: ask for transparent huge
// pages (2 MiB) before the first touch; 512x fewer faults. A hint only: the kernel may decline.
void advise_huge_pages(const at::Tensor& t) {
#ifdef MADV_HUGEPAGE
  constexpr uintptr_t kHuge = uintptr_t(1) << 21;
  const auto begin = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t end = begin + t.nbytes();
  const uintptr_t first = (begin + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t last = end & ~(kHuge - 1);
  if (last > first) {
    madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
  }
#endif
}

// scan_pooled_rows (unpool.h). Its reductions are unsigned 64-bit maxima, which the baseline x86-64
// ISA (SSE2) has no vector form of: hence the clones below.
FASTSEG_ALWAYS_INLINE UnpoolStatus scan_rows_impl(const int64_t* idx, const UnpoolGeometry& g, int64_t ph_begin,
                                                  int64_t ph_end, int64_t& bad_value) {
  const uint64_t plane = uint64_t(g.Ho * g.Wo);
  const int64_t row_len = g.W * g.channels;
  bool out_of_window = false;
  for (int64_t ph = ph_begin; ph < ph_end; ++ph) {
    const int64_t r0 = std::max<int64_t>(ph * g.sH - g.pH, 0);
    const int64_t r1 = std::min<int64_t>(ph * g.sH - g.pH + g.kH, g.Ho);
    const int64_t lo = r0 * g.Wo;
    const uint64_t span = r1 > r0 ? uint64_t((r1 - r0) * g.Wo) : 0;
    const int64_t* row = idx + ph * row_len;
    // Largest index and largest offset from the window's first row, as unsigned (a negative index
    // is huge): max-reductions vectorise where or-ing compare results did not.
    uint64_t largest = 0, farthest = 0;
    for (int64_t j = 0; j < row_len; ++j) {
      largest = std::max(largest, uint64_t(row[j]));
      farthest = std::max(farthest, uint64_t(row[j] - lo));
    }
    out_of_window |= farthest >= span;
    if (largest >= plane) {
      for (int64_t j = 0; j < row_len; ++j) {
        if (uint64_t(row[j]) >= plane) bad_value = row[j];
      }
      return kOutOfRange;
    }
  }
  return out_of_window ? kOutOfWindow : kInWindow;
}

UnpoolStatus scan_rows_base(const int64_t* idx, const UnpoolGeometry& g, int64_t ph_begin, int64_t ph_end,
                            int64_t& bad_value) {
  return scan_rows_impl(idx, g, ph_begin, ph_end, bad_value);
}

#if FASTSEG_HAVE_AVX2_CLONE
FASTSEG_TARGET_AVX2 UnpoolStatus scan_rows_avx2(const int64_t* idx, const UnpoolGeometry& g, int64_t ph_begin,
                                                int64_t ph_end, int64_t& bad_value) {
  return scan_rows_impl(idx, g, ph_begin, ph_end, bad_value);
}

FASTSEG_TARGET_AVX512 UnpoolStatus scan_rows_avx512(const int64_t* idx, const UnpoolGeometry& g, int64_t ph_begin,
                                                    int64_t ph_end, int64_t& bad_value) {
  return scan_rows_impl(idx, g, ph_begin, ph_end, bad_value);
}
#endif

}  // namespace

UnpoolStatus scan_pooled_rows(const int64_t* idx, const UnpoolGeometry& g, int64_t ph_begin, int64_t ph_end,
                              int64_t& bad_value) {
#if FASTSEG_HAVE_AVX2_CLONE
  if (cpu_has_avx512()) return scan_rows_avx512(idx, g, ph_begin, ph_end, bad_value);
  if (cpu_has_avx2()) return scan_rows_avx2(idx, g, ph_begin, ph_end, bad_value);
#endif
  return scan_rows_base(idx, g, ph_begin, ph_end, bad_value);
}

// w = max(w, st), from any thread (statuses order by severity).
static void raise_status(std::atomic<uint8_t>& w, uint8_t st) {
  uint8_t seen = w.load();
  while (seen < st && !w.compare_exchange_weak(seen, st)) {
  }
}

UnpoolStatus scan_slabs(const int64_t* idx, const UnpoolGeometry& g, uint8_t* per_slab, int64_t& bad_value) {
  const int64_t row_len = g.W * g.channels, in_slab = g.H * row_len;
  std::vector<std::atomic<uint8_t>> worst(per_slab ? g.slabs : 0);
  for (auto& w : worst) w = kInWindow;
  std::atomic<uint8_t> overall{kInWindow};
  std::atomic<int64_t> bad{0};
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(row_len, 1));
  at::parallel_for(0, g.slabs * g.H, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end;) {
      const int64_t s = r / g.H, ph = r % g.H;
      const int64_t stop = std::min(end, (s + 1) * g.H);
      int64_t found = 0;
      const UnpoolStatus st = scan_pooled_rows(idx + s * in_slab, g, ph, ph + (stop - r), found);
      if (st == kOutOfRange) bad = found;
      if (per_slab) raise_status(worst[s], st);
      raise_status(overall, st);
      r = stop;
    }
  });
  for (int64_t s = 0; s < int64_t(worst.size()); ++s) per_slab[s] = worst[s].load();
  bad_value = bad.load();
  return UnpoolStatus(overall.load());
}

namespace {

// Output rows owned by pooled row ph when windows do not overlap vertically (kH <= sH): from the
// top of its window to the top of the next one, so every output row has exactly one owner.
void owned_rows(const UnpoolGeometry& g, int64_t ph, int64_t& begin, int64_t& end) {
  auto top = [&](int64_t p) { return std::min(std::max<int64_t>(p * g.sH - g.pH, 0), g.Ho); };
  begin = ph == 0 ? 0 : top(ph);
  end = ph == g.H - 1 ? g.Ho : top(ph + 1);
}

// Bytes of output rows zeroed and filled per step: consecutive pooled rows are grouped until their
// owned rows would pass this size, so that small planes (2 output rows of 32 floats per pooled row
// at 32x32) take one zeroing per group instead of one per pooled row (1.12-1.19x on 4..8x512x32x32
// NCHW when measured with the earlier block-and-stream build; larger groups lost 4-8% on 64..256-
// wide planes). Rows of 2 KiB and more take one pooled row per step.
constexpr int64_t kOwnedGroupBytes = 2048;

// kH <= sH: zero the output rows that the pooled rows in [ph_begin, ph_end) own, a group at a
// time, and store the rows' entries while those rows are in cache. The scan proved every index lies
// in its own window, hence in rows its pooled row owns: no branch per element. Entries go in flat
// order, so of two naming one position the later wins. (Building each group in a separate block
// and copying it out with non-temporal stores, the kernel of 2026-11-25, ran 0.94-1.19x the time of
// writing in place, same process, 4x512x32x32 to 16x64x256x256, both layouts.)
template <typename T>
void fill_owned_rows(const T* x, const int64_t* idx, T* out, const UnpoolGeometry& g,
                     int64_t ph_begin, int64_t ph_end) {
  const int64_t C = g.channels;
  const int64_t in_row = g.W * C;
  const int64_t out_row = g.Wo * C;
  for (int64_t ph0 = ph_begin; ph0 < ph_end;) {
    int64_t begin, end;
    owned_rows(g, ph0, begin, end);
    int64_t ph1 = ph0 + 1;
    for (; ph1 < ph_end; ++ph1) {  // owned rows are consecutive: extend while the group is small
      int64_t next_begin, next_end;
      owned_rows(g, ph1, next_begin, next_end);
      if ((next_end - begin) * out_row * int64_t(sizeof(T)) > kOwnedGroupBytes) break;
      end = next_end;
    }
    std::memset(out + begin * out_row, 0, sizeof(T) * (end - begin) * out_row);
    // out[v * C + c] is output position v; every v here lies in rows [begin, end).
    for (int64_t ph = ph0; ph < ph1; ++ph) {
      const int64_t* irow = idx + ph * in_row;
      const T* xrow = x + ph * in_row;
      if (C == 1) {
        for (int64_t pw = 0; pw < g.W; ++pw) out[irow[pw]] = xrow[pw];
      } else {
        for (int64_t pw = 0; pw < g.W; ++pw) {
          for (int64_t c = 0; c < C; ++c) out[irow[pw * C + c] * C + c] = xrow[pw * C + c];
        }
      }
    }
    ph0 = ph1;
  }
}

// Output columns owned by pooled column pw when windows do not overlap horizontally (kW <= sW).
void owned_cols(const UnpoolGeometry& g, int64_t pw, int64_t& begin, int64_t& end) {
  auto left = [&](int64_t p) { return std::min(std::max<int64_t>(p * g.sW - g.pW, 0), g.Wo); };
  begin = pw == 0 ? 0 : left(pw);
  end = pw == g.W - 1 ? g.Wo : left(pw + 1);
}

// o[c] = x[c] where idx[c] names `target`, else 0, a compare and a mask per channel, which the
// compiler vectorises (a mask rather than ?: so that x is read unconditionally: no masked loads).
// Returns how many of the C indices named it.
template <typename T>
FASTSEG_ALWAYS_INLINE int64_t select_channels(const T* x, const int64_t* idx, int64_t target, T* o, int64_t C) {
  int64_t hits = 0;
  for (int64_t c = 0; c < C; ++c) {
    const bool hit = idx[c] == target;
    o[c] = x[c] & static_cast<T>(T(0) - T(hit));
    hits += hit;
  }
  return hits;
}

// channels_last with windows that overlap in neither direction (kH <= sH, kW <= sW): an entry in
// its own window is the only one that can name a position of that window, so each output pixel is
// written once, with its window's values where their indices name it and zeros elsewhere: no
// zeroing pass, no scatter, and the channels vectorise (the scatter of fill_owned_rows stores one
// element at a time). The scan proved each index lies in its window's rows; its columns are
// checked by counting: every entry of a pooled row names exactly one position of its window
// exactly when all of them lie in their windows. Returns false if one does not (the caller then
// redoes the slab with scatter_slab).
template <typename T>
FASTSEG_ALWAYS_INLINE bool select_owned_rows_impl(const T* x, const int64_t* idx, T* out, const UnpoolGeometry& g,
                                                  int64_t ph_begin, int64_t ph_end) {
  const int64_t C = g.channels;
  const int64_t in_row = g.W * C;
  const int64_t out_row = g.Wo * C;
  for (int64_t ph = ph_begin; ph < ph_end; ++ph) {
    int64_t begin, end;
    owned_rows(g, ph, begin, end);
    const int64_t top = ph * g.sH - g.pH;  // the window's rows: [top, top + kH)
    const int64_t* irow = idx + ph * in_row;
    const T* xrow = x + ph * in_row;
    int64_t hits = 0;
    for (int64_t oh = begin; oh < end; ++oh) {
      T* orow = out + oh * out_row;
      if (oh < top || oh >= top + g.kH) {
        std::memset(orow, 0, sizeof(T) * out_row);
        continue;
      }
      for (int64_t pw = 0; pw < g.W; ++pw) {
        int64_t cb, ce;
        owned_cols(g, pw, cb, ce);
        const int64_t left = pw * g.sW - g.pW;
        for (int64_t ow = cb; ow < ce; ++ow) {
          T* o = orow + ow * C;
          if (ow < left || ow >= left + g.kW) {
            std::memset(o, 0, sizeof(T) * C);
          } else {
            hits += select_channels(xrow + pw * C, irow + pw * C, oh * g.Wo + ow, o, C);
          }
        }
      }
    }
    if (hits != in_row) return false;
  }
  return true;
}

template <typename T>
bool select_owned_rows_base(const T* x, const int64_t* idx, T* out, const UnpoolGeometry& g, int64_t ph_begin,
                            int64_t ph_end) {
  return select_owned_rows_impl(x, idx, out, g, ph_begin, ph_end);
}

#if FASTSEG_HAVE_AVX2_CLONE
template <typename T>
FASTSEG_TARGET_AVX2 bool select_owned_rows_avx2(const T* x, const int64_t* idx, T* out, const UnpoolGeometry& g,
                                                int64_t ph_begin, int64_t ph_end) {
  return select_owned_rows_impl(x, idx, out, g, ph_begin, ph_end);
}

template <typename T>
FASTSEG_TARGET_AVX512 bool select_owned_rows_avx512(const T* x, const int64_t* idx, T* out, const UnpoolGeometry& g,
                                                    int64_t ph_begin, int64_t ph_end) {
  return select_owned_rows_impl(x, idx, out, g, ph_begin, ph_end);
}
#endif

// The select's loop runs per output pixel (its owner and window looked up, C channels compared):
// it pays from this many bytes of channels per pixel. Same process, alternating with
// fill_owned_rows: float16 64 channels 1.07-1.27x, float32 48 1.22x, 32 1.03x; float16 32 0.86x,
// 4..16 float32 channels 0.29-0.64x.
constexpr int64_t kSelectMinPixelBytes = 128;

template <typename T>
bool select_owned_rows(const T* x, const int64_t* idx, T* out, const UnpoolGeometry& g, int64_t ph_begin,
                       int64_t ph_end) {
#if FASTSEG_HAVE_AVX2_CLONE
  if (cpu_has_avx512()) return select_owned_rows_avx512(x, idx, out, g, ph_begin, ph_end);
  if (cpu_has_avx2()) return select_owned_rows_avx2(x, idx, out, g, ph_begin, ph_end);
#endif
  return select_owned_rows_base(x, idx, out, g, ph_begin, ph_end);
}

// kH > sH (overlapping windows): build output rows [oh_begin, oh_end) from the pooled rows whose
// windows cover each one, in increasing flat order so that the later of two entries wins. Entries
// of a covering row that point at another output row are sent to a scratch slot rather than
// branched around: the branch would be mispredicted about half the time.
template <typename T>
void gather_rows(const T* x, const int64_t* idx, T* out, const UnpoolGeometry& g,
                 int64_t oh_begin, int64_t oh_end) {
  const int64_t C = g.channels;
  const int64_t in_row = g.W * C;
  const int64_t out_row = g.Wo * C;
  const uint64_t Wo = uint64_t(g.Wo);
  T scratch;
  for (int64_t oh = oh_begin; oh < oh_end; ++oh) {
    T* orow = out + oh * out_row;
    std::memset(orow, 0, sizeof(T) * out_row);
    int64_t first, last;
    UnpoolGeometry::covering(oh, g.kH, g.sH, g.pH, g.H, first, last);
    const int64_t row_start = oh * g.Wo;
    for (int64_t ph = first; ph <= last; ++ph) {
      const int64_t* irow = idx + ph * in_row;
      const T* xrow = x + ph * in_row;
      for (int64_t pw = 0; pw < g.W; ++pw) {
        for (int64_t c = 0; c < C; ++c) {
          const uint64_t col = uint64_t(irow[pw * C + c] - row_start);
          T* dst = col < Wo ? orow + col * C + c : &scratch;
          *dst = xrow[pw * C + c];
        }
      }
    }
  }
}

// The general case: zero the slab, then scatter in flat order (later entries win).
template <typename T>
void scatter_slab(const T* x, const int64_t* idx, T* out, const UnpoolGeometry& g) {
  const int64_t C = g.channels;
  std::memset(out, 0, sizeof(T) * g.Ho * g.Wo * C);
  const int64_t n = g.H * g.W;
  for (int64_t k = 0; k < n; ++k) {
    for (int64_t c = 0; c < C; ++c) {
      out[idx[k * C + c] * C + c] = x[k * C + c];
    }
  }
}

// T is an unsigned integer of the element's width: unpooling only moves bits.
template <typename T>
void unpool_kernel(const T* x, const int64_t* idx, T* out, const UnpoolGeometry& g) {
  const int64_t in_slab = g.H * g.W * g.channels;
  const int64_t out_slab = g.Ho * g.Wo * g.channels;
  // Work units of the fast path: pooled rows when windows do not overlap vertically, else rows.
  const bool by_pooled_row = g.kH <= g.sH;
  const int64_t units = by_pooled_row ? g.H : g.Ho;
  // channels_last without overlapping windows: each output pixel selected once (select_owned_rows).
  const bool by_pixel = by_pooled_row && g.kW <= g.sW && g.channels * int64_t(sizeof(T)) >= kSelectMinPixelBytes;
  // The fast path over units [begin, end) of slab s, whose indices were found in their windows'
  // rows; false where the select found one outside its window's columns.
  auto fast_path = [&](int64_t s, int64_t begin, int64_t end) {
    const T* xs = x + s * in_slab;
    const int64_t* is = idx + s * in_slab;
    T* os = out + s * out_slab;
    if (by_pixel) return select_owned_rows(xs, is, os, g, begin, end);
    if (by_pooled_row) {
      fill_owned_rows(xs, is, os, g, begin, end);
    } else {
      gather_rows(xs, is, os, g, begin, end);
    }
    return true;
  };
  std::vector<uint8_t> status(g.slabs, kInWindow);
  std::atomic<int64_t> bad_value{0};
  const int threads = at::get_num_threads();

  if (g.slabs >= 4 * int64_t(threads)) {
    // Many slabs: one task per slab, its indices scanned and then reused while still in cache.
    at::parallel_for(0, g.slabs, 1, [&](int64_t begin, int64_t end) {
      for (int64_t s = begin; s < end; ++s) {
        int64_t bad = 0;
        status[s] = scan_pooled_rows(idx + s * in_slab, g, 0, g.H, bad);
        if (status[s] == kInWindow && !fast_path(s, 0, units)) status[s] = kOutOfWindow;
        if (status[s] == kOutOfWindow) {
          scatter_slab(x + s * in_slab, idx + s * in_slab, out + s * out_slab, g);
        } else if (status[s] == kOutOfRange) {
          bad_value = bad;
        }
      }
    });
  } else {
    // Few large slabs: each slab's rows split across threads. A slab's status is the worst of its
    // parts'; its out-of-window slabs are redone with scatter_slab afterwards.
    const int64_t unit_size = (by_pooled_row ? g.W : g.Wo) * g.channels;
    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(unit_size, 1));
    if (by_pooled_row) {
      // Pooled rows are the fast path's units: a few at a time, scanned and then unpooled while
      // their indices are in cache (a scan of every slab first read the indices twice from memory).
      const int64_t scan_rows_per_step = std::max<int64_t>(1, 16384 / std::max<int64_t>(g.W * g.channels, 1));
      std::vector<std::atomic<uint8_t>> worst(g.slabs);
      for (auto& w : worst) w = kInWindow;
      at::parallel_for(0, g.slabs * g.H, grain, [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end;) {
          const int64_t s = r / g.H, ph = r % g.H;
          const int64_t stop = std::min({end, (s + 1) * g.H, r + scan_rows_per_step});
          int64_t bad = 0;
          UnpoolStatus st = scan_pooled_rows(idx + s * in_slab, g, ph, ph + (stop - r), bad);
          if (st == kOutOfRange) bad_value = bad;
          if (st == kInWindow && !fast_path(s, ph, ph + (stop - r))) st = kOutOfWindow;
          raise_status(worst[s], st);
          r = stop;
        }
      });
      for (int64_t s = 0; s < g.slabs; ++s) status[s] = worst[s].load();
    } else {
      // Output rows are the units and each reads several pooled rows: scan every slab first.
      int64_t bad = 0;
      if (scan_slabs(idx, g, status.data(), bad) == kOutOfRange) bad_value = bad;
      at::parallel_for(0, g.slabs * units, grain, [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end;) {
          const int64_t s = r / units, u = r % units;
          const int64_t stop = std::min(end, (s + 1) * units);
          if (status[s] == kInWindow) fast_path(s, u, u + (stop - r));
          r = stop;
        }
      });
    }
    for (int64_t s = 0; s < g.slabs; ++s) {
      if (status[s] == kOutOfWindow) {
        scatter_slab(x + s * in_slab, idx + s * in_slab, out + s * out_slab, g);
      }
    }
  }
  for (int64_t s = 0; s < g.slabs; ++s) {
    if (status[s] == kOutOfRange) fail_index_out_of_range(bad_value.load(), g.Ho, g.Wo);
  }
}

at::Tensor max_unpool2d_cpu(const at::Tensor& input, const at::Tensor& indices,
                            at::IntArrayRef kernel_size, at::IntArrayRef stride,
                            at::IntArrayRef padding, c10::SymIntArrayRef output_size) {
  const int64_t Ho = output_size[0].expect_int(), Wo = output_size[1].expect_int();
  check_max_unpool2d_args(input, indices, kernel_size, stride, padding, Ho, Wo);
  const auto format = output_memory_format(input);
  const at::Tensor x = input.contiguous(format);
  const at::Tensor idx = indices.contiguous(format);
  at::Tensor out = at::empty({input.size(0), input.size(1), Ho, Wo},
                             input.options().memory_format(format));
  if (out.numel() == 0) return out;
  if (x.numel() == 0) return out.zero_();
  advise_huge_pages(out);
  const UnpoolGeometry g = unpool_geometry(
      x, kernel_size, stride, padding, Ho, Wo, format == at::MemoryFormat::ChannelsLast);
  dispatch_by_element_size(x.element_size(), [&](auto tag) {
    using T = decltype(tag);
    unpool_kernel(static_cast<const T*>(x.const_data_ptr()), idx.const_data_ptr<int64_t>(),
                  static_cast<T*>(out.mutable_data_ptr()), g);
  });
  return out;
}

at::Tensor max_unpool2d_backward_cpu(const at::Tensor& grad_output, const at::Tensor& indices) {
  check_max_unpool2d_backward_args(grad_output, indices);
  const auto format = output_memory_format(indices);
  const at::Tensor idx = indices.contiguous(format);
  const at::Tensor grad = grad_output.contiguous(format);
  at::Tensor grad_input =
      at::empty(indices.sizes(), grad_output.options().memory_format(format));
  if (grad_input.numel() == 0) return grad_input;
  const bool channels_last = format == at::MemoryFormat::ChannelsLast;
  const int64_t B = indices.size(0), C = indices.size(1);
  const int64_t slabs = channels_last ? B : B * C, channels = channels_last ? C : 1;
  const int64_t Ho = grad.size(2), Wo = grad.size(3);
  const uint64_t plane = uint64_t(Ho * Wo);
  const int64_t in_slab = indices.size(2) * indices.size(3) * channels;
  const int64_t out_slab = Ho * Wo * channels;
  std::atomic<bool> failed{false};
  std::atomic<int64_t> bad_value{0};
  dispatch_by_element_size(grad.element_size(), [&](auto tag) {
    using T = decltype(tag);
    const T* g = static_cast<const T*>(grad.const_data_ptr());
    const int64_t* id = idx.const_data_ptr<int64_t>();
    T* gi = static_cast<T*>(grad_input.mutable_data_ptr());
    const int64_t grain = std::max<int64_t>(1, 32768 / in_slab);
    at::parallel_for(0, slabs, grain, [&](int64_t begin, int64_t end) {
      for (int64_t s = begin; s < end; ++s) {
        const int64_t* is = id + s * in_slab;
        const T* gs = g + s * out_slab;
        T* gis = gi + s * in_slab;
        for (int64_t k = 0; k < in_slab; k += channels) {
          for (int64_t c = 0; c < channels; ++c) {
            const int64_t v = is[k + c];
            if (uint64_t(v) < plane) {
              gis[k + c] = gs[v * channels + c];
            } else {
              gis[k + c] = 0;
              bad_value = v;
              failed = true;
            }
          }
        }
      }
    });
  });
  if (failed) fail_index_out_of_range(bad_value.load(), Ho, Wo);
  return grad_input;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastseg, CPU, m) {
  m.impl("max_unpool2d", &max_unpool2d_cpu);
  m.impl("max_unpool2d_backward", &max_unpool2d_backward_cpu);
}

}  // namespace fastseg
