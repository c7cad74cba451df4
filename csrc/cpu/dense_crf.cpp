// Dense-CRF mean-field inference on the CPU (Kraehenbuehl & Koltun, "Efficient Inference in Fully
// Connected CRFs with Gaussian Edge Potentials", NIPS 2011), with the Gaussian filtering done on
// the permutohedral lattice (Adams, Baek & Davis, "Fast High-Dimensional Filtering Using the
// Permutohedral Lattice", Eurographics 2010). fastseg/ops/_reference/dense_crf.py is the same
// algorithm in plain PyTorch, step for step; keep the two in step.
//
// Layout and schedule, per image:
//  * Each pairwise kernel's lattice is built once (in parallel: pixels locate their simplices, then
//    each thread owns the lattice points whose hash falls in its share and numbers them) and reused
//    by every iteration. Indices are int32 inside a lattice (checked) and int64 everywhere else.
//    A lattice of grid positions (the Gaussian kernel's) is kept for the next image of that size.
//  * Label vectors are rows of `lanes` floats (L rounded up to 4 or a multiple of 8, zero padded),
//    so splat, blur and slice are short fixed-length vector loops.
//  * One pass over the pixels per iteration does everything per pixel: slice every kernel, apply
//    the compatibilities, add the unary, exp-and-normalise, and splat the new Q into this thread's
//    own splat buffer (no atomics; Q itself is never stored until the last iteration). Between
//    passes the buffers are summed (each lattice point over the chunks that touch it) and blurred,
//    in parallel over lattice points. All passes, sums and blur directions of a call run in one
//    parallel region, as phases shared out to its threads (run_phases).
//  * The passes visit the pixels in 32x32 tiles (tile_order): a pixel's index inside the pass and
//    the lattice is its position in that order, translated back only to read and write planes.
//  * All buffers are allocated before the first iteration.
#include <ATen/Parallel.h>
#include <sys/mman.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstring>
#include <exception>
#include <mutex>
#include <new>
#include <thread>
#include <vector>

#include "common.h"

#if FASTSEG_HAVE_AVX2_CLONE
#include <immintrin.h>
#endif
#if defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h>
#endif

// Vector-extension values passed between always-inline helpers never cross an ABI boundary.
#pragma GCC diagnostic ignored "-Wpsabi"

// The hot loops are compiled three times (common.h): AVX2 doubles the width of every label row, and
// AVX-512VL (the same 256-bit code with 32 vector registers instead of 16) lets a pass step of four
// pixels keep its rows in registers: 500x375, 10 iterations, 7-9% faster than the AVX2 clone with
// two pixels a step on the project's Zen 4 VM (benchmarks/RESULTS.md).

namespace fastseg {
namespace {

constexpr int kMaxFeatures = 64;

enum Normalization : int64_t {
  kNoNormalization = 0,
  kNormalizeBefore = 1,
  kNormalizeAfter = 2,
  kNormalizeSymmetric = 3,
};

// Label rows: L rounded up to 4, or to a multiple of 8 (one AVX register per 8 labels).
int64_t lanes_for(int64_t L) { return L <= 1 ? 1 : L <= 4 ? 4 : (L + 7) / 8 * 8; }
int64_t lanes_for_labels(int64_t L) { return std::max<int64_t>(4, lanes_for(L)); }

// Fresh memory costs a page fault per 4 KiB on first touch, which on a VM is slower than the
// whole mean-field pass over it: ask for transparent huge pages (a hint; the kernel may decline).
void advise_huge_pages(const at::Tensor& t) {
#ifdef MADV_HUGEPAGE
  constexpr uintptr_t kHuge = uintptr_t(1) << 21;
  const auto begin = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t first = (begin + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t last = (begin + t.nbytes()) & ~(kHuge - 1);
  if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
#endif
}

// A raw array whose memory comes from ATen's allocator: 64-byte aligned, and running out of memory
// is a clear c10::Error rather than a crash.
template <typename T>
struct Buffer {
  at::Tensor storage;
  T* data = nullptr;
  void resize(int64_t n) {
    const int64_t bytes = std::max<int64_t>(n, 1) * int64_t(sizeof(T));
    if (!storage.defined() || storage.numel() < bytes) {
      storage = at::Tensor();
      storage = at::empty({bytes}, at::TensorOptions().dtype(at::kByte));
      advise_huge_pages(storage);
    }
    data = reinterpret_cast<T*>(storage.mutable_data_ptr());
  }
  void release() {
    storage = at::Tensor();
    data = nullptr;
  }
};

// --- the lattice ---------------------------------------------------------------------------------

// 32-bit steps only (one multiply and one xor-shift per coordinate, then MurmurHash3's finaliser),
// so that the 8-pixel locate (locate_block8) hashes 8 keys at once with AVX2's 32-bit multiply.
constexpr uint32_t kHashSeed = 0x9E3779B9u, kHashStep = 0x85EBCA6Bu, kHashFinal = 0xC2B2AE35u;
FASTSEG_ALWAYS_INLINE uint32_t hash_key(const int32_t* key, int d) {
  uint32_t h = kHashSeed;
  for (int i = 0; i < d; ++i) {
    h = (h ^ uint32_t(key[i])) * kHashStep;
    h ^= h >> 15;
  }
  h *= kHashFinal;
  return h ^ (h >> 16);
}

// hash_key of 8 keys at once, lane by lane: key[i] holds coordinate i of every lane's key.
typedef uint32_t HashLanes __attribute__((vector_size(32)));
template <int D>
FASTSEG_ALWAYS_INLINE HashLanes hash_key_lanes(const HashLanes* key) {
  HashLanes h = HashLanes{} + kHashSeed;
  for (int i = 0; i < D; ++i) {
    h = (h ^ key[i]) * kHashStep;
    h ^= h >> 15;
  }
  h *= kHashFinal;
  return h ^ (h >> 16);
}

// Which of `owners` threads numbers the lattice point of hash h (uses the high bits; the table
// slot uses the low ones).
FASTSEG_ALWAYS_INLINE int owner_of(uint32_t h, int owners) {
  return int((uint64_t(h) * uint64_t(owners)) >> 32);
}

FASTSEG_ALWAYS_INLINE bool same_key(const int32_t* a, const int32_t* b, int d) {
  for (int i = 0; i < d; ++i) {
    if (a[i] != b[i]) return false;
  }
  return true;
}

// Open-addressing table of the lattice points one thread owns: keys (d int32 each) numbered in
// order of first appearance. A slot holds the point's number and its key side by side, in a power
// of two of words so that it never straddles a cache line: a lookup costs one random access, and
// the build prefetches it. (Slots holding a number into a separate key array cost two dependent
// misses per lookup, and the tables outgrow L2: 45-55 ns per lookup at 500x375.)
class KeyTable {
 public:
  // A table for about `expected` points and at most `most` (each entry could be a new point).
  void reset(int d, int64_t expected, int64_t most) {
    d_ = d;
    size_ = 0;
    words_ = 1;
    while (words_ < d + 1) words_ *= 2;
    keys_.clear();
    keys_.reserve(size_t(expected) * d);
    // Start at the size the last image needed, if this one could need it: growing the table takes
    // fresh memory, and first touches of fresh memory are page faults (a 725k-point lattice grew
    // four times per call, from 64k to 1M slots per owner).
    uint64_t capacity = 64, largest = 64;
    while (capacity < uint64_t(expected) * 2) capacity *= 2;
    while (largest < uint64_t(most) * 2) largest *= 2;
    capacity = std::min(largest, std::max(capacity, mask_ + 1));
    allocate(capacity);
  }

  int64_t size() const { return size_; }
  // Keys in number order, for walking the points.
  const int32_t* key(int64_t i) const { return keys_.data() + i * d_; }
  void prefetch(uint32_t h) const { __builtin_prefetch(slot(h & mask_)); }

  // D: the key length when compiled for it, else 0 (then d).
  template <int D = 0>
  int32_t find(const int32_t* key, uint32_t h) const {
    for (uint64_t s = h & mask_;; s = (s + 1) & mask_) {
      const int32_t* e = slot(s);
      if (e[0] < 0) return -1;
      if (same_key(e + 1, key, D > 0 ? D : d_)) return e[0];
    }
  }

  template <int D = 0>
  int32_t insert(const int32_t* key, uint32_t h) {
    for (uint64_t s = h & mask_;; s = (s + 1) & mask_) {
      int32_t* e = slot(s);
      if (e[0] < 0) {
        TORCH_CHECK(size_ < int64_t(INT32_MAX) / 2, "dense_crf: the lattice has more than 2^30 points");
        const int32_t index = int32_t(size_++);
        e[0] = index;
        std::memcpy(e + 1, key, sizeof(int32_t) * d_);
        keys_.insert(keys_.end(), key, key + d_);
        if (uint64_t(size_) * 2 > mask_ + 1) grow();
        return index;
      }
      if (same_key(e + 1, key, D > 0 ? D : d_)) return e[0];
    }
  }

  void release() {
    std::vector<int32_t>().swap(keys_);
    slots_.release();
  }

 private:
  int32_t* slot(uint64_t s) const { return slots_.data + s * words_; }

  void allocate(uint64_t capacity) {
    slots_.resize(int64_t(capacity * words_));
    mask_ = capacity - 1;
    for (uint64_t s = 0; s < capacity; ++s) slot(s)[0] = -1;
  }

  void grow() {
    Buffer<int32_t> old;
    std::swap(old, slots_);
    const uint64_t old_capacity = mask_ + 1;
    allocate(old_capacity * 2);
    for (uint64_t i = 0; i < old_capacity; ++i) {
      const int32_t* e = old.data + i * words_;
      if (e[0] < 0) continue;
      uint64_t s = hash_key(e + 1, d_) & mask_;
      while (slot(s)[0] >= 0) s = (s + 1) & mask_;
      std::memcpy(slot(s), e, sizeof(int32_t) * (d_ + 1));
    }
  }

  int d_ = 0, words_ = 1;
  int64_t size_ = 0;
  std::vector<int32_t> keys_;
  Buffer<int32_t> slots_;
  uint64_t mask_ = 0;  // capacity - 1; the capacity outlives reset, as the next image's first guess
};

// The lattice of one image's features: for every pixel the d+1 lattice points of its simplex and
// their barycentric weights, and for every lattice point its two blur neighbours along each of the
// d+1 lattice directions (M, a zero row, where the neighbour does not exist).
struct Lattice {
  int d = 0;
  int64_t N = 0, M = 0;
  float alpha = 1.0f;
  Buffer<int32_t> offset;      // N x (d+1)
  Buffer<float> weight;        // N x (d+1)
  Buffer<int32_t> neighbours;  // (d+1) x M x 2
  // Which of the `chunks` pixel chunks (the passes' split of the pixels) splat into which points:
  // chunk c's bitmap of M bits at touched[c * touched_words]. Most points have one chunk, so the
  // gather reads and re-zeroes one splat buffer per point instead of all of them.
  int64_t chunks = 0, touched_words = 0;
  Buffer<uint64_t> touched;
  // Scratch of the build, kept for the next image.
  Buffer<int32_t> rem0s;
  Buffer<uint8_t> ranks;
  Buffer<uint32_t> hashes;
  Buffer<uint8_t> same;  // 1 where a pixel's simplex is its left neighbour's
  Buffer<uint32_t> entries;  // (pixel, vertex) entries binned by owner
  std::vector<KeyTable> tables;
};

// Locates feature vector f (d values, stride `stride`) in the lattice (Adams et al. 2010, section
// 3.1): rem0 is the remainder-0 point the simplex is built from, rank the order of the residuals,
// bary the barycentric weights of the d+1 vertices. Plain IEEE float arithmetic, in the order of
// the PyTorch reference, so both find the same simplices (no FMA: this is baseline-ISA code).
// D is d when compiled for that d (the loops unroll and the arrays live in registers), else 0.
// Branch-free where the outcome is data-dependent: the residuals' order is a coin toss per
// comparison, and mispredicting it cost more than the rest of the arithmetic.
template <int D>
FASTSEG_ALWAYS_INLINE void locate(const float* f, int64_t stride, int runtime_d, const float* scale, int32_t* rem0,
                                  int32_t* rank, float* bary, bool& out_of_range) {
  constexpr int kCap = D > 0 ? D + 1 : kMaxFeatures + 1;
  const int d = D > 0 ? D : runtime_d;
  const int d1 = d + 1;
  float elevated[kCap], cf[kCap];
  for (int i = 0; i < d; ++i) cf[i] = f[i * stride] * scale[i];
  float sum = 0.0f;
  for (int j = d; j > 0; --j) {
    elevated[j] = sum - float(j) * cf[j - 1];
    sum += cf[j - 1];
  }
  elevated[0] = sum;
  const float down_factor = 1.0f / float(d1);
  const float up_factor = float(d1);
  float rem0f[kCap];
  float total = 0.0f;
  bool bad = false;
  for (int i = 0; i <= d; ++i) {
    // Lattice coordinates must stay well inside int32 (and NaN fails this test too).
    bad |= !(std::fabs(elevated[i]) < 1.0e9f);
    const float v = elevated[i] * down_factor;
    const float up = std::ceil(v) * up_factor;
    const float down = std::floor(v) * up_factor;
    rem0f[i] = (up - elevated[i] < elevated[i] - down) ? up : down;
    total += rem0f[i];
  }
  if (bad) {
    out_of_range = true;
    return;
  }
  const int s = int(total) / d1;  // total is an exact multiple of d+1
  float diff[kCap];
  for (int i = 0; i <= d; ++i) {
    diff[i] = elevated[i] - rem0f[i];
    rank[i] = 0;
  }
  // Rank of each residual, largest first; of two equal residuals the later one ranks higher.
  for (int i = 0; i < d; ++i) {
    for (int j = i + 1; j <= d; ++j) {
      const int32_t smaller = diff[i] < diff[j];
      rank[i] += smaller;
      rank[j] += 1 - smaller;
    }
  }
  // Shift the ranks by s (|s| <= d) and wrap them into 0..d, moving rem0 by d+1 where they wrap.
  for (int i = 0; i <= d; ++i) {
    const int32_t shifted = rank[i] + s;
    const int32_t wrap = int32_t(shifted < 0) - int32_t(shifted >= d1);
    rank[i] = shifted + wrap * d1;
    rem0[i] = int32_t(rem0f[i]) + wrap * d1;
  }
  for (int i = 0; i <= d + 1; ++i) bary[i] = 0.0f;
  for (int i = 0; i <= d; ++i) {
    const float v = (elevated[i] - float(rem0[i])) * down_factor;
    bary[d - rank[i]] += v;
    bary[d + 1 - rank[i]] -= v;
  }
  bary[0] += 1.0f + bary[d + 1];
}

// Key (first d coordinates) of vertex k of the simplex (rem0, rank): rem0 plus the canonical
// vertex k, which has k in the coordinates of rank <= d-k and k-(d+1) in the others.
FASTSEG_ALWAYS_INLINE void vertex_key(const int32_t* rem0, const uint8_t* rank, int d, int k,
                                      int32_t* key) {
  for (int i = 0; i < d; ++i) key[i] = rem0[i] + (rank[i] <= d - k ? k : k - (d + 1));
}

// Phase 1 of the build for pixels [begin, end): see build_lattice. D as in locate.
template <int D>
FASTSEG_ALWAYS_INLINE void locate_pixels_d(Lattice& lat, const float* features, int64_t stride, int runtime_d,
                                           const float* scale, const int64_t* order, int64_t begin, int64_t end,
                                           bool& bad) {
  constexpr int kCap = D > 0 ? D + 1 : kMaxFeatures + 1;
  const int d = D > 0 ? D : runtime_d;
  const int d1 = d + 1;
  int32_t* rem0s = lat.rem0s.data;
  uint8_t* ranks = lat.ranks.data;
  uint32_t* hashes = lat.hashes.data;
  int32_t rem0[kCap], rank[kCap], key[kCap];
  float bary[kCap + 1];
  uint8_t rank8[kCap];
  for (int64_t p = begin; p < end; ++p) {
    locate<D>(features + (order ? order[p] : p), stride, d, scale, rem0, rank, bary, bad);
    if (bad) break;
    bool same = p > begin;  // neighbouring pixels often share their simplex: no hashing then
    for (int i = 0; i < d; ++i) {
      rank8[i] = uint8_t(rank[i]);
      same = same && rem0s[(p - 1) * d + i] == rem0[i] && ranks[(p - 1) * d + i] == rank8[i];
      rem0s[p * d + i] = rem0[i];
      ranks[p * d + i] = rank8[i];
    }
    lat.same.data[p] = same;
    for (int k = 0; k < d1; ++k) lat.weight.data[p * d1 + k] = bary[k];
    if (same) {
      for (int k = 0; k < d1; ++k) hashes[p * d1 + k] = hashes[(p - 1) * d1 + k];
      continue;
    }
    for (int k = 0; k < d1; ++k) {
      vertex_key(rem0, rank8, d, k, key);
      hashes[p * d1 + k] = hash_key(key, d);
    }
  }
}

// The build's loops get an unrolled copy for the feature counts of the usual kernels: 2 (position),
// 3 (position and grey), 5 (position and RGB), 6 (position and four channels); fn<0> takes the
// count at run time.
#define FASTSEG_FEATURES_SWITCH(d, fn, ...)  \
  switch (d) {                               \
    case 2: fn<2>(__VA_ARGS__); break;       \
    case 3: fn<3>(__VA_ARGS__); break;       \
    case 5: fn<5>(__VA_ARGS__); break;       \
    case 6: fn<6>(__VA_ARGS__); break;       \
    default: fn<0>(__VA_ARGS__); break;      \
  }

FASTSEG_ALWAYS_INLINE void locate_pixels_impl(Lattice& lat, const float* features, int64_t stride, int d,
                                              const float* scale, const int64_t* order, int64_t begin,
                                              int64_t end, bool& bad) {
  FASTSEG_FEATURES_SWITCH(d, locate_pixels_d, lat, features, stride, d, scale, order, begin, end, bad)
}
void locate_pixels_base(Lattice& lat, const float* features, int64_t stride, int d, const float* scale,
                        const int64_t* order, int64_t begin, int64_t end, bool& bad) {
  locate_pixels_impl(lat, features, stride, d, scale, order, begin, end, bad);
}
#if FASTSEG_HAVE_AVX2_CLONE
// locate_pixels_d for 8 pixels at once, one pixel per lane: the same float operations in the same
// order (AVX2 without FMA, so nothing is contracted), hence bit for bit the same simplices and
// weights; the vertex hashes too. The scalar loop spent ~450 cycles per pixel at d = 5, on
// dependent scalar steps. Pixels [p, p + 8) of the pass order; returns false if a feature is out of
// range (nothing is then trusted).
#define FASTSEG_AVX2_NO_FMA __attribute__((target("avx2")))
template <int D>
FASTSEG_AVX2_NO_FMA FASTSEG_ALWAYS_INLINE bool locate_block8(Lattice& lat, const float* features, int64_t stride,
                                                             const float* scale, const int64_t* order, int64_t p) {
  constexpr int d = D, d1 = D + 1;
  alignas(32) float in[D][8];
  for (int l = 0; l < 8; ++l) {
    const float* f = features + (order ? order[p + l] : p + l);
    for (int i = 0; i < d; ++i) in[i][l] = f[i * stride];
  }
  __m256 elevated[d1];
  __m256 sum = _mm256_setzero_ps();
  for (int j = d; j > 0; --j) {
    const __m256 cf = _mm256_mul_ps(_mm256_load_ps(in[j - 1]), _mm256_set1_ps(scale[j - 1]));
    elevated[j] = _mm256_sub_ps(sum, _mm256_mul_ps(_mm256_set1_ps(float(j)), cf));
    sum = _mm256_add_ps(sum, cf);
  }
  elevated[0] = sum;
  const __m256 down_factor = _mm256_set1_ps(1.0f / float(d1)), up_factor = _mm256_set1_ps(float(d1));
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  __m256 rem0f[d1];
  __m256 total = _mm256_setzero_ps();
  __m256 in_range = _mm256_castsi256_ps(_mm256_set1_epi32(-1));
  for (int i = 0; i <= d; ++i) {
    in_range = _mm256_and_ps(in_range, _mm256_cmp_ps(_mm256_and_ps(elevated[i], abs_mask), _mm256_set1_ps(1.0e9f),
                                                     _CMP_LT_OQ));
    const __m256 v = _mm256_mul_ps(elevated[i], down_factor);
    const __m256 up = _mm256_mul_ps(_mm256_round_ps(v, _MM_FROUND_TO_POS_INF | _MM_FROUND_NO_EXC), up_factor);
    const __m256 down = _mm256_mul_ps(_mm256_round_ps(v, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC), up_factor);
    const __m256 closer_up =
        _mm256_cmp_ps(_mm256_sub_ps(up, elevated[i]), _mm256_sub_ps(elevated[i], down), _CMP_LT_OQ);
    rem0f[i] = _mm256_blendv_ps(down, up, closer_up);
    total = _mm256_add_ps(total, rem0f[i]);
  }
  if (_mm256_movemask_ps(in_range) != 0xFF) return false;
  // total is an exact multiple of d+1, so the correctly rounded quotient is exact.
  const __m256i s = _mm256_cvttps_epi32(_mm256_div_ps(total, up_factor));
  __m256 diff[d1];
  __m256i rank[d1];
  for (int i = 0; i <= d; ++i) {
    diff[i] = _mm256_sub_ps(elevated[i], rem0f[i]);
    rank[i] = _mm256_setzero_si256();
  }
  for (int i = 0; i < d; ++i) {
    for (int j = i + 1; j <= d; ++j) {
      const __m256i smaller = _mm256_castps_si256(_mm256_cmp_ps(diff[i], diff[j], _CMP_LT_OQ));  // -1 or 0
      rank[i] = _mm256_sub_epi32(rank[i], smaller);
      rank[j] = _mm256_add_epi32(rank[j], _mm256_add_epi32(_mm256_set1_epi32(1), smaller));
    }
  }
  const __m256i vd1 = _mm256_set1_epi32(d1);
  __m256i rem0[d1];
  for (int i = 0; i <= d; ++i) {
    const __m256i shifted = _mm256_add_epi32(rank[i], s);
    const __m256i below = _mm256_cmpgt_epi32(_mm256_setzero_si256(), shifted);                    // wrap +1
    const __m256i above = _mm256_cmpgt_epi32(shifted, _mm256_set1_epi32(d));                      // wrap -1
    const __m256i wrap_d1 = _mm256_sub_epi32(_mm256_and_si256(below, vd1), _mm256_and_si256(above, vd1));
    rank[i] = _mm256_add_epi32(shifted, wrap_d1);
    rem0[i] = _mm256_add_epi32(_mm256_cvttps_epi32(rem0f[i]), wrap_d1);
  }
  // bary[k] = v of the coordinate ranked d - k, minus v of the one ranked d + 1 - k (one each:
  // the ranks are a permutation), so selecting instead of scattering gives the same sums.
  __m256 plus[d1 + 1], minus[d1 + 1];
  for (int k = 0; k <= d1; ++k) plus[k] = minus[k] = _mm256_setzero_ps();
  for (int i = 0; i <= d; ++i) {
    const __m256 v = _mm256_mul_ps(_mm256_sub_ps(elevated[i], _mm256_cvtepi32_ps(rem0[i])), down_factor);
    for (int k = 0; k <= d1; ++k) {
      if (k <= d) {
        const __m256 hit = _mm256_castsi256_ps(_mm256_cmpeq_epi32(rank[i], _mm256_set1_epi32(d - k)));
        plus[k] = _mm256_add_ps(plus[k], _mm256_and_ps(hit, v));
      }
      if (k >= 1) {
        const __m256 hit = _mm256_castsi256_ps(_mm256_cmpeq_epi32(rank[i], _mm256_set1_epi32(d + 1 - k)));
        minus[k] = _mm256_add_ps(minus[k], _mm256_and_ps(hit, v));
      }
    }
  }
  alignas(32) float bary[d1][8];
  const __m256 last = _mm256_sub_ps(_mm256_setzero_ps(), minus[d1]);
  _mm256_store_ps(bary[0], _mm256_add_ps(plus[0], _mm256_add_ps(_mm256_set1_ps(1.0f), last)));
  for (int k = 1; k <= d; ++k) _mm256_store_ps(bary[k], _mm256_sub_ps(plus[k], minus[k]));
  alignas(32) int32_t rem0_out[D][8], rank_out[D][8];
  alignas(32) uint32_t hash_out[d1][8];
  for (int i = 0; i < d; ++i) {
    _mm256_store_si256(reinterpret_cast<__m256i*>(rem0_out[i]), rem0[i]);
    _mm256_store_si256(reinterpret_cast<__m256i*>(rank_out[i]), rank[i]);
  }
  // hash_key of every vertex key rem0 + (rank <= d - k ? k : k - (d + 1)).
  for (int k = 0; k <= d; ++k) {
    HashLanes key[D];
    for (int i = 0; i < d; ++i) {
      const __m256i high = _mm256_cmpgt_epi32(rank[i], _mm256_set1_epi32(d - k));
      const __m256i offset = _mm256_add_epi32(_mm256_set1_epi32(k), _mm256_and_si256(high, _mm256_set1_epi32(-d1)));
      key[i] = HashLanes(_mm256_add_epi32(rem0[i], offset));
    }
    const HashLanes h = hash_key_lanes<D>(key);
    std::memcpy(hash_out[k], &h, sizeof(h));
  }
  for (int l = 0; l < 8; ++l) {
    const int64_t q = p + l;
    for (int i = 0; i < d; ++i) {
      lat.rem0s.data[q * d + i] = rem0_out[i][l];
      lat.ranks.data[q * d + i] = uint8_t(rank_out[i][l]);
    }
    for (int k = 0; k <= d; ++k) {
      lat.weight.data[q * d1 + k] = bary[k][l];
      lat.hashes.data[q * d1 + k] = hash_out[k][l];
    }
  }
  return true;
}

// Pixels [begin, end): blocks of 8 by locate_block8 and the rest by locate_pixels_d; then `same`
// (pixel p shares pixel p - 1's simplex) as locate_pixels_d sets it.
template <int D>
FASTSEG_AVX2_NO_FMA FASTSEG_ALWAYS_INLINE void locate_pixels_block8(Lattice& lat, const float* features,
                                                                    int64_t stride, const float* scale,
                                                                    const int64_t* order, int64_t begin,
                                                                    int64_t end, bool& bad) {
  int64_t p = begin;
  for (; p + 8 <= end; p += 8) {
    if (!locate_block8<D>(lat, features, stride, scale, order, p)) {
      bad = true;
      return;
    }
  }
  if (p < end) locate_pixels_d<D>(lat, features, stride, D, scale, order, p, end, bad);
  const int32_t* rem0s = lat.rem0s.data;
  const uint8_t* ranks = lat.ranks.data;
  const int64_t last = p;  // pixels from here on have `same` from locate_pixels_d
  for (int64_t q = begin; q < last; ++q) {
    bool same = q > begin;
    for (int i = 0; i < D && same; ++i) {
      same = rem0s[(q - 1) * D + i] == rem0s[q * D + i] && ranks[(q - 1) * D + i] == ranks[q * D + i];
    }
    lat.same.data[q] = same;
  }
}

// AVX2 without FMA: inline rounding instructions instead of libm's ceil and floor, and the same
// IEEE rounding of every step as the reference (no contraction).
FASTSEG_AVX2_NO_FMA void locate_pixels_avx2(Lattice& lat, const float* features, int64_t stride, int d,
                                            const float* scale, const int64_t* order, int64_t begin, int64_t end,
                                            bool& bad) {
  switch (d) {
    case 2: locate_pixels_block8<2>(lat, features, stride, scale, order, begin, end, bad); break;
    case 3: locate_pixels_block8<3>(lat, features, stride, scale, order, begin, end, bad); break;
    case 5: locate_pixels_block8<5>(lat, features, stride, scale, order, begin, end, bad); break;
    case 6: locate_pixels_block8<6>(lat, features, stride, scale, order, begin, end, bad); break;
    default: locate_pixels_d<0>(lat, features, stride, d, scale, order, begin, end, bad); break;
  }
}
#endif

// Numbers the points of entries [first, last) in `table`: with a list, entries list[first..last)
// (p * d1 + k: vertex k of pixel p), each replaced by its point's local number; without, every
// entry p * d1 + k of a pixel that is not `same`, in order, writing lat.offset.
template <int D>
FASTSEG_ALWAYS_INLINE void number_entries_d(KeyTable& table, Lattice& lat, int runtime_d, uint32_t* list,
                                            int64_t first, int64_t last) {
  const int d = D > 0 ? D : runtime_d;
  const int d1 = d + 1;
  int32_t key[D > 0 ? D : kMaxFeatures];
  // The slots miss the cache: prefetch the one of the entry kAhead ahead.
  constexpr int64_t kAhead = 16;
  // Most entries name a point that a pixel shortly before named too (1.1M entries for 68k points in
  // the bilateral lattice at 500x375): a small direct-mapped cache of recent keys (number, key)
  // answers those from L1 instead of the table (that step 11-12 ms instead of 13-17, 2 threads).
  // Compiled feature counts only.
  constexpr int kRecentWords = 8, kRecent = D > 0 && D < kRecentWords ? 1024 : 1;
  alignas(64) int32_t recent[kRecent * kRecentWords];
  for (int r = 0; r < kRecent; ++r) recent[r * kRecentWords] = -1;
  for (int64_t i = first; i < last; ++i) {
    const int64_t e = list ? list[i] : i;
    const int64_t p = e / d1;
    if (!list && lat.same.data[p]) {
      i += d1 - 1;  // the whole pixel
      continue;
    }
    if (i + kAhead < last) table.prefetch(lat.hashes.data[list ? list[i + kAhead] : i + kAhead]);
    vertex_key(lat.rem0s.data + p * d, lat.ranks.data + p * d, d, int(e - p * d1), key);
    const uint32_t h = lat.hashes.data[e];
    int32_t number;
    if constexpr (kRecent > 1) {
      int32_t* r = recent + (h & (kRecent - 1)) * kRecentWords;
      if (r[0] >= 0 && same_key(r + 1, key, D)) {
        number = r[0];
      } else {
        number = table.insert<D>(key, h);
        r[0] = number;
        std::memcpy(r + 1, key, sizeof(int32_t) * D);
      }
    } else {
      number = table.insert<D>(key, h);
    }
    if (list) {
      list[i] = uint32_t(number);
    } else {
      lat.offset.data[e] = number;
    }
  }
}
void number_entries(KeyTable& table, Lattice& lat, int d, uint32_t* list, int64_t first, int64_t last) {
  FASTSEG_FEATURES_SWITCH(d, number_entries_d, table, lat, d, list, first, last)
}

// Step 4 of build_lattice: the blur neighbours of every point m, key -/+ (-1, .., d, .., -1) along
// direction j (d at coordinate j; all -1 for direction d, whose coordinate is the implied one),
// as lat.neighbours[j][m] = (minus, plus), M where there is none. Only the plus neighbour is
// looked up: m is its plus neighbour's minus neighbour, so that one is written from here (each
// point has one minus neighbour per direction, so every write has one writer). The lookups miss
// the cache, so a block of points computes and prefetches its slots before looking any up.
template <int D>
FASTSEG_ALWAYS_INLINE void find_neighbours_range(Lattice& lat, const std::vector<KeyTable>& tables,
                                                 const std::vector<int64_t>& base, int owners, int runtime_d,
                                                 int64_t begin, int64_t end) {
  constexpr int64_t kBlock = 8;
  constexpr int kCap = D > 0 ? D + 1 : kMaxFeatures + 1;
  const int d = D > 0 ? D : runtime_d;
  const int d1 = d + 1;
  const int64_t M = lat.M;
  int32_t* neighbours = lat.neighbours.data;
  int32_t plus[kBlock][kCap][kCap - 1];
  uint32_t hashes[kBlock][kCap];
  int t = int(std::upper_bound(base.begin(), base.end(), begin) - base.begin()) - 1;
  for (int64_t m0 = begin; m0 < end; m0 += kBlock) {
    const int64_t m1 = std::min(end, m0 + kBlock);
    for (int64_t m = m0; m < m1; ++m) {
      while (m >= base[t + 1]) ++t;
      const int32_t* key = tables[t].key(m - base[t]);
      if constexpr (D > 0 && D < 8) {
        // The d + 1 neighbour keys at once, one per lane (lanes past d unused).
        HashLanes lanes[D];
        for (int i = 0; i < D; ++i) {
          for (int j = 0; j < 8; ++j) lanes[i][j] = uint32_t(key[i]) + (j == i ? uint32_t(D) : uint32_t(-1));
        }
        const HashLanes h = hash_key_lanes<D>(lanes);
        for (int j = 0; j < d1; ++j) hashes[m - m0][j] = h[j];
      }
      for (int j = 0; j < d1; ++j) {
        int32_t* n = plus[m - m0][j];
        for (int i = 0; i < d; ++i) n[i] = key[i] + (i == j ? d : -1);
        if constexpr (!(D > 0 && D < 8)) hashes[m - m0][j] = hash_key(n, d);
        const uint32_t h = hashes[m - m0][j];
        tables[owner_of(h, owners)].prefetch(h);
      }
    }
    for (int64_t m = m0; m < m1; ++m) {
      for (int j = 0; j < d1; ++j) {
        const uint32_t h = hashes[m - m0][j];
        const int o = owner_of(h, owners);
        const int32_t f = tables[o].template find<D>(plus[m - m0][j], h);
        const int64_t row = int64_t(j) * M;
        neighbours[(row + m) * 2 + 1] = f < 0 ? int32_t(M) : int32_t(base[o] + f);
        if (f >= 0) neighbours[(row + base[o] + f) * 2] = int32_t(m);
      }
    }
  }
}
#if FASTSEG_HAVE_AVX2_CLONE
template <int D>
FASTSEG_AVX2_NO_FMA void find_neighbours_range_avx2(Lattice& lat, const std::vector<KeyTable>& tables,
                                                    const std::vector<int64_t>& base, int owners, int64_t begin,
                                                    int64_t end) {
  find_neighbours_range<D>(lat, tables, base, owners, lat.d, begin, end);
}
#endif
template <int D>
void find_neighbours_d(Lattice& lat, const std::vector<KeyTable>& tables, const std::vector<int64_t>& base,
                       int owners) {
  const int64_t M = lat.M;
  int32_t* neighbours = lat.neighbours.data;
  at::parallel_for(0, M * (lat.d + 1), 16384, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) neighbours[2 * i] = int32_t(M);
  });
  at::parallel_for(0, M, 2048, [&](int64_t begin, int64_t end) {
#if FASTSEG_HAVE_AVX2_CLONE
    if (cpu_has_avx2()) {
      find_neighbours_range_avx2<D>(lat, tables, base, owners, begin, end);
      return;
    }
#endif
    find_neighbours_range<D>(lat, tables, base, owners, lat.d, begin, end);
  });
}
void find_neighbours(Lattice& lat, const std::vector<KeyTable>& tables, const std::vector<int64_t>& base,
                     int owners) {
  FASTSEG_FEATURES_SWITCH(lat.d, find_neighbours_d, lat, tables, base, owners)
}

// lat.touched for the passes' split of the pixels into `chunks`, sized and cleared.
void clear_chunk_marks(Lattice& lat, int64_t chunks) {
  lat.chunks = chunks;
  lat.touched_words = (lat.M + 63) / 64;
  lat.touched.resize(std::max<int64_t>(1, chunks * lat.touched_words));
  std::fill(lat.touched.data, lat.touched.data + chunks * lat.touched_words, uint64_t(0));
}
FASTSEG_ALWAYS_INLINE void mark_chunk(Lattice& lat, int64_t chunk, int32_t point) {
  lat.touched.data[chunk * lat.touched_words + (point >> 6)] |= uint64_t(1) << (point & 63);
}

// Builds the lattice of features (d planes of N floats, plane stride `stride`) for passes that
// split the pixels into `chunks` (chunk_begin), numbering its points with one thread per chunk.
// Lattice pixel i is feature pixel order[i] (i without an order).
void build_lattice(Lattice& lat, const float* features, int64_t stride, int d, int64_t N, int64_t chunks,
                   const int64_t* order = nullptr) {
  TORCH_CHECK_VALUE(d >= 1 && d <= kMaxFeatures, "dense_crf: a kernel needs 1 to ", kMaxFeatures,
                    " features, got ", d);
  lat.d = d;
  lat.N = N;
  lat.alpha = float(1.0 / (1.0 + std::pow(2.0, -d)));
  const int d1 = d + 1;
  lat.offset.resize(N * d1);
  lat.weight.resize(N * d1);

  // The scale that makes the blur a unit Gaussian in feature space, spread over d directions.
  float scale[kMaxFeatures];
  const double inv_std = std::sqrt(2.0 / 3.0) * d1;
  for (int i = 0; i < d; ++i) scale[i] = float(inv_std / std::sqrt(double(i + 1) * (i + 2)));

  // 1. Every pixel finds its simplex: weights, the simplex itself, and its vertices' hashes.
  Buffer<int32_t>& rem0s = lat.rem0s;
  Buffer<uint8_t>& ranks = lat.ranks;
  Buffer<uint32_t>& hashes = lat.hashes;
  rem0s.resize(N * d);
  ranks.resize(N * d);
  hashes.resize(N * d1);
  lat.same.resize(N);
  // Entries (vertex k of pixel p) are binned by owner as p * d1 + k in 32 bits; lattices too big
  // for that use one owner.
  int owners = int(chunks);
  if (N * d1 > int64_t(UINT32_MAX)) owners = 1;
  // Every step splits the pixels into the same parts, one per owner (a part's first pixel is never
  // `same`, so each part is self-contained).
  const int64_t parts = owners;
  auto part_begin = [&](int64_t c) { return N * c / parts; };
  std::atomic<bool> out_of_range{false};
  at::parallel_for(0, parts, 1, [&](int64_t first, int64_t last) {
    for (int64_t c = first; c < last; ++c) {
      bool bad = false;
#if FASTSEG_HAVE_AVX2_CLONE
      if (cpu_has_avx2()) {
        locate_pixels_avx2(lat, features, stride, d, scale, order, part_begin(c), part_begin(c + 1), bad);
      } else {
        locate_pixels_base(lat, features, stride, d, scale, order, part_begin(c), part_begin(c + 1), bad);
      }
#else
      locate_pixels_base(lat, features, stride, d, scale, order, part_begin(c), part_begin(c + 1), bad);
#endif
      if (bad) out_of_range = true;
    }
  });
  TORCH_CHECK_VALUE(!out_of_range,
                    "dense_crf: features must be finite and of magnitude below about 1e8 after "
                    "scaling (is sxy or srgb tiny, or the image not finite?)");

  // 2. Numbering. A pixel whose simplex is its left neighbour's (same) takes that pixel's numbers;
  //    every other entry belongs to the owner of its hash, and each owner numbers its points in
  //    order of first appearance, pixel by pixel (deterministic).
  std::vector<KeyTable>& tables = lat.tables;
  tables.resize(owners);
  const int64_t expected = std::max<int64_t>(1024, N / 4 / owners);
  std::vector<int64_t> base(owners + 1, 0);
  if (owners == 1) {
    tables[0].reset(d, expected, N * d1);
    number_entries(tables[0], lat, d, nullptr, 0, N * d1);
    base[1] = tables[0].size();
  } else {
    // Bin the entries by owner, keeping pixel order (an owner scanning every entry for its own
    // would branch on a coin toss per entry): each part counts its entries per owner, then writes
    // them where the parts before it leave room; each owner numbers its bin in place; each part
    // reads its entries' numbers back in the order it wrote them. Counters are per task (shared
    // ones would share cache lines between threads).
    // fn(entry, owner) for each entry of part c, in pixel order.
    auto each_entry = [&](int64_t c, auto&& fn) {
      for (int64_t p = part_begin(c); p < part_begin(c + 1); ++p) {
        if (lat.same.data[p]) continue;
        for (int64_t e = p * d1; e < (p + 1) * d1; ++e) fn(e, owner_of(hashes.data[e], owners));
      }
    };
    std::vector<int64_t> counts(parts * owners, 0);
    at::parallel_for(0, parts, 1, [&](int64_t first, int64_t last) {
      std::vector<int64_t> count(owners + 16, 0);
      for (int64_t c = first; c < last; ++c) {
        std::fill(count.begin(), count.end(), 0);
        each_entry(c, [&](int64_t, int t) { ++count[t]; });
        std::copy(count.begin(), count.begin() + owners, counts.begin() + c * owners);
      }
    });
    std::vector<int64_t> bin_begin(owners + 1, 0), cursor(parts * owners);
    for (int t = 0; t < owners; ++t) {
      int64_t at = bin_begin[t];
      for (int64_t c = 0; c < parts; ++c) {
        cursor[c * owners + t] = at;
        at += counts[c * owners + t];
      }
      bin_begin[t + 1] = at;
    }
    lat.entries.resize(bin_begin[owners]);
    uint32_t* entries = lat.entries.data;
    // Walks part c's entries, calling fn(entry, owner, position in the owner's bin).
    auto walk_part = [&](int64_t c, auto&& fn) {
      std::vector<int64_t> at(cursor.begin() + c * owners, cursor.begin() + (c + 1) * owners);
      at.resize(owners + 16);
      each_entry(c, [&](int64_t e, int t) { fn(e, t, at[t]++); });
    };
    at::parallel_for(0, parts, 1, [&](int64_t first, int64_t last) {
      for (int64_t c = first; c < last; ++c) {
        walk_part(c, [&](int64_t e, int, int64_t i) { entries[i] = uint32_t(e); });
      }
    });
    at::parallel_for(0, owners, 1, [&](int64_t first, int64_t last) {
      for (int64_t t = first; t < last; ++t) {
        tables[t].reset(d, expected, bin_begin[t + 1] - bin_begin[t]);
        number_entries(tables[t], lat, d, entries, bin_begin[t], bin_begin[t + 1]);
      }
    });
    for (int t = 0; t < owners; ++t) base[t + 1] = base[t] + tables[t].size();
    // 3. Global numbers: owner t's points follow those of owners 0..t-1. The parts are the passes'
    //    chunks: each marks the points it touches (its `same` pixels touch its own points).
    lat.M = base[owners];
    clear_chunk_marks(lat, chunks);
    at::parallel_for(0, parts, 1, [&](int64_t first, int64_t last) {
      for (int64_t c = first; c < last; ++c) {
        walk_part(c, [&](int64_t e, int t, int64_t i) {
          const int32_t number = int32_t(base[t] + entries[i]);
          lat.offset.data[e] = number;
          mark_chunk(lat, c, number);
        });
      }
    });
  }
  // Same pixels copy their left neighbour's numbers (within a part, which starts with a pixel that
  // is not same).
  at::parallel_for(0, parts, 1, [&](int64_t first, int64_t last) {
    for (int64_t p = part_begin(first); p < part_begin(last); ++p) {
      if (lat.same.data[p]) std::memcpy(lat.offset.data + p * d1, lat.offset.data + (p - 1) * d1, sizeof(int32_t) * d1);
    }
  });
  const int64_t M = base[owners];
  TORCH_CHECK(M < INT32_MAX, "dense_crf: the lattice has ", M, " points, more than int32 holds");
  lat.M = M;
  // 4. Blur neighbours along each of the d+1 directions.
  lat.neighbours.resize(int64_t(d1) * M * 2);
  find_neighbours(lat, tables, base, owners);
  if (owners == 1) {  // one table numbered every point: mark them chunk by chunk (one chunk: unused)
    clear_chunk_marks(lat, chunks);
    if (chunks == 1) return;
    at::parallel_for(0, chunks, 1, [&](int64_t first, int64_t last) {
      for (int64_t c = first; c < last; ++c) {
        for (int64_t e = N * c / chunks * d1; e < N * (c + 1) / chunks * d1; ++e) {
          mark_chunk(lat, c, lat.offset.data[e]);
        }
      }
    });
  }
}

// --- the vector loops (compiled per ISA) --------------------------------------------------------

// Label rows are processed as GCC/Clang vector-extension values of W floats (W = 8, or 4 for rows
// of 4): plain C++ that lowers to AVX2 in the AVX2 clone and to SSE pairs in the baseline one.
template <int W>
struct Vec;
template <>
struct Vec<8> {
  typedef float F __attribute__((vector_size(32)));
  typedef int32_t I __attribute__((vector_size(32)));
};
template <>
struct Vec<4> {
  typedef float F __attribute__((vector_size(16)));
  typedef int32_t I __attribute__((vector_size(16)));
};

template <typename V>
FASTSEG_ALWAYS_INLINE V vload(const float* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}
template <typename V>
FASTSEG_ALWAYS_INLINE void vstore(float* p, V v) {
  std::memcpy(p, &v, sizeof(V));
}
template <typename V>
FASTSEG_ALWAYS_INLINE V vbroadcast(float x) {
  V v = {};
  return v + x;
}

// Lane i takes lane i ^ S: the butterfly steps of the reductions below.
template <int W, int S>
FASTSEG_ALWAYS_INLINE typename Vec<W>::F swap_lanes(typename Vec<W>::F v) {
#if defined(__clang__)
  if constexpr (W == 8) {
    return __builtin_shufflevector(v, v, 0 ^ S, 1 ^ S, 2 ^ S, 3 ^ S, 4 ^ S, 5 ^ S, 6 ^ S, 7 ^ S);
  } else {
    return __builtin_shufflevector(v, v, 0 ^ S, 1 ^ S, 2 ^ S, 3 ^ S);
  }
#else
  using I = typename Vec<W>::I;
  if constexpr (W == 8) {
    const I mask = {0 ^ S, 1 ^ S, 2 ^ S, 3 ^ S, 4 ^ S, 5 ^ S, 6 ^ S, 7 ^ S};
    return __builtin_shuffle(v, mask);
  } else {
    const I mask = {0 ^ S, 1 ^ S, 2 ^ S, 3 ^ S};
    return __builtin_shuffle(v, mask);
  }
#endif
}

// The minimum and the sum of the W lanes, in every lane: log2(W) shuffle steps instead of a
// chain of W - 1 scalar operations on extracted lanes (the softmax's critical path).
template <typename V>
FASTSEG_ALWAYS_INLINE V vmin(V a, V b) {
  return a < b ? a : b;
}
template <int W>
FASTSEG_ALWAYS_INLINE typename Vec<W>::F min_all(typename Vec<W>::F v) {
  if constexpr (W == 8) v = vmin(v, swap_lanes<W, 4>(v));
  v = vmin(v, swap_lanes<W, 2>(v));
  return vmin(v, swap_lanes<W, 1>(v));
}
template <int W>
FASTSEG_ALWAYS_INLINE typename Vec<W>::F sum_all(typename Vec<W>::F v) {
  if constexpr (W == 8) v += swap_lanes<W, 4>(v);
  v += swap_lanes<W, 2>(v);
  return v + swap_lanes<W, 1>(v);
}

// exp(x) for x <= 0, to 2 ulp: n = round(x / ln 2) and r = x - n ln 2 (Cody-Waite, ln 2 in two
// parts), then e^r by a degree-5 polynomial (minimax for the relative error on |r| <= ln 2 / 2,
// fitted for this file: 9e-8 in exact arithmetic) and 2^n added to its exponent bits: 14 vector
// operations per 8 lanes against 19 for the Cephes form (a degree-6 polynomial, 2^n built apart,
// an upper clamp), 3-4% of a 1-thread call at 500x375 (the exp was about 12% of it). Arguments
// below -86 give exp(-86) (~4e-38: still normal, so the exponent add cannot underflow) instead of
// a denormal or zero. x > 0 gives an unspecified value (the pass masks its padding lanes off).
template <int W>
FASTSEG_ALWAYS_INLINE typename Vec<W>::F vexp_nonpositive(typename Vec<W>::F x) {
  using V = typename Vec<W>::F;
  using I = typename Vec<W>::I;
  const V lo = vbroadcast<V>(-86.0f);
  x = x < lo ? lo : x;
  const V magic = vbroadcast<V>(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  const V k = x * 1.44269504088896341f + magic;  // n in the low mantissa bits
  const V n = k - magic;
  V r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  V p = vbroadcast<V>(8.290315046906471e-3f);
  p = p * r + 4.189793020486832e-2f;
  p = p * r + 1.666763573884964e-1f;
  p = p * r + 4.999915063381195e-1f;
  p = p * r + 9.999997019767761e-1f;
  p = p * r + 1.0f;
  // 2^n times p: n << 23 added to p's exponent field. k's bits are those of magic plus n, and the
  // shift pushes magic's own bits out of the word.
  I bits, kbits;
  std::memcpy(&bits, &p, sizeof(V));
  std::memcpy(&kbits, &k, sizeof(V));
  bits += kbits << 23;
  std::memcpy(&p, &bits, sizeof(V));
  return p;
}

// a with the lanes where mask's bits are zero cleared (mask lanes are all ones or all zeros).
template <int W>
FASTSEG_ALWAYS_INLINE typename Vec<W>::F vand_bits(typename Vec<W>::F a, typename Vec<W>::F mask) {
  using I = typename Vec<W>::I;
  I ai, mi;
  std::memcpy(&ai, &a, sizeof(a));
  std::memcpy(&mi, &mask, sizeof(mask));
  ai &= mi;
  std::memcpy(&a, &ai, sizeof(a));
  return a;
}

// The bilateral lattice's rows (68k x 96 B at 500x375, 21 labels) outgrow L2, and the rows a pixel
// touches are known from its offsets long before it is processed: prefetching the rows of the
// pixels kPrefetchAhead ahead (and, in the blur, the neighbours kBlurAhead rows ahead) measured
// 3-7% faster per call on the 2-core EPYC VM (interleaved A/B, 12-25 rounds, noisy under load).
constexpr int64_t kPrefetchAhead = 4;  // pixels
FASTSEG_ALWAYS_INLINE void prefetch_row(const float* row, int lanes) {
  // One prefetch per cache line the row touches. Rows of 8k lanes are 32-byte aligned, so a row
  // of 32 bytes mod 64 (96 bytes at 21 labels) spans ceil(bytes / 64) lines wherever it starts,
  // and one of 0 mod 64 at most one more; rows of 1 or 4 lanes never straddle a line. With the
  // width known at compile time this is 1-3 instructions, no loop.
  const int bytes = lanes * 4;
  const char* p = reinterpret_cast<const char*>(row);
  for (int b = 0; b < bytes; b += 64) __builtin_prefetch(p + b, 1);
  if (bytes % 64 == 0) __builtin_prefetch(p + bytes - 1, 1);
}

// The per-pixel arrays of a pass (unary rows, offsets, weights, scales) are read in order, but a
// pass reads about ten of them at once besides the lattice rows, and the hardware prefetcher does
// not keep up: fetch the ones kStreamAhead pixels ahead, a block of kStreamBlock pixels at a time.
constexpr int64_t kStreamAhead = 64, kStreamBlock = 8;  // pixels
FASTSEG_ALWAYS_INLINE void prefetch_bytes(const void* begin, int64_t bytes) {
  const uintptr_t first = reinterpret_cast<uintptr_t>(begin) & ~uintptr_t(63);
  const uintptr_t last = reinterpret_cast<uintptr_t>(begin) + bytes - 1;
  for (uintptr_t line = first; line <= last; line += 64) __builtin_prefetch(reinterpret_cast<const void*>(line), 0);
}

// Lattice rows of one pass position (its d1 vertices off[j] with barycentric weights w[j]) and a
// label row of nv vectors: the slice out = scale * sum_j w_j row_j, and the splat row_j += scale *
// w_j in. Shared by the forward and reverse passes. The vertex loops are unrolled for the usual
// simplex sizes (D1 = 3: positions, 4: positions and grey, 6: positions and RGB; 0: d1 at run time),
// which took 2-4% off a 500x375 call (1 and 2 threads). The switches call templates, not lambdas: a
// lambda's body was compiled out of line for the baseline ISA, outside the caller's clone.
template <typename V, int W, int D1>
FASTSEG_ALWAYS_INLINE void slice_row_unrolled(const float* rows, const int32_t* off, const float* w, int d1,
                                              float scale, int lanes, int nv, V* out) {
  const int n = D1 > 0 ? D1 : d1;
  {
    const float* row = rows + int64_t(off[0]) * lanes;
    const float w0 = w[0] * scale;
    for (int v = 0; v < nv; ++v) out[v] = w0 * vload<V>(row + v * W);
  }
  for (int j = 1; j < n; ++j) {
    const float* row = rows + int64_t(off[j]) * lanes;
    const float wj = w[j] * scale;
    for (int v = 0; v < nv; ++v) out[v] += wj * vload<V>(row + v * W);
  }
}

template <typename V, int W>
FASTSEG_ALWAYS_INLINE void slice_row(const float* rows, const int32_t* off, const float* w, int d1, float scale,
                                     int lanes, int nv, V* out) {
  switch (d1) {
    case 3: return slice_row_unrolled<V, W, 3>(rows, off, w, d1, scale, lanes, nv, out);
    case 4: return slice_row_unrolled<V, W, 4>(rows, off, w, d1, scale, lanes, nv, out);
    case 6: return slice_row_unrolled<V, W, 6>(rows, off, w, d1, scale, lanes, nv, out);
    default: return slice_row_unrolled<V, W, 0>(rows, off, w, d1, scale, lanes, nv, out);
  }
}

// Label rows from and to L planes of N (padding lanes read as 0), at one pixel.
template <typename V, int W>
FASTSEG_ALWAYS_INLINE void load_planes(const float* planes, int64_t N, int L, int64_t pixel, int nv, V* row) {
  for (int v = 0; v < nv; ++v) {
    for (int i = 0; i < W; ++i) row[v][i] = v * W + i < L ? planes[int64_t(v * W + i) * N + pixel] : 0.0f;
  }
}

template <typename V, int W>
FASTSEG_ALWAYS_INLINE void store_planes(const V* row, int64_t N, int L, int64_t pixel, float* planes) {
  for (int l = 0; l < L; ++l) planes[int64_t(l) * N + pixel] = row[l / W][l % W];
}

// Label rows on their way to L planes of N, collected while their pixels are consecutive (up to
// kRun of them) and written plane by plane: contiguous runs per plane instead of one float in
// each of L planes per pixel, which cost as much as the rest of the last pass (21 labels).
constexpr int kRun = 32;
struct PlaneWriter {
  float* planes;
  int64_t N;
  int L, lanes;
  float* run;  // kRun x lanes
  int64_t first = 0;
  int n = 0;

  template <typename V, int W>
  FASTSEG_ALWAYS_INLINE void add(const V* row, int nv, int64_t pixel) {
    if (n > 0 && (pixel != first + n || n == kRun)) flush();
    if (n == 0) first = pixel;
    for (int v = 0; v < nv; ++v) vstore(run + int64_t(n) * lanes + v * W, row[v]);
    ++n;
  }
  FASTSEG_ALWAYS_INLINE void flush() {
    for (int l = 0; l < L; ++l) {
      float* dst = planes + int64_t(l) * N + first;
      for (int i = 0; i < n; ++i) dst[i] = run[int64_t(i) * lanes + l];
    }
    n = 0;
  }
};

template <typename V, int W, int D1>
FASTSEG_ALWAYS_INLINE void splat_row_unrolled(float* rows, const int32_t* off, const float* w, int d1, float scale,
                                              int lanes, int nv, const V* in) {
  const int n = D1 > 0 ? D1 : d1;
  for (int j = 0; j < n; ++j) {
    float* row = rows + int64_t(off[j]) * lanes;
    const float wj = w[j] * scale;
    for (int v = 0; v < nv; ++v) vstore(row + v * W, vload<V>(row + v * W) + wj * in[v]);
  }
}

template <typename V, int W>
FASTSEG_ALWAYS_INLINE void splat_row(float* rows, const int32_t* off, const float* w, int d1, float scale,
                                     int lanes, int nv, const V* in) {
  switch (d1) {  // as in slice_row
    case 3: return splat_row_unrolled<V, W, 3>(rows, off, w, d1, scale, lanes, nv, in);
    case 4: return splat_row_unrolled<V, W, 4>(rows, off, w, d1, scale, lanes, nv, in);
    case 6: return splat_row_unrolled<V, W, 6>(rows, off, w, d1, scale, lanes, nv, in);
    default: return splat_row_unrolled<V, W, 0>(rows, off, w, d1, scale, lanes, nv, in);
  }
}

// The lattice rows that the vertex entries off[0 .. Pixels * d1) name, in the slice source and in
// the splat target (either may be null: not prefetched). Unrolled for the usual simplex sizes, the
// two row pointers in registers (the generic loop reloaded them, 12 instructions an entry): the
// prefetches cost ~15% of a pass whose rows sit in cache (64x64, where they are useless) and pay
// that back at 500x375; fewer of them (one line a row, or the splat rows only) measured slower.
template <int Pixels, int D1>
FASTSEG_ALWAYS_INLINE void prefetch_vertex_rows_unrolled(const float* sliced, const float* splat, const int32_t* off,
                                                         int d1, int lanes) {
  const int n = Pixels * (D1 > 0 ? D1 : d1);
  if (sliced != nullptr && splat != nullptr) {
    for (int j = 0; j < n; ++j) {
      const int64_t row = int64_t(off[j]) * lanes;
      prefetch_row(sliced + row, lanes);
      prefetch_row(splat + row, lanes);
    }
  } else if (sliced != nullptr || splat != nullptr) {
    const float* rows = sliced != nullptr ? sliced : splat;
    for (int j = 0; j < n; ++j) prefetch_row(rows + int64_t(off[j]) * lanes, lanes);
  }
}

template <int Pixels>
FASTSEG_ALWAYS_INLINE void prefetch_vertex_rows(const float* sliced, const float* splat, const int32_t* off, int d1,
                                                int lanes) {
  switch (d1) {  // as in slice_row
    case 3: return prefetch_vertex_rows_unrolled<Pixels, 3>(sliced, splat, off, d1, lanes);
    case 4: return prefetch_vertex_rows_unrolled<Pixels, 4>(sliced, splat, off, d1, lanes);
    case 6: return prefetch_vertex_rows_unrolled<Pixels, 6>(sliced, splat, off, d1, lanes);
    default: return prefetch_vertex_rows_unrolled<Pixels, 0>(sliced, splat, off, d1, lanes);
  }
}

// One pairwise kernel as a pixel pass sees it.
struct PassKernel {
  int d1;
  const int32_t* offset;
  const float* weight;
  const float* pre;      // splat scale per pixel (normalisation), or null: 1
  const float* post;     // slice scale per pixel (normalisation, and the lattice's alpha), or null:
  float post_constant;   // this one (symmetric normalisation, its scale folded into the weights)
  const float* sliced;   // blurred lattice values to slice, (M+1) x lanes; null on the first pass
  float* const* splat;   // per chunk: the buffer this chunk splats into; null on the last pass
  bool diagonal;
  const float* compat;   // diagonal: lanes values; otherwise L rows of lanes (symmetrised)
};

struct PassArgs {
  int64_t N;
  int L, lanes, kernels;
  const PassKernel* k;
  const float* unary;    // N x lanes energies, in pass order
  const float* init;     // L planes of N: Q to start from (first pass only), or null
  float* out;            // L planes of N: where this pass writes Q, or null
  bool splat;            // whether this pass splats Q (every pass but the last)
  const int64_t* order;  // pass position -> pixel of init and out (null: the same)
};

// Pixels [p0, p1) of one pass: E = U + sum_k C_k (post_k * slice_k), Q = softmax(-E), then Q is
// splatted (scaled by pre_k) into chunk `chunk`'s buffers and/or written out. NV is the number of
// W-wide vectors per label row when the row width is a compiled one (then e, s, pad and keep are
// local arrays indexed by constants, which the compiler keeps in registers), 0 otherwise (then
// they point into a heap buffer and nv = a.lanes / W).
// Pixels per step of a pass: the softmax of one pixel is a long dependency chain (min, exp, sum,
// divide); interleaving independent chains keeps the core busy. Four measured 3-5% faster than two
// (AVX2, 500x375, 1 and 2 threads), more so with AVX-512VL's registers.
constexpr int kPassPixels = 4;

template <typename V, int W, int NV, typename Rows, typename Row>
FASTSEG_ALWAYS_INLINE void pixel_pass_rows(const PassArgs& a, int64_t chunk, int64_t p0, int64_t p1, Rows& e,
                                           Row& s, const Row& pad, const Row& keep, PlaneWriter& out) {
  constexpr int P = kPassPixels;
  const int lanes = NV > 0 ? NV * W : a.lanes;
  const int nv = NV > 0 ? NV : a.lanes / W;
  const int L = a.L;
  const bool slice = a.kernels > 0 && a.k[0].sliced != nullptr;
  const bool from_init = a.init != nullptr && !slice;
  const bool splat = a.splat;
  for (int64_t p = p0; p < p1; p += P) {
    const int np = int(std::min<int64_t>(P, p1 - p));
    if ((p - p0) % kStreamBlock == 0 && p + kStreamAhead + kStreamBlock <= p1) {
      const int64_t ahead = p + kStreamAhead;
      if (!from_init) prefetch_bytes(a.unary + ahead * lanes, kStreamBlock * lanes * 4);
      for (int k = 0; k < a.kernels; ++k) {
        const PassKernel& K = a.k[k];
        prefetch_bytes(K.offset + ahead * K.d1, kStreamBlock * K.d1 * 4);
        prefetch_bytes(K.weight + ahead * K.d1, kStreamBlock * K.d1 * 4);
        if (splat && K.pre) prefetch_bytes(K.pre + ahead, kStreamBlock * 4);
        if (slice && K.post) prefetch_bytes(K.post + ahead, kStreamBlock * 4);
      }
    }
    if (p + kPrefetchAhead + P <= p1) {
      for (int k = 0; k < a.kernels; ++k) {
        const PassKernel& K = a.k[k];
        const int32_t* off = K.offset + (p + kPrefetchAhead) * K.d1;
        prefetch_vertex_rows<P>(slice ? K.sliced : nullptr, splat ? K.splat[chunk] : nullptr, off, K.d1, lanes);
      }
    }
    for (int q = 0; q < P; ++q) {
      if (q >= np) {
        for (int v = 0; v < nv; ++v) e[q][v] = vbroadcast<V>(0.0f);
        continue;
      }
      const int64_t pq = p + q;
      if (from_init) {
        load_planes<V, W>(a.init, a.N, L, a.order ? a.order[pq] : pq, nv, e[q]);
        continue;
      }
      const float* u = a.unary + pq * lanes;
      if (!slice) {
        for (int v = 0; v < nv; ++v) e[q][v] = vload<V>(u + v * W);
        continue;
      }
      for (int k = 0; k < a.kernels; ++k) {
        const PassKernel& K = a.k[k];
        // w * 1.0f is exact: the post scale multiplies the sum below instead.
        slice_row<V, W>(K.sliced, K.offset + pq * K.d1, K.weight + pq * K.d1, K.d1, 1.0f, lanes, nv, s);
        const float scale = K.post ? K.post[pq] : K.post_constant;
        if (K.diagonal) {
          // The unary joins with the first kernel's term: e[q] is stored once per kernel, not
          // loaded, added to and stored again.
          if (k == 0) {
            for (int v = 0; v < nv; ++v) e[q][v] = vload<V>(u + v * W) + scale * vload<V>(K.compat + v * W) * s[v];
          } else {
            for (int v = 0; v < nv; ++v) e[q][v] += scale * vload<V>(K.compat + v * W) * s[v];
          }
        } else {
          if (k == 0) {
            for (int v = 0; v < nv; ++v) e[q][v] = vload<V>(u + v * W);
          }
          // C is symmetric: E += sum_m (scale s_m) C[m, :], row by row. The sliced values are read
          // back from memory by label, so that s itself is only ever indexed by constants.
          alignas(64) float sf[NV > 0 ? NV * W : 1];
          const float* sv = sf;
          if constexpr (NV > 0) {
            for (int v = 0; v < nv; ++v) vstore(sf + v * W, s[v]);
          } else {
            sv = reinterpret_cast<const float*>(s);
          }
          for (int m = 0; m < L; ++m) {
            const float sm = scale * sv[m];
            const float* c = K.compat + int64_t(m) * lanes;
            for (int v = 0; v < nv; ++v) e[q][v] += sm * vload<V>(c + v * W);
          }
        }
      }
    }
    if (!from_init) {
      // Q = softmax(-E) over the L real labels; padding lanes get exactly 0.
      V low[P];
      for (int q = 0; q < P; ++q) low[q] = e[q][0] + pad[0];
      for (int v = 1; v < nv; ++v) {
        for (int q = 0; q < P; ++q) {
          const V x = e[q][v] + pad[v];
          low[q] = x < low[q] ? x : low[q];
        }
      }
      V lowest[P];
      for (int q = 0; q < P; ++q) lowest[q] = min_all<W>(low[q]);
      V sum[P];
      for (int q = 0; q < P; ++q) sum[q] = vbroadcast<V>(0.0f);
      for (int v = 0; v < nv; ++v) {
        for (int q = 0; q < P; ++q) {
          e[q][v] = vexp_nonpositive<W>(lowest[q] - e[q][v]);
          e[q][v] = vand_bits<W>(e[q][v], keep[v]);
          sum[q] += e[q][v];
        }
      }
      for (int q = 0; q < P; ++q) {
        const V inv = vbroadcast<V>(1.0f) / sum_all<W>(sum[q]);
        for (int v = 0; v < nv; ++v) e[q][v] *= inv;
      }
    }
    for (int q = 0; q < np; ++q) {
      const int64_t pq = p + q;
      if (a.out != nullptr) out.add<V, W>(e[q], nv, a.order ? a.order[pq] : pq);
      if (!splat) continue;
      for (int k = 0; k < a.kernels; ++k) {
        const PassKernel& K = a.k[k];
        splat_row<V, W>(K.splat[chunk], K.offset + pq * K.d1, K.weight + pq * K.d1, K.d1, K.pre ? K.pre[pq] : 1.0f,
                        lanes, nv, e[q]);
      }
    }
  }
  if (a.out != nullptr) out.flush();
}

// LP is the row width when it is one of the compiled ones, 0 for a wider row (then `a.lanes`).
template <int LP_>
FASTSEG_ALWAYS_INLINE void pixel_pass(const PassArgs& a, int64_t chunk, int64_t p0, int64_t p1) {
  constexpr int LP = LP_ == 1 ? 0 : LP_;  // label rows are never 1 wide (lanes_for_labels)
  constexpr int W = LP == 4 ? 4 : 8;      // rows are 4 wide or a multiple of 8
  using V = typename Vec<W>::F;
  const int lanes = LP > 0 ? LP : a.lanes;
  if (LP == 0 && lanes % W != 0) {
    // Only a 4-wide row can get here with W = 8, and it has its own instantiation.
    TORCH_CHECK(false, "dense_crf: internal error, row of ", lanes, " lanes");
  }
  constexpr int P = kPassPixels;
  auto fill_masks = [&](auto& pad, auto& keep, int nv) {
    for (int v = 0; v < nv; ++v) {
      for (int i = 0; i < W; ++i) {
        pad[v][i] = v * W + i < a.L ? 0.0f : INFINITY;  // +inf on padding lanes, else 0
        const uint32_t bits = v * W + i < a.L ? ~0u : 0u;  // 0 on padding lanes, else all ones
        std::memcpy(&keep[v][i], &bits, sizeof(float));
      }
    }
  };
  Buffer<float> run;
  if (a.out != nullptr) run.resize(int64_t(kRun) * lanes);
  PlaneWriter out{a.out, a.N, a.L, lanes, run.data};
  if constexpr (LP > 0) {
    constexpr int NV = LP / W;
    V e[P][NV], s[NV], pad[NV], keep[NV];
    fill_masks(pad, keep, NV);
    pixel_pass_rows<V, W, NV>(a, chunk, p0, p1, e, s, pad, keep, out);
  } else {
    // Rows wider than the fixed instantiations live on the heap, 64-byte aligned by hand: a
    // std::vector<V> of these 32-byte vector-extension values was not reliably 32-byte aligned (the
    // AVX2 clone's aligned stores then faulted, intermittently, for L > 64).
    const int nv = lanes / W;
    Buffer<V> heap_buffer;
    heap_buffer.resize((P + 3) * int64_t(nv));
    std::memset(static_cast<void*>(heap_buffer.data), 0, sizeof(V) * (P + 3) * size_t(nv));
    V* heap = heap_buffer.data;
    V* e[P];
    for (int q = 0; q < P; ++q) e[q] = heap + (3 + q) * nv;
    V* s = heap;
    V* pad = heap + nv;
    V* keep = heap + 2 * nv;
    fill_masks(pad, keep, nv);
    pixel_pass_rows<V, W, 0>(a, chunk, p0, p1, e, s, pad, keep, out);
  }
}

// One pairwise kernel as a reverse (backward) pass sees it: the transposed filter
// F^T = pre * S^T B^T S (post * .) splats with post and slices with pre.
struct ReverseKernel {
  int d1;
  const int32_t* offset;
  const float* weight;
  const float* pre;
  const float* post;
  const float* sliced;        // reverse-blurred gE_{t+1}, (M+1) x lanes; null on the first pass
  float* const* splat;        // per chunk: the buffer gE_t goes into
  bool diagonal;
  const float* compat;        // as in PassKernel
};

struct ReverseArgs {
  int64_t N;
  int L, lanes, kernels;
  const ReverseKernel* k;
  const float* q;         // L planes of N: Q_t
  const float* direct;    // L planes of N: the gradient reaching Q_t directly, or null
  float* grad_energy;     // per pass position, a row of lanes: the sum of gE (the unary's gradient)
  bool first_energy;      // whether this pass writes that sum instead of adding to it
  bool energy;            // whether gE_t exists (not for Q_0 = init)
  bool splat;             // whether gE_t is splatted (t > 0)
  float* grad_init;       // L planes of N: gQ_0 is written here (init only), or null
  float* r_rows;          // when slicing: per pass position, every kernel's R row (K rows of lanes)
  float* q_rows;          // when slicing: per pass position, Q_t's row (lanes)
  const int64_t* order;   // pass position -> pixel of the planes (null: the same)
};

// Pixels [p0, p1) of reverse step t (the forward's pass t, backwards): R_k = pre_k * slice_k of
// F_k^T(gE_{t+1}); gQ_t = direct + sum_k C_k R_k; gE_t = Q_t * (<gQ_t, Q_t> - gQ_t), added to the
// unary's gradient and splatted (times post_k) for step t - 1. The R_k and Q_t rows are kept for
// the compatibilities' gradient sum_p R_k Q_t^T, one GEMM after the pass: accumulating those outer
// products here, pixel by pixel, took 200 of the backward's 490 ms (500x375, 21 labels, 5 steps).
template <int LP_>
FASTSEG_ALWAYS_INLINE void reverse_pass(const ReverseArgs& a, int64_t chunk, int64_t p0, int64_t p1) {
  constexpr int LP = LP_ == 1 ? 0 : LP_;
  constexpr int W = LP == 4 ? 4 : 8;
  using V = typename Vec<W>::F;
  const int lanes = LP > 0 ? LP : a.lanes;
  if (LP == 0 && lanes % W != 0) TORCH_CHECK(false, "dense_crf: internal error, row of ", lanes, " lanes");
  const int nv = lanes / W;
  const int L = a.L;
  constexpr int kStack = LP > 0 ? LP / W : 1;
  V gq_stack[kStack], q_stack[kStack], s_stack[kStack];
  Buffer<V> heap_buffer;
  if (LP == 0) heap_buffer.resize(3 * int64_t(nv));
  V* gq = LP > 0 ? gq_stack : heap_buffer.data;
  V* q = LP > 0 ? q_stack : heap_buffer.data + nv;
  V* s = LP > 0 ? s_stack : heap_buffer.data + 2 * nv;
  const bool slice = a.kernels > 0 && a.k[0].sliced != nullptr;
  const int64_t N = a.N;
  for (int64_t p = p0; p < p1; ++p) {
    if (p + kPrefetchAhead < p1) {
      for (int k = 0; k < a.kernels; ++k) {
        const ReverseKernel& K = a.k[k];
        const int32_t* off = K.offset + (p + kPrefetchAhead) * K.d1;
        prefetch_vertex_rows<1>(slice ? K.sliced : nullptr, a.splat ? K.splat[chunk] : nullptr, off, K.d1, lanes);
      }
    }
    const int64_t pixel = a.order ? a.order[p] : p;
    load_planes<V, W>(a.q, N, L, pixel, nv, q);
    if (a.direct != nullptr) {
      load_planes<V, W>(a.direct, N, L, pixel, nv, gq);
    } else {
      for (int v = 0; v < nv; ++v) gq[v] = vbroadcast<V>(0.0f);
    }
    if (slice) {
      for (int v = 0; v < nv; ++v) vstore(a.q_rows + p * lanes + v * W, q[v]);
      for (int k = 0; k < a.kernels; ++k) {
        const ReverseKernel& K = a.k[k];
        slice_row<V, W>(K.sliced, K.offset + p * K.d1, K.weight + p * K.d1, K.d1, K.pre[p], lanes, nv, s);
        float* r_row = a.r_rows + (p * a.kernels + k) * lanes;
        for (int v = 0; v < nv; ++v) vstore(r_row + v * W, s[v]);
        if (K.diagonal) {
          for (int v = 0; v < nv; ++v) gq[v] += vload<V>(K.compat + v * W) * s[v];
        } else {
          // C is symmetric: C R = sum_m R_m C[m, :].
          for (int m = 0; m < L; ++m) {
            const float sm = s[m / W][m % W];
            const float* c = K.compat + int64_t(m) * lanes;
            for (int v = 0; v < nv; ++v) gq[v] += sm * vload<V>(c + v * W);
          }
        }
      }
    }
    if (a.grad_init != nullptr) store_planes<V, W>(gq, N, L, pixel, a.grad_init);
    if (!a.energy) continue;
    // gE = Q * (<gQ, Q> - gQ), the backward of Q = softmax(-E).
    V dot = gq[0] * q[0];
    for (int v = 1; v < nv; ++v) dot += gq[v] * q[v];
    const V total = sum_all<W>(dot);
    for (int v = 0; v < nv; ++v) gq[v] = q[v] * (total - gq[v]);
    float* sum = a.grad_energy + p * lanes;
    for (int v = 0; v < nv; ++v) vstore(sum + v * W, a.first_energy ? gq[v] : vload<V>(sum + v * W) + gq[v]);
    if (!a.splat) continue;
    for (int k = 0; k < a.kernels; ++k) {
      const ReverseKernel& K = a.k[k];
      splat_row<V, W>(K.splat[chunk], K.offset + p * K.d1, K.weight + p * K.d1, K.d1, K.post[p], lanes, nv, gq);
    }
  }
}

// Lattice rows [m0, m1): dst = sum of the chunks' splat buffers, in chunk order, of the chunks that
// touch the row (bitmaps of `words` words per chunk; the others hold zeros there, and adding a
// zero changes nothing), which are zeroed for the next pass.
template <int LP>
FASTSEG_ALWAYS_INLINE void gather_rows(float* const* parts, int64_t nparts, const uint64_t* touched, int64_t words,
                                       float* dst, int runtime_lanes, int64_t m0, int64_t m1) {
  const int lanes = LP > 0 ? LP : runtime_lanes;
  for (int64_t m = m0; m < m1; ++m) {
    float* out = dst + m * lanes;
    bool written = false;
    for (int64_t c = 0; c < nparts; ++c) {
      if (!((touched[c * words + (m >> 6)] >> (m & 63)) & 1)) continue;
      float* in = parts[c] + m * lanes;
      for (int l = 0; l < lanes; ++l) {
        out[l] = written ? out[l] + in[l] : in[l];
        in[l] = 0.0f;
      }
      written = true;
    }
    if (!written) std::fill(out, out + lanes, 0.0f);
  }
}

// Lattice rows [m0, m1) of one blur direction: dst = src + (src[n1] + src[n2]) / 2. The neighbours
// are random rows, mostly in L3 or memory: fetched 16 rows ahead, the blur took 34-39 ms of a
// 1-thread 500x375 call against 38-42 at 8 rows (32 was no better than 16).
constexpr int64_t kBlurAhead = 16;
template <int LP>
FASTSEG_ALWAYS_INLINE void blur_rows(const float* src, float* dst, const int32_t* neighbours,
                                     int runtime_lanes, int64_t m0, int64_t m1) {
  const int lanes = LP > 0 ? LP : runtime_lanes;
  for (int64_t m = m0; m < m1; ++m) {
    if (m + kBlurAhead < m1) {
      prefetch_row(src + int64_t(neighbours[2 * (m + kBlurAhead)]) * lanes, lanes);
      prefetch_row(src + int64_t(neighbours[2 * (m + kBlurAhead) + 1]) * lanes, lanes);
    }
    const float* a = src + int64_t(neighbours[2 * m]) * lanes;
    const float* b = src + int64_t(neighbours[2 * m + 1]) * lanes;
    const float* c = src + m * lanes;
    float* out = dst + m * lanes;
    for (int l = 0; l < lanes; ++l) out[l] = c[l] + 0.5f * (a[l] + b[l]);
  }
}

// Pixels [p0, p1): slice the blurred values (times post) into C planes of N.
template <int LP>
FASTSEG_ALWAYS_INLINE void slice_pixels(const Lattice& lat, const float* sliced, const float* post,
                                        int runtime_lanes, int C, float* out, int64_t p0, int64_t p1) {
  const int lanes = LP > 0 ? LP : runtime_lanes;
  const int d1 = lat.d + 1;
  constexpr int kStack = LP > 0 ? LP : 1;
  float s_stack[kStack];
  std::vector<float> heap(LP > 0 ? 0 : size_t(lanes));
  float* s = LP > 0 ? s_stack : heap.data();
  for (int64_t p = p0; p < p1; ++p) {
    for (int l = 0; l < lanes; ++l) s[l] = 0.0f;
    for (int j = 0; j < d1; ++j) {
      const float* row = sliced + int64_t(lat.offset.data[p * d1 + j]) * lanes;
      const float w = lat.weight.data[p * d1 + j];
      for (int l = 0; l < lanes; ++l) s[l] += w * row[l];
    }
    const float scale = post[p];
    for (int c = 0; c < C; ++c) out[int64_t(c) * lat.N + p] = scale * s[c];
  }
}

// Pixels [p0, p1): splat C planes of N values (times pre) into one chunk's buffer.
template <int LP>
FASTSEG_ALWAYS_INLINE void splat_pixels(const Lattice& lat, const float* values, const float* pre,
                                        int runtime_lanes, int C, float* buffer, int64_t p0, int64_t p1) {
  const int lanes = LP > 0 ? LP : runtime_lanes;
  const int d1 = lat.d + 1;
  constexpr int kStack = LP > 0 ? LP : 1;
  float v_stack[kStack];
  std::vector<float> heap(LP > 0 ? 0 : size_t(lanes));
  float* v = LP > 0 ? v_stack : heap.data();
  for (int64_t p = p0; p < p1; ++p) {
    const float scale = pre[p];
    for (int l = 0; l < lanes; ++l) v[l] = l < C ? scale * (values ? values[int64_t(l) * lat.N + p] : 1.0f) : 0.0f;
    for (int j = 0; j < d1; ++j) {
      float* row = buffer + int64_t(lat.offset.data[p * d1 + j]) * lanes;
      const float w = lat.weight.data[p * d1 + j];
      for (int l = 0; l < lanes; ++l) row[l] += w * v[l];
    }
  }
}

#define FASTSEG_LANES_SWITCH(lanes, fn, ...) \
  switch (lanes) {                           \
    case 1: fn<1>(__VA_ARGS__); break;       \
    case 4: fn<4>(__VA_ARGS__); break;       \
    case 8: fn<8>(__VA_ARGS__); break;       \
    case 16: fn<16>(__VA_ARGS__); break;     \
    case 24: fn<24>(__VA_ARGS__); break;     \
    case 32: fn<32>(__VA_ARGS__); break;     \
    case 40: fn<40>(__VA_ARGS__); break;     \
    case 48: fn<48>(__VA_ARGS__); break;     \
    case 64: fn<64>(__VA_ARGS__); break;     \
    default: fn<0>(__VA_ARGS__); break;      \
  }

#if FASTSEG_HAVE_AVX2_CLONE
#define FASTSEG_DISPATCHED(name, params, lanes, ...)                                        \
  void name##_base params { FASTSEG_LANES_SWITCH(lanes, name##_impl, __VA_ARGS__) }          \
  FASTSEG_TARGET_AVX2 void name##_avx2 params { FASTSEG_LANES_SWITCH(lanes, name##_impl, __VA_ARGS__) } \
  FASTSEG_TARGET_AVX512 void name##_avx512 params { FASTSEG_LANES_SWITCH(lanes, name##_impl, __VA_ARGS__) } \
  void name params {                                                                         \
    if (cpu_has_avx512()) {                                                                  \
      name##_avx512(__VA_ARGS__);                                                            \
    } else if (cpu_has_avx2()) {                                                             \
      name##_avx2(__VA_ARGS__);                                                              \
    } else {                                                                                 \
      name##_base(__VA_ARGS__);                                                              \
    }                                                                                        \
  }
#else
#define FASTSEG_DISPATCHED(name, params, lanes, ...) \
  void name params { FASTSEG_LANES_SWITCH(lanes, name##_impl, __VA_ARGS__) }
#endif

#define run_pixel_pass_impl pixel_pass
#define run_reverse_pass_impl reverse_pass
#define run_gather_rows_impl gather_rows
#define run_blur_rows_impl blur_rows
#define run_slice_pixels_impl slice_pixels
#define run_splat_pixels_impl splat_pixels
FASTSEG_DISPATCHED(run_pixel_pass, (const PassArgs& a, int64_t chunk, int64_t p0, int64_t p1),
                   a.lanes, a, chunk, p0, p1)
FASTSEG_DISPATCHED(run_reverse_pass, (const ReverseArgs& a, int64_t chunk, int64_t p0, int64_t p1),
                   a.lanes, a, chunk, p0, p1)
FASTSEG_DISPATCHED(run_gather_rows,
                   (float* const* parts, int64_t nparts, const uint64_t* touched, int64_t words, float* dst,
                    int lanes, int64_t m0, int64_t m1),
                   lanes, parts, nparts, touched, words, dst, lanes, m0, m1)
FASTSEG_DISPATCHED(run_blur_rows,
                   (const float* src, float* dst, const int32_t* nb, int lanes, int64_t m0, int64_t m1),
                   lanes, src, dst, nb, lanes, m0, m1)
FASTSEG_DISPATCHED(run_slice_pixels,
                   (const Lattice& lat, const float* sliced, const float* post, int lanes, int C,
                    float* out, int64_t p0, int64_t p1),
                   lanes, lat, sliced, post, lanes, C, out, p0, p1)
FASTSEG_DISPATCHED(run_splat_pixels,
                   (const Lattice& lat, const float* values, const float* pre, int lanes, int C,
                    float* buffer, int64_t p0, int64_t p1),
                   lanes, lat, values, pre, lanes, C, buffer, p0, p1)

// --- filtering with one lattice -----------------------------------------------------------------

// Rows [m0, m1) of direction j of the blur, src to dst ((M+1) x lanes each, row M zero).
void blur_direction(const Lattice& lat, int j, const float* src, float* dst, int lanes, int64_t m0, int64_t m1) {
  run_blur_rows(src, dst, lat.neighbours.data + int64_t(j) * lat.M * 2, lanes, m0, m1);
}

// The splat buffers and blur buffers of one lattice at one row width.
struct FilterBuffers {
  int64_t lanes = 0, chunks = 0;
  std::vector<Buffer<float>> splat;  // per chunk, (M+1) x lanes, kept zero between uses
  std::vector<float*> splat_ptrs;
  Buffer<float> x, y;                // blur ping-pong, (M+1) x lanes, row M zero

  void allocate(const Lattice& lat, int64_t lanes_, int64_t chunks_) {
    // The gather reads the chunks' splats where lat.touched says they wrote.
    TORCH_CHECK(chunks_ == lat.chunks, "dense_crf: internal error, ", chunks_, " chunks on a lattice built for ",
                lat.chunks);
    lanes = lanes_;
    chunks = chunks_;
    const int64_t n = (lat.M + 1) * lanes;
    splat.resize(chunks);
    splat_ptrs.resize(chunks);
    for (int64_t c = 0; c < chunks; ++c) {
      splat[c].resize(n);
      splat_ptrs[c] = splat[c].data;
    }
    x.resize(n);
    y.resize(n);
    at::parallel_for(0, lat.M + 1, 8192, [&](int64_t begin, int64_t end) {
      for (int64_t c = 0; c < chunks; ++c) {
        std::fill(splat[c].data + begin * lanes, splat[c].data + end * lanes, 0.0f);
      }
    });
    // Of x and y only the zero row: every other row is written (by the gather, or by the blur)
    // before it is read, and with one chunk x is zeroed before it becomes a splat buffer.
    std::fill(x.data + lat.M * lanes, x.data + n, 0.0f);
    std::fill(y.data + lat.M * lanes, y.data + n, 0.0f);
  }

  // With one chunk there is nothing to sum: its splat buffer becomes the blur's source and the
  // old source, once zeroed, the next splat buffer (one pass writing zeros instead of a copy plus
  // zeros). Returns whether it did that, for gather_rows.
  bool take_single_splat() {
    if (chunks != 1) return false;
    std::swap(splat[0], x);
    splat_ptrs[0] = splat[0].data;
    return true;
  }

  // Rows [m0, m1) of the blur's source x: the sum of the chunks' splats, which are zeroed for the
  // next pass; after take_single_splat only the zeroing.
  void gather_rows(const Lattice& lat, bool single, int64_t m0, int64_t m1) {
    if (single) {
      std::fill(splat[0].data + m0 * lanes, splat[0].data + m1 * lanes, 0.0f);
    } else {
      run_gather_rows(splat_ptrs.data(), chunks, lat.touched.data, lat.touched_words, x.data, int(lanes), m0, m1);
    }
  }

  // Sums the chunks' splats and blurs them along directions 0..d (d..0 if reverse: the blur's
  // transpose, as each direction's blur is symmetric); returns the blurred (M+1) x lanes values.
  const float* gather_and_blur(const Lattice& lat, bool reverse = false) {
    const int64_t M = lat.M;
    const int l = int(lanes);
    const int64_t grain = std::max<int64_t>(256, 65536 / lanes);
    const bool single = take_single_splat();
    at::parallel_for(0, M, grain, [&](int64_t begin, int64_t end) { gather_rows(lat, single, begin, end); });
    float* src = x.data;
    float* dst = y.data;
    for (int i = 0; i <= lat.d; ++i) {
      const int j = reverse ? lat.d - i : i;
      at::parallel_for(0, M, grain,
                       [&](int64_t begin, int64_t end) { blur_direction(lat, j, src, dst, l, begin, end); });
      std::swap(src, dst);
    }
    return src;
  }
};

int64_t pixel_chunks(int64_t N) {
  if (at::in_parallel_region()) return 1;
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), N / 4096));
}

FASTSEG_ALWAYS_INLINE int64_t chunk_begin(int64_t N, int64_t chunks, int64_t c) { return N * c / chunks; }

// Per-pixel (pre, post) scales of a normalised filter F_n(v) = post * F(pre * v), from n = F(1).
void normalisers(const Lattice& lat, int64_t normalization, int64_t chunks, Buffer<float>& pre,
                 Buffer<float>& post, FilterBuffers& buffers) {
  const int64_t N = lat.N;
  pre.resize(N);
  post.resize(N);
  buffers.allocate(lat, 1, chunks);
  at::parallel_for(0, N, 8192, [&](int64_t begin, int64_t end) {
    std::fill(pre.data + begin, pre.data + end, 1.0f);
  });
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      run_splat_pixels(lat, nullptr, pre.data, 1, 1, buffers.splat_ptrs[c], chunk_begin(N, chunks, c),
                       chunk_begin(N, chunks, c + 1));
    }
  });
  const float* blurred = buffers.gather_and_blur(lat);
  const float alpha = lat.alpha;
  at::parallel_for(0, N, 8192, [&](int64_t begin, int64_t end) {
    const int d1 = lat.d + 1;
    for (int64_t p = begin; p < end; ++p) {
      float n = 0.0f;
      for (int j = 0; j < d1; ++j) n += lat.weight.data[p * d1 + j] * blurred[lat.offset.data[p * d1 + j]];
      n *= alpha;
      float a = 1.0f, b = 1.0f;
      if (normalization == kNormalizeSymmetric) {
        a = b = 1.0f / std::sqrt(n + 1e-20f);
      } else if (normalization == kNormalizeBefore) {
        a = 1.0f / (n + 1e-20f);
      } else if (normalization == kNormalizeAfter) {
        b = 1.0f / (n + 1e-20f);
      }
      pre.data[p] = a;
      post.data[p] = b * alpha;  // the lattice's alpha rides on the slice
    }
  });
}

// --- the ops -------------------------------------------------------------------------------------

struct KernelSpec {
  const float* features;  // d planes of N for this image
  int d;
  int64_t normalization;
  bool diagonal;
  std::vector<float> compat;  // lanes (diagonal) or L rows of lanes (symmetrised, zero padded)
};

struct KernelState {
  Lattice lattice;
  Buffer<float> pre, post;
  // With symmetric normalisation pre = post / alpha, so the mean-field passes splat and slice with
  // the lattice weights times pre and scale by alpha alone: two fewer per-pixel streams per pass.
  Buffer<float> folded_weight;
  FilterBuffers buffers, norm_buffers;
  // For a lattice of a pixel grid's positions (grid_positions), what it was built from: the grid's
  // x row and y column, then H, W, the pixel chunks and the normalisation; empty otherwise.
  std::vector<float> grid;
};

// Whether d = 2 feature planes of an H x W image are a pixel grid's positions, as the Gaussian
// (smoothness) kernel's are: plane 0 the same in every row, plane 1 constant along each row. Then
// key gets plane 0's first row and plane 1's first column, which determine the lattice: every
// image of that size and kernel width shares it. Reads the planes once (about 0.2 ms at 500x375;
// the lattice and its normalisers take 4-7 ms to build there).
bool grid_positions(const float* features, int64_t H, int64_t W, std::vector<float>& key) {
  const float* xs = features;
  const float* ys = features + H * W;
  for (int64_t y = 1; y < H; ++y) {
    if (std::memcmp(xs + y * W, xs, sizeof(float) * W) != 0) return false;
  }
  for (int64_t y = 0; y < H; ++y) {
    const float* row = ys + y * W;
    for (int64_t x = 1; x < W; ++x) {
      if (row[x] != row[0]) return false;
    }
  }
  key.assign(xs, xs + W);
  for (int64_t y = 0; y < H; ++y) key.push_back(ys[y * W]);
  return true;
}

// Everything one thread's images need, kept between calls: a call on an image of the size of the
// previous one allocates nothing (and so takes no page faults).
struct Workspace {
  std::vector<KernelState> states;
  Buffer<float> rows;
  Buffer<float> r_rows, q_rows, grad_rows;  // the backward's
};

// Pixel orders of the last image size, kept like the workspace (but apart from it: every thread
// of a batch reads the calling thread's).
struct PixelOrder {
  Buffer<int64_t> order;
  int64_t h = -1, w = -1;
};

// The mean-field passes visit the pixels tile by tile (kTile x kTile, row by row inside a tile):
// nearby pixels share lattice points, and a tile's points fit in L2 where a raster row's do not
// (simulated on the 500x375 benchmark, 512 KiB LRU: 6% of the row accesses miss instead of 13%).
constexpr int64_t kTile = 32;
const int64_t* tile_order(PixelOrder& ws, int64_t H, int64_t W) {
  if (H <= kTile || W <= kTile) return nullptr;  // one band of tiles: raster order is as good
  if (ws.h != H || ws.w != W) {
    ws.h = ws.w = -1;
    ws.order.resize(H * W);
    int64_t i = 0;
    for (int64_t ty = 0; ty < H; ty += kTile) {
      for (int64_t tx = 0; tx < W; tx += kTile) {
        for (int64_t y = ty; y < std::min(H, ty + kTile); ++y) {
          for (int64_t x = tx; x < std::min(W, tx + kTile); ++x) ws.order.data[i++] = y * W + x;
        }
      }
    }
    ws.h = H;
    ws.w = W;
  }
  return ws.order.data;
}

PixelOrder& thread_pixel_order() {
  static thread_local PixelOrder order;
  return order;
}

Workspace& thread_workspace() {
  static thread_local Workspace workspace;
  return workspace;
}

// Large images would pin their (large) workspace for the rest of the process.
constexpr int64_t kKeepWorkspacePixels = int64_t(4) << 20;

// Splats of very small Q (scores whose energies differ by 80 or more) fall below float's normal
// range, where x86 arithmetic takes microcode assists: energies scaled x100 cost 119 ms against 108
// (500x375, 10 iterations, 2 threads). Mean field and its backward flush such values to zero on
// their threads (a change of at most 1.2e-38 in any value), restoring each thread's mode after.
struct FlushDenormals {
#if defined(__x86_64__) || defined(__i386__)
  const unsigned int saved = _mm_getcsr();
  FlushDenormals() { _mm_setcsr(saved | 0x8040); }  // FTZ (bit 15) and DAZ (bit 6)
  ~FlushDenormals() { _mm_setcsr(saved); }
#endif
};

// fn(k, b, e) for the part [b, e) of kernel k's items that falls in [begin, end), the K kernels'
// size(k) items laid end to end (how the gather and blur share out several kernels' rows).
template <typename Size, typename Fn>
void split_over_kernels(int K, Size&& size, int64_t begin, int64_t end, Fn&& fn) {
  int64_t first = 0;
  for (int k = 0; k < K && first < end; ++k) {
    const int64_t n = size(k);
    const int64_t b = std::max(begin, first), e = std::min(end, first + n);
    if (b < e) fn(k, b - first, e - first);
    first += n;
  }
}

// gather_and_blur of every kernel, the kernels side by side in each parallel region (one region
// for the gathers, one per blur direction): fewer OpenMP barriers than one kernel at a time, and
// on a loaded machine every barrier can be a wait for a preempted thread.
// With reverse, each kernel's directions run d..0: the blur's transpose. sliced[k] receives kernel
// k's blurred rows.
void gather_and_blur_kernels(std::vector<KernelState>& states, int K, bool reverse, const float** sliced) {
  int64_t lanes = 1;
  int directions = 0;
  std::vector<float*> src(K), dst(K);
  for (int k = 0; k < K; ++k) {
    lanes = std::max(lanes, states[k].buffers.lanes);
    directions = std::max(directions, states[k].lattice.d + 1);
    src[k] = states[k].buffers.x.data;
    dst[k] = states[k].buffers.y.data;
  }
  const int64_t grain = std::max<int64_t>(256, 65536 / lanes);
  // fn(k, b, e) over rows [begin, end) of the active kernels' rows laid end to end.
  auto for_rows = [&](auto&& active, auto&& fn) {
    auto rows = [&](int k) { return active(k) ? states[k].lattice.M : int64_t(0); };
    int64_t total = 0;
    for (int k = 0; k < K; ++k) total += rows(k);
    at::parallel_for(0, total, grain, [&](int64_t begin, int64_t end) {
      const FlushDenormals flush;
      split_over_kernels(K, rows, begin, end, fn);
    });
  };
  std::vector<char> single(K);
  for (int k = 0; k < K; ++k) {
    single[k] = states[k].buffers.take_single_splat();
    src[k] = states[k].buffers.x.data;
  }
  for_rows([](int) { return true; },
           [&](int k, int64_t b, int64_t e) { states[k].buffers.gather_rows(states[k].lattice, single[k], b, e); });
  for (int j = 0; j < directions; ++j) {
    auto active = [&](int k) { return states[k].lattice.d >= j; };
    for_rows(active, [&](int k, int64_t b, int64_t e) {
      const Lattice& lat = states[k].lattice;
      blur_direction(lat, reverse ? lat.d - j : j, src[k], dst[k], int(states[k].buffers.lanes), b, e);
    });
    for (int k = 0; k < K; ++k) {
      if (active(k)) std::swap(src[k], dst[k]);
    }
  }
  for (int k = 0; k < K; ++k) sliced[k] = src[k];
}

// The kernels of image b: the prototype's with that image's feature planes (batch 1 features are
// shared by every image).
std::vector<KernelSpec> image_specs(const std::vector<KernelSpec>& prototype, const std::vector<at::Tensor>& feats,
                                    int64_t b, int64_t N) {
  std::vector<KernelSpec> specs = prototype;
  for (size_t k = 0; k < specs.size(); ++k) {
    const int64_t fb = feats[k].size(0) == 1 ? 0 : b;
    specs[k].features = feats[k].const_data_ptr<float>() + fb * feats[k].size(1) * N;
  }
  return specs;
}

// folded_weight = weight * pre, per pixel (see KernelState).
void fold_pre_into_weights(KernelState& s) {
  const Lattice& lat = s.lattice;
  const int d1 = lat.d + 1;
  s.folded_weight.resize(lat.N * d1);
  at::parallel_for(0, lat.N, 8192, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      for (int j = 0; j < d1; ++j) s.folded_weight.data[p * d1 + j] = lat.weight.data[p * d1 + j] * s.pre.data[p];
    }
  });
}

// Builds every kernel's lattice (pixel i of the lattice is pixel order[i], or i; order depends on
// H and W only) and normalisers, and sizes its buffers for label rows of `lanes`. A lattice of grid
// positions that this state already holds for the same grid, chunks and normalisation is kept.
void prepare_kernels(std::vector<KernelState>& states, const std::vector<KernelSpec>& specs, int64_t H, int64_t W,
                     int64_t chunks, int lanes, const int64_t* order) {
  const int K = int(specs.size());
  const int64_t N = H * W;
  states.resize(K);
  std::vector<float> grid;
  for (int k = 0; k < K; ++k) {
    KernelState& s = states[k];
    grid.clear();
    if (specs[k].d == 2 && grid_positions(specs[k].features, H, W, grid)) {
      for (const int64_t v : {H, W, chunks, specs[k].normalization}) grid.push_back(float(v));
    }
    if (grid.empty() || grid != s.grid) {  // the key holds H and W
      s.grid.clear();  // while rebuilding: an exception must not leave a stale key
      build_lattice(s.lattice, specs[k].features, N, specs[k].d, N, int(chunks), order);
      normalisers(s.lattice, specs[k].normalization, chunks, s.pre, s.post, s.norm_buffers);
      if (specs[k].normalization == kNormalizeSymmetric) fold_pre_into_weights(s);
      s.grid = std::move(grid);
      grid = std::vector<float>();
    }
    s.buffers.allocate(s.lattice, lanes, chunks);
  }
}

#if FASTSEG_HAVE_AVX2_CLONE
// Rows of `lanes` (a multiple of 8) for the first n / 8 * 8 of n consecutive pixels, from L planes
// (stride N) starting at those pixels: 8 pixels by 8 labels at a time, loaded plane-wise and
// transposed in registers (the scalar loop stored one float per row per label). Each value is
// scale * plane[i], as the scalar loop computes it; padding lanes are exactly 0. Returns the number
// of pixels done; sets non_finite if a value is nan or inf.
FASTSEG_TARGET_AVX2 int64_t pack_rows_avx2(const float* planes, int64_t N, int L, int lanes, float scale, int64_t n,
                                           float* rows, bool& non_finite) {
  const __m256 s = _mm256_set1_ps(scale);
  const int64_t blocks = n / 8 * 8;
  __m256 nan_if_not_finite = _mm256_setzero_ps();  // or-ed x - x: 0 for a finite x, nan otherwise
  for (int64_t i0 = 0; i0 < blocks; i0 += 8) {
    for (int g = 0; g < lanes; g += 8) {
      __m256 r[8];
      for (int j = 0; j < 8; ++j) {
        r[j] = g + j < L ? _mm256_mul_ps(s, _mm256_loadu_ps(planes + int64_t(g + j) * N + i0)) : _mm256_setzero_ps();
        nan_if_not_finite = _mm256_or_ps(nan_if_not_finite, _mm256_sub_ps(r[j], r[j]));
      }
      // 8x8 transpose: r[j][i] (label g + j, pixel i0 + i) -> row i.
      const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
      const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
      const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
      const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
      const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
      const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
      const __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
      const __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
      float* out = rows + i0 * lanes + g;
      _mm256_storeu_ps(out + 0 * lanes, _mm256_permute2f128_ps(u0, u4, 0x20));
      _mm256_storeu_ps(out + 1 * lanes, _mm256_permute2f128_ps(u1, u5, 0x20));
      _mm256_storeu_ps(out + 2 * lanes, _mm256_permute2f128_ps(u2, u6, 0x20));
      _mm256_storeu_ps(out + 3 * lanes, _mm256_permute2f128_ps(u3, u7, 0x20));
      _mm256_storeu_ps(out + 4 * lanes, _mm256_permute2f128_ps(u0, u4, 0x31));
      _mm256_storeu_ps(out + 5 * lanes, _mm256_permute2f128_ps(u1, u5, 0x31));
      _mm256_storeu_ps(out + 6 * lanes, _mm256_permute2f128_ps(u2, u6, 0x31));
      _mm256_storeu_ps(out + 7 * lanes, _mm256_permute2f128_ps(u3, u7, 0x31));
    }
  }
  if (_mm256_movemask_ps(_mm256_cmp_ps(nan_if_not_finite, nan_if_not_finite, _CMP_UNORD_Q)) != 0) non_finite = true;
  return blocks;
}
#endif

FASTSEG_ALWAYS_INLINE void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

// Runs phases 0 .. phases - 1 in order, phase p being share_count(p) independent shares
// run_share(p, s), in one parallel region: every thread takes the next share of the current phase
// until there is none, then waits (spinning, then yielding) until all of the phase's shares are
// done. Mean field is 2 + d + 1 phases per iteration, most of them a fraction of a millisecond; as
// one parallel region each (8 per iteration with the two default kernels) the team's fork, join
// and wake-ups cost about 5% of a 500x375, 10-iteration call on this project's 2-core VM, 8-10%
// under OMP_WAIT_POLICY=PASSIVE (benchmarks/RESULTS.md). Deadlock-free with any number of threads
// (one thread runs every share itself); the first exception stops the remaining work and is
// rethrown.
template <typename ShareCount, typename RunShare>
void run_phases(int64_t phases, ShareCount&& share_count, RunShare&& run_share) {
  struct alignas(64) Counter {
    std::atomic<int64_t> next{0}, done{0};
  };
  std::vector<Counter> counters(size_t(std::max<int64_t>(phases, 1)));
  std::atomic<bool> failed{false};
  std::exception_ptr error;
  std::mutex error_lock;
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
    const FlushDenormals flush;
    for (int64_t p = 0; p < phases; ++p) {
      const int64_t n = share_count(p);
      Counter& c = counters[size_t(p)];
      for (int64_t s; (s = c.next.fetch_add(1, std::memory_order_relaxed)) < n;) {
        if (!failed.load(std::memory_order_relaxed)) {
          try {
            run_share(p, s);
          } catch (...) {
            std::lock_guard<std::mutex> lock(error_lock);
            if (!error) error = std::current_exception();
            failed = true;
          }
        }
        c.done.fetch_add(1, std::memory_order_release);
      }
      for (int spin = 0; c.done.load(std::memory_order_acquire) < n; ++spin) {
        if (spin < 4096) {
          cpu_relax();
        } else {
          std::this_thread::yield();
        }
      }
    }
  });
  if (error) std::rethrow_exception(error);
}

// Mean field on prepared kernels. Writes the last Q to out or, with out_stride > 0, every Q_t
// (t = 0 .. iterations) to out + t * out_stride.
void run_mean_field(const float* unary, float unary_scale, const float* init, float* out, int64_t out_stride,
                    int64_t N, int L, const std::vector<KernelSpec>& specs, int64_t iterations,
                    std::vector<KernelState>& states, Buffer<float>& unary_rows, const int64_t* order,
                    int64_t chunks) {
  const int lanes = int(lanes_for_labels(L));
  const int K = int(specs.size());
  // Unary energies as rows of `lanes` (padding 0; the softmax ignores it). unary_scale -1 makes
  // logits energies: -logits differs from -log_softmax(logits) by a per-pixel constant, which no
  // softmax sees. Packed run by run of consecutive pixels (as PlaneWriter writes), so that each
  // plane is read contiguously. The packing also checks the scores (the Python entry point leaves
  // that to it for this backend: a separate pass over them cost 0.5 ms of a 500x375 call).
  unary_rows.resize(N * lanes);
  std::atomic<bool> non_finite{false};
  at::parallel_for(0, N, 4096, [&](int64_t begin, int64_t end) {
    bool bad = false;
    for (int64_t p = begin; p < end;) {
      const int64_t first = order ? order[p] : p;
      int64_t n = 1;
      while (p + n < end && n < kRun && (order ? order[p + n] : p + n) == first + n) ++n;
      float* rows = unary_rows.data + p * lanes;
      int64_t done = 0;
#if FASTSEG_HAVE_AVX2_CLONE
      if (lanes % 8 == 0 && cpu_has_avx2()) {
        done = pack_rows_avx2(unary + first, N, L, lanes, unary_scale, n, rows, bad);
      }
#endif
      for (int l = 0; l < L; ++l) {
        const float* plane = unary + int64_t(l) * N + first;
        for (int64_t i = done; i < n; ++i) {
          const float x = unary_scale * plane[i];
          bad |= !std::isfinite(x);
          rows[i * lanes + l] = x;
        }
      }
      for (int64_t i = done; i < n; ++i) std::fill(rows + i * lanes + L, rows + (i + 1) * lanes, 0.0f);
      p += n;
    }
    if (bad) non_finite = true;
  });
  TORCH_CHECK_VALUE(!non_finite, "dense_crf: scores contains non-finite values (nan or inf)");

  // Where kernel k's pass t splats (per chunk) and where the gather before pass t + 1 leaves the
  // values to blur. With several chunks: chunk c's own buffer, summed into x by the gather. With
  // one there is nothing to sum, and the splat buffer and x trade places every iteration instead:
  // pass t splats into own[t % 2], which the gather before pass t + 1 leaves in place, while it
  // zeroes own[(t + 1) % 2] (which pass t's slice read from or the blur used) for pass t + 1.
  std::vector<std::array<float*, 2>> own(K);
  for (int k = 0; k < K; ++k) own[k] = {states[k].buffers.splat[0].data, states[k].buffers.x.data};
  auto splat_target = [&](int k, int64_t t) -> float* const* {
    FilterBuffers& b = states[k].buffers;
    return chunks > 1 ? b.splat_ptrs.data() : &own[k][t % 2];
  };
  auto gathered = [&](int k, int64_t t) {  // where the gather before pass t leaves kernel k's values
    return chunks > 1 ? states[k].buffers.x.data : own[k][(t - 1) % 2];
  };
  // The blur ping-pongs between those and y: direction j reads the one and writes the other.
  auto blur_buffer = [&](int k, int64_t t, int64_t j) {
    return j % 2 == 0 ? gathered(k, t) : states[k].buffers.y.data;
  };
  auto blurred = [&](int k, int64_t t) { return blur_buffer(k, t, states[k].lattice.d + 1); };
  std::vector<PassKernel> pass(K);
  for (int k = 0; k < K; ++k) {
    KernelState& s = states[k];
    const bool folded = specs[k].normalization == kNormalizeSymmetric;
    pass[k] = PassKernel{s.lattice.d + 1, s.lattice.offset.data,
                         folded ? s.folded_weight.data : s.lattice.weight.data, folded ? nullptr : s.pre.data,
                         folded ? nullptr : s.post.data, s.lattice.alpha, nullptr, nullptr, specs[k].diagonal,
                         specs[k].compat.data()};
  }
  // Pass t's kernels differ only in where they slice from and splat to, which depends on t only
  // through t == 0 and t's parity: three variants (for t = 0, 1, 2), made before the phases.
  std::array<std::vector<PassKernel>, 3> pass_at;
  for (int64_t v = 0; v < 3; ++v) {
    pass_at[v] = pass;
    for (int k = 0; k < K; ++k) {
      pass_at[v][k].sliced = v > 0 ? blurred(k, v) : nullptr;
      pass_at[v][k].splat = splat_target(k, v);
    }
  }

  // The schedule: pass 0, then per iteration t = 1 .. T the gather, the blur's directions and pass
  // t. Pass t computes Q_t (pass 0: softmax(-U) or init) and splats it for the next, but the last.
  // The gather and blur phases do every kernel side by side, their rows laid end to end and cut
  // into `shares` equal parts.
  int directions = 0;
  for (int k = 0; k < K; ++k) directions = std::max(directions, states[k].lattice.d + 1);
  const int64_t per_iteration = 2 + directions;
  const int64_t phases = 1 + iterations * per_iteration;
  const int64_t shares = std::max<int64_t>(1, 2 * int64_t(at::get_num_threads()));
  auto phase_of = [&](int64_t p, int64_t& t, int64_t& step) {  // step 0: gather, 1 + j: blur j, last: pass
    t = p == 0 ? 0 : (p - 1) / per_iteration + 1;
    step = p == 0 ? per_iteration - 1 : (p - 1) % per_iteration;
  };
  auto direction = [&](int k, int64_t j) { return states[k].lattice.d >= j ? int(j) : -1; };
  auto items = [&](int k, int64_t step) -> int64_t {  // rows of kernel k in a gather or blur step
    return step == 0 || direction(k, step - 1) >= 0 ? states[k].lattice.M : 0;
  };
  auto share_count = [&](int64_t p) -> int64_t {
    int64_t t, step;
    phase_of(p, t, step);
    return step == per_iteration - 1 ? chunks : shares;
  };
  auto run_share = [&](int64_t p, int64_t share) {
    int64_t t, step;
    phase_of(p, t, step);
    if (step == per_iteration - 1) {
      const PassKernel* kernels = pass_at[t == 0 ? 0 : 2 - t % 2].data();
      PassArgs args{N, L, lanes, K, kernels, unary_rows.data, t == 0 ? init : nullptr,
                    out_stride > 0 ? out + t * out_stride : t == iterations ? out : nullptr, t < iterations, order};
      run_pixel_pass(args, share, chunk_begin(N, chunks, share), chunk_begin(N, chunks, share + 1));
      return;
    }
    auto rows = [&](int k) { return items(k, step); };
    int64_t total = 0;
    for (int k = 0; k < K; ++k) total += rows(k);
    split_over_kernels(K, rows, total * share / shares, total * (share + 1) / shares, [&](int k, int64_t b, int64_t e) {
      FilterBuffers& buf = states[k].buffers;
      if (step > 0) {
        const int j = direction(k, step - 1);
        blur_direction(states[k].lattice, j, blur_buffer(k, t, j), blur_buffer(k, t, j + 1), int(buf.lanes), b, e);
      } else if (chunks > 1) {
        buf.gather_rows(states[k].lattice, /*single=*/false, b, e);
      } else {
        std::fill(own[k][t % 2] + b * buf.lanes, own[k][t % 2] + e * buf.lanes, 0.0f);
      }
    });
  };
  run_phases(phases, share_count, run_share);
  if (chunks == 1 && iterations % 2 == 1) {
    // The last gather zeroed own[1], x: trade back, so that splat buffers are zero between uses.
    for (int k = 0; k < K; ++k) states[k].buffers.take_single_splat();
  }
}

// out = F_n(values) (or its transpose) on a prepared kernel, for C planes of N values.
void filter_planes(KernelState& s, const float* values, int C, bool transpose, float* out) {
  const Lattice& lat = s.lattice;
  const int64_t N = lat.N, chunks = s.buffers.chunks;
  const int lanes = int(s.buffers.lanes);
  const float* splat_scale = transpose ? s.post.data : s.pre.data;
  const float* slice_scale = transpose ? s.pre.data : s.post.data;
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      run_splat_pixels(lat, values, splat_scale, lanes, C, s.buffers.splat_ptrs[c], chunk_begin(N, chunks, c),
                       chunk_begin(N, chunks, c + 1));
    }
  });
  const float* blurred = s.buffers.gather_and_blur(lat, transpose);
  at::parallel_for(0, N, 4096, [&](int64_t begin, int64_t end) {
    run_slice_pixels(lat, blurred, slice_scale, lanes, C, out, begin, end);
  });
}

std::vector<KernelSpec> kernel_specs(const at::TensorList features, const at::TensorList compat,
                                     at::IntArrayRef normalization, int64_t L) {
  const int64_t K = int64_t(features.size());
  const int64_t lanes = lanes_for_labels(L);
  std::vector<KernelSpec> specs(K);
  for (int64_t k = 0; k < K; ++k) {
    const at::Tensor c = compat[k].to(at::kFloat).contiguous();
    const float* m = c.const_data_ptr<float>();
    KernelSpec& s = specs[k];
    s.d = int(features[k].size(1));
    s.normalization = normalization[k];
    s.diagonal = true;
    for (int64_t i = 0; i < L; ++i) {
      for (int64_t j = 0; j < L; ++j) {
        if (i != j && (m[i * L + j] != 0.0f || m[j * L + i] != 0.0f)) s.diagonal = false;
      }
    }
    if (s.diagonal) {
      s.compat.assign(lanes, 0.0f);
      for (int64_t i = 0; i < L; ++i) s.compat[i] = m[i * L + i];
    } else {
      s.compat.assign(L * lanes, 0.0f);
      for (int64_t i = 0; i < L; ++i) {
        for (int64_t j = 0; j < L; ++j) s.compat[i * lanes + j] = 0.5f * (m[i * L + j] + m[j * L + i]);
      }
    }
  }
  return specs;
}

void check_dense_crf_args(const at::Tensor& unary, at::TensorList features, at::TensorList compat,
                          at::IntArrayRef normalization, int64_t iterations,
                          const std::optional<at::Tensor>& init) {
  TORCH_CHECK_VALUE(unary.dim() == 4, "dense_crf: unary must be 4-D (B, L, H, W), got ", unary.dim(), "-D");
  TORCH_CHECK_TYPE(unary.scalar_type() == at::kFloat, "dense_crf: unary must be float32, got ",
                   unary.scalar_type());
  TORCH_CHECK_VALUE(unary.size(1) >= 1, "dense_crf: unary needs at least one label");
  TORCH_CHECK_VALUE(features.size() == compat.size() && features.size() == normalization.size(),
                    "dense_crf: features, compat and normalization must have one entry per kernel, got ",
                    features.size(), ", ", compat.size(), " and ", normalization.size());
  TORCH_CHECK_VALUE(iterations >= 0, "dense_crf: iterations must be >= 0, got ", iterations);
  const int64_t B = unary.size(0), L = unary.size(1);
  for (size_t k = 0; k < features.size(); ++k) {
    const at::Tensor& f = features[k];
    TORCH_CHECK_VALUE(f.dim() == 4 && (f.size(0) == B || f.size(0) == 1) &&
                          f.size(2) == unary.size(2) && f.size(3) == unary.size(3),
                      "dense_crf: features[", k, "] must be (B or 1, D, H, W) with (B, H, W) of unary ",
                      unary.sizes(), ", got ", f.sizes());
    TORCH_CHECK_TYPE(f.scalar_type() == at::kFloat, "dense_crf: features[", k, "] must be float32, got ",
                     f.scalar_type());
    TORCH_CHECK_VALUE(f.size(1) >= 1 && f.size(1) <= kMaxFeatures, "dense_crf: features[", k,
                      "] must have 1 to ", kMaxFeatures, " channels, got ", f.size(1));
    TORCH_CHECK_VALUE(compat[k].dim() == 2 && compat[k].size(0) == L && compat[k].size(1) == L,
                      "dense_crf: compat[", k, "] must be (L, L) = (", L, ", ", L, "), got ",
                      compat[k].sizes());
    TORCH_CHECK_VALUE(normalization[k] >= 0 && normalization[k] <= 3, "dense_crf: normalization[", k,
                      "] must be 0 (none), 1 (before), 2 (after) or 3 (symmetric), got ", normalization[k]);
    TORCH_CHECK_VALUE(f.device() == unary.device(), "dense_crf: features[", k, "] is on ", f.device(),
                      " but unary is on ", unary.device());
  }
  if (init.has_value()) {
    TORCH_CHECK_VALUE(init->sizes() == unary.sizes(), "dense_crf: init has shape ", init->sizes(),
                      " but unary has shape ", unary.sizes());
    TORCH_CHECK_TYPE(init->scalar_type() == at::kFloat, "dense_crf: init must be float32, got ",
                     init->scalar_type());
  }
}

template <typename F>
auto rethrow_bad_alloc(const char* what, int64_t N, F&& f) {
  try {
    return f();
  } catch (const std::bad_alloc&) {
    TORCH_CHECK(false, "dense_crf: out of memory ", what, " for an image of ", N, " pixels");
  }
}

// Mean field over the batch: Q_T as (B, L, H, W), or with every_iterate Q_0 .. Q_T as
// (T + 1, B, L, H, W).
at::Tensor mean_field_batch(const at::Tensor& unary, at::TensorList features, at::TensorList compat,
                            at::IntArrayRef normalization, int64_t iterations,
                            const std::optional<at::Tensor>& init, double unary_scale, bool every_iterate) {
  check_dense_crf_args(unary, features, compat, normalization, iterations, init);
  const int64_t B = unary.size(0), L = unary.size(1), N = unary.size(2) * unary.size(3);
  std::vector<int64_t> sizes(unary.sizes().begin(), unary.sizes().end());
  if (every_iterate) sizes.insert(sizes.begin(), iterations + 1);
  at::Tensor out = at::empty(sizes, unary.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  advise_huge_pages(out);
  const at::Tensor U = unary.contiguous();
  const at::Tensor Q0 = init.has_value() ? init->contiguous() : at::Tensor();
  std::vector<at::Tensor> feats;
  for (const auto& f : features) feats.push_back(f.contiguous());
  const std::vector<KernelSpec> prototype = kernel_specs(features, compat, normalization, L);
  PixelOrder& pixel_order = thread_pixel_order();
  const int64_t* order = tile_order(pixel_order, unary.size(2), unary.size(3));
  const int64_t out_stride = every_iterate ? B * L * N : 0;

  auto image = [&](int64_t b, std::vector<KernelState>& states, Buffer<float>& rows) {
    const std::vector<KernelSpec> specs = image_specs(prototype, feats, b, N);
    const int64_t chunks = pixel_chunks(N);
    prepare_kernels(states, specs, unary.size(2), unary.size(3), chunks, int(lanes_for_labels(L)), order);
    run_mean_field(U.const_data_ptr<float>() + b * L * N, float(unary_scale),
                   Q0.defined() ? Q0.const_data_ptr<float>() + b * L * N : nullptr,
                   out.mutable_data_ptr<float>() + b * L * N, out_stride, N, int(L), specs, iterations, states,
                   rows, order, chunks);
  };
  rethrow_bad_alloc("running dense_crf", N, [&] {
    const int threads = at::get_num_threads();
    if (B >= threads && threads > 1) {
      // Enough images for every thread: one image per task, each single-threaded inside.
      at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
        Workspace& ws = thread_workspace();
        for (int64_t b = begin; b < end; ++b) image(b, ws.states, ws.rows);
        if (N > kKeepWorkspacePixels) ws = Workspace();
      });
    } else {
      Workspace& ws = thread_workspace();
      for (int64_t b = 0; b < B; ++b) image(b, ws.states, ws.rows);
      if (N > kKeepWorkspacePixels) ws = Workspace();
    }
    if (N > kKeepWorkspacePixels) pixel_order = PixelOrder();
    return 0;
  });
  return out;
}

at::Tensor dense_crf_cpu(const at::Tensor& unary, at::TensorList features, at::TensorList compat,
                         at::IntArrayRef normalization, int64_t iterations,
                         const std::optional<at::Tensor>& init, double unary_scale) {
  return mean_field_batch(unary, features, compat, normalization, iterations, init, unary_scale, false);
}

at::Tensor dense_crf_iterates_cpu(const at::Tensor& unary, at::TensorList features, at::TensorList compat,
                                  at::IntArrayRef normalization, int64_t iterations,
                                  const std::optional<at::Tensor>& init, double unary_scale) {
  return mean_field_batch(unary, features, compat, normalization, iterations, init, unary_scale, true);
}

// The gradients of Q_T (or of every iterate) with respect to the unary, init and each compat,
// image by image on lattices built once. Per kernel k, Cs_k = (C_k + C_k^T) / 2 and F_k its
// normalised filter, the forward is
//   Q_0 = softmax(-s U) (or init);  E_t = s U + sum_k Cs_k F_k(Q_{t-1});  Q_t = softmax(-E_t),
// and the reverse sweep, t = T .. 0, from gQ_T (plus whatever reaches an iterate directly):
//   R_k = F_k^T(gE_{t+1});  gQ_t += sum_k Cs_k R_k;  gCs_k += R_k Q_t^T;
//   gE_t = Q_t * (<gQ_t, Q_t> - gQ_t);  gU += s gE_t   (no gE_0 with init: g_init = gQ_0).
// Each step is one fused pass over the pixels (slice, mix, outer product, softmax backward,
// splat) and one reverse blur, like a forward iteration. `grad` and `iterates` are
// (T + 1, B, L, H, W), or (1, B, L, H, W) for Q_T alone: the earlier iterates are then recomputed
// on the same lattices (checkpointing). Returns [grad unary, grad init (empty without init), grad
// compat per kernel (symmetric)].
std::vector<at::Tensor> dense_crf_backward_cpu(const at::Tensor& grad, const at::Tensor& iterates,
                                               const at::Tensor& unary, at::TensorList features,
                                               at::TensorList compat, at::IntArrayRef normalization,
                                               int64_t iterations, const std::optional<at::Tensor>& init,
                                               double unary_scale) {
  check_dense_crf_args(unary, features, compat, normalization, iterations, init);
  const int64_t B = unary.size(0), L = unary.size(1), H = unary.size(2), W = unary.size(3), N = H * W;
  const int64_t T = iterations, K = int64_t(features.size());
  const bool recompute = iterates.size(0) == 1 && T > 0;
  TORCH_CHECK_VALUE(iterates.dim() == 5 && (iterates.size(0) == T + 1 || iterates.size(0) == 1) &&
                        iterates.sizes().slice(1) == unary.sizes() && grad.sizes() == iterates.sizes(),
                    "dense_crf_backward: grad and iterates must both be (iterations + 1 or 1, B, L, H, W) with "
                    "(B, L, H, W) of unary ", unary.sizes(), ", got ", grad.sizes(), " and ", iterates.sizes());
  TORCH_CHECK_TYPE(grad.scalar_type() == at::kFloat && iterates.scalar_type() == at::kFloat,
                   "dense_crf_backward: grad and iterates must be float32");
  const at::Tensor G = grad.contiguous(), Q = iterates.contiguous(), U = unary.contiguous();
  const at::Tensor Q0 = init.has_value() ? init->contiguous() : at::Tensor();
  at::Tensor grad_unary = at::empty_like(U, at::MemoryFormat::Contiguous);
  at::Tensor grad_init = init.has_value() ? at::empty_like(U, at::MemoryFormat::Contiguous)
                                          : at::empty({0}, U.options());
  const int lanes = int(lanes_for_labels(L));
  // sum over images, steps and pixels of [R_1; ..; R_K] Q^T, (K lanes) x lanes.
  at::Tensor grad_sym = at::zeros({K * lanes, lanes}, U.options());
  if (N > 0 && B > 0) {
    std::vector<at::Tensor> feats;
    for (const auto& f : features) feats.push_back(f.contiguous());
    const std::vector<KernelSpec> prototype = kernel_specs(features, compat, normalization, L);
    const int64_t chunks = pixel_chunks(N);
    PixelOrder& pixel_order = thread_pixel_order();
    const int64_t* order = tile_order(pixel_order, H, W);
    rethrow_bad_alloc("in the dense_crf backward", N, [&] {
      Workspace& ws = thread_workspace();
      at::Tensor recomputed = recompute ? at::empty({T, L, N}, U.options()) : at::Tensor();
      // Kept in the workspace: fresh pages cost more to fault in than a pass writing them.
      ws.r_rows.resize(N * K * lanes);
      ws.q_rows.resize(N * lanes);
      ws.grad_rows.resize(N * lanes);
      const at::Tensor r_rows = at::from_blob(ws.r_rows.data, {N, K * lanes}, U.options());
      const at::Tensor q_rows = at::from_blob(ws.q_rows.data, {N, lanes}, U.options());
      const float* q_data = Q.const_data_ptr<float>();
      const float* g_data = G.const_data_ptr<float>();
      for (int64_t b = 0; b < B; ++b) {
        const std::vector<KernelSpec> specs = image_specs(prototype, feats, b, N);
        prepare_kernels(ws.states, specs, H, W, chunks, lanes, order);
        if (recompute) {
          run_mean_field(U.const_data_ptr<float>() + b * L * N, float(unary_scale),
                         Q0.defined() ? Q0.const_data_ptr<float>() + b * L * N : nullptr,
                         recomputed.mutable_data_ptr<float>(), L * N, N, int(L), specs, T - 1, ws.states, ws.rows,
                         order, chunks);
        }
        // Q_t and the gradient reaching it directly (none for a recomputed iterate).
        auto q_at = [&](int64_t t) -> const float* {
          if (recompute) return t < T ? recomputed.const_data_ptr<float>() + t * L * N : q_data + b * L * N;
          return q_data + (t * B + b) * L * N;
        };
        auto g_at = [&](int64_t t) -> const float* {
          if (recompute) return t < T ? nullptr : g_data + b * L * N;
          return g_data + (t * B + b) * L * N;
        };
        std::vector<ReverseKernel> reverse(K);
        for (int64_t k = 0; k < K; ++k) {
          KernelState& st = ws.states[k];
          reverse[k] = ReverseKernel{st.lattice.d + 1, st.lattice.offset.data, st.lattice.weight.data, st.pre.data,
                                     st.post.data, nullptr, st.buffers.splat_ptrs.data(), specs[k].diagonal,
                                     specs[k].compat.data()};
        }
        ReverseArgs args{N,    int(L), lanes, int(K), reverse.data(), nullptr, nullptr, ws.grad_rows.data,
                         true, true, true,   nullptr, ws.r_rows.data, ws.q_rows.data, order};
        std::vector<const float*> sliced(K);
        for (int64_t t = T; t >= 0; --t) {
          if (t < T) {
            gather_and_blur_kernels(ws.states, int(K), true, sliced.data());
            for (int64_t k = 0; k < K; ++k) reverse[k].sliced = sliced[k];
          }
          args.q = q_at(t);
          args.direct = g_at(t);
          args.first_energy = t == T;
          args.energy = t > 0 || !init.has_value();
          args.splat = t > 0;
          args.grad_init = t == 0 && init.has_value() ? grad_init.mutable_data_ptr<float>() + b * L * N : nullptr;
          at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
            const FlushDenormals flush;
            for (int64_t c = begin; c < end; ++c) {
              run_reverse_pass(args, c, chunk_begin(N, chunks, c), chunk_begin(N, chunks, c + 1));
            }
          });
          if (t < T && K > 0) grad_sym.addmm_(r_rows.t(), q_rows);
        }
        // The unary's gradient, s times the gE sum, back to planes (zero if no gE: T = 0 with init).
        const bool any_energy = T > 0 || !init.has_value();
        float* planes = grad_unary.mutable_data_ptr<float>() + b * L * N;
        const float scale = float(unary_scale);
        at::parallel_for(0, N, 4096, [&](int64_t begin, int64_t end) {
          for (int64_t p = begin; p < end; ++p) {
            const int64_t pixel = order ? order[p] : p;
            const float* row = ws.grad_rows.data + p * lanes;
            for (int64_t l = 0; l < L; ++l) planes[l * N + pixel] = any_energy ? scale * row[l] : 0.0f;
          }
        });
      }
      if (N > kKeepWorkspacePixels) {
        ws = Workspace();
        pixel_order = PixelOrder();
      }
      return 0;
    });
  } else {
    grad_unary.zero_();
    grad_init.zero_();
  }
  std::vector<at::Tensor> out{grad_unary, grad_init};
  for (int64_t k = 0; k < K; ++k) {
    const at::Tensor g = grad_sym.narrow(0, k * lanes, L).narrow(1, 0, L);
    out.push_back(0.5 * (g + g.t()));
  }
  return out;
}

// The normalised lattice filter of values (B, C, *) with features (B or 1, D, *):
// F_n(v) = post * S^T B_d .. B_0 S (pre * v), or with transpose its exact transpose
// pre * S^T B_0 .. B_d S (post * v) (the adjoint a backward pass through F_n needs).
at::Tensor permutohedral_filter_cpu(const at::Tensor& values, const at::Tensor& features,
                                    int64_t normalization, bool transpose) {
  TORCH_CHECK_VALUE(values.dim() >= 2 && features.dim() == values.dim(),
                    "permutohedral_filter: values (B, C, *) and features (B, D, *) must have the same "
                    "rank >= 2, got ", values.sizes(), " and ", features.sizes());
  TORCH_CHECK_VALUE((features.size(0) == values.size(0) || features.size(0) == 1) &&
                        values.sizes().slice(2) == features.sizes().slice(2),
                    "permutohedral_filter: values ", values.sizes(), " and features ", features.sizes(),
                    " must agree in batch (or features batch 1) and in every dimension after the second");
  TORCH_CHECK_TYPE(values.scalar_type() == at::kFloat && features.scalar_type() == at::kFloat,
                   "permutohedral_filter: values and features must be float32, got ",
                   values.scalar_type(), " and ", features.scalar_type());
  TORCH_CHECK_VALUE(features.size(1) >= 1 && features.size(1) <= kMaxFeatures,
                    "permutohedral_filter: features must have 1 to ", kMaxFeatures, " channels, got ",
                    features.size(1));
  TORCH_CHECK_VALUE(normalization >= 0 && normalization <= 3,
                    "permutohedral_filter: normalization must be 0 to 3, got ", normalization);
  const int64_t B = values.size(0), C = values.size(1);
  const int64_t N = values.numel() / std::max<int64_t>(B * C, 1);
  at::Tensor out = at::empty(values.sizes(), values.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  const at::Tensor v = values.contiguous();
  const at::Tensor f = features.contiguous();
  const int d = int(f.size(1));
  const int lanes = int(C == 1 ? 1 : lanes_for(C));
  rethrow_bad_alloc("filtering", N, [&] {
    KernelState state;
    for (int64_t b = 0; b < B; ++b) {
      const int64_t chunks = pixel_chunks(N);
      const int64_t fb = f.size(0) == 1 ? 0 : b;
      build_lattice(state.lattice, f.const_data_ptr<float>() + fb * d * N, N, d, N, int(chunks));
      normalisers(state.lattice, normalization, chunks, state.pre, state.post, state.norm_buffers);
      state.buffers.allocate(state.lattice, lanes, chunks);
      filter_planes(state, v.const_data_ptr<float>() + b * C * N, int(C), transpose,
                    out.mutable_data_ptr<float>() + b * C * N);
    }
    return 0;
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastseg, CPU, m) {
  m.impl("dense_crf", &dense_crf_cpu);
  m.impl("permutohedral_filter", &permutohedral_filter_cpu);
  m.impl("dense_crf_iterates_cpp", &dense_crf_iterates_cpu);
  m.impl("dense_crf_backward_cpp", &dense_crf_backward_cpu);
}

}  // namespace fastseg
