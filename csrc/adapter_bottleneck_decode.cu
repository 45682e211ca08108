// The whole bottleneck adapter for decode shapes (M <= 16 rows) in one launch:
//     out = res + s * (act(h W_d^T + b_d) W_u^T + b_u)
//
// Two bandwidth-bound GEMVs with a dependency between them. The first tiles stream the rows of W_d and publish
// act(pre) (M x m, fp32); the other tiles wait for it (the protocol of decode_common.cuh), stage it in shared
// memory, and stream the rows of W_u, adding bias, scale and residual as they write the output.
#include "adapter_bottleneck_decode.h"
#include "decode_common.cuh"

namespace fastpeft {
namespace {

using namespace decode;

struct Params {
  const void* h;
  const void* w_down;
  const void* b_down;  // nullptr: none
  const void* w_up;
  const void* b_up;    // nullptr: none
  const void* res;
  float* act;
  int* counters;
  void* out;
  int64_t M, d, m, stride_hm, stride_rm, stride_om;
  float scaling;
  int activation;
  int down_tiles;
};

__device__ __forceinline__ float activate(float z, int activation) {
  switch (activation) {
    case kRelu: return fmaxf(z, 0.f);
    case kGelu: return 0.5f * z * (1.f + erff(z * 0.70710678118654752f));
    case kSilu: return z / (1.f + __expf(-z));
    default: return 0.5f * z * (1.f + tanhf(0.79788456080286536f * (z + 0.044715f * z * z * z)));
  }
}

template <typename T, int MAXM, bool VECTOR>
__global__ void __launch_bounds__(kThreads, 1) adapter_bottleneck_decode_kernel(Params p) {
  __shared__ __align__(32) float act_s[kMaxDecodeRows * kMaxDecodeBottleneck];
  const int tile = take_tile(p.counters);
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int M = static_cast<int>(p.M);
  float acc[kRowsPerWarp][MAXM];

  if (tile < p.down_tiles) {
    // act(pre) for this tile's rows of W_d; lane mm writes row i's value for batch row mm.
    const int64_t row0 = int64_t(tile) * kRowsPerBlock + warp * kRowsPerWarp;
    warp_rows_dot<T, T, MAXM, VECTOR>(static_cast<const T*>(p.h), p.stride_hm, M, static_cast<const T*>(p.w_down),
                                      p.d, row0, p.m, acc);
    const T* b_down = static_cast<const T*>(p.b_down);
#pragma unroll
    for (int i = 0; i < kRowsPerWarp; ++i) {
      const int64_t j = row0 + i;
      if (j >= p.m) break;  // warp-uniform
      const float bias = b_down != nullptr ? to_float(b_down[j]) : 0.f;
#pragma unroll
      for (int mm = 0; mm < MAXM; ++mm)
        if (lane == mm && mm < M) p.act[mm * p.m + j] = activate(acc[i][mm] + bias, p.activation);
    }
    publish(p.counters);
  } else {
    wait_published(p.counters, p.down_tiles);
    for (int64_t idx = threadIdx.x; idx < p.M * p.m; idx += kThreads) act_s[idx] = __ldcg(p.act + idx);
    __syncthreads();
    const int64_t row0 = int64_t(tile - p.down_tiles) * kRowsPerBlock + warp * kRowsPerWarp;
    warp_rows_dot<float, T, MAXM, VECTOR>(act_s, p.m, M, static_cast<const T*>(p.w_up), p.m, row0, p.d, acc);
    const T* b_up = static_cast<const T*>(p.b_up);
    const T* res = static_cast<const T*>(p.res);
    T* out = static_cast<T*>(p.out);
#pragma unroll
    for (int i = 0; i < kRowsPerWarp; ++i) {
      const int64_t n = row0 + i;
      if (n >= p.d) break;  // warp-uniform
      const float bias = b_up != nullptr ? to_float(b_up[n]) : 0.f;
#pragma unroll
      for (int mm = 0; mm < MAXM; ++mm)
        if (lane == mm && mm < M)
          out[mm * p.stride_om + n] =
              from_float<T>(to_float(res[mm * p.stride_rm + n]) + p.scaling * (acc[i][mm] + bias));
    }
  }
  retire(p.counters);
}

template <typename T, int MAXM>
void launch_m(const Params& p, bool vector, dim3 grid, cudaStream_t stream) {
  if (vector) {
    adapter_bottleneck_decode_kernel<T, MAXM, true><<<grid, kThreads, 0, stream>>>(p);
  } else {
    adapter_bottleneck_decode_kernel<T, MAXM, false><<<grid, kThreads, 0, stream>>>(p);
  }
}

template <typename T>
void launch_type(const Params& p, bool vector, dim3 grid, cudaStream_t stream) {
  if (p.M <= 1) launch_m<T, 1>(p, vector, grid, stream);
  else if (p.M <= 2) launch_m<T, 2>(p, vector, grid, stream);
  else if (p.M <= 4) launch_m<T, 4>(p, vector, grid, stream);
  else if (p.M <= 8) launch_m<T, 8>(p, vector, grid, stream);
  else launch_m<T, 16>(p, vector, grid, stream);
}

}  // namespace

void adapter_bottleneck_decode(const AdapterDecodeArgs& args) {
  if (args.M < 1 || args.M > kMaxDecodeRows) {
    throw std::invalid_argument("fastpeft._C.adapter_bottleneck_decode: M must be in [1, 16]");
  }
  if (args.m < 1 || args.m > kMaxDecodeBottleneck) {
    throw std::invalid_argument("fastpeft._C.adapter_bottleneck_decode: the bottleneck m must be in [1, 256]");
  }
  if (args.d < 1) throw std::invalid_argument("fastpeft._C.adapter_bottleneck_decode: d must be positive");
  if (args.activation < kRelu || args.activation > kGeluTanh) {
    throw std::invalid_argument("fastpeft._C.adapter_bottleneck_decode: unknown activation code");
  }
  DeviceGuard guard(args.device, "adapter_bottleneck_decode");
  Params p{};
  p.h = reinterpret_cast<const void*>(args.h);
  p.w_down = reinterpret_cast<const void*>(args.w_down);
  p.b_down = reinterpret_cast<const void*>(args.b_down);
  p.w_up = reinterpret_cast<const void*>(args.w_up);
  p.b_up = reinterpret_cast<const void*>(args.b_up);
  p.res = reinterpret_cast<const void*>(args.res);
  p.act = reinterpret_cast<float*>(args.act);
  p.counters = reinterpret_cast<int*>(args.counters);
  p.out = reinterpret_cast<void*>(args.out);
  p.M = args.M; p.d = args.d; p.m = args.m;
  p.stride_hm = args.stride_hm; p.stride_rm = args.stride_rm; p.stride_om = args.stride_om;
  p.scaling = args.scaling;
  p.activation = args.activation;
  p.down_tiles = static_cast<int>((args.m + kRowsPerBlock - 1) / kRowsPerBlock);
  const dim3 grid(static_cast<unsigned>(p.down_tiles + (args.d + kRowsPerBlock - 1) / kRowsPerBlock));
  auto stream = reinterpret_cast<cudaStream_t>(args.stream);
  switch (args.dtype) {
    case kHalf: launch_type<__half>(p, args.vector, grid, stream); break;
    case kBFloat16: launch_type<__nv_bfloat16>(p, args.vector, grid, stream); break;
    case kFloat: launch_type<float>(p, args.vector, grid, stream); break;
    default: throw std::invalid_argument("fastpeft._C.adapter_bottleneck_decode: unsupported dtype");
  }
  check(cudaGetLastError(), "adapter_bottleneck_decode kernel launch");
}

}  // namespace fastpeft
