"""How the benchmarks measure: side by side in one process, rounds interleaved, medians; peak memory above what was
live; what imports here (PEFT, bitsandbytes) and what the device is. ``timing`` builds the cases on these.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import sys
import time

import torch
from torch import nn

MODES = ("fwd", "fwd+bwd")


def try_import(module: str):
    """``(the module, None)`` when ``module`` imports here; ``(None, None)`` when it is not installed (it, or a package
    above it, is absent); ``(None, the error)`` when its import fails otherwise (a broken install, or a dependency
    missing or shadowed), so that a broken install is never called an absent one."""
    try:
        return importlib.import_module(module), None
    except Exception as err:  # noqa: BLE001 (a package failing at import time in any way is one we cannot use)
        if isinstance(err, ModuleNotFoundError) and err.name is not None and (
                module == err.name or module.startswith(err.name + ".")):
            return None, None
        return None, err


def import_problem(module: str) -> str | None:
    """Why ``module`` cannot be imported here (:func:`try_import`), as a sentence, or None when it can."""
    imported, err = try_import(module)
    if imported is not None:
        return None
    if err is None:
        return f"{module} is not installed (pip install 'fastpeft[bench]')"
    return f"`import {module}` failed: {type(err).__name__}: {err}"


def peft_available() -> bool:
    """Whether HF PEFT imports here (:func:`import_problem` says why not)."""
    return import_problem("peft") is None


def bnb_available() -> bool:
    """Whether bitsandbytes imports here (:func:`import_problem` says why not)."""
    return import_problem("bitsandbytes") is None


def progress_bar(title: str, unit: str = "case"):
    """A ``progress`` (see :func:`_ticker`) shown on stderr under ``title``: tqdm's bar when tqdm is installed, else
    a line at the start and one a ``unit`` done."""
    def start(total: int):
        try:
            from tqdm import tqdm
        except ImportError:
            print(f"{title}: {total} {unit}s", file=sys.stderr, flush=True)
            done = 0

            def line():
                nonlocal done
                done += 1
                print(f"{title}: {done}/{total} {unit}s done", file=sys.stderr, flush=True)
            return line
        bar = tqdm(total=total, desc=title, unit=unit, file=sys.stderr)

        def update():
            bar.update()
            if bar.n == total:
                bar.close()
        return update
    return start


def _ticker(progress, total: int):
    """What to call as each of ``total`` cases is measured. A ``progress``, the argument of the ``run_*`` functions,
    is called once with the number of cases and returns that callable; None shows nothing."""
    return progress(total) if progress is not None else (lambda: None)


def _clear_grads(layer: nn.Module, x: torch.Tensor) -> None:
    x.grad = None
    for p in layer.parameters():
        p.grad = None


def make_step(layer: nn.Module, x: torch.Tensor, dy: torch.Tensor, mode: str):
    """A zero-argument callable running one ``mode`` step of ``layer`` (gradients reset, as an optimizer would)."""
    def forward():
        layer(x)

    def forward_backward():
        _clear_grads(layer, x)
        layer(x).backward(dy)

    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return forward if mode == "fwd" else forward_backward


def _cuda_median_ms(fn) -> float:
    from triton.testing import do_bench
    return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))


def interleaved_times(steps: dict, device, rounds: int) -> dict[str, list[float]]:
    """Times (ms) of each named zero-argument callable over ``rounds`` rounds that interleave them, rotating
    their order, so the drift of a shared machine falls on all alike. A round is one call per callable on a
    CPU (calls there take milliseconds), one ``do_bench`` median on CUDA."""
    names = list(steps)
    for name in names:  # warm-up: first-call allocations, autotuning, lazy imports
        steps[name]()
        steps[name]()
    times = {name: [] for name in names}
    cuda = torch.device(device).type == "cuda"
    for i in range(rounds):
        for name in names[i % len(names):] + names[:i % len(names)]:
            if cuda:
                times[name].append(_cuda_median_ms(steps[name]))
            else:
                start = time.perf_counter()
                steps[name]()
                times[name].append((time.perf_counter() - start) * 1e3)
    return times


def peak_memory_mb(fn, device) -> float:
    """Peak bytes (MiB) that ``fn()`` allocates above what was live before it."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    # CPU: the profiler's allocation events carry the running total of memory allocated while profiling.
    from torch._C._profiler import _ExtraFields_Allocation
    from torch.profiler import ProfilerActivity, profile
    with _native_stderr_hidden(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        stack.extend(event.children)
        if isinstance(event.extra_fields, _ExtraFields_Allocation):
            events.append(event)
    if not events:
        return 0.0
    # The running total also counts earlier blocks whose frees were not seen; measure from the first event.
    events.sort(key=lambda e: e.start_time_ns)
    first = events[0].extra_fields
    before = first.total_allocated - first.alloc_size
    return max(e.extra_fields.total_allocated - before for e in events) / 2**20


@contextlib.contextmanager
def _native_stderr_hidden():
    """Send file descriptor 2 to /dev/null for the block: the profiler's native layer (kineto) prints a
    ``USDT ... profiler_start/stop`` line there on every start and stop, which no setting turns off."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def device_description(device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{props.name} ({props.multi_processor_count} SMs, {props.total_memory / 2**30:.0f} GiB)"
    import os
    import platform
    cpu = platform.processor() or platform.machine()
    return f"CPU {cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} threads"
