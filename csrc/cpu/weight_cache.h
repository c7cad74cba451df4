// Forms derived from a layer's weights (atrous.cpp's Winograd transforms, gcn.cpp's spectra), kept
// for the weights last used. Inference runs a layer with the same weights on every call, and
// deriving them again can cost as much as the layer's GEMMs. An entry is reused only while the
// weights' bytes equal its copy of them (a memcmp), so in-place changes, ones that bypass the
// version counter included, are never missed. One budget for every op: 512 MiB, or
// FASTSEG_WINOGRAD_CACHE_MB (read once; 0 keeps nothing), least recently used entries dropped first.
#pragma once

#include <ATen/ATen.h>

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
    static DerivedWeightCache cache;
    return cache.lookup(op, weight, key, derive);
  }

 private:
  struct Entry {
    std::string op;
    at::Tensor weight;
    std::vector<double> key;
    at::Tensor derived;
  };

  at::Tensor lookup(const std::string& op, const at::Tensor& weight, const std::vector<double>& key,
                    const std::function<at::Tensor()>& derive) {
    const at::Tensor w = weight.contiguous();
    const int64_t nbytes = int64_t(w.nbytes());
    {
      std::lock_guard<std::mutex> lock(mutex_);
      for (auto it = entries_.begin(); it != entries_.end(); ++it) {
        if (it->op == op && it->key == key && it->weight.sizes() == w.sizes() &&
            it->weight.scalar_type() == w.scalar_type() &&
            std::memcmp(it->weight.const_data_ptr(), w.const_data_ptr(), nbytes) == 0) {
          entries_.splice(entries_.begin(), entries_, it);
          return it->derived;
        }
      }
    }
    at::Tensor derived = derive();
    const int64_t bytes = nbytes + int64_t(derived.nbytes());
    if (bytes > limit_bytes()) return derived;  // would evict itself: not kept, and the weights not copied
    Entry e{op, w.clone(), key, derived};
    std::lock_guard<std::mutex> lock(mutex_);
    entries_.push_front(e);
    bytes_ += bytes;
    while (bytes_ > limit_bytes() && !entries_.empty()) {
      const Entry& last = entries_.back();
      bytes_ -= int64_t(last.weight.nbytes() + last.derived.nbytes());
      entries_.pop_back();
    }
    return derived;
  }

  static int64_t limit_bytes() {
    static const int64_t bytes = env_setting("FASTSEG_WINOGRAD_CACHE_MB", 512, 0) << 20;
    return bytes;
  }

  std::mutex mutex_;
  std::list<Entry> entries_;
  int64_t bytes_ = 0;
};

}  // namespace fastseg
