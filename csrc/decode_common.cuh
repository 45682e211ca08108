// Device helpers shared by the decode kernels (M <= 16 rows): bandwidth-bound GEMVs over weight rows, and the
// ticket/counter protocol that lets one launch hand a small intermediate from its first blocks to the rest.
//
// Protocol (three int32 counters, zero between launches): every block takes its tile from an atomic ticket when it
// starts running, so a block holding a later tile started after every earlier tile was handed out — those blocks
// are resident and make progress, and waiting on them cannot deadlock (the ordering argument of single-pass
// "decoupled look-back" scans). Producer tiles publish; consumer tiles wait; the last block to retire resets the
// counters, so no memset launch is needed. The host gives each stream its own counters, and each launch captured in
// a CUDA graph counters of its own (fastpeft/cuda_ext.py), so no two launches that may overlap share them. A launch
// that stops half-way (a device fault) leaves them set, but a fault also ends the CUDA context: nothing launches
// on it again.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "lora_linear_decode.h"

namespace fastpeft {
namespace decode {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kRowsPerWarp = 2;
constexpr int kRowsPerBlock = kWarps * kRowsPerWarp;

template <typename T> __device__ __forceinline__ float to_float(T v);
template <> __device__ __forceinline__ float to_float<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// VEC consecutive elements in one load (16 bytes for the weights, VEC * sizeof(T) for x).
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

template <typename T, int VEC>
__device__ __forceinline__ void load_floats(const T* p, float (&out)[VEC]) {
  const Pack<T, VEC> pack = *reinterpret_cast<const Pack<T, VEC>*>(p);
#pragma unroll
  for (int i = 0; i < VEC; ++i) out[i] = to_float(pack.v[i]);
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// An optional scale of x's columns, applied as x is read ((IA)^3's input scale): row m of x times scale[m * stride +
// k] (stride 0: one vector), each product rounded to x's type, as a scaled copy of x would hold it.
struct XScale {
  const float* scale = nullptr;
  int64_t stride = 0;

  template <typename TX, int VEC>
  __device__ __forceinline__ void apply(float (&xv)[VEC], int m, int64_t k) const {
    if (scale == nullptr) return;  // (uniform: no divergence)
    const float* s = scale + m * stride + k;
#pragma unroll
    for (int v = 0; v < VEC; ++v) xv[v] = to_float(from_float<TX>(xv[v] * s[v]));
  }
};

// acc[i][m] = sum_{k in [k_begin, k_end)} x[m, k] * w[row0 + i, k] for this warp's rows (rows of w are K long),
// every lane holding the full sums. VECTOR: 16-byte loads of w (needs K and k_begin multiples of VEC and aligned
// rows); otherwise one element per load.
template <typename TX, typename TW, int MAXM, bool VECTOR>
__device__ __forceinline__ void warp_rows_dot(const TX* __restrict__ x, int64_t stride_xm, int M,
                                              const TW* __restrict__ w, int64_t K, int64_t row0, int64_t rows,
                                              float (&acc)[kRowsPerWarp][MAXM], int64_t k_begin = 0,
                                              int64_t k_end = -1, const XScale& x_scale = XScale{}) {
  if (k_end < 0) k_end = K;
  constexpr int VEC = VECTOR ? 16 / sizeof(TW) : 1;
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int i = 0; i < kRowsPerWarp; ++i)
#pragma unroll
    for (int m = 0; m < MAXM; ++m) acc[i][m] = 0.f;

#pragma unroll 2
  for (int64_t k = k_begin + int64_t(lane) * VEC; k < k_end; k += 32 * VEC) {
    float wv[kRowsPerWarp][VEC];
#pragma unroll
    for (int i = 0; i < kRowsPerWarp; ++i) {
      if (row0 + i < rows) {
        load_floats<TW, VEC>(w + (row0 + i) * K + k, wv[i]);
      } else {
#pragma unroll
        for (int v = 0; v < VEC; ++v) wv[i][v] = 0.f;
      }
    }
#pragma unroll
    for (int m = 0; m < MAXM; ++m) {
      if (m < M) {
        float xv[VEC];
        load_floats<TX, VEC>(x + m * stride_xm + k, xv);
        x_scale.apply<TX, VEC>(xv, m, k);
#pragma unroll
        for (int i = 0; i < kRowsPerWarp; ++i)
#pragma unroll
          for (int v = 0; v < VEC; ++v) acc[i][m] = fmaf(xv[v], wv[i][v], acc[i][m]);
      }
    }
  }
#pragma unroll
  for (int i = 0; i < kRowsPerWarp; ++i)
#pragma unroll
    for (int m = 0; m < MAXM; ++m) acc[i][m] = warp_sum(acc[i][m]);
}

// Counters: [0] ticket, [1] producer tiles published, [2] blocks retired.
__device__ __forceinline__ int take_tile(int* counters) {
  __shared__ int tile;
  if (threadIdx.x == 0) tile = atomicAdd(&counters[0], 1);
  __syncthreads();
  return tile;
}

// Call after this block's producer writes: every thread fences its own writes, then one announces them.
__device__ __forceinline__ void publish(int* counters) {
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) atomicAdd(&counters[1], 1);
}

// Returns once `producers` tiles have published; read their data with __ldcg (L2) afterwards.
__device__ __forceinline__ void wait_published(int* counters, int producers) {
  if (threadIdx.x == 0) {
    while (atomicAdd(&counters[1], 0) < producers) __nanosleep(64);
    __threadfence();
  }
  __syncthreads();
}

__device__ __forceinline__ void retire(int* counters) {
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();
    if (atomicAdd(&counters[2], 1) == static_cast<int>(gridDim.x) - 1) {
      counters[0] = 0;
      counters[1] = 0;
      counters[2] = 0;
      __threadfence();
    }
  }
}

inline void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("fastpeft._C: ") + what + " failed: " + cudaGetErrorName(err) + ": " +
                             cudaGetErrorString(err));
  }
}

// Check that `device` exists, select it for the launch, and restore the caller's device afterwards (torch shares
// the CUDA context). `op` names the caller in errors.
class DeviceGuard {
 public:
  DeviceGuard(int device, const char* op) {
    const int count = device_count();
    if (count == 0) throw std::runtime_error("fastpeft._C: no CUDA GPU (cudaGetDeviceCount found none)");
    if (device < 0 || device >= count) {
      throw std::invalid_argument(std::string("fastpeft._C.") + op + ": device " + std::to_string(device) +
                                  " out of range (" + std::to_string(count) + " CUDA devices)");
    }
    check(cudaGetDevice(&previous_), "cudaGetDevice");
    check(cudaSetDevice(device), "cudaSetDevice");
  }
  ~DeviceGuard() { cudaSetDevice(previous_); }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = 0;
};

}  // namespace decode
}  // namespace fastpeft
