// Fused LoRA linear for decode shapes (M <= 16 rows), in one launch:
//     y = x W^T + b + s * (x A^T) B^T,   or for DoRA   y = c * (x W^T + s * (x A^T) B^T) + b   (c per column),
// or (IA)^3 with no low-rank term (R = 0)   y = (x W^T + b) * l   or   y = (x * l) W^T + b   (l per row of the batch
// when each row has its own task)
// (W may be a 4-bit NF4 base, its packed codes read and dequantised in the GEMV), or, for a mixed batch, each row m with its own adapter a_m of a stack: y_m = x_m W^T + b + (x_m A_{a_m}^T) B_{a_m}^T
// (B pre-scaled). The S blocks then compute x A^T against every stacked adapter's rows (at most 256 in all) and each
// row keeps its own adapter's part.
//
// Decode is bandwidth-bound on the read of W, so the kernel is a GEMV over the rows of W: each warp owns
// kRowsPerWarp rows, streams them with 16-byte loads (unrolled, so several loads are in flight), and keeps the
// M partial sums per row in registers. The low-rank term needs S = x A^T (M x r) in full before any row can
// finish; rather than a second launch, the first blocks compute S (rows of A, the same GEMV) and publish it,
// and the W blocks only wait for it after their own, much longer, pass over W. S is split over K as well as
// over A's rows (k_split partial sums, each block reading at most a quarter of what a W block reads), so its
// blocks finish well inside the W pass even at r=16, where one block per 16 rows of fp32 A once read 256 KB alone
// while the W blocks waited on it; each W block sums the partials into shared memory once.
//
// The hand-off uses the ticket/counter protocol of decode_common.cuh, which is what makes the wait safe.
#include "decode_common.cuh"
#include "lora_linear_decode.h"

namespace fastpeft {
namespace {

using namespace decode;

// A 4-bit (NF4) base weight (see DecodeArgs).
struct Nf4 {
  const float* code;          // 16 values
  const void* absmax;         // fp32, or uint8 when absmax_code is set
  const float* absmax_code;   // nullptr: absmax is fp32
  const float* absmax_scale;
  const float* absmax_offset;
  int64_t block, block2;
};

__device__ __forceinline__ float nf4_absmax(const Nf4& q, int64_t block) {
  if (q.absmax_code == nullptr) return static_cast<const float*>(q.absmax)[block];
  const uint8_t index = static_cast<const uint8_t*>(q.absmax)[block];
  // Rounded twice, never fused into one FMA: the absmax bitsandbytes and fastpeft.nf4 compute.
  return __fadd_rn(__fmul_rn(q.absmax_code[index], q.absmax_scale[block / q.block2]), *q.absmax_offset);
}

// The NF4 counterpart of warp_rows_dot over all of K: acc[i][m] = sum_k x[m, k] * W[row0 + i, k], each element of W
// dequantised as code[q] * absmax (fp32), rounded to T. Each lane reads 16 bytes of codes at a time: 32 elements of
// one block (K is a multiple of 32; the host sends other shapes elsewhere), with one absmax. `code` is the code book
// in shared memory.
template <typename T, int MAXM>
__device__ __forceinline__ void warp_rows_dot_nf4(const T* __restrict__ x, int64_t stride_xm, int M,
                                                  const uint8_t* __restrict__ codes, const Nf4& q,
                                                  const float* code, int64_t K, int64_t row0, int64_t rows,
                                                  float (&acc)[kRowsPerWarp][MAXM], const XScale& in_scale) {
  constexpr int VEC = 32;  // elements per load
  constexpr int XVEC = 16 / sizeof(T);  // x's elements per 16-byte load
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int i = 0; i < kRowsPerWarp; ++i)
#pragma unroll
    for (int m = 0; m < MAXM; ++m) acc[i][m] = 0.f;

  for (int64_t k = int64_t(lane) * VEC; k < K; k += 32 * VEC) {
    float wv[kRowsPerWarp][VEC];
#pragma unroll
    for (int i = 0; i < kRowsPerWarp; ++i) {
      const int64_t flat = (row0 + i) * K + k;
      if (row0 + i >= rows) {
#pragma unroll
        for (int v = 0; v < VEC; ++v) wv[i][v] = 0.f;
      } else {
        const uint4 pack = *reinterpret_cast<const uint4*>(codes + flat / 2);
        const uint32_t words[4] = {pack.x, pack.y, pack.z, pack.w};
        const float absmax = nf4_absmax(q, flat / q.block);
#pragma unroll
        for (int j = 0; j < 16; ++j) {
          const uint32_t byte = (words[j / 4] >> (8 * (j % 4))) & 0xFFu;  // little-endian: byte j of the 16
          wv[i][2 * j] = to_float(from_float<T>(code[byte >> 4] * absmax));
          wv[i][2 * j + 1] = to_float(from_float<T>(code[byte & 15u] * absmax));
        }
      }
    }
#pragma unroll
    for (int m = 0; m < MAXM; ++m) {
      if (m < M) {
#pragma unroll
        for (int v0 = 0; v0 < VEC; v0 += XVEC) {
          float xv[XVEC];
          load_floats<T, XVEC>(x + m * stride_xm + k + v0, xv);
          in_scale.apply<T, XVEC>(xv, m, k + v0);
#pragma unroll
          for (int i = 0; i < kRowsPerWarp; ++i)
#pragma unroll
            for (int v = 0; v < XVEC; ++v) acc[i][m] = fmaf(xv[v], wv[i][v0 + v], acc[i][m]);
        }
      }
    }
  }
#pragma unroll
  for (int i = 0; i < kRowsPerWarp; ++i)
#pragma unroll
    for (int m = 0; m < MAXM; ++m) acc[i][m] = warp_sum(acc[i][m]);
}

struct Params {
  const void* x;
  const void* w;
  const void* bias;  // nullptr: no bias
  const void* a;
  const void* b;
  float* s;          // (k_split, M, R) fp32 partial sums of S
  int* counters;     // [ticket, S tiles done, blocks finished], zero between launches
  void* y;
  const float* col_scale;  // nullptr: no column scale (plain LoRA)
  int64_t stride_col_scale;  // 0: one vector; else each row's own, rows this far apart
  const float* in_scale;   // (IA)^3's input scale, nullptr: none (see DecodeArgs)
  int64_t stride_in_scale;
  bool bias_first;
  const int* row_adapter;  // nullptr: one adapter; else (M,) adapter of each row of the stacks (-1: base)
  int64_t adapter_rank;    // with row_adapter: the rank of each stacked adapter (R = adapters * adapter_rank)
  Nf4 nf4;                 // a 4-bit base (the NF4 instantiation reads w as its packed codes)
  int64_t M, K, N, R, stride_xm, stride_ym;
  float scaling;
  int k_split;       // S's K range is split in this many chunks of k_chunk
  int64_t k_chunk;
  int s_tiles;       // ceil(R / kRowsPerBlock) * k_split
};

template <typename T, typename TA, int MAXM, bool VECTOR, bool NF4>
__global__ void __launch_bounds__(kThreads, 1) lora_linear_decode_kernel(Params p) {
  const int tile = take_tile(p.counters);
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int M = static_cast<int>(p.M);
  const T* x = static_cast<const T*>(p.x);
  float acc[kRowsPerWarp][MAXM];

  if (tile < p.s_tiles) {
    // A partial of S = x A^T: rows of A over one K chunk, through the same GEMV; lane m writes row i's S[m, r].
    const int part = tile % p.k_split;
    const int64_t row0 = int64_t(tile / p.k_split) * kRowsPerBlock + warp * kRowsPerWarp;
    const int64_t k_begin = part * p.k_chunk;
    const int64_t k_end = k_begin + p.k_chunk < p.K ? k_begin + p.k_chunk : p.K;
    warp_rows_dot<T, TA, MAXM, VECTOR>(x, p.stride_xm, M, static_cast<const TA*>(p.a), p.K, row0, p.R, acc,
                                       k_begin, k_end);
    float* s_part = p.s + part * p.M * p.R;
#pragma unroll
    for (int i = 0; i < kRowsPerWarp; ++i)
#pragma unroll
      for (int m = 0; m < MAXM; ++m)
        if (lane == m && m < M && row0 + i < p.R) s_part[m * p.R + row0 + i] = acc[i][m];
    publish(p.counters);
  } else {
    __shared__ float s_sum[kMaxDecodeRows * kMaxDecodeRank];
    const int64_t row0 = int64_t(tile - p.s_tiles) * kRowsPerBlock + warp * kRowsPerWarp;
    // (IA)^3's input scale multiplies x as the GEMV reads it (XScale), no scaled copy of x.
    const XScale in_scale{p.in_scale, p.stride_in_scale};
    if constexpr (NF4) {
      __shared__ float code[16];
      if (threadIdx.x < 16) code[threadIdx.x] = p.nf4.code[threadIdx.x];
      __syncthreads();
      warp_rows_dot_nf4<T, MAXM>(x, p.stride_xm, M, static_cast<const uint8_t*>(p.w), p.nf4, code, p.K,
                                 row0, p.N, acc, in_scale);
    } else {
      warp_rows_dot<T, T, MAXM, VECTOR>(x, p.stride_xm, M, static_cast<const T*>(p.w), p.K, row0, p.N, acc, 0, -1,
                                        in_scale);
    }
    wait_published(p.counters, p.s_tiles);
    for (int64_t idx = threadIdx.x; idx < p.M * p.R; idx += kThreads) {
      float total = 0.f;
      for (int part = 0; part < p.k_split; ++part) total += __ldcg(p.s + part * p.M * p.R + idx);  // L2: other blocks
      s_sum[idx] = total;
    }
    __syncthreads();
    const TA* b = static_cast<const TA*>(p.b);
    const T* bias = static_cast<const T*>(p.bias);
    T* y = static_cast<T*>(p.y);
#pragma unroll
    for (int i = 0; i < kRowsPerWarp; ++i) {
      const int64_t n = row0 + i;
      if (n >= p.N) break;  // warp-uniform
      float low[MAXM];
#pragma unroll
      for (int m = 0; m < MAXM; ++m) low[m] = 0.f;
      if (p.row_adapter == nullptr) {
        for (int64_t r = lane; r < p.R; r += 32) {
          const float bv = to_float(b[n * p.R + r]);
#pragma unroll
          for (int m = 0; m < MAXM; ++m)
            if (m < M) low[m] = fmaf(s_sum[m * p.R + r], bv, low[m]);
        }
      } else {  // each row its own adapter's slice of S and of the B stack
        const int64_t rank = p.adapter_rank;
#pragma unroll
        for (int m = 0; m < MAXM; ++m) {
          const int adapter = m < M ? p.row_adapter[m] : -1;
          if (adapter < 0) continue;  // the base alone (uniform across the warp)
          const TA* b_row = b + (int64_t(adapter) * p.N + n) * rank;
          for (int64_t r = lane; r < rank; r += 32)
            low[m] = fmaf(s_sum[m * p.R + adapter * rank + r], to_float(b_row[r]), low[m]);
        }
      }
      const float bias_n = bias != nullptr ? to_float(bias[n]) : 0.f;
#pragma unroll
      for (int m = 0; m < MAXM; ++m) {
        // (each row's own column scale when its rows are strided: (IA)^3 tasks)
        const float scale_n = p.col_scale != nullptr ? p.col_scale[(m < M ? m : 0) * p.stride_col_scale + n] : 1.f;
        const float sum = acc[i][m] + p.scaling * warp_sum(low[m]);
        const float total = p.bias_first ? (sum + bias_n) * scale_n : fmaf(sum, scale_n, bias_n);
        if (lane == m && m < M) y[m * p.stride_ym + n] = from_float<T>(total);
      }
    }
  }

  retire(p.counters);
}

template <typename T, typename TA, int MAXM>
void launch_m(const Params& p, bool vector, dim3 grid, cudaStream_t stream) {
  if (p.nf4.code != nullptr) {  // (always with 16-byte loads)
    lora_linear_decode_kernel<T, TA, MAXM, true, true><<<grid, kThreads, 0, stream>>>(p);
  } else if (vector) {
    lora_linear_decode_kernel<T, TA, MAXM, true, false><<<grid, kThreads, 0, stream>>>(p);
  } else {
    lora_linear_decode_kernel<T, TA, MAXM, false, false><<<grid, kThreads, 0, stream>>>(p);
  }
}

template <typename T, typename TA>
void launch_types(const Params& p, bool vector, dim3 grid, cudaStream_t stream) {
  if (p.M <= 1) launch_m<T, TA, 1>(p, vector, grid, stream);
  else if (p.M <= 2) launch_m<T, TA, 2>(p, vector, grid, stream);
  else if (p.M <= 4) launch_m<T, TA, 4>(p, vector, grid, stream);
  else if (p.M <= 8) launch_m<T, TA, 8>(p, vector, grid, stream);
  else launch_m<T, TA, 16>(p, vector, grid, stream);
}

}  // namespace

int device_count() {
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("fastpeft._C: no CUDA GPU or driver usable (cudaGetDeviceCount: ") +
                             cudaGetErrorName(err) + ": " + cudaGetErrorString(err) + ")");
  }
  return count;
}

void lora_linear_decode(const DecodeArgs& args) {
  if (args.M < 1 || args.M > kMaxDecodeRows) throw std::invalid_argument("fastpeft._C.lora_linear_decode: M must be in [1, 16]");
  if (args.R < 0 || args.R > kMaxDecodeRank) throw std::invalid_argument("fastpeft._C.lora_linear_decode: r must be in [0, 256]");
  if (args.R == 0 && (args.row_adapter != 0 || (args.in_scale == 0 && args.col_scale == 0))) {
    throw std::invalid_argument("fastpeft._C.lora_linear_decode: r = 0 is (IA)^3: an in_scale or col_scale, no row_adapter");
  }
  if (args.K < 1 || args.N < 1) throw std::invalid_argument("fastpeft._C.lora_linear_decode: K and N must be positive");
  if (args.row_adapter != 0 && (args.adapter_rank < 1 || args.R % args.adapter_rank != 0)) {
    throw std::invalid_argument("fastpeft._C.lora_linear_decode: R must be a whole number of adapters of adapter_rank");
  }
  if (args.nf4_code != 0 && (args.nf4_absmax == 0 || args.nf4_block < 32 || (args.nf4_block & (args.nf4_block - 1)) ||
                            (args.nf4_absmax_code != 0 && (args.nf4_absmax_scale == 0 || args.nf4_absmax_offset == 0 ||
                                                           args.nf4_block2 < 1)) ||
                            !args.vector || args.K % 32 != 0 || args.row_adapter != 0 ||
                            (args.col_scale != 0 && args.R != 0))) {
    throw std::invalid_argument("fastpeft._C.lora_linear_decode: inconsistent NF4 arguments");
  }
  if (args.k_split < 1 || args.k_chunk < 1 || args.k_split * args.k_chunk < args.K ||
      (args.k_split - 1) * args.k_chunk >= args.K) {
    throw std::invalid_argument("fastpeft._C.lora_linear_decode: k_split chunks of k_chunk must cover K exactly");
  }
  DeviceGuard guard(args.device, "lora_linear_decode");

  Params p{};
  p.x = reinterpret_cast<const void*>(args.x);
  p.w = reinterpret_cast<const void*>(args.w);
  p.bias = reinterpret_cast<const void*>(args.bias);
  p.a = reinterpret_cast<const void*>(args.a);
  p.b = reinterpret_cast<const void*>(args.b);
  p.s = reinterpret_cast<float*>(args.s);
  p.counters = reinterpret_cast<int*>(args.counters);
  p.y = reinterpret_cast<void*>(args.y);
  p.col_scale = reinterpret_cast<const float*>(args.col_scale);
  p.stride_col_scale = args.stride_col_scale;
  p.in_scale = reinterpret_cast<const float*>(args.in_scale);
  p.stride_in_scale = args.stride_in_scale;
  p.bias_first = args.bias_first;
  p.row_adapter = reinterpret_cast<const int*>(args.row_adapter);
  p.adapter_rank = args.adapter_rank;
  p.nf4 = Nf4{reinterpret_cast<const float*>(args.nf4_code), reinterpret_cast<const void*>(args.nf4_absmax),
              reinterpret_cast<const float*>(args.nf4_absmax_code), reinterpret_cast<const float*>(args.nf4_absmax_scale),
              reinterpret_cast<const float*>(args.nf4_absmax_offset), args.nf4_block, args.nf4_block2};
  p.M = args.M; p.K = args.K; p.N = args.N; p.R = args.R;
  p.stride_xm = args.stride_xm; p.stride_ym = args.stride_ym;
  p.scaling = args.scaling;
  p.k_split = static_cast<int>(args.k_split);
  p.k_chunk = args.k_chunk;
  p.s_tiles = static_cast<int>((args.R + kRowsPerBlock - 1) / kRowsPerBlock) * p.k_split;
  const int64_t blocks = p.s_tiles + (args.N + kRowsPerBlock - 1) / kRowsPerBlock;
  const dim3 grid(static_cast<unsigned>(blocks));
  auto stream = reinterpret_cast<cudaStream_t>(args.stream);

  using bf16 = __nv_bfloat16;
  switch (args.dtype * 3 + args.adapter_dtype) {
    case kHalf * 3 + kHalf: launch_types<__half, __half>(p, args.vector, grid, stream); break;
    case kHalf * 3 + kFloat: launch_types<__half, float>(p, args.vector, grid, stream); break;
    case kBFloat16 * 3 + kBFloat16: launch_types<bf16, bf16>(p, args.vector, grid, stream); break;
    case kBFloat16 * 3 + kFloat: launch_types<bf16, float>(p, args.vector, grid, stream); break;
    case kFloat * 3 + kFloat: launch_types<float, float>(p, args.vector, grid, stream); break;
    default:
      throw std::invalid_argument("fastpeft._C.lora_linear_decode: unsupported (dtype, adapter dtype) pair");
  }
  check(cudaGetLastError(), "lora_linear_decode kernel launch");
}

}  // namespace fastpeft
