"""Kernel-level GPU timings of the LoRA linear, side by side in one process (run by bench/gpu_check.sh).

Training shapes (--part gemm): the base ``torch.mm`` (x Wᵀ forward, dY W backward), the fused Triton launchers,
and the unfused torch path, without autograd overhead. FLOPs and bytes are counted first; times are reported
with achieved TFLOP/s, the ratio to torch.mm, and the share of a roofline built from the device's nominal peaks.

Decode shapes (--part decode): the CUDA decode kernel (fastpeft._C) against torch.mm of the base alone, the
unfused torch path, HF PEFT's layer and the Triton path, as time and as GB/s over the bytes of W, next to the
device's copy bandwidth measured in the same run.

QLoRA (--part qlora): over a 4-bit (NF4, double-quantised) base, the fused forward (W's tiles dequantised as they
load) and dX GEMM against torch.mm on the bf16 weight and against dequantising the whole weight then torch.mm (what
Unsloth and torchao do); and the CUDA decode kernel at M = 1 as GB/s over the packed weight (codes and absmaxes)
beside the copy bandwidth.

Decode step under CUDA graphs (--part graphs): the projections of 32 Llama-7B-sized blocks at M = 1 and 16, with
LoRA r=16 on every linear and without, eagerly and replayed from a CUDA graph.

    python bench/gpu_kernels.py [--part gemm|decode|qlora|graphs|all] [--markdown PATH] [--shape M,K,N,r ...]
"""
import argparse
import datetime

import torch
from triton.testing import do_bench

from fastpeft.ops.lora_linear import LORA_LINEAR_BACKENDS

# Nominal datasheet peaks (dense bf16 TFLOP/s, HBM TB/s): for a roofline, not a measurement.
NOMINAL_PEAKS = {"H100 PCIe": (756.0, 2.0), "H100": (989.4, 3.35), "H200": (989.4, 4.8), "A100": (312.0, 2.0)}


def nominal_peaks(name):
    for key, peaks in NOMINAL_PEAKS.items():  # most specific names first
        if key in name:
            return peaks
    return None


def median_ms(fn):
    return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))


def measure(M, K, N, r, dtype, dropout):
    torch.manual_seed(0)
    dev = "cuda"
    x = torch.randn(M, K, device=dev, dtype=dtype)
    w = torch.randn(N, K, device=dev, dtype=dtype) * K ** -0.5
    a = torch.randn(r, K, device=dev) * K ** -0.5  # fp32 adapters, as LoraLinear holds them on a half base
    b = torch.randn(N, r, device=dev) * r ** -0.5
    dy = torch.randn(M, N, device=dev, dtype=dtype)
    seed, s = 1234, 2.0
    from fastpeft.kernels import lora_linear as kernels

    fused, unfused = LORA_LINEAR_BACKENDS["triton"], LORA_LINEAR_BACKENDS["torch"]
    _, S, _, _ = fused.forward(x, w, None, a, b, s, dropout, seed)
    _, s_torch, drop, _ = unfused.forward(x, w, None, a, b, s, dropout, seed)
    col_scale = torch.rand(N, device=dev) + 0.5  # DoRA's m / ‖W + s·BA‖
    _, _, _, pre = fused.forward(x, w, None, a, b, s, dropout, seed, col_scale, True)
    y, dx = torch.empty(M, N, device=dev, dtype=dtype), torch.empty(M, K, device=dev, dtype=dtype)
    dS = torch.randn(M, r, device=dev)
    es = x.element_size()
    rows = {
        "fwd torch.mm (base)": (lambda: torch.mm(x, w.t()), 2 * M * N * K, (M * K + N * K + M * N) * es),
        "fwd fused triton": (lambda: fused.forward(x, w, None, a, b, s, dropout, seed),
                             2 * M * N * K + 2 * M * r * (K + N), (2 * M * K + N * K + M * N) * es),
        "fwd fused GEMM alone": (lambda: kernels.lora_gemm(x, w.t(), S, b.t(), None, y, s, schedule="prologue"),
                                 2 * M * N * K + 2 * M * r * N, (M * K + N * K + M * N) * es),
        "fwd fused GEMM alone, low-rank term last": (
            lambda: kernels.lora_gemm(x, w.t(), S, b.t(), None, y, s, schedule="epilogue"),
            2 * M * N * K + 2 * M * r * N, (M * K + N * K + M * N) * es),
        "fwd GEMM alone, cuBLAS base + low-rank pass": (
            lambda: kernels.lora_gemm(x, w.t(), S, b.t(), None, y, s, schedule="cublas"),
            2 * M * N * K + 2 * M * r * N, (M * K + N * K + 3 * M * N) * es),
        "fwd GEMM alone, persistent TMA": (
            lambda: kernels.lora_gemm(x, w.t(), S, b.t(), None, y, s, schedule="tma"),
            2 * M * N * K + 2 * M * r * N, (M * K + N * K + M * N) * es),
        "fwd fused triton, DoRA (scale + pre kept)": (
            lambda: fused.forward(x, w, None, a, b, s, dropout, seed, col_scale, True),
            2 * M * N * K + 2 * M * r * (K + N), (2 * M * K + N * K + 2 * M * N) * es),
        "DoRA row norm (triton kernel)": (lambda: kernels.dora_norm(w, a, b, s), 2 * N * K * r, N * K * es),
        "fwd unfused torch": (lambda: unfused.forward(x, w, None, a, b, s, dropout, seed),
                              2 * M * N * K + 2 * M * r * (K + N), (2 * M * K + N * K + 2 * M * N) * es),
        "bwd torch.mm (dX base)": (lambda: torch.mm(dy, w), 2 * M * N * K, (M * N + N * K + M * K) * es),
        "bwd fused triton": (lambda: fused.backward(dy, x, w, a, b, S, None, seed, s, dropout,
                                                    True, True, True, False),
                             2 * M * N * K + 6 * M * r * (K + N), (2 * M * N + N * K + 2 * M * K) * es),
        "bwd fused triton, DoRA (dm too)": (
            lambda: fused.backward(dy, x, w, a, b, S, None, seed, s, dropout, True, True, True, False,
                                   col_scale=col_scale, pre=pre),
            2 * M * N * K + 6 * M * r * (K + N), (4 * M * N + N * K + 2 * M * K) * es),
        "bwd dX GEMM alone": (lambda: kernels.lora_gemm(dy, w, dS, a, None, dx, 1.0 / (1.0 - dropout), seed, dropout,
                                                        schedule="prologue"),
                              2 * M * N * K + 2 * M * r * K, (M * N + N * K + M * K) * es),
        "bwd dX GEMM alone, low-rank term last": (
            lambda: kernels.lora_gemm(dy, w, dS, a, None, dx, 1.0 / (1.0 - dropout), seed, dropout,
                                      schedule="epilogue"),
            2 * M * N * K + 2 * M * r * K, (M * N + N * K + M * K) * es),
        "bwd dX GEMM alone, cuBLAS base + low-rank pass": (
            lambda: kernels.lora_gemm(dy, w, dS, a, None, dx, 1.0 / (1.0 - dropout), seed, dropout, schedule="cublas"),
            2 * M * N * K + 2 * M * r * K, (M * N + N * K + 3 * M * K) * es),
        "bwd dX GEMM alone, persistent TMA": (
            lambda: kernels.lora_gemm(dy, w, dS, a, None, dx, 1.0 / (1.0 - dropout), seed, dropout, schedule="tma"),
            2 * M * N * K + 2 * M * r * K, (M * N + N * K + M * K) * es),
        "bwd unfused torch": (lambda: unfused.backward(dy, x, w, a, b, s_torch, drop, seed, s, dropout,
                                                       True, True, True, False),
                              2 * M * N * K + 6 * M * r * (K + N), (3 * M * N + N * K + 3 * M * K) * es),
    }
    timed = {name: (median_ms(fn), flops, bytes_) for name, (fn, flops, bytes_) in rows.items()}
    print(f"autotune winners (M={M} K={K} N={N} r={r} dropout={dropout:g}): {kernels.autotune_winners()}", flush=True)
    return timed


def copy_bandwidth_gbs() -> float:
    """Device-to-device copy bandwidth (read + write bytes / time) of a 1 GiB buffer, measured now."""
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.numel() / (median_ms(lambda: dst.copy_(src)) * 1e-3) / 1e9


def decode_paths(x, w, a, b, peft_layer, lora_linear_decode):
    """The decode-shape candidates, each a zero-argument callable (adapters fp32, scaling 2, no bias)."""
    return {
        "torch.mm (base only)": lambda: torch.mm(x, w.t()),
        "fastpeft cuda decode": lambda: lora_linear_decode(x, w, None, a, b, 2.0),
        "fastpeft triton": lambda: LORA_LINEAR_BACKENDS["triton"].forward(x, w, None, a, b, 2.0, 0.0, 0),
        "unfused torch": lambda: LORA_LINEAR_BACKENDS["torch"].forward(x, w, None, a, b, 2.0, 0.0, 0),
        "HF PEFT layer": lambda: peft_layer(x),
    }


def decode_section(dtype, markdown):
    from peft import LoraConfig
    from peft.tuners.lora import Linear as PeftLinear

    from fastpeft import BottleneckAdapter, cuda_ext

    copy_gbs = copy_bandwidth_gbs()
    lines = [f"Device copy bandwidth measured in this run: {copy_gbs:.0f} GB/s.", "",
             "| M | K | N | r | path | median µs | × torch.mm | GB/s over W | % of copy bandwidth |",
             "|---|---|---|---|---|---|---|---|---|"]
    print(lines[0], flush=True)
    for K, N in ((4096, 4096), (4096, 14336)):
        for r in (16, 64):
            torch.manual_seed(0)
            w = torch.randn(N, K, device="cuda", dtype=dtype) * K ** -0.5
            a = torch.randn(r, K, device="cuda") * K ** -0.5
            b = torch.randn(N, r, device="cuda") * r ** -0.5
            peft_layer = PeftLinear(torch.nn.Linear(K, N, bias=False, device="cuda", dtype=dtype), "default",
                                    config=LoraConfig(r=r, lora_alpha=2 * r), r=r, lora_alpha=2 * r)
            peft_layer.lora_A["default"].weight = torch.nn.Parameter(a.clone())
            peft_layer.lora_B["default"].weight = torch.nn.Parameter(b.clone())
            peft_layer.eval()
            for M in (1, 4, 16):
                x = torch.randn(M, K, device="cuda", dtype=dtype)
                paths = decode_paths(x, w, a, b, peft_layer, cuda_ext.lora_linear_decode)
                with torch.no_grad():
                    times = {path: median_ms(fn) for path, fn in paths.items()}
                base = times["torch.mm (base only)"]
                for path, ms in times.items():
                    gbs = N * K * w.element_size() / (ms * 1e-3) / 1e9
                    line = (f"| {M} | {K} | {N} | {r} | {path} | {ms * 1e3:.1f} | {ms / base:.3f} | {gbs:.0f} | "
                            f"{100 * gbs / copy_gbs:.0f}% |")
                    lines.append(line)
                    print(line, flush=True)
    lines += ["", "Bottleneck adapter, whole adapter per call (GB/s over the bytes of W_d and W_u):", "",
              "| M | d | m | path | median µs | × unfused torch | GB/s over weights |", "|---|---|---|---|---|---|---|"]
    for m in (64, 256):
        d = 4096
        torch.manual_seed(0)
        ours = {backend: BottleneckAdapter(d, bottleneck=m, activation="gelu", device="cuda", dtype=dtype,
                                           backend=backend) for backend in ("torch", "triton", "cuda")}
        for layer in list(ours.values())[1:]:
            layer.load_state_dict(ours["torch"].state_dict())
        for M in (1, 4, 16):
            h = torch.randn(M, d, device="cuda", dtype=dtype)
            with torch.no_grad():
                times = {f"fastpeft {name}": median_ms(lambda layer=layer, h=h: layer(h))
                         for name, layer in ours.items()}
            base = times["fastpeft torch"]
            for path, ms in times.items():
                gbs = 2 * d * m * h.element_size() / (ms * 1e-3) / 1e9
                line = f"| {M} | {d} | {m} | {path} | {ms * 1e3:.1f} | {ms / base:.3f} | {gbs:.0f} |"
                lines.append(line)
                print(line, flush=True)
    if markdown:
        with open(markdown, "a") as f:
            f.write(f"\n## Decode (M <= 16), {dtype}, {torch.cuda.get_device_name(0)}\n\n"
                    "triton.testing.do_bench medians, no autograd (torch.no_grad); adapters fp32.\n\n"
                    + "\n".join(lines) + "\n")


def qlora_section(dtype, markdown, M=8192, K=4096, N=4096, r=16):
    from fastpeft import cuda_ext, quantize_nf4
    from fastpeft.kernels import lora_linear as kernels

    torch.manual_seed(0)
    w = torch.randn(N, K, device="cuda", dtype=dtype) * K ** -0.5
    q = quantize_nf4(w)
    a = torch.randn(r, K, device="cuda") * K ** -0.5
    b = torch.randn(N, r, device="cuda") * r ** -0.5
    x = torch.randn(M, K, device="cuda", dtype=dtype)
    dy = torch.randn(M, N, device="cuda", dtype=dtype)
    s = torch.randn(M, r, device="cuda")
    triton = LORA_LINEAR_BACKENDS["triton"]
    rows = {
        "fwd torch.mm (bf16 W, base only)": lambda: torch.mm(x, w.t()),
        "fwd fastpeft triton LoRA (bf16 W)": lambda: triton.forward(x, w, None, a, b, 2.0, 0.0, 0),
        "fwd fastpeft triton QLoRA (NF4 W, fused)": lambda: triton.forward(x, q, None, a, b, 2.0, 0.0, 0),
        "fwd fastpeft triton:cublas QLoRA (NF4 W, chunks dequantised for cuBLAS)":
            lambda: LORA_LINEAR_BACKENDS["triton:cublas"].forward(x, q, None, a, b, 2.0, 0.0, 0),
        "fwd dequantise W, then torch.mm": lambda: torch.mm(x, q.dequantize().t()),
        "bwd torch.mm (dX base, bf16 W)": lambda: torch.mm(dy, w),
        "bwd fastpeft triton QLoRA dX (NF4 W, fused)": lambda: kernels.lora_bwd(dy, x, q, a, b, s, 2.0, 0.0, 0,
                                                                              True, False, False, False),
    }
    copy_gbs = copy_bandwidth_gbs()
    lines = [f"M={M} K={K} N={N} r={r}, {dtype}; the NF4 weight takes {q.nbytes / 2**20:.2f} MiB "
             f"({q.nbytes / (w.numel() * w.element_size()):.3f}x the bf16 weight). Device copy bandwidth measured in "
             f"this run: {copy_gbs:.0f} GB/s.", "", "| kernel | median ms | × torch.mm |", "|---|---|---|"]
    print(lines[0], flush=True)
    times = {}
    for name, fn in rows.items():
        times[name] = median_ms(fn)
        base = times["fwd torch.mm (bf16 W, base only)" if name.startswith("fwd")
                     else "bwd torch.mm (dX base, bf16 W)"]
        lines.append(f"| {name} | {times[name]:.4f} | {times[name] / base:.3f} |")
        print(lines[-1], flush=True)
    lines += ["", "Decode over the NF4 base (cuda kernel, M rows): GB/s over the packed weight's bytes.", "",
              "| M | K | N | path | median µs | GB/s over W | % of copy bandwidth |", "|---|---|---|---|---|---|---|"]
    for K2, N2 in ((4096, 4096), (4096, 14336)):
        w2 = torch.randn(N2, K2, device="cuda", dtype=dtype) * K2 ** -0.5
        q2 = quantize_nf4(w2)
        a2, b2 = torch.randn(r, K2, device="cuda") * K2 ** -0.5, torch.randn(N2, r, device="cuda") * r ** -0.5
        for M2 in (1, 16):
            x2 = torch.randn(M2, K2, device="cuda", dtype=dtype)
            paths = {"fastpeft cuda decode (NF4)": (q2.nbytes, lambda x2=x2, q2=q2, a2=a2, b2=b2:
                                                    cuda_ext.lora_linear_decode(x2, q2, None, a2, b2, 2.0)),
                     "torch.mm (bf16 W, base only)": (w2.numel() * w2.element_size(),
                                                      lambda x2=x2, w2=w2: torch.mm(x2, w2.t()))}
            for path, (nbytes, fn) in paths.items():
                ms = median_ms(fn)
                gbs = nbytes / (ms * 1e-3) / 1e9
                lines.append(f"| {M2} | {K2} | {N2} | {path} | {ms * 1e3:.1f} | {gbs:.0f} | "
                             f"{100 * gbs / copy_gbs:.0f}% |")
                print(lines[-1], flush=True)
    if markdown:
        with open(markdown, "a") as f:
            f.write(f"\n## QLoRA kernels, {dtype}, {torch.cuda.get_device_name(0)}\n\n"
                    "triton.testing.do_bench medians, no autograd.\n\n" + "\n".join(lines) + "\n")


def llama_projections(layers, hidden, intermediate, kv, dtype, device="cuda"):
    """The seven projections of ``layers`` Llama blocks as one chain of linears (q, k, v, o, gate, up, down), M
    tokens in, the attention and the elementwise ops left out: what LoRA adds to a decode step is in these."""
    shapes = [(hidden, hidden), (hidden, kv), (hidden, kv), (hidden, hidden), (hidden, intermediate),
              (hidden, intermediate), (intermediate, hidden)]
    blocks = []
    for _ in range(layers):
        for k, n in shapes:
            blocks.append(torch.nn.Linear(k, n, bias=False, device=device, dtype=dtype))
    return blocks


class Chain(torch.nn.Module):
    """Runs each projection on its own input width (q, k, v, o read the hidden state; down reads the MLP's)."""

    def __init__(self, blocks, hidden, intermediate):
        super().__init__()
        self.blocks = torch.nn.ModuleList(blocks)
        self.hidden, self.intermediate = hidden, intermediate

    def forward(self, h, g):
        out = h
        for block in self.blocks:
            out = block(g if block.in_features == self.intermediate else h)
        return out


def graphed_ms(model, inputs):
    """Median ms of one replay of ``model(*inputs)`` captured in a CUDA graph (warmed up eagerly first)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.no_grad():
        for _ in range(3):
            model(*inputs)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        model(*inputs)
    return median_ms(graph.replay)


def graphs_section(dtype, markdown):
    """A Llama-style decode step (32 blocks of 7B's projections, M = 1 and 16) with LoRA r=16 on every linear,
    against the same step without LoRA, both under CUDA graphs; and eagerly, where host time shows."""
    import copy

    import fastpeft
    hidden, intermediate, kv, layers = 4096, 11008, 4096, 32
    torch.manual_seed(0)
    base = Chain(llama_projections(layers, hidden, intermediate, kv, dtype), hidden, intermediate).eval()
    lora = fastpeft.apply_lora(copy.deepcopy(base), target_modules=r"blocks\.\d+", r=16, lora_alpha=32,
                               init_lora_weights=False).eval()
    lines = ["| M | mode | without LoRA ms | with LoRA (fastpeft, auto) ms | × without |", "|---|---|---|---|---|"]
    for M in (1, 16):
        h = torch.randn(M, hidden, device="cuda", dtype=dtype)
        g = torch.randn(M, intermediate, device="cuda", dtype=dtype)
        with torch.no_grad():
            eager = [median_ms(lambda model=model, h=h, g=g: model(h, g)) for model in (base, lora)]
        graphed = [graphed_ms(model, (h, g)) for model in (base, lora)]
        for mode, (plain, ours) in (("eager", eager), ("CUDA graph", graphed)):
            line = f"| {M} | {mode} | {plain:.3f} | {ours:.3f} | {ours / plain:.3f} |"
            lines.append(line)
            print(line, flush=True)
    if markdown:
        with open(markdown, "a") as f:
            f.write(f"\n## Decode step under CUDA graphs, {dtype}, {torch.cuda.get_device_name(0)}\n\n"
                    f"{layers} blocks of q, k, v, o, gate, up, down ({hidden}/{intermediate}), no attention; LoRA r=16 "
                    "on every linear; do_bench medians (target: CUDA graph × without ≤ 1.15).\n\n"
                    + "\n".join(lines) + "\n")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--part", default="all", choices=["gemm", "decode", "qlora", "graphs", "all"])
    parser.add_argument("--markdown", help="append the table to this markdown file")
    parser.add_argument("--shape", action="append", help="M,K,N,r (repeatable; training shapes)")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    args = parser.parse_args()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    if args.part in ("decode", "all"):
        decode_section(dtype, args.markdown)
    if args.part in ("qlora", "all"):
        qlora_section(dtype, args.markdown)
    if args.part in ("graphs", "all"):
        graphs_section(dtype, args.markdown)
    if args.part in ("decode", "qlora", "graphs"):
        return
    shapes = [tuple(int(v) for v in s.split(",")) for s in args.shape] if args.shape else \
        [(8192, 4096, 4096, 16), (8192, 4096, 14336, 16), (8192, 14336, 4096, 64)]
    name = torch.cuda.get_device_name(0)
    peaks = nominal_peaks(name)
    lines = ["| shape | dropout | kernel | median ms | × torch.mm | TFLOP/s | roofline ms (nominal) | % of roofline |",
             "|---|---|---|---|---|---|---|---|"]
    for M, K, N, r in shapes:
        for dropout in (0.0, 0.1):
            res = measure(M, K, N, r, dtype, dropout)
            for kernel, (ms, flops, bytes_) in res.items():
                base = res["fwd torch.mm (base)" if kernel.startswith("fwd") else "bwd torch.mm (dX base)"][0]
                roof = max(flops / (peaks[0] * 1e12), bytes_ / (peaks[1] * 1e12)) * 1e3 if peaks else None
                line = (f"| M={M} K={K} N={N} r={r} | {dropout:g} | {kernel} | {ms:.4f} | {ms / base:.3f} | "
                        f"{flops / (ms * 1e-3) / 1e12:.1f} | {f'{roof:.4f}' if roof else '-'} | "
                        f"{f'{100 * roof / ms:.0f}%' if roof else '-'} |")
                lines.append(line)
                print(line, flush=True)
    if args.markdown:
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        with open(args.markdown, "a") as f:
            f.write(f"\n## Kernels, {args.dtype}, {name}\n\n{stamp}; triton.testing.do_bench medians; roofline from "
                    f"nominal peaks {peaks} (TFLOP/s, TB/s).\n\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
