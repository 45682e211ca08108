"""Scaling sweeps and a one-page report: how each LoRA-family layer's cost grows with the work, beside the frozen base
layer, HF PEFT's equivalent layer and the device's limit, as ratios measured side by side.

    python -m fastpeft report [--quick] [--device cpu|cuda] [--out DIR]

Each sweep point times its candidates in interleaved rounds (:func:`.timing.interleaved_times`); a ratio is
the candidate's median over the base's median at that point, and its spread the lowest and highest of the per-round
ratios; against PEFT's equivalent, the ratio is the median of the per-round ratios to it and the spread their middle
half (quartiles). The limit is an estimate, stated as one: a roofline (FLOPs over the FLOP rate, bytes over the
bandwidth, whichever is longer) from a large matmul's FLOP rate and a copy's bandwidth, both measured in the same run.
A point whose rounds disagree, or whose order against PEFT's equivalent is not established, is :func:`unsettled`:
marked in the plots, the tables and the page's warning. Plots need matplotlib (``pip install 'fastpeft[plot]'``);
without it the report has the tables alone and says so.
"""
from __future__ import annotations

import datetime
import importlib.metadata
import math
import os
import platform
import statistics
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import __version__
from . import timing
from .timing import AdapterShape, Shape, make_step

BASE = "nn.Linear"


@dataclass(frozen=True)
class Sweep:
    """One sweep: ``name`` (the plot's file name), what varies (``axis``), its values, and the fixed sizes."""
    name: str
    axis: str
    values: tuple
    title: str
    fixed: dict = field(default_factory=dict)


QUICK_SWEEPS = (
    Sweep("tokens", "M", (64, 512, 2048), "fwd+bwd time vs tokens M", dict(K=512, N=512, r=16)),
    Sweep("rank", "r", (4, 16, 64, 256), "fwd+bwd time vs rank r", dict(M=512, K=512, N=512)),
    Sweep("width", "K=N", (256, 512, 1024), "fwd+bwd time vs width K=N", dict(M=512, r=16)),
    Sweep("dropout", "dropout", (0.0, 0.1), "fwd+bwd time without and with dropout", dict(M=512, K=512, N=512, r=16)),
    Sweep("adapters", "adapters", (1, 4, 16), "forward (serving) time vs adapters in one batch",
          dict(sequences=16, tokens=32, K=512, N=512, r=16)),
)
FULL_SWEEPS = (
    Sweep("tokens", "M", (1, 16, 128, 1024, 4096, 8192), "fwd+bwd time vs tokens M", dict(K=1024, N=1024, r=16)),
    Sweep("rank", "r", (1, 4, 16, 64, 256), "fwd+bwd time vs rank r", dict(M=2048, K=1024, N=1024)),
    Sweep("width", "K=N", (256, 1024, 2048, 4096), "fwd+bwd time vs width K=N", dict(M=1024, r=16)),
    Sweep("dropout", "dropout", (0.0, 0.1), "fwd+bwd time without and with dropout",
          dict(M=2048, K=1024, N=1024, r=16)),
    Sweep("adapters", "adapters", (1, 4, 16, 64), "forward (serving) time vs adapters in one batch",
          dict(sequences=64, tokens=32, K=1024, N=1024, r=16)),
)
GPU_SIZES = dict(K=4096, N=4096, M=8192)  # the GPU sweeps' fixed sizes where the CPU's are smaller


@dataclass
class Point:
    sweep: str
    x: object  # the swept value
    candidate: str
    ms: float  # median
    ratio: float  # median / the base's median
    low: float  # lowest and highest per-round ratio to the base (the plots' bars)
    high: float
    middle_low: float | None = None  # first and third quartiles of the per-round ratios (None: judge on low, high)
    middle_high: float | None = None
    peak_mb: float | None = None
    reference_ratio: float | None = None  # median of the per-round time / PEFT's equivalent's, where there is one
    reference_low: float | None = None  # quartiles of the per-round time / PEFT's equivalent's in that round
    reference_high: float | None = None
    shape: Shape | None = None  # a LoRA-shaped point's sizes


@dataclass
class Peaks:
    """The device's FLOP rate and bandwidth, measured in this run (for the limit estimate)."""
    tflops: float
    gbs: float


# fastpeft's candidate -> PEFT's equivalent (its reference ratio), and the curves' families for the plots
REFERENCES = {"fastpeft LoRA": "peft LoRA", "fastpeft DoRA": "peft DoRA", "fastpeft QLoRA": "peft+bnb QLoRA",
              "fastpeft mixed": "peft mixed", "fastpeft adapter": "unfused adapter"}
LIMIT = "LoRA limit (roofline estimate)"
# Each family's colour and marker in the plots, shared by fastpeft's layer and its equivalent so that a pair reads as
# one comparison; fastpeft's is drawn solid with filled markers, the equivalent dashed with hollow ones.
LOOKS = {"fastpeft LoRA": ("C0", "o"), "peft LoRA": ("C0", "o"), "fastpeft LoRA[triton]": ("C5", "v"),
         "fastpeft DoRA": ("C2", "s"), "peft DoRA": ("C2", "s"), "fastpeft QLoRA": ("C3", "^"),
         "peft+bnb QLoRA": ("C3", "^"), "fastpeft adapter": ("C4", "D"), "unfused adapter": ("C4", "D"),
         "fastpeft mixed": ("C0", "o"), "peft mixed": ("C0", "o")}
CATEGORICAL_AXES = {"dropout"}  # swept as a switch (off, on), not as a quantity: its points are not joined
NOISY_FACTOR = 1.5  # a point whose middle half of rounds spans more than this factor is unsettled


def unsettled(p: Point) -> str | None:
    """Why a measured point's median does not settle what it is read for, or None when it does.

    A point is unsettled when either

    - its rounds disagree: the third quartile of its per-round ratios to the base exceeds the first by more than
      :data:`NOISY_FACTOR` (1.5x), so the machine's drift, not the layer, may have set its median; or
    - it is a fastpeft layer whose order against PEFT's equivalent is not established: the middle half of its
      per-round times over the equivalent's in the same round (rounds are interleaved, so both saw the same load)
      spans 1, i.e. it was the faster in a quarter of the rounds or more and the slower in a quarter or more: that
      ratio's spread exceeds its median's gap from parity.

    Both use quartiles, not the extremes (the plots' bars): one disturbed round neither unsettles a point nor
    reverses an order, and more rounds settle a real difference instead of widening the range.

    The base (1 by definition) and the limit (an estimate, not timed) are never unsettled."""
    if p.candidate in (BASE, LIMIT):
        return None
    reasons = []
    first, third = (p.middle_low, p.middle_high) if p.middle_low is not None else (p.low, p.high)
    if third > NOISY_FACTOR * first:
        reasons.append(f"rounds {third / first:.1f}x apart ({first:.2f}-{third:.2f})")
    if p.reference_low is not None and p.reference_low <= 1 <= p.reference_high:
        equivalent = REFERENCES[p.candidate.split("[")[0]]
        reasons.append(f"faster than {equivalent} in a quarter of the rounds or more, slower in as many "
                       f"({p.reference_low:.2f}-{p.reference_high:.2f})")
    return "; ".join(reasons) or None


def _best_ms(fn, device, rounds=7) -> float:
    return min(timing.interleaved_times({"f": fn}, device, rounds)["f"])


def measure_peaks(device, dtype) -> Peaks:
    """The fastest FLOP rate of large square matmuls and the fastest copy bandwidth (read + write) in several
    rounds, timed now (:func:`run_report` raises the FLOP rate to any faster one a layer reaches in the sweeps)."""
    sizes = (1024, 2048) if torch.device(device).type == "cpu" else (4096, 8192)
    tflops = 0.0
    for n in sizes:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        tflops = max(tflops, 2 * n ** 3 / (_best_ms(lambda a=a, b=b: torch.mm(a, b), device) * 1e-3) / 1e12)
    src = torch.empty(2 ** 26, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    gbs = 2 * src.numel() / (_best_ms(lambda: dst.copy_(src), device) * 1e-3) / 1e9
    return Peaks(tflops, gbs)


def limit_ms(shape: Shape, element_size: int, peaks: Peaks) -> float:
    """Roofline estimate of one LoRA forward+backward: its FLOPs (no dW) at the measured FLOP rate, or its least
    bytes moved (x, y, dY, dX once each, W twice) at the measured bandwidth, whichever is longer."""
    M, K, N = shape.M, shape.K, shape.N
    flops = shape.flops("fwd+bwd", "lora")
    bytes_ = element_size * (2 * M * K + 2 * M * N + 2 * N * K)
    return max(flops / (peaks.tflops * 1e12), bytes_ / (peaks.gbs * 1e9)) * 1e3


def _lora_family(shape: Shape, dtype, device, dropout: float) -> dict:
    """The base, fastpeft's LoRA (torch path, and triton on a GPU), DoRA and QLoRA, and PEFT's of each, all over one
    base weight."""
    names = {"fastpeft[torch]": "fastpeft LoRA", "fastpeft[triton]": "fastpeft LoRA[triton]", "peft": "peft LoRA"}
    layers = {names.get(k, k): v for k, v in timing.make_candidates(shape, dtype, device, dropout).items()}
    dora = timing.make_dora_candidates(shape, dtype, device, dropout)
    layers["fastpeft DoRA"] = dora["fastpeft DoRA[torch]"]
    if timing.DORA_REFERENCE in dora:
        layers["peft DoRA"] = dora[timing.DORA_REFERENCE]
    qlora = timing.make_nf4_candidates(shape, dtype, device, dropout)
    layers["fastpeft QLoRA"] = qlora["fastpeft QLoRA[torch]"]
    if timing.NF4_REFERENCE in qlora:
        layers["peft+bnb QLoRA"] = qlora[timing.NF4_REFERENCE]
    return layers


def _middle_half(values: list[float]) -> tuple[float, float]:
    """The first and third quartiles of ``values`` (both the value itself for a single round)."""
    if len(values) < 2:
        return values[0], values[0]
    first, _, third = statistics.quantiles(values, n=4, method="inclusive")
    return first, third


def _points(sweep, x, steps, times) -> list[Point]:
    base = times[BASE]
    points = []
    for name in steps:
        ratios = [t / b for t, b in zip(times[name], base, strict=True)]
        ms = statistics.median(times[name])
        points.append(Point(sweep, x, name, ms, ms / statistics.median(base), min(ratios), max(ratios),
                            *_middle_half(ratios)))
    by_name = {p.candidate: p for p in points}
    for p in points:
        ref = by_name.get(REFERENCES.get(p.candidate.split("[")[0], ""))
        if ref is not None:
            # Each round's own ratio (both saw that round's load), summarised as the spread is: so the figure shown
            # always lies within its spread and reads the same way as the verdict drawn from it.
            paired = [t / r for t, r in zip(times[p.candidate], times[ref.candidate], strict=True)]
            p.reference_ratio = statistics.median(paired)
            p.reference_low, p.reference_high = _middle_half(paired)
    return points


def run_sweep(sweep: Sweep, dtype, device, rounds: int, progress) -> list[Point]:
    """Every point of one sweep, its candidates side by side."""
    points = []
    for x in sweep.values:
        fixed = dict(sweep.fixed)
        if sweep.name == "adapters":
            points += _adapters_point(sweep, x, fixed, dtype, device, rounds)
            progress()
            continue
        size = {"M": "M", "r": "r", "K=N": "K"}.get(sweep.axis)
        if size == "K":
            fixed.update(K=x, N=x)
        elif size is not None:
            fixed[size] = x
        shape = Shape(fixed["M"], fixed["K"], fixed["N"], fixed["r"])
        dropout = x if sweep.name == "dropout" else 0.0
        layers = _lora_family(shape, dtype, device, dropout)
        if shape.K == shape.N:  # the bottleneck adapter (d = K=N, m = 64) beside LoRA
            adapters = timing.make_adapter_candidates(AdapterShape(shape.M, shape.K, 64), dtype, device)
            layers["fastpeft adapter"] = adapters["fastpeft[torch]"]
            layers["unfused adapter"] = adapters["unfused (AdapterHub way)"]
        torch.manual_seed(1)
        x_in = torch.randn(shape.M, shape.K, device=device, dtype=dtype, requires_grad=True)
        dy = torch.randn(shape.M, shape.N, device=device, dtype=dtype)
        steps = {name: make_step(layer, x_in, dy, "fwd+bwd") for name, layer in layers.items()}
        times = timing.interleaved_times(steps, device, rounds)
        new = _points(sweep.name, x, steps, times)
        if sweep.name == "tokens":  # peak memory against tokens, each from nothing left by another candidate
            for p in new:
                for layer in layers.values():
                    timing._clear_grads(layer, x_in)
                p.peak_mb = timing.peak_memory_mb(steps[p.candidate], device)
        for p in new:
            p.shape = shape  # (for the limit, added once every point is measured)
        points += new
        progress()
    return points


def _adapters_point(sweep, n, fixed, dtype, device, rounds) -> list[Point]:
    if n > fixed["sequences"]:
        raise ValueError(f"{n} adapters need at least as many sequences, got {fixed['sequences']}")
    layers = timing._mixed_layers(fixed["K"], fixed["N"], fixed["r"], n, dtype, device)
    names = [f"a{i % n}" for i in range(fixed["sequences"])]
    x = torch.randn(fixed["sequences"], fixed["tokens"], fixed["K"], device=device, dtype=dtype)

    def serve(layer, base):
        def step():
            with torch.no_grad():
                layer(x) if base else layer(x, adapter_names=names)
        return step
    for layer in layers.values():
        layer.eval()
    steps = {name: serve(layer, name == BASE) for name, layer in layers.items()}
    times = timing.interleaved_times(steps, device, rounds)
    renamed = {BASE: BASE, "fastpeft mixed": "fastpeft mixed", timing.MIXED_REFERENCE: "peft mixed"}
    return _points(sweep.name, n, {renamed[k]: v for k, v in steps.items()},
                   {renamed[k]: v for k, v in times.items()})


def run_report(sweeps=QUICK_SWEEPS, dtype=torch.float32, device="cpu", rounds: int = 3, progress=None
               ) -> tuple[list[Point], Peaks]:
    """Every sweep's points, and the peaks measured for the limit."""
    if torch.device(device).type == "cuda":
        sweeps = [Sweep(s.name, s.axis, s.values, s.title, {**s.fixed, **{k: v for k, v in GPU_SIZES.items()
                                                                           if k in s.fixed and k != s.axis}})
                  for s in sweeps]
    total = sum(len(s.values) for s in sweeps)
    tick = timing.progress_bar("sweeps", unit="point")(total) if progress is None else progress
    peaks = measure_peaks(device, dtype)
    points = []
    for sweep in sweeps:
        points += run_sweep(sweep, dtype, device, rounds, tick)
    _add_limits(points, peaks, torch.empty((), dtype=dtype).element_size())
    return points, peaks, sweeps


def _add_limits(points: list[Point], peaks: Peaks, element_size: int) -> None:
    """The LoRA limit at every LoRA-shaped point, from ``peaks`` with the FLOP rate raised to the fastest that the
    base or a LoRA layer reached in these sweeps (so no LoRA point is measured below its limit)."""
    shaped = [p for p in points if p.shape is not None]
    for p in shaped:
        if p.candidate in (BASE, "fastpeft LoRA", "peft LoRA") or p.candidate.startswith("fastpeft LoRA["):
            flops = p.shape.flops("fwd+bwd", "nn.Linear" if p.candidate == BASE else "lora")
            peaks.tflops = max(peaks.tflops, flops / (p.ms * 1e-3) / 1e12)
    for (sweep, x), shape in {(p.sweep, p.x): p.shape for p in shaped}.items():
        base = next(p for p in shaped if (p.sweep, p.x, p.candidate) == (sweep, x, BASE))
        bound = limit_ms(shape, element_size, peaks)
        at = next(i for i, p in enumerate(points) if (p.sweep, p.x) == (sweep, x)) + sum(
            1 for p in points if (p.sweep, p.x) == (sweep, x))
        points.insert(at, Point(sweep, x, LIMIT, bound, bound / base.ms, bound / base.ms, bound / base.ms))


# ----------------------------------------------------------------------------------------------------------
# The report: one PNG per sweep (and peak memory vs tokens), one markdown page embedding them
# ----------------------------------------------------------------------------------------------------------

OPTIONAL_MODULES = ("triton", "peft", "bitsandbytes", "transformers")


def _version_of(module: str) -> str:
    """``module``'s version; "not installed" when it (or a package above it) is absent, "broken: <exception type>:
    <message>" when importing it fails otherwise (a dependency of it missing, a bad build), so that a broken install
    is told from an absent one on the page."""
    imported, err = timing.try_import(module)
    if imported is None:
        return "not installed" if err is None else _broken(err)
    version = getattr(imported, "__version__", None)
    if version is None:
        try:
            version = importlib.metadata.version(module)
        except importlib.metadata.PackageNotFoundError:
            version = "version unknown"
    return str(version)


def _broken(err: BaseException) -> str:
    message = " ".join(str(err).split())  # one line: the page lists the versions in one sentence
    if len(message) > 300:
        message = message[:297] + "..."
    return f"broken: {type(err).__name__}: {message}" if message else f"broken: {type(err).__name__}"


def _versions() -> dict[str, str]:
    found = {"fastpeft": __version__, "torch": torch.__version__, "python": platform.python_version()}
    found.update({module: _version_of(module) for module in OPTIONAL_MODULES})
    return found


class GitError(Exception):
    """A git command that could not run or failed; its message is git's own (or why git did not run)."""


def _git(tree: Path, *args: str) -> str:
    try:
        done = subprocess.run(["git", *args], cwd=tree, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError) as err:
        raise GitError(str(err) or type(err).__name__) from err
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines()
        raise GitError(lines[0] if lines else f"git {args[0]} exited with {done.returncode}")
    return done.stdout


def _commit(out: Path | str | None = None, tree: Path | None = None) -> str:
    """The commit checked out in ``tree`` (fastpeft's source tree by default), with " (+ changes to tracked files)"
    when a tracked file differs from it (staged or not) outside ``out``, the report's own folder.

    ``out`` is taken as the report writes it: relative to the working directory, through any symlink, and it may lie
    inside the repository, outside it, or not exist yet. "unknown" when ``tree`` is no git checkout; when git names
    the commit but cannot compare the tree with it, the commit is given with git's error, never as changed."""
    tree = Path(__file__).resolve().parent.parent if tree is None else Path(tree)
    try:
        head = _git(tree, "rev-parse", "--short", "HEAD").strip()
    except GitError:
        return "unknown"
    try:
        top = Path(_git(tree, "rev-parse", "--show-toplevel").strip()).resolve()
        # From the top, so that the names are the top's even under diff.relative; --no-renames: a file moved into the
        # report's folder is still a change where it left.
        changed = _git(top, "diff", "--name-only", "--no-renames", "-z", "HEAD", "--").split("\0")
    except GitError as err:
        return f"{head} (changes unknown: {err})"
    own = Path(out).resolve() if out is not None else None
    if own is not None and _within(top, own):
        own = None  # an --out at or above the tree's top (--out .) would excuse every change in it
    outside = [name for name in changed if name and not (own is not None and _within(top / name, own))]
    return head + (" (+ changes to tracked files)" if outside else "")


def _within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


# The plots: ratios on a logarithmic axis (a ratio of 4 is as far above 1 as 1/4 is below it, and one slow outlier
# does not squash the rest), fastpeft's curves solid with filled markers, each equivalent's dashed with hollow ones.

def _look(name: str, joined: bool = True) -> dict:
    """The ``Line2D`` keywords of one candidate's curve (``joined``: points connected by a line)."""
    if name == LIMIT:
        return dict(color="black", linestyle=":", linewidth=1.6, marker="")
    if name == BASE:
        return dict(color="0.45", linestyle="-", linewidth=1.2, marker="")
    colour, marker = LOOKS.get(name, ("C7", "o"))
    if name.startswith("fastpeft"):
        look = dict(color=colour, linestyle="-", linewidth=1.8, marker=marker, markersize=6,
                    markerfacecolor=colour, markeredgecolor=colour)
    else:
        look = dict(color=colour, linestyle="--", linewidth=1.3, marker=marker, markersize=6,
                    markerfacecolor="white", markeredgecolor=colour, markeredgewidth=1.4)
    return look if joined else {**look, "linestyle": "none"}


def _log_ticks(low: float, high: float) -> list[float]:
    """At most 12 tick values from ``low`` to ``high`` on a log axis: powers of 2 times 1, 1.25, 1.5 and 1.75, or
    times 1 and 1.5, or powers of 2 alone, or every 2nd, 4th or 8th power (1 among them whenever it is in range);
    the finest of these that fits."""
    k_low, k_high = math.floor(math.log2(low)), math.ceil(math.log2(high))
    for stride, mantissas in ((1, (1, 1.25, 1.5, 1.75)), (1, (1, 1.5)), (1, (1,)), (2, (1,)), (4, (1,)), (8, (1,))):
        ticks = [2.0 ** k * m for k in range(k_low - k_low % stride, k_high + 1, stride) for m in mantissas
                 if low <= 2.0 ** k * m <= high]
        if len(ticks) <= 12:
            break
    return ticks


def _ratio_label(ratio: float) -> str:
    """A ratio tick's label: "1024x", "1.5x", "0.375x", "0.0625x" (three significant digits at most)."""
    return f"{ratio:.0f}x" if ratio >= 10 else f"{ratio:.3g}x"


def _size_label(value) -> str:
    """A size tick's label, short enough that neighbours on a log axis do not run together: 128, 1K, 8K."""
    if isinstance(value, int) and value >= 1024 and value % 1024 == 0:
        return f"{value // 1024}K"
    return f"{value:g}"


def _category_label(sweep: Sweep, value) -> str:
    if sweep.axis == "dropout":
        return "dropout off" if not value else f"dropout on (p = {value:g})"
    return f"{sweep.axis} {value}"


def figure(points: list[Point], sweep: Sweep, memory: bool = False):
    """One sweep's plot as a matplotlib ``Figure``: each candidate's time over the base's (``memory``: its peak
    memory) against the swept value, the ratio axis logarithmic with the base as the grey line at 1, bars spanning the
    per-round range, and a dashed black ring around each :func:`unsettled` point. A categorical sweep
    (:data:`CATEGORICAL_AXES`) draws its candidates side by side within each category, unconnected."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8.6, 4.3), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    mine = [p for p in points if p.sweep == sweep.name and (p.peak_mb is not None or not memory)]
    names = list(dict.fromkeys(p.candidate for p in mine if not (memory and p.candidate == LIMIT)))
    values = list(dict.fromkeys(p.x for p in mine))
    categorical = sweep.axis in CATEGORICAL_AXES and not memory
    numeric = not categorical and all(isinstance(x, (int, float)) for x in values)
    flagged = _draw_candidates(ax, mine, names, values, memory, categorical, numeric)
    if memory:
        _memory_axis(ax, mine)
    else:
        _ratio_axis(ax, mine)
    _swept_axis(ax, sweep, values, categorical, numeric)
    timed = sum(1 for p in mine if p.candidate not in (BASE, LIMIT))
    ax.set_title(("peak memory vs tokens M" if memory else sweep.title)
                 + (f"\n! {len(flagged)} of {timed} timed points unsettled (ringed): see the page" if flagged else ""),
                 fontsize=10)
    ax.grid(True, alpha=0.3)
    _legend(ax, names, flagged, memory, categorical)
    return fig


def _draw_candidates(ax, mine, names, values, memory, categorical, numeric) -> list[tuple]:
    """Each candidate's line (and bars), the roofline; returns the unsettled points, ringed."""
    group = 0.76  # the width of a category's points side by side
    dodged = [n for n in names if n not in (BASE, LIMIT)]
    offset = {n: group * ((i + 0.5) / len(dodged) - 0.5) for i, n in enumerate(dodged)}
    flagged = []
    for name in names:
        rows = [p for p in mine if p.candidate == name]
        xs = [p.x if numeric else values.index(p.x) for p in rows]
        if memory:
            ax.plot(xs, [p.peak_mb for p in rows], gid=name, **_look(name))
            continue
        ys = [p.ratio for p in rows]
        if name == BASE:
            continue  # the base is the line at 1, drawn across the whole plot
        if name == LIMIT:
            if categorical:
                ax.hlines(ys, [x - group / 2 for x in xs], [x + group / 2 for x in xs], colors="black",
                          linestyles=":", linewidth=1.6, gid=name)
            else:
                ax.plot(xs, ys, gid=name, **_look(name))
            continue
        if categorical:
            xs = [x + offset[name] for x in xs]
        look = _look(name, joined=not categorical)
        ax.plot(xs, ys, zorder=3, gid=name, **look)
        ax.errorbar(xs, ys, yerr=[[p.ratio - p.low for p in rows], [p.high - p.ratio for p in rows]], fmt="none",
                    ecolor=look["color"], elinewidth=1.0, capsize=2.5, alpha=0.75, zorder=2)
        flagged += [(x, y) for x, y, p in zip(xs, ys, rows, strict=True) if unsettled(p)]
    if flagged:
        ax.scatter([x for x, _ in flagged], [y for _, y in flagged], s=260, facecolors="none", edgecolors="black",
                   linewidths=1.1, linestyles="--", zorder=4, gid="unsettled")
        for x, y in flagged:
            ax.annotate("!", (x, y), xytext=(7, 5), textcoords="offset points", fontsize=10, fontweight="bold",
                        zorder=4)
    return flagged


def _memory_axis(ax, mine) -> None:
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator
    peaks = [p.peak_mb for p in mine if p.peak_mb > 0]
    if peaks and max(peaks) >= 10 * min(peaks):  # a linear axis would flatten the smaller candidates to 0
        ax.set_yscale("log", base=10)
        ax.yaxis.set_major_locator(FixedLocator([m * 10.0 ** k for k in range(-3, 7) for m in (1, 2, 5)]))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_locator(NullLocator())
    ax.set_ylabel("peak MiB (fwd+bwd)" + (", log scale" if ax.get_yscale() == "log" else ""))


def _ratio_axis(ax, mine) -> None:
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator
    ax.axhline(1.0, gid="base", zorder=1, **_look(BASE))
    measured = [p for p in mine if p.candidate != BASE]
    low = min([1.0] + [min(p.low, p.ratio) for p in measured]) / 1.15
    high = max([1.0] + [max(p.high, p.ratio) for p in measured]) * 1.15
    ax.set_yscale("log", base=2)
    ax.set_ylim(low, high)
    ax.yaxis.set_major_locator(FixedLocator(_log_ticks(low, high)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: _ratio_label(v)))
    ax.yaxis.set_minor_locator(NullLocator())
    ax.set_ylabel(f"time / {BASE}, log scale\n(median; bars: per-round range)")


def _swept_axis(ax, sweep: Sweep, values, categorical, numeric) -> None:
    from matplotlib.ticker import NullLocator
    if categorical:
        ax.set_xticks(range(len(values)), [_category_label(sweep, v) for v in values])
        ax.set_xlim(-0.6, len(values) - 0.4)
    elif numeric and len(values) > 2 and min(values) > 0:
        ax.set_xscale("log", base=2)
        ax.set_xticks(values, [_size_label(v) for v in values])
        ax.xaxis.set_minor_locator(NullLocator())
    elif numeric:
        ax.set_xticks(values, [f"{v:g}" for v in values])
    else:
        ax.set_xticks(range(len(values)), [str(v) for v in values])
    ax.set_xlabel(sweep.axis)


def _legend(ax, names, flagged, memory, categorical) -> None:
    from matplotlib.lines import Line2D
    handles = []
    for name in names:
        if name == BASE and not memory:
            handles.append(Line2D([], [], label=f"{BASE} (the base: 1x)", **_look(BASE)))
        else:
            handles.append(Line2D([], [], label=name, **_look(name, joined=not categorical or name == LIMIT)))
    if flagged:
        handles.append(Line2D([], [], linestyle="none", marker="o", markersize=13, markerfacecolor="none",
                              markeredgecolor="black", label=f"! unsettled: {len(flagged)} (see the page)"))
    key = ("fastpeft: filled\nPEFT / unfused: hollow" if categorical else
           "fastpeft: filled, solid\nPEFT / unfused: hollow, dashed")
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, handlelength=3.4,
              frameon=False, title=key, title_fontsize=8)


def plot(points: list[Point], sweep: Sweep, path: Path, memory: bool = False) -> None:
    """Saves :func:`figure`'s plot of ``sweep`` to ``path`` (a PNG)."""
    figure(points, sweep, memory).savefig(path)


def written_files(sweeps) -> list[str]:
    """The names of the files :func:`write_report` may write in its folder for ``sweeps`` (the PNGs only when
    matplotlib is installed): the command line checks each can be written before it measures."""
    plots = [f"{sweep.name}.png" for sweep in sweeps] + ["memory.png"] * any(s.name == "tokens" for s in sweeps)
    return ["report.md", "report.md.tmp", *plots]


def write_report(points: list[Point], peaks: Peaks, sweeps, out: Path, device, dtype, rounds: int) -> Path:
    """``out``/report.md and one PNG per sweep (plus memory.png) when matplotlib is installed; returns the page."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        import matplotlib  # noqa: F401
        plots = True
    except ImportError:
        plots = False
    versions = ", ".join(f"{k} {v}" for k, v in _versions().items())
    lines = [f"# fastpeft scaling report: {timing.device_description(device)}", "",
             f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}; {dtype}; commit {_commit(out)}; "
             f"{versions}.", "",
             "**Measured**: every time, ratio and peak memory below, each point's candidates side by side in "
             f"{rounds} interleaved rounds (ratio = median / the frozen base's median at that point; spread = the "
             "lowest and highest per-round ratio; time / PEFT's = the median of the per-round ratios to PEFT's "
             "equivalent in the same round, its spread their first and third quartiles). **Estimated**: the LoRA "
             "limit line only, a roofline (a LoRA forward+backward's FLOPs over the FLOP rate, or its least bytes "
             "over the bandwidth, whichever is "
             f"longer) with the fastest FLOP rate seen in this run ({peaks.tflops:.3f} TFLOP/s: large matmuls' best "
             "rounds, or the base or a LoRA layer where one ran faster) and the fastest copy bandwidth "
             f"({peaks.gbs:.1f} GB/s). It bounds LoRA layers, not the bottleneck adapter (a different op).", "",
             f"**Unsettled** (⚠ in the tables, a dashed ring and \"!\" in the plots): a point whose rounds disagree, "
             f"the middle half of its per-round ratios spanning more than {NOISY_FACTOR:g}x, or a fastpeft layer "
             "faster than PEFT's equivalent in a quarter of the rounds or more and slower in as many (the middle half "
             "of its per-round time / PEFT's, taken within each round, spans 1: the spread exceeds the median's gap "
             "from parity, so the order is not established). "
             "Read such a point as unmeasured, not as a result.", ""]
    flagged = [p for p in points if unsettled(p)]
    if flagged:
        timed = sum(1 for p in points if p.candidate not in (BASE, LIMIT))
        lines += [f"**Warning: {len(flagged)} of {timed} measured points are unsettled in this run** (listed in "
                  "each sweep below). Their medians may reflect the machine's load more than the layers; more "
                  "`--rounds` on an idle machine settle them.", ""]
    if not plots:
        lines += ["(matplotlib is not installed, so this report has tables only: `pip install 'fastpeft[plot]'`.)", ""]
    for sweep in sweeps:
        mine = [p for p in points if p.sweep == sweep.name]
        if not mine:
            continue
        lines += [f"## {sweep.title}", "", "Fixed: " + ", ".join(f"{k}={v}" for k, v in sweep.fixed.items()) + ".",
                  ""]
        if plots:
            plot(points, sweep, out / f"{sweep.name}.png")
            lines += [f"![{sweep.title}]({sweep.name}.png)", ""]
        lines += [f"| {sweep.axis} | candidate | median ms | time / {BASE} | spread | time / PEFT's (spread) "
                  "| unsettled |", "|---|---|---|---|---|---|---|"]
        for p in mine:
            reference = "-" if p.reference_ratio is None else (
                f"{p.reference_ratio:.2f} ({p.reference_low:.2f}-{p.reference_high:.2f})")
            spread = "-" if p.candidate == LIMIT else f"{p.low:.2f}-{p.high:.2f}"
            why = unsettled(p)
            lines.append(f"| {p.x} | {p.candidate} | {p.ms:.3f} | {p.ratio:.2f} | {spread} | {reference} | "
                         f"{'⚠ ' + why if why else ''} |")
        lines.append("")
        here = [p for p in mine if unsettled(p)]
        if here:
            lines += ["⚠ Unsettled here: " + "; ".join(f"{p.candidate} at {sweep.axis} = {p.x}" for p in here)
                      + ".", ""]
        if sweep.name == "tokens":
            lines += ["### Peak memory vs tokens M", ""]
            if plots:
                plot(points, sweep, out / "memory.png", memory=True)
                lines += ["![peak memory vs tokens](memory.png)", ""]
            lines += ["| M | candidate | peak MiB |", "|---|---|---|"]
            lines += [f"| {p.x} | {p.candidate} | {p.peak_mb:.1f} |" for p in mine if p.peak_mb is not None]
            lines.append("")
    lines += ["PEFT's equivalents: `peft LoRA` (PEFT's LoRA Linear), `peft DoRA`, `peft+bnb QLoRA` (PEFT over "
              "bitsandbytes' Linear4bit holding the same codes), `peft mixed` (its `adapter_names` forward); "
              "`unfused adapter` is a bottleneck adapter written the AdapterHub way. In the plots each family has "
              "one colour and marker: fastpeft's layer filled and solid, its equivalent hollow and dashed; the grey "
              "line at 1 is the base, the dotted one the limit estimate. Ratio axes are logarithmic (so is memory's "
              "where it spans a decade or more), and dropout's off and on are categories, their points side by side "
              "and not joined."]
    page = out / "report.md"
    tmp = page.with_name(page.name + ".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, page)
    return page
