// The schemas of every fastseg op, declared once. Each backend registers its kernels in its own
// file (csrc/cpu/*.cpp for CPU, csrc/cuda/*.cu for CUDA); fake (meta) kernels and autograd are
// registered from Python, beside each op's public function in fastseg/ops/.
#include <Python.h>
#include <torch/library.h>
#include <torch/version.h>

#include <string>

#include "common.h"

namespace fastseg {

#ifdef FASTSEG_WITH_CUDA
int64_t compiled_cuda_version();  // csrc/cuda/unpool.cu: CUDA_VERSION is only known to nvcc
#endif

// CUDA_VERSION the extension was compiled against, or 0 for a CPU-only build.
int64_t cuda_version() {
#ifdef FASTSEG_WITH_CUDA
  return compiled_cuda_version();
#else
  return 0;
#endif
}

// The clone of the CPU hot loops this process runs (common.h's cpu_isa): base, avx2 or avx512.
std::string cpu_isa_name() {
  switch (cpu_isa()) {
    case CpuIsa::kAvx512: return "avx512";
    case CpuIsa::kAvx2: return "avx2";
    default: return "base";
  }
}

// The torch release the extension was compiled against, "major.minor": the C++ ABI changes between
// them, so fastseg/_backends.py refuses the extension under another one rather than risk a crash.
std::string torch_version() {
  return std::to_string(TORCH_VERSION_MAJOR) + "." + std::to_string(TORCH_VERSION_MINOR);
}

TORCH_LIBRARY(fastseg, m) {
  m.def("_cuda_version() -> int", &cuda_version);
  m.def("_torch_version() -> str", &torch_version);
  m.def("_cpu_isa() -> str", &cpu_isa_name);

  // Max-unpooling (SegNet). input/indices (B, C, H, W); indices are flat positions in the
  // (Ho, Wo) output plane, as max_pool2d(return_indices=True) gives them. kernel_size, stride and
  // padding only describe where the indices are expected to lie (the fast single-pass path).
  m.def(
      "max_unpool2d(Tensor input, Tensor indices, int[2] kernel_size, int[2] stride, "
      "int[2] padding, SymInt[2] output_size) -> Tensor");
  // Gradient with respect to input: grad_output gathered at indices.
  m.def("max_unpool2d_backward(Tensor grad_output, Tensor indices) -> Tensor");

  // Dense-CRF mean-field inference (Kraehenbuehl & Koltun 2011) on the permutohedral lattice.
  // unary (B, L, H, W) float32 energies -log p; one pairwise kernel per entry of features
  // ((B or 1, D, H, W) float32, already divided by their standard deviations), compat ((L, L),
  // used symmetrised; energy E = U + sum C F(Q)) and normalization (0 none, 1 before, 2 after,
  // 3 symmetric); init (B, L, H, W) replaces softmax(-unary) as the starting Q; the energies are
  // unary_scale * unary (-1 turns logits into energies). Returns Q.
  m.def(
      "dense_crf(Tensor unary, Tensor[] features, Tensor[] compat, int[] normalization, "
      "int iterations, Tensor? init=None, float unary_scale=1.0) -> Tensor");
  // dense_crf's every iterate Q_0 .. Q_iterations, (iterations + 1, B, L, H, W), from one call.
  m.def(
      "dense_crf_iterates_cpp(Tensor unary, Tensor[] features, Tensor[] compat, int[] normalization, "
      "int iterations, Tensor? init=None, float unary_scale=1.0) -> Tensor");
  // dense_crf's reverse sweep on lattices built once per image: grad and iterates are every
  // iterate's (iterations + 1, B, L, H, W), or Q_T's alone (1, B, L, H, W; the others are then
  // recomputed). Returns [grad unary, grad init (empty without init), grad compat per kernel].
  m.def(
      "dense_crf_backward_cpp(Tensor grad, Tensor iterates, Tensor unary, Tensor[] features, Tensor[] compat, "
      "int[] normalization, int iterations, Tensor? init, float unary_scale) -> Tensor[]");
  // The normalised permutohedral-lattice Gaussian filter of values (B, C, *) with features
  // (B or 1, D, *): what one dense-CRF kernel applies to Q; transpose applies its exact transpose.
  m.def(
      "permutohedral_filter(Tensor values, Tensor features, int normalization, bool transpose=False) "
      "-> Tensor");

  // Atrous (dilated) convolution with a fused epilogue (Yu & Koltun 2016; DeepLab v2/v3):
  // act(scale * conv(input, weight) + shift + residual). input (B, C, H, W), weight
  // (O, C / groups, kH, kW), scale/shift (O), residual (B, O, Ho, Wo); the output takes input's
  // memory format. algorithm: 'auto' ('auto_training' when autograd will update the weights, so
  // that the CPU kernel does not keep their transforms), or force the CPU kernel's 'taps',
  // 'winograd' or 'conv' path (tests).
  m.def(
      "atrous_conv2d(Tensor input, Tensor weight, Tensor? scale, Tensor? shift, Tensor? residual, "
      "int[2] stride, int[2] padding, int[2] dilation, int groups, bool relu, "
      "str algorithm=\"auto\") -> Tensor");

  // Global Convolutional Network block (Peng et al., "Large Kernel Matters", CVPR 2017): the sum of
  // conv_1xk(conv_kx1(input, w_l1) + b_l1, w_l2) + b_l2 and conv_kx1(conv_1xk(input, w_r1) + b_r1,
  // w_r2) + b_r2, 'same' padding dilation * (k - 1) / 2 along each long axis. input (B, Cin, H, W),
  // w_l1 (Cmid, Cin, k, 1), w_l2 (Cout, Cmid, 1, k), w_r1 (Cmid, Cin, 1, k), w_r2 (Cout, Cmid, k, 1);
  // the output (B, Cout, H, W) takes input's memory format. algorithm: 'auto' ('auto_training' when
  // autograd will update the weights, so that their spectra are not kept), or force the CPU kernel's
  // 'fft', 'gemm' or 'conv' route (tests, benchmarks).
  m.def(
      "gcn_conv2d(Tensor input, Tensor w_l1, Tensor w_l2, Tensor w_r1, Tensor w_r2, Tensor? b_l1, "
      "Tensor? b_l2, Tensor? b_r1, Tensor? b_r2, int dilation, str algorithm=\"auto\") -> Tensor");

  // Max-unpooling followed by a stride-1 atrous convolution with the fused epilogue (SegNet's
  // decoder, Badrinarayanan et al. 2017): atrous_conv2d(max_unpool2d(values, indices, kernel_size,
  // stride, pool_padding, output_size), weight, padding, dilation) with scale, shift, residual and
  // ReLU, without the unpooled map ever existing in full. values/indices (B, C, h, w), weight
  // (O, C, kH, kW). band_rows: output rows per band of the CPU kernel (0: chosen by size; tests).
  m.def(
      "unpool_conv2d(Tensor values, Tensor indices, Tensor weight, Tensor? scale, Tensor? shift, "
      "Tensor? residual, int[2] kernel_size, int[2] stride, int[2] pool_padding, SymInt[2] output_size, "
      "int[2] padding, int[2] dilation, bool relu, int band_rows=0) -> Tensor");
}

}  // namespace fastseg

// `import fastseg._C` loads this library, whose static initialisers register the ops above.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
