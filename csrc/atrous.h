// Atrous convolution's CPU kernel as the other CPU kernels see it (unpool_conv.cpp).
#pragma once

#include "common.h"

namespace fastseg {

// Whether atrous_conv2d's 'auto' takes its winograd path for a float32 (B, C, H, W) input and
// (O, C, kH, kW) weights at stride 1 and groups 1 with this padding and dilation: the choice by
// measured cost (csrc/cpu/atrous.cpp), for a caller that convolves many pieces of one map and
// wants to lay out its weights for the path they will take.
bool atrous_takes_winograd(int64_t B, int64_t C, int64_t H, int64_t W, int64_t O, int64_t kH, int64_t kW,
                           at::IntArrayRef padding, at::IntArrayRef dilation, bool channels_last);

}  // namespace fastseg
