"""Command line: ``python -m fastpeft info``, ``python -m fastpeft bench [--quick]`` and
``python -m fastpeft report [--quick] [--out DIR]``."""
from __future__ import annotations

import argparse
import datetime
import os
import sys
from pathlib import Path

import torch

from . import __version__
from .backends import ENV_VAR, backend_status, check_environment, requested_backend, triton_interpreting
from .checks import is_probability

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def info(_args, _parser) -> int:
    print(f"fastpeft {__version__}  torch {torch.__version__}  python {sys.version.split()[0]}")
    try:
        import triton
        interpreter = ""
        if triton_interpreting():  # whether it can is the backend's to say (the reasons listed below)
            runs = not backend_status()["triton"]
            interpreter = ("  (TRITON_INTERPRET=1: kernels run on the CPU interpreter)" if runs
                           else "  (TRITON_INTERPRET=1, but the interpreter cannot run here: see backends)")
        print(f"triton {triton.__version__}{interpreter}")
    except ImportError:
        print("triton: not installed")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            print(f"cuda:{i} {p.name}  compute capability {p.major}.{p.minor}")
    else:
        print("cuda: no GPU visible to torch")
    print(f"{ENV_VAR}={os.environ.get(ENV_VAR, '')!r} -> {requested_backend(None)}")
    from . import cuda_ext
    print(f"extension fastpeft._C: {cuda_ext.status()}")
    from . import auto
    measuring = "measures" if auto.measuring_enabled() else f"rule order ({auto.MEASURE_ENV}=0)"
    where = ""
    if torch.cuda.is_available() and auto.measuring_enabled():
        cache = auto.cache_path(torch.device("cuda"))
        where = f"; winners stored in {cache if cache else 'memory only'}"
    print(f"auto: the torch path on CPU tensors; on CUDA tensors {measuring}{where}")
    from .environment import GEMM_SCHEDULE_ENV, GEMM_SCHEDULES, gemm_schedule_env
    schedule = gemm_schedule_env()
    print(f"triton's fused GEMM: {schedule} ({GEMM_SCHEDULE_ENV})" if schedule else
          f"triton's fused GEMM: auto measures its schedules ({', '.join(GEMM_SCHEDULES)}); prologue by name")
    print("backends:")
    for name, reasons in backend_status().items():
        print(f"  {name:7s} " + ("available" if not reasons else "unavailable: " + "; ".join(reasons)))
    return 0


def _check_environment(measuring: bool) -> None:
    """Every setting fastpeft takes from the environment, checked before anything runs (ValueError naming a bad
    one). ``bench`` and ``report`` (``measuring``) build layers on the backend $FASTPEFT_BACKEND names, which must
    then be able to run here."""
    check_environment()
    name = requested_backend(None)
    reasons = backend_status()[name] if measuring and name != "auto" else []
    if reasons:
        raise ValueError(f"{ENV_VAR}={name}, but the {name} backend cannot run here: " + "; ".join(reasons))


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _shape(text: str):
    from .benchmarks.timing import Shape
    try:
        M, K, N, r = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected M,K,N,r (four integers), got {text!r}") from None
    if min(M, K, N, r) < 1:
        raise argparse.ArgumentTypeError(f"M, K, N and r must be positive, got {text!r}")
    return Shape(M, K, N, r)


def _probability(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = None
    if not is_probability(value):  # what the layers take as dropout
        raise argparse.ArgumentTypeError(f"expected a probability in [0, 1), got {text!r}")
    return value


def _device(text: str) -> torch.device:
    """``--device`` as a torch device this machine has."""
    try:
        device = torch.device(text)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"expected cpu or cuda, got {text!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text}, but torch sees no CUDA GPU")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise argparse.ArgumentTypeError(f"{text}, but torch sees {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}")
    return device


def _device_arguments(parser) -> None:
    parser.add_argument("--device", type=_device, default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="default fp32 on CPU, bf16 on CUDA")


# What ``bench`` measures, in the order it runs them: the names --only takes, and each one's title.
BENCH_SECTIONS = {"lora": "LoRA linear", "overhead": "Host overhead and the token sweep", "dora": "DoRA",
                  "qlora": "QLoRA (LoRA over an NF4 base)", "mixed": "Mixed-adapter batches",
                  "adapters": "Bottleneck adapter", "ia3": "(IA)³",
                  "peft-step": "A PeftModel's training step, fused",
                  "merging": "Merging adapters (add_weighted_adapter)"}


def _cannot_write(path: Path) -> str | None:
    """Why ``path`` cannot be written (None when it can), found by opening it for append: that changes no file
    already there, and a file it creates is removed again."""
    existed = os.path.lexists(path)
    try:
        with open(path, "a"):
            pass
    except OSError as err:
        return err.strerror or str(err)
    if not existed:
        os.remove(path)
    return None


def bench(args, parser) -> int:
    from .benchmarks import timing

    # The tables are appended after each benchmark: a file found unwritable only then would lose the results.
    if args.markdown and (reason := _cannot_write(Path(args.markdown))):
        parser.error(f"argument --markdown: cannot append to {args.markdown}: {reason}")
    device = args.device
    cuda = device.type == "cuda"
    dtype = DTYPES[args.dtype or ("bf16" if cuda else "fp32")]
    if args.shape:
        shapes = args.shape
    elif args.quick:
        shapes = timing.QUICK_SHAPES
    else:
        shapes = timing.GPU_SHAPES if cuda else timing.CPU_SHAPES
    # --quick keeps one dropout setting, the libraries' default: each setting times every LoRA-family candidate again.
    dropouts = args.dropout if args.dropout is not None else ([0.0] if args.quick else [0.0, 0.1])
    rounds = args.rounds or (5 if args.quick else 10 if cuda else 30)
    chosen = [name for name in BENCH_SECTIONS if args.only in (None, name)]
    missing = [("HF PEFT", timing.import_problem("peft"))]
    if "qlora" in chosen:
        missing.append(("PEFT over bitsandbytes' 4-bit layers", timing.import_problem("bitsandbytes")))
    for what, problem in missing:
        if problem is not None:
            print(f"note: {what} is not compared: {problem}")
    description = timing.device_description(device)
    print(f"fastpeft bench on {description}, {args.dtype or dtype}, {rounds} rounds", flush=True)

    def lora(progress):
        return timing.format_table(timing.run(shapes, dtype, device, dropouts, rounds, progress=progress))

    def overhead(progress):
        tokens = timing.SWEEP_TOKENS[:3] if args.quick else timing.SWEEP_TOKENS
        return timing.format_overhead_table(timing.run_overhead(dtype, device, rounds, tokens, progress))

    def dora(progress):
        results, saved = timing.run_dora(shapes, dtype, device, dropouts, rounds, progress)
        return (timing.format_table(results, reference=timing.DORA_REFERENCE) + "\n\n"
                + timing.format_saved_table(saved))

    def qlora(progress):
        results, sizes = timing.run_nf4(shapes[:1] if args.quick else shapes, dtype, device, dropouts, rounds,
                                           progress)
        return (timing.format_table(results, reference=timing.NF4_REFERENCE) + "\n\n"
                + timing.format_weight_bytes(sizes))

    def mixed(progress):
        if cuda:  # the GPU target is at 64 adapters
            counts = (64,) if args.quick else (1, 16, 64)
        else:
            counts = (16,) if args.quick else timing.MIXED_ADAPTER_COUNTS
        # a GPU: the headline training shape, 64 sequences of 128 tokens (M=8192) at K=N=4096
        width, sequences = (4096, 64) if cuda else (1024, timing.MIXED_SEQUENCES)
        results = timing.run_mixed(counts, width, width, dtype=dtype, device=device, rounds=rounds,
                                      progress=progress, sequences=sequences)
        return timing.format_mixed_table(results, sequences)

    def adapters(progress):
        if cuda:
            adapter_shapes = timing.ADAPTER_GPU_SHAPES[:1] if args.quick else timing.ADAPTER_GPU_SHAPES
        else:
            adapter_shapes = timing.ADAPTER_QUICK_SHAPES if args.quick else timing.ADAPTER_SHAPES
        return timing.format_table(timing.run_adapters(adapter_shapes, dtype, device, rounds, progress),
                                      reference="unfused (AdapterHub way)", base_name="unfused (AdapterHub way)")

    def ia3(progress):
        from .benchmarks import ia3 as bench_ia3
        if args.shape:  # each given shape with both scales (r is not used)
            ia3_shapes = [bench_ia3.Ia3Shape(s.M, s.K, s.N, ff) for s in args.shape for ff in (False, True)]
        else:
            ia3_shapes = (bench_ia3.IA3_GPU_SHAPES if cuda else bench_ia3.IA3_QUICK_SHAPES if args.quick
                          else bench_ia3.IA3_CPU_SHAPES)
        results, saved = bench_ia3.run_ia3(ia3_shapes, dtype, device, rounds, progress)
        return (timing.format_table(results, reference=bench_ia3.IA3_REFERENCE) + "\n\n"
                + timing.format_saved_table(saved, reference=bench_ia3.IA3_REFERENCE))

    def peft_step(progress):
        from .benchmarks import peft_step as step
        if (problem := timing.import_problem("peft")) is not None:
            return f"Not measured: {problem}."
        shape = step.GPU_STEP if cuda else step.QUICK_STEP if args.quick else step.CPU_STEP
        return step.format_step_table(step.run_peft_step(shape, dtype, device, rounds, progress))

    def merging(progress):
        from .benchmarks import merging as merges
        if (problem := timing.import_problem("peft")) is not None:
            return f"Not measured: {problem}."
        cases = merges.QUICK_CASES if args.quick else merges.GPU_CASES if cuda else merges.CPU_CASES
        return merges.format_merging_table(merges.run_merging(cases, dtype, device, rounds, progress))

    measure = {"lora": lora, "overhead": overhead, "dora": dora, "qlora": qlora, "mixed": mixed,
               "adapters": adapters, "ia3": ia3, "peft-step": peft_step, "merging": merging}
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    for i, name in enumerate(chosen, 1):
        title = BENCH_SECTIONS[name]
        table = measure[name](timing.progress_bar(f"[{i}/{len(chosen)}] {title}"))
        print(f"\n{title}\n\n{table}", flush=True)
        if args.markdown:
            with open(args.markdown, "a") as f:
                f.write(f"\n## {title}, {dtype}, {description}\n\n{stamp}; fastpeft {__version__}, "
                        f"torch {torch.__version__}; median of {rounds} rounds; peak = allocated above the live "
                        f"set before the call.\n\n{table}\n")
    return 0


def report(args, parser) -> int:
    from .benchmarks import report as sweeps

    device = args.device
    chosen = sweeps.QUICK_SWEEPS if args.quick else sweeps.FULL_SWEEPS
    out = Path(args.out)
    try:  # before minutes of sweeps: the folder, and each file the report writes there, must be one we can write
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        parser.error(f"argument --out: cannot write a report there: {args.out}: {err.strerror or err}")
    for name in sweeps.written_files(chosen):
        if reason := _cannot_write(out / name):
            parser.error(f"argument --out: cannot write a report there: {out / name}: {reason}")
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    rounds = args.rounds if args.rounds is not None else (3 if args.quick else 7)
    print(f"fastpeft report on {sweeps.timing.device_description(device)}, {dtype}, {rounds} rounds a point",
          flush=True)
    points, peaks, measured = sweeps.run_report(chosen, dtype, device, rounds)
    page = sweeps.write_report(points, peaks, measured, out, device, dtype, rounds)
    print(f"report: {page}")
    unsettled = sum(1 for p in points if sweeps.unsettled(p))
    if unsettled:
        print(f"warning: {unsettled} points are unsettled (their rounds disagree, or fastpeft's order against "
              "PEFT's is not established): marked in the report; more --rounds on an idle machine settle them",
              file=sys.stderr)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastpeft", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, devices, and which backends run here (and why not)")
    b = sub.add_parser("bench", help="time nn.Linear vs fastpeft (each usable backend) vs HF PEFT's LoRA layer, "
                                     "fastpeft's DoRA vs PEFT's, QLoRA vs PEFT over bitsandbytes, and fastpeft's "
                                     "bottleneck adapter vs the unfused AdapterHub-style one")
    b.add_argument("--quick", action="store_true",
                   help="one shape, no dropout, 5 rounds, smaller sweeps: under a minute on an idle 2-core CPU")
    _device_arguments(b)
    b.add_argument("--shape", type=_shape, action="append", metavar="M,K,N,r", help="repeatable")
    b.add_argument("--dropout", type=_probability, action="append",
                   help="repeatable; default 0 and 0.1 (0 alone with --quick)")
    b.add_argument("--rounds", type=_positive_int, help="rounds of interleaved timing (median taken); default 30 on "
                                                        "a CPU, 10 on a GPU, 5 with --quick")
    b.add_argument("--markdown", metavar="PATH", help="append the tables to this markdown file")
    b.add_argument("--only", choices=list(BENCH_SECTIONS), help="run one of the benchmarks")
    rp = sub.add_parser("report", help="scaling sweeps (tokens, rank, width, dropout, adapters per batch) of every "
                                       "LoRA-family layer against the frozen base, HF PEFT's equivalent and a "
                                       "roofline estimate: PNG plots (with matplotlib) and a one-page markdown report")
    rp.add_argument("--quick", action="store_true", help="small sweeps: under two minutes on a 2-core CPU")
    _device_arguments(rp)
    rp.add_argument("--rounds", type=_positive_int, help="interleaved rounds per sweep point (median taken)")
    rp.add_argument("--out", default="fastpeft-report", metavar="DIR",
                    help="folder for report.md and the PNGs (e.g. bench/results/<date>-cpu-report)")
    args = parser.parse_args(argv)
    try:
        _check_environment(measuring=args.command != "info")
    except ValueError as err:  # a bad setting: one line naming it (no usage: it is no argument), before anything runs
        print(f"error: {err}", file=sys.stderr)
        return 2
    return {"info": info, "bench": bench, "report": report}[args.command](args, sub.choices[args.command])


if __name__ == "__main__":
    sys.exit(main())
