// pybind11 bindings of fastpeft._C. Errors from CUDA come back as RuntimeError with the CUDA error string,
// bad arguments as ValueError.
#include <pybind11/pybind11.h>

#include <string>

#include "adapter_bottleneck_decode.h"
#include "lora_linear_decode.h"

namespace py = pybind11;

#ifndef FASTPEFT_CUDA_ARCHS
#define FASTPEFT_CUDA_ARCHS "unknown"
#endif

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastpeft's compiled CUDA kernels (takes device pointers; no libtorch dependency)";
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const std::invalid_argument& e) {
      PyErr_SetString(PyExc_ValueError, e.what());
    }
  });
  m.def("device_count", &fastpeft::device_count,
        "Number of CUDA devices; RuntimeError with the CUDA error when there is no usable GPU or driver.");
  m.def(
      "lora_linear_decode",
      [](uintptr_t x, uintptr_t w, uintptr_t bias, uintptr_t a, uintptr_t b, uintptr_t s, uintptr_t counters,
         uintptr_t y, int64_t M, int64_t K, int64_t N, int64_t R, int64_t stride_xm, int64_t stride_ym,
         int64_t k_split, int64_t k_chunk, float scaling, int dtype, int adapter_dtype, bool vector, int device,
         uintptr_t stream, uintptr_t col_scale, uintptr_t row_adapter, int64_t adapter_rank, uintptr_t nf4_code,
         uintptr_t nf4_absmax, uintptr_t nf4_absmax_code, uintptr_t nf4_absmax_scale, uintptr_t nf4_absmax_offset,
         int64_t nf4_block, int64_t nf4_block2, uintptr_t in_scale, int64_t stride_in_scale,
         int64_t stride_col_scale, bool bias_first) {
        fastpeft::DecodeArgs args{x, w, bias, a, b, s, counters, y, col_scale, row_adapter, adapter_rank,
                                  nf4_code, nf4_absmax, nf4_absmax_code, nf4_absmax_scale, nf4_absmax_offset,
                                  nf4_block, nf4_block2, in_scale, stride_in_scale, stride_col_scale, bias_first,
                                  M, K, N, R, stride_xm, stride_ym, k_split, k_chunk, scaling,
                                  dtype, adapter_dtype, vector, device, stream};
        py::gil_scoped_release release;
        fastpeft::lora_linear_decode(args);
      },
      py::arg("x"), py::arg("w"), py::arg("bias"), py::arg("a"), py::arg("b"), py::arg("s"), py::arg("counters"),
      py::arg("y"), py::arg("M"), py::arg("K"), py::arg("N"), py::arg("R"), py::arg("stride_xm"),
      py::arg("stride_ym"), py::arg("k_split"), py::arg("k_chunk"), py::arg("scaling"), py::arg("dtype"),
      py::arg("adapter_dtype"), py::arg("vector"),
      py::arg("device"), py::arg("stream"), py::arg("col_scale") = 0, py::arg("row_adapter") = 0,
      py::arg("adapter_rank") = 0, py::arg("nf4_code") = 0, py::arg("nf4_absmax") = 0, py::arg("nf4_absmax_code") = 0,
      py::arg("nf4_absmax_scale") = 0, py::arg("nf4_absmax_offset") = 0, py::arg("nf4_block") = 0,
      py::arg("nf4_block2") = 0, py::arg("in_scale") = 0, py::arg("stride_in_scale") = 0,
      py::arg("stride_col_scale") = 0, py::arg("bias_first") = false,
      "Fused LoRA linear (or, with R = 0, (IA)^3) for M <= 16 rows (see csrc/lora_linear_decode.h); launches "
      "asynchronously on `stream`.");
  m.def(
      "adapter_bottleneck_decode",
      [](uintptr_t h, uintptr_t w_down, uintptr_t b_down, uintptr_t w_up, uintptr_t b_up, uintptr_t res,
         uintptr_t act, uintptr_t counters, uintptr_t out, int64_t M, int64_t d, int64_t bottleneck,
         int64_t stride_hm, int64_t stride_rm, int64_t stride_om, float scaling, int activation, int dtype,
         bool vector, int device, uintptr_t stream) {
        fastpeft::AdapterDecodeArgs args{h, w_down, b_down, w_up, b_up, res, act, counters, out, M, d, bottleneck,
                                         stride_hm, stride_rm, stride_om, scaling, activation, dtype, vector,
                                         device, stream};
        py::gil_scoped_release release;
        fastpeft::adapter_bottleneck_decode(args);
      },
      py::arg("h"), py::arg("w_down"), py::arg("b_down"), py::arg("w_up"), py::arg("b_up"), py::arg("res"),
      py::arg("act"), py::arg("counters"), py::arg("out"), py::arg("M"), py::arg("d"), py::arg("m"),
      py::arg("stride_hm"), py::arg("stride_rm"), py::arg("stride_om"), py::arg("scaling"), py::arg("activation"),
      py::arg("dtype"), py::arg("vector"), py::arg("device"), py::arg("stream"),
      "The whole bottleneck adapter for M <= 16 rows (see csrc/adapter_bottleneck_decode.h); asynchronous on `stream`.");
  m.attr("cuda_archs") = std::string(FASTPEFT_CUDA_ARCHS);
  m.attr("max_decode_bottleneck") = fastpeft::kMaxDecodeBottleneck;
  m.attr("max_decode_rows") = fastpeft::kMaxDecodeRows;
  m.attr("max_decode_rank") = fastpeft::kMaxDecodeRank;
}
