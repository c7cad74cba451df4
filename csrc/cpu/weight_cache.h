// Forms derived from a layer's weights (atrous.cpp's Winograd transforms, gcn.cpp's spectra), kept
// for the weights last used. Inference runs a layer with the same weights on every call, and
// deriving them again can cost as much as the layer's GEMMs. An entry is reused only while the
// weights' bytes equal its copy of them (a memcmp), so in-place changes, ones that bypass the
// version counter included, are never missed. One budget for every op: 512 MiB, or
// FASTSEG_WINOGRAD_CACHE_MB (read once; 0 keeps nothing).
//
// When a new entry does not fit, room is made only from stale entries (least recently used first):
// ones not used for twice their own reuse period (plus a few lookups), or for kMinStaleLookups
// lookups when never reused. Otherwise the new one is not kept. A model's forward pass uses each
// layer once per pass, in the same order; with plain LRU, a pass whose entries outgrow the budget
// evicts every entry just before its next use (the converted DeepLab v3 of fastseg.models, about
// 600 MiB of transforms on an AVX-512 Xeon: 755 ms a pass against 488 ms with the budget at 768 MiB,
// measured 2026-11-29). Kept this way, the entries that fit stay and keep hitting; those of weights
// no longer used age out.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <atomic>
#include <cstring>
#include <functional>
#include <list>
#include <mutex>
#include <string>
#include <vector>

#include "common.h"

namespace fastseg {

class DerivedWeightCache {
 public:
  // derive() for weight, or its result kept from a call with the same op, key and weight bytes. The
  // key names what op derives (its own numbers: a transform's rows, a length, ...).
  static at::Tensor get(const char* op, const at::Tensor& weight, const std::vector<double>& key,
                        const std::function<at::Tensor()>& derive) {
    return instance().lookup(op, weight, key, derive);
  }

  // Whether get() would most likely find or keep a derived form of derived_bytes for weights of this
  // shape: an entry of the same op, key and shape is kept (its bytes are compared only by get), or
  // there is room for one, counting stale entries as free. Ops whose derived form pays only when
  // kept choose their route by it.
  static bool likely_kept(const char* op, const at::Tensor& weight, const std::vector<double>& key,
                          int64_t derived_bytes) {
    return instance().would_keep(op, weight, key, derived_bytes);
  }

 private:
  static DerivedWeightCache& instance() {
    static DerivedWeightCache cache;
    return cache;
  }

  bool would_keep(const std::string& op, const at::Tensor& weight, const std::vector<double>& key,
                  int64_t derived_bytes) {
    const int64_t bytes = int64_t(weight.numel() * weight.element_size()) + derived_bytes;
    if (bytes > limit_bytes()) return false;
    std::lock_guard<std::mutex> lock(mutex_);
    int64_t freeable = 0;
    for (const Entry& e : entries_) {
      if (same_kind(e, op, key, weight)) return true;
      if (stale(e)) freeable += entry_bytes(e);
    }
    return bytes_ - freeable + bytes <= limit_bytes();
  }

  struct Entry {
    std::string op;
    at::Tensor weight;
    std::vector<double> key;
    at::Tensor derived;
    int64_t used;    // lookup count at its last use
    int64_t period;  // lookups between its last two uses (0: not reused yet)
  };

  // An entry never reused goes stale after this many lookups: more than a model's cached layers, so
  // that a model's first pass keeps what fits. A reused one after twice its period and this slack:
  // a layer called over and over (a benchmark, a loop) makes room soon after its calls stop.
  static constexpr int64_t kMinStaleLookups = 256;
  static constexpr int64_t kStaleSlack = 4;

  // Same op, key, shape and dtype: the same layer's derived form unless the weights' bytes differ.
  static bool same_kind(const Entry& e, const std::string& op, const std::vector<double>& key,
                        const at::Tensor& weight) {
    return e.op == op && e.key == key && e.weight.sizes() == weight.sizes() &&
           e.weight.scalar_type() == weight.scalar_type();
  }

  // memcmp, split between the threads for large weights: one thread compared 18 MiB in 1.7 ms, a
  // tenth of a 2048 -> 256 layer's winograd call at 17x17 (Intel Xeon, 2026-11-29).
  static bool same_bytes(const void* a, const void* b, int64_t n) {
    if (n < kParallelCompareBytes || at::in_parallel_region()) {
      return std::memcmp(a, b, size_t(n)) == 0;
    }
    std::atomic<bool> same{true};
    at::parallel_for(0, n, kParallelCompareBytes / 2, [&](int64_t lo, int64_t hi) {
      if (same.load(std::memory_order_relaxed) &&
          std::memcmp(static_cast<const char*>(a) + lo, static_cast<const char*>(b) + lo, size_t(hi - lo)) != 0) {
        same.store(false, std::memory_order_relaxed);
      }
    });
    return same.load();
  }
  static constexpr int64_t kParallelCompareBytes = int64_t(1) << 20;

  static int64_t entry_bytes(const Entry& e) { return int64_t(e.weight.nbytes() + e.derived.nbytes()); }

  bool stale(const Entry& e) const {
    const int64_t age = lookups_ - e.used;
    return e.period > 0 ? age > 2 * e.period + kStaleSlack : age > kMinStaleLookups;
  }

  at::Tensor lookup(const std::string& op, const at::Tensor& weight, const std::vector<double>& key,
                    const std::function<at::Tensor()>& derive) {
    const at::Tensor w = weight.contiguous();
    const int64_t nbytes = int64_t(w.nbytes());
    {
      std::lock_guard<std::mutex> lock(mutex_);
      ++lookups_;
      for (auto it = entries_.begin(); it != entries_.end(); ++it) {
        if (same_kind(*it, op, key, w) && same_bytes(it->weight.const_data_ptr(), w.const_data_ptr(), nbytes)) {
          it->period = lookups_ - it->used;
          it->used = lookups_;
          entries_.splice(entries_.begin(), entries_, it);
          return it->derived;
        }
      }
    }
    at::Tensor derived = derive();
    const int64_t bytes = nbytes + int64_t(derived.nbytes());
    if (bytes > limit_bytes()) return derived;  // would evict itself: not kept, and the weights not copied
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto it = entries_.end(); bytes_ + bytes > limit_bytes() && it != entries_.begin();) {
      --it;
      if (!stale(*it)) continue;
      bytes_ -= entry_bytes(*it);
      it = entries_.erase(it);
    }
    if (bytes_ + bytes > limit_bytes()) return derived;  // the entries in use stay; this one is not kept
    entries_.push_front(Entry{op, w.clone(), key, derived, lookups_, 0});
    bytes_ += bytes;
    return derived;
  }

  static int64_t limit_bytes() {
    static const int64_t bytes = env_setting("FASTSEG_WINOGRAD_CACHE_MB", 512, 0) << 20;
    return bytes;
  }

  std::mutex mutex_;
  std::list<Entry> entries_;
  int64_t bytes_ = 0;
  int64_t lookups_ = 0;
};

}  // namespace fastseg
