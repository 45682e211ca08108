"""Kernel-level GPU timings of the LoRA linear, side by side in one process (run by bench/gpu_check.sh).

For each shape: the base ``torch.mm`` (x Wᵀ forward, dY W backward), the fused Triton launchers, and the unfused
torch path, without autograd overhead. FLOPs and bytes are counted first; times are reported with achieved
TFLOP/s, the ratio to torch.mm, and the share of a roofline built from the device's nominal peaks.

    python bench/gpu_kernels.py [--markdown PATH] [--shape M,K,N,r ...]
"""
import argparse
import datetime

import torch
from triton.testing import do_bench

from fastpeft.kernels import lora as triton_lora
from fastpeft.ops.lora_linear import _torch_lora_bwd, _torch_lora_fwd

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
    _, S = triton_lora.lora_fwd(x, w, None, a, b, s, dropout, seed)
    _, s_torch, drop = _torch_lora_fwd(x, w, None, a, b, s, dropout, seed)
    es = x.element_size()
    rows = {
        "fwd torch.mm (base)": (lambda: torch.mm(x, w.t()), 2 * M * N * K, (M * K + N * K + M * N) * es),
        "fwd fused triton": (lambda: triton_lora.lora_fwd(x, w, None, a, b, s, dropout, seed),
                             2 * M * N * K + 2 * M * r * (K + N), (2 * M * K + N * K + M * N) * es),
        "fwd unfused torch": (lambda: _torch_lora_fwd(x, w, None, a, b, s, dropout, seed),
                              2 * M * N * K + 2 * M * r * (K + N), (2 * M * K + N * K + 2 * M * N) * es),
        "bwd torch.mm (dX base)": (lambda: torch.mm(dy, w), 2 * M * N * K, (M * N + N * K + M * K) * es),
        "bwd fused triton": (lambda: triton_lora.lora_bwd(dy, x, w, a, b, S, s, dropout, seed,
                                                          True, True, True, False),
                             2 * M * N * K + 6 * M * r * (K + N), (2 * M * N + N * K + 2 * M * K) * es),
        "bwd unfused torch": (lambda: _torch_lora_bwd(dy, x, w, a, b, s_torch, drop, s, dropout,
                                                      True, True, True, False),
                              2 * M * N * K + 6 * M * r * (K + N), (3 * M * N + N * K + 3 * M * K) * es),
    }
    return {name: (median_ms(fn), flops, bytes_) for name, (fn, flops, bytes_) in rows.items()}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--markdown", help="append the table to this markdown file")
    parser.add_argument("--shape", action="append", help="M,K,N,r (repeatable)")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    args = parser.parse_args()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
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
