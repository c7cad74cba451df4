// Max-unpooling on CUDA (SegNet's decoder, Badrinarayanan et al. 2017).
//
// One scan of the indices decides the path (and finds out-of-range indices, which must raise, not
// fault). On the fast path, where every index lies in its own pooling window as max_pool2d makes
// them, each thread owns one output element and gathers it from the few pooled cells whose windows
// cover it: every element is written once, with no zero-fill and no atomics, and deterministically.
// Otherwise an atomic max elects, per output position, the latest entry in flat order pointing at
// it (ATen's CPU semantics), and a gather writes the result.
// c10's CUDA headers only: ATen/cuda/CUDAContext.h pulls in cuSPARSE/cuBLAS headers that a bare
// nvcc toolkit may lack, and nothing here needs them.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "unpool.h"

namespace fastseg {

int64_t compiled_cuda_version() { return CUDA_VERSION; }

namespace {

constexpr int kThreads = 256;

int64_t blocks_for(int64_t n) {
  // Grid-stride loops: enough blocks to fill the device, no more.
  const int64_t needed = (n + kThreads - 1) / kThreads;
  int device = 0, sms = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  const int64_t cap = int64_t(sms) * 32;
  return std::max<int64_t>(1, std::min(needed, cap));
}

__global__ void scan_kernel(const int64_t* __restrict__ idx, int* __restrict__ status,
                            UnpoolGeometry g, int64_t n) {
  const int64_t plane = g.Ho * g.Wo;
  int worst = kInWindow;
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < n;
       e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t spatial = e / g.channels;
    const int64_t pw = spatial % g.W, ph = (spatial / g.W) % g.H;
    const int64_t v = idx[e];
    if (v < 0 || v >= plane) {
      worst = kOutOfRange;
    } else {
      const int64_t row = v / g.Wo, col = v - row * g.Wo;
      const int64_t top = ph * g.sH - g.pH, left = pw * g.sW - g.pW;
      if (row < top || row >= top + g.kH || col < left || col >= left + g.kW) {
        worst = max(worst, int(kOutOfWindow));
      }
    }
  }
  // Only threads that saw something unusual touch the flag.
  if (worst != kInWindow) atomicMax(status, worst);
}

template <typename T>
__global__ void gather_kernel(const T* __restrict__ x, const int64_t* __restrict__ idx,
                              T* __restrict__ out, UnpoolGeometry g, int64_t n) {
  for (int64_t o = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; o < n;
       o += int64_t(gridDim.x) * blockDim.x) {
    const int64_t c = o % g.channels;
    const int64_t spatial = o / g.channels;
    const int64_t ow = spatial % g.Wo;
    const int64_t t = spatial / g.Wo;
    const int64_t oh = t % g.Ho, slab = t / g.Ho;
    int64_t ph_first, ph_last, pw_first, pw_last;
    UnpoolGeometry::covering(oh, g.kH, g.sH, g.pH, g.H, ph_first, ph_last);
    UnpoolGeometry::covering(ow, g.kW, g.sW, g.pW, g.W, pw_first, pw_last);
    const int64_t target = oh * g.Wo + ow;
    const int64_t base = slab * g.H * g.W * g.channels + c;
    T value = T(0);
    // Latest flat order first: the first match is the entry a sequential scatter keeps.
    bool found = false;
    for (int64_t ph = ph_last; ph >= ph_first && !found; --ph) {
      for (int64_t pw = pw_last; pw >= pw_first; --pw) {
        const int64_t at = base + (ph * g.W + pw) * g.channels;
        if (__ldg(idx + at) == target) {
          value = x[at];
          found = true;
          break;
        }
      }
    }
    out[o] = value;
  }
}

__global__ void elect_kernel(const int64_t* __restrict__ idx, int* __restrict__ winner,
                             UnpoolGeometry g, int64_t n) {
  const int64_t HW = g.H * g.W;
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < n;
       e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t c = e % g.channels;
    const int64_t k = (e / g.channels) % HW;
    const int64_t slab = e / (g.channels * HW);
    atomicMax(winner + slab * g.Ho * g.Wo * g.channels + idx[e] * g.channels + c, int(k));
  }
}

template <typename T>
__global__ void winner_gather_kernel(const T* __restrict__ x, const int* __restrict__ winner,
                                     T* __restrict__ out, UnpoolGeometry g, int64_t n) {
  const int64_t HW = g.H * g.W;
  for (int64_t o = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; o < n;
       o += int64_t(gridDim.x) * blockDim.x) {
    const int64_t c = o % g.channels;
    const int64_t slab = o / (g.channels * g.Ho * g.Wo);
    const int w = winner[o];
    out[o] = w >= 0 ? x[slab * HW * g.channels + int64_t(w) * g.channels + c] : T(0);
  }
}

template <typename T>
__global__ void backward_kernel(const T* __restrict__ grad, const int64_t* __restrict__ idx,
                                T* __restrict__ grad_input, int* __restrict__ status,
                                int64_t HW, int64_t plane, int64_t channels, int64_t n) {
  int worst = kInWindow;
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < n;
       e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t c = e % channels;
    const int64_t slab = e / (channels * HW);
    const int64_t v = idx[e];
    if (v >= 0 && v < plane) {
      grad_input[e] = grad[slab * plane * channels + v * channels + c];
    } else {
      grad_input[e] = T(0);
      worst = kOutOfRange;
    }
  }
  if (worst != kInWindow) atomicMax(status, worst);
}

[[noreturn]] void raise_out_of_range(const at::Tensor& idx, int64_t Ho, int64_t Wo) {
  const at::Tensor bad = idx.masked_select((idx < 0).logical_or(idx >= Ho * Wo));
  fail_index_out_of_range(bad.numel() ? bad[0].item<int64_t>() : -1, Ho, Wo);
}

at::Tensor max_unpool2d_cuda(const at::Tensor& input, const at::Tensor& indices,
                             at::IntArrayRef kernel_size, at::IntArrayRef stride,
                             at::IntArrayRef padding, c10::SymIntArrayRef output_size) {
  const int64_t Ho = output_size[0].expect_int(), Wo = output_size[1].expect_int();
  check_max_unpool2d_args(input, indices, kernel_size, stride, padding, Ho, Wo);
  TORCH_CHECK_VALUE(input.size(2) * input.size(3) < (int64_t(1) << 31),
                    "max_unpool2d: input planes over 2^31 elements are not supported on CUDA");
  const c10::cuda::CUDAGuard guard(input.device());
  const auto format = output_memory_format(input);
  const at::Tensor x = input.contiguous(format);
  const at::Tensor idx = indices.contiguous(format);
  at::Tensor out = at::empty({input.size(0), input.size(1), Ho, Wo},
                             input.options().memory_format(format));
  if (out.numel() == 0) return out;
  if (x.numel() == 0) return out.zero_();
  const UnpoolGeometry g = unpool_geometry(
      x, kernel_size, stride, padding, Ho, Wo, format == at::MemoryFormat::ChannelsLast);
  const auto stream = c10::cuda::getCurrentCUDAStream();

  at::Tensor status = at::zeros({1}, input.options().dtype(at::kInt));
  const int64_t n_in = x.numel(), n_out = out.numel();
  scan_kernel<<<blocks_for(n_in), kThreads, 0, stream>>>(
      idx.const_data_ptr<int64_t>(), status.mutable_data_ptr<int>(), g, n_in);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const int worst = status.item<int>();  // the one host sync: picks the path, reports bad indices
  if (worst == kOutOfRange) raise_out_of_range(idx, Ho, Wo);

  dispatch_by_element_size(x.element_size(), [&](auto tag) {
    using T = decltype(tag);
    const T* xp = static_cast<const T*>(x.const_data_ptr());
    T* op = static_cast<T*>(out.mutable_data_ptr());
    if (worst == kInWindow) {
      gather_kernel<T><<<blocks_for(n_out), kThreads, 0, stream>>>(
          xp, idx.const_data_ptr<int64_t>(), op, g, n_out);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else {
      at::Tensor winner = at::full({n_out}, -1, input.options().dtype(at::kInt));
      elect_kernel<<<blocks_for(n_in), kThreads, 0, stream>>>(
          idx.const_data_ptr<int64_t>(), winner.mutable_data_ptr<int>(), g, n_in);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      winner_gather_kernel<T><<<blocks_for(n_out), kThreads, 0, stream>>>(
          xp, winner.const_data_ptr<int>(), op, g, n_out);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return out;
}

at::Tensor max_unpool2d_backward_cuda(const at::Tensor& grad_output, const at::Tensor& indices) {
  check_max_unpool2d_backward_args(grad_output, indices);
  const c10::cuda::CUDAGuard guard(indices.device());
  const auto format = output_memory_format(indices);
  const at::Tensor idx = indices.contiguous(format);
  const at::Tensor grad = grad_output.contiguous(format);
  at::Tensor grad_input = at::empty(indices.sizes(), grad_output.options().memory_format(format));
  const int64_t n = grad_input.numel();
  if (n == 0) return grad_input;
  const bool channels_last = format == at::MemoryFormat::ChannelsLast;
  const int64_t channels = channels_last ? indices.size(1) : 1;
  const int64_t Ho = grad.size(2), Wo = grad.size(3);
  at::Tensor status = at::zeros({1}, indices.options().dtype(at::kInt));
  dispatch_by_element_size(grad.element_size(), [&](auto tag) {
    using T = decltype(tag);
    backward_kernel<T><<<blocks_for(n), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        static_cast<const T*>(grad.const_data_ptr()), idx.const_data_ptr<int64_t>(),
        static_cast<T*>(grad_input.mutable_data_ptr()), status.mutable_data_ptr<int>(),
        indices.size(2) * indices.size(3), Ho * Wo, channels, n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  if (status.item<int>() == kOutOfRange) raise_out_of_range(idx, Ho, Wo);
  return grad_input;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastseg, CUDA, m) {
  m.impl("max_unpool2d", &max_unpool2d_cuda);
  m.impl("max_unpool2d_backward", &max_unpool2d_backward_cuda);
}

}  // namespace fastseg
