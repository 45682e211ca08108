// Host interface of the bottleneck-adapter decode kernel (see lora_linear_decode.h for the conventions).
#pragma once

#include <cstdint>

#include "lora_linear_decode.h"

namespace fastpeft {

constexpr int64_t kMaxDecodeBottleneck = 256;

enum Activation : int { kRelu = 0, kGelu = 1, kSilu = 2, kGeluTanh = 3 };

struct AdapterDecodeArgs {
  // h: (M, d) rows of stride stride_hm, unit inner stride; w_down: (m, d), w_up: (d, m) contiguous; b_down (m,),
  // b_up (d,) or 0; res: (M, d) rows of stride stride_rm (h itself for a sequential adapter); act: (M, m) fp32
  // scratch; counters: 3 int32, zero; out: (M, d) rows of stride stride_om. All one dtype.
  uintptr_t h, w_down, b_down, w_up, b_up, res, act, counters, out;
  int64_t M, d, m, stride_hm, stride_rm, stride_om;
  float scaling;
  int activation;  // Activation
  int dtype;       // DType
  bool vector;     // 16-byte loads: d, m and the row strides multiples of 16/sizeof(dtype), aligned pointers
  int device;
  uintptr_t stream;
};

// out = res + scaling * (act(h w_down^T + b_down) w_up^T + b_up) for M <= 16 rows, one launch on `stream`.
void adapter_bottleneck_decode(const AdapterDecodeArgs& args);

}  // namespace fastpeft
