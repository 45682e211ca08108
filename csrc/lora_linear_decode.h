// Host interface of the CUDA kernels: plain integers and device pointers, no libtorch, so one build of
// fastpeft._C serves every torch version. The Python side validates every argument before it gets here.
#pragma once

#include <cstdint>

namespace fastpeft {

enum DType : int { kHalf = 0, kBFloat16 = 1, kFloat = 2 };

constexpr int64_t kMaxDecodeRows = 16;
constexpr int64_t kMaxDecodeRank = 256;

struct DecodeArgs {
  // Device pointers (as integers). x: (M, K) rows of stride stride_xm, unit inner stride; w: (N, K) contiguous;
  // bias: (N,) or 0; a: (R, K) and b: (N, R) contiguous; s: (k_split, M, R) fp32 scratch; counters: 3 int32,
  // zero, used by no launch that may overlap this one; y: (M, N) rows of stride stride_ym; col_scale: (N,) fp32 or 0
  // (DoRA: y = col_scale * (x w^T + scaling * (x a^T) b^T) + bias).
  uintptr_t x, w, bias, a, b, s, counters, y, col_scale;
  // Mixed adapters: row_adapter (M,) int32, the adapter of each row (-1: the base alone), or 0 for one adapter;
  // then a and b stack the adapters, (n, adapter_rank, K) and (n, N, adapter_rank) with each B pre-scaled, and
  // R = n * adapter_rank.
  uintptr_t row_adapter;
  int64_t adapter_rank;
  // A 4-bit (NF4) base, when nf4_code is not 0: w holds W's packed codes (two per byte, the first element of a pair
  // in the high nibble, row-major over (N, K)), nf4_code the 16 NF4 values (fp32), nf4_absmax one absmax per block of
  // nf4_block elements: fp32, or uint8 indices into nf4_absmax_code (256 fp32) scaled per nf4_block2 absmaxes by
  // nf4_absmax_scale (fp32) plus *nf4_absmax_offset (fp32) when nf4_absmax_code is not 0. Each element is
  // code[q] * absmax in fp32, rounded to dtype, as the weight would be dequantised.
  uintptr_t nf4_code, nf4_absmax, nf4_absmax_code, nf4_absmax_scale, nf4_absmax_offset;
  int64_t nf4_block, nf4_block2;
  // (IA)^3 (R = 0: no low-rank term, a and b unused): in_scale, fp32 rows of stride_in_scale (0: one vector for every
  // row), multiplies x's columns as they are read, each product rounded to dtype (PEFT's scaled copy of x);
  // col_scale's rows are stride_col_scale apart (0: one vector); bias_first adds the bias before the column scale,
  // y = col_scale * (x w^T + bias).
  uintptr_t in_scale;
  int64_t stride_in_scale, stride_col_scale;
  bool bias_first;
  int64_t M, K, N, R, stride_xm, stride_ym;
  int64_t k_split, k_chunk;  // S = x a^T is summed from k_split partials over K chunks of k_chunk (multiples of
                             // 16/sizeof(adapter dtype) when vector)
  float scaling;
  int dtype;          // DType of x, w, bias, y
  int adapter_dtype;  // DType of a, b: the same as dtype, or kFloat
  bool vector;        // 16-byte loads: K and stride_xm multiples of 16/sizeof(dtype), pointers 16-byte aligned (NF4:
                      // required, with K a multiple of 32, so each 16 bytes of codes are 32 elements of one block)
  int device;
  uintptr_t stream;   // cudaStream_t of the device
};

// Number of CUDA devices; throws with the CUDA error string when there is no usable GPU or driver.
int device_count();

// y = [col_scale *] (x w^T + scaling * (x a^T) b^T) + bias for M <= 16 rows, one kernel launch on `stream`; with
// row_adapter, row m takes adapter row_adapter[m] of the stacks; with R = 0, (IA)^3: y = ([x * in_scale] w^T + bias)
// [* col_scale] (bias_first), each row with its own scales when their row strides are not 0.
void lora_linear_decode(const DecodeArgs& args);

}  // namespace fastpeft
