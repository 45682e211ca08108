"""The tensor side of merging LoRA adapters (:func:`fastpeft.add_weighted_adapter` runs it per layer): one layer's
merged factors from its adapters' factors, with HF PEFT's combination types and results.

Read top to bottom: the reference (PEFT's semantics on whole matrices); the element-wise merges of PEFT's
``merge_utils`` (pruning, sign election, disjoint mean) run over row chunks; the exact low-rank SVD, PEFT's full one,
and the backend table of the full matrix's element-wise pass (its Triton kernel: kernels/merging.py); one layer's
merge (:func:`merge_lora_factors`).

What each type computes, per layer, for adapters i with factors Aᵢ (rᵢ, K), Bᵢ (N, rᵢ), scale sᵢ and weight wᵢ:

- ``cat``: A' = [w₁s₁A₁; …], B' = [B₁ … Bₙ] (rank Σrᵢ): exactly Σ wᵢsᵢBᵢAᵢ.
- ``linear``, ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune``: the rule applied to the Aᵢ with weights
  ±√|wᵢsᵢ| (the sign on A's side) and to the Bᵢ with √|wᵢsᵢ|, separately (equal ranks).
- ``svd`` and the ``*_svd`` types: the rule applied to the deltas sᵢBᵢAᵢ (N, K), then the merged matrix's truncated
  SVD: B' = U·S, A' = Vᴴ. ``svd`` sums the deltas: that sum is [B₁ … Bₙ]·diag(wᵢsᵢ)·[A₁; …; Aₙ], whose truncated SVD
  comes exactly from two thin QRs and the SVD of a (Σrᵢ)×(Σrᵢ) core, never forming N×K (:func:`lowrank_svd`).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..backends import Backend, requested_backend, select_backend

COMBINATION_TYPES = ("svd", "linear", "cat", "ties", "ties_svd", "dare_linear", "dare_ties", "dare_linear_svd",
                     "dare_ties_svd", "magnitude_prune", "magnitude_prune_svd")
# Merged on A and on B separately: the adapters must have one rank, which the merged adapter keeps.
FACTOR_TYPES = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
# Merged on the deltas s·BA, then truncated by an SVD to svd_rank (default: the largest rank).
DELTA_TYPES = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
SIGN_METHODS = ("total", "frequency")
SVD_DRIVERS = (None, "gesvd", "gesvdj", "gesvda")

# Each type's element-wise rule: how every task tensor is pruned (None, "magnitude": its largest |values|,
# "random": DARE's Bernoulli keep-and-rescale) and whether signs are elected (TIES' disjoint mean) or the weighted
# tensors summed.
RULES = {
    "svd": (None, False), "linear": (None, False),
    "ties": ("magnitude", True), "ties_svd": ("magnitude", True),
    "dare_linear": ("random", False), "dare_linear_svd": ("random", False),
    "dare_ties": ("random", True), "dare_ties_svd": ("random", True),
    "magnitude_prune": ("magnitude", False), "magnitude_prune_svd": ("magnitude", False),
}

# A row chunk of the element-wise pass holds about this many elements per task tensor stack (n × rows × columns):
# the temporaries of a chunk stay a few MiB whatever the layer's size.
CHUNK_ELEMENTS = 1 << 20
# BLAS computes a product of one or two rows by another kernel than a block's, so a chunk's rows of B·A could round
# differently from the full product's; chunks have at least this many rows.
MIN_CHUNK_ROWS = 8


@dataclass(frozen=True)
class MergeOptions:
    """How one layer is merged: the combination type (after PEFT's rule that one adapter merges ``linear``), the
    merged rank, and the type's settings, checked by :func:`add_weighted_adapter`."""

    combination_type: str
    rank: int
    density: float | None = None
    majority_sign_method: str = "total"
    svd_clamp: float | None = None
    svd_full_matrices: bool = True
    svd_driver: str | None = None


@dataclass(frozen=True)
class Term:
    """One adapter's part in a layer's merge: ``lora_A`` (r, K), ``lora_B`` (N, r) (float tensors, one device), its
    ``scaling`` and its merge ``weight``."""

    lora_A: Tensor
    lora_B: Tensor
    scaling: float
    weight: float


# ----------------------------------------------------------------------------------------------------------
# The reference: PEFT's semantics the plain way, on whole matrices. What the chunked and low-rank paths below must
# give (tests/test_merging.py), and the spec of each type.
# ----------------------------------------------------------------------------------------------------------

def _merge_whole(tensors: Sequence[Tensor], weights: Sequence[float], combination_type: str, density, method,
                 generator) -> Tensor:
    """``tensors`` (each (R, C)) merged by the type's rule: each pruned (its ``int(density·numel)`` largest
    magnitudes kept; or DARE: kept with probability ``density``, then divided by it), then weighted and summed, or
    (TIES) the signs elected and each element averaged over the weighted tensors that agree with its sign."""
    prune, elect = RULES[combination_type]
    if density is not None and density >= 1:
        prune = None
    pruned = []
    for t in tensors:
        if prune == "magnitude":
            keep = torch.zeros(t.numel(), dtype=t.dtype, device=t.device)
            keep[t.abs().flatten().topk(int(density * t.numel())).indices] = 1
            t = t * keep.view(t.shape)
        elif prune == "random":
            t = t * torch.bernoulli(torch.full_like(t, density), generator=generator) / density
        pruned.append(t)
    stacked = torch.stack(pruned)
    weight = torch.tensor(list(weights)).to(stacked.device).view(-1, *([1] * (stacked.dim() - 1)))
    if not elect:
        return (stacked * weight).sum(dim=0)
    votes = stacked.sum(dim=0) if method == "total" else stacked.sign().sum(dim=0)
    agree = stacked.sign() == torch.where(votes >= 0, 1, -1)
    return (stacked * weight * agree).sum(dim=0) / agree.sum(dim=0).clamp(min=1)


def merge_reference(terms: Sequence[Term], options: MergeOptions, generator: torch.Generator | None = None
                    ) -> Tensor:
    """The merged adapter's delta B'·A' (N, K), before its own scaling, in the terms' dtype: the type's rule on whole
    matrices (the factors for ``cat`` and the factor types; the deltas sᵢBᵢAᵢ, then a full SVD truncated to
    ``options.rank`` and clamped, for the SVD types). DARE draws each task's whole mask in turn from ``generator``."""
    kind = options.combination_type
    if kind == "cat":
        return sum(t.weight * t.scaling * (t.lora_B @ t.lora_A) for t in terms)
    if kind in FACTOR_TYPES:
        signed = [math.copysign(math.sqrt(abs(t.weight * t.scaling)), t.weight * t.scaling) for t in terms]
        merged_A = _merge_whole([t.lora_A for t in terms], signed, kind, options.density,
                                options.majority_sign_method, generator)
        merged_B = _merge_whole([t.lora_B for t in terms], [abs(w) for w in signed], kind, options.density,
                                options.majority_sign_method, generator)
        return merged_B @ merged_A
    delta = _merge_whole([(t.lora_B @ t.lora_A) * t.scaling for t in terms], [t.weight for t in terms], kind,
                         options.density, options.majority_sign_method, generator)
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    lora_B, lora_A = u[:, :options.rank] * s[:options.rank], vh[:options.rank]
    if options.svd_clamp is not None:
        high = torch.quantile(torch.cat([lora_B.flatten(), lora_A.flatten()]), options.svd_clamp)
        lora_B, lora_A = lora_B.clamp(-high, high), lora_A.clamp(-high, high)
    return lora_B @ lora_A


# ----------------------------------------------------------------------------------------------------------
# The element-wise merges. PEFT's merge_utils act on whole stacked tensors; here the same operations, in the same
# order (so the same roundings), run on row chunks of each task tensor, which are formed from the factors as they are
# needed. What must see a whole tensor, the magnitude threshold of each task, is found first, one task at a time.
# ----------------------------------------------------------------------------------------------------------

def _row_chunks(rows: int, columns: int, tasks: int) -> list[tuple[int, int]]:
    """Row ranges covering ``rows``, each of at least MIN_CHUNK_ROWS rows (unless there are fewer)."""
    step = max(MIN_CHUNK_ROWS, CHUNK_ELEMENTS // max(1, tasks * columns))
    chunks = [(r, min(r + step, rows)) for r in range(0, rows, step)]
    if len(chunks) > 1 and chunks[-1][1] - chunks[-1][0] < MIN_CHUNK_ROWS:
        chunks[-2:] = [(chunks[-2][0], rows)]
    return chunks


@dataclass
class _Threshold:
    """Which entries of one task tensor magnitude pruning keeps. PEFT keeps the k = int(density · numel) entries of
    largest magnitude (``torch.topk``): here every entry with |x| > ``value``, and of those with |x| = ``value`` all
    (``all_equal``: there are exactly as many as k needs, the usual case) or else the first ``ties`` in row-major
    order (topk's choice among equal magnitudes is unspecified; continuous values have none)."""

    value: Tensor
    ties: int
    all_equal: bool


def _magnitude_threshold(values: Tensor, density: float) -> _Threshold:
    magnitudes = values.abs().flatten()
    count = magnitudes.numel()
    k = int(density * count)
    if k == 0:
        return _Threshold(magnitudes.new_tensor(math.inf), 0, False)
    if k >= count:
        return _Threshold(magnitudes.new_tensor(-math.inf), 0, False)
    value = torch.kthvalue(magnitudes, count - k + 1).values
    ties = k - int((magnitudes > value).sum())
    return _Threshold(value, ties, ties == int((magnitudes == value).sum()))


class _RandomMasks:
    """DARE's Bernoulli(density) keep-masks, drawn as PEFT draws them: each task's whole tensor in turn (task 0's
    first), element by element in its row-major order, from ``generator`` (None: the device's default generator,
    so that under the same ``torch.manual_seed`` the masks are PEFT's).

    The pass reads them chunk by chunk with all tasks interleaved. In one chunk they are drawn there and then. Over
    several chunks on a CPU, whose generator draws element by element, each task gets a generator started where that
    task's draws start (found by drawing the earlier tasks' elements ahead, a chunk at a time), and the generator
    ends where PEFT's would. Elsewhere (a GPU's counter-based generator draws a tensor differently from its chunks)
    each task's mask is drawn whole up front and kept as bool: one byte per element and task."""

    def __init__(self, tasks: int, shape: tuple[int, int], chunks, density: float, dtype, device, generator,
                 transposed: bool):
        self.density, self.dtype, self.device, self.shape, self.transposed = density, dtype, device, shape, transposed
        self.generator, self.inline, self.kept, self.task_generators = generator, len(chunks) == 1, None, None
        if self.inline:
            return
        if device.type == "cpu":
            main = generator if generator is not None else torch.default_generator
            states = []
            for task in range(tasks):
                states.append(main.get_state())
                if task < tasks - 1:
                    for r0, r1 in chunks:
                        self._draw(r1 - r0, main)
            self.task_generators = []
            for state in states:
                g = torch.Generator()
                g.set_state(state)
                self.task_generators.append(g)
            self.main = main
        else:
            self.kept = [self._draw_whole().bool() for _ in range(tasks)]

    def _draw(self, rows: int, generator) -> Tensor:
        p = torch.full((rows, self.shape[1]), self.density, dtype=self.dtype, device=self.device)
        return torch.bernoulli(p, generator=generator)

    def _draw_whole(self) -> Tensor:
        # With PEFT's strides: its delta of a transposed layer is a transposed view, and so is the mask it draws.
        rows, columns = self.shape
        if self.transposed:
            p = torch.full((columns, rows), self.density, dtype=self.dtype, device=self.device).T
        else:
            p = torch.full((rows, columns), self.density, dtype=self.dtype, device=self.device)
        return torch.bernoulli(p, generator=self.generator)

    def chunk(self, task: int, r0: int, r1: int) -> Tensor:
        """Task ``task``'s mask for rows r0:r1, in the compute dtype (tasks of a chunk are asked in order)."""
        if self.inline:
            return self._draw_whole()
        if self.kept is not None:
            return self.kept[task][r0:r1].to(self.dtype)
        return self._draw(r1 - r0, self.task_generators[task])

    def finish(self) -> None:
        """Leave the generator where PEFT's would be: after every task's draws."""
        if self.task_generators is not None:
            self.main.set_state(self.task_generators[-1].get_state())


def merge_elementwise(rows: Callable[[int, int, int], Tensor], tasks: int, out: Tensor, combination_type: str,
                      weights: Sequence[float], density: float | None = None, majority_sign_method: str = "total",
                      generator: torch.Generator | None = None, transposed: bool = False) -> Tensor:
    """Merge ``tasks`` tensors of ``out``'s shape (R, C) element-wise by ``combination_type``'s rule, as PEFT's
    ``merge_utils`` do (``task_arithmetic``, ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune``), writing
    ``out`` (R, C), any strides, in its dtype, one row chunk at a time.

    ``rows(i, r0, r1)`` gives rows r0:r1 of task tensor i (out's dtype and device); a task is asked for all its rows
    once first when magnitude pruning needs its threshold. ``weights``: one per task, rounded to float32 as PEFT's
    ``torch.tensor(weights)`` does. ``density`` 1 prunes nothing (PEFT draws no mask then). ``transposed``: the task
    tensors are transposed views in PEFT (its deltas of ``fan_in_fan_out`` and embedding layers), which only changes
    how a GPU draws DARE's masks. Peak memory: ``out``, one task tensor and its threshold's copy (magnitude pruning
    only), the chunk's stacks; DARE on a GPU over several chunks also keeps one bool per element and task.
    """
    prune, elect = RULES[combination_type]
    if density is not None and density >= 1:
        prune = None
    shape, dtype, device = tuple(out.shape), out.dtype, out.device
    chunks = _row_chunks(shape[0], shape[1], tasks)
    weight = torch.tensor(list(weights)).to(device)
    weight = weight.view(-1, *([1] * len(shape)))
    thresholds = masks = None
    if prune == "magnitude":
        thresholds = [_magnitude_threshold(rows(i, 0, shape[0]), density) for i in range(tasks)]
    elif prune == "random":
        masks = _RandomMasks(tasks, shape, chunks, density, dtype, device, generator, transposed)
    for r0, r1 in chunks:
        pruned = []
        for i in range(tasks):
            x = rows(i, r0, r1)
            if thresholds is not None:
                x = x * _keep_largest(x, thresholds[i]).to(x.dtype)
            elif masks is not None:
                x = (x * masks.chunk(i, r0, r1)) / density
            pruned.append(x)
        stacked = torch.stack(pruned)
        if elect:
            signs = stacked.sign()
            votes = stacked.sum(dim=0) if majority_sign_method == "total" else signs.sum(dim=0)
            agree = signs == torch.where(votes >= 0, 1, -1)
            weighted = stacked * weight
            out[r0:r1] = (weighted * agree).sum(dim=0) / torch.clamp(agree.sum(dim=0), min=1.0)
        else:
            out[r0:r1] = (stacked * weight).sum(dim=0)
    if masks is not None:
        masks.finish()
    return out


def _keep_largest(x: Tensor, threshold: _Threshold) -> Tensor:
    """Which entries of a chunk magnitude pruning keeps (chunks come in row order: the ties left go down as a chunk
    keeps some)."""
    magnitude = x.abs()
    if threshold.all_equal:
        return magnitude >= threshold.value
    keep = magnitude > threshold.value
    if threshold.ties:
        tie = magnitude == threshold.value
        order = tie.flatten().cumsum(0).view(tie.shape)
        keep |= tie & (order <= threshold.ties)
        threshold.ties = max(0, threshold.ties - int(tie.sum()))
    return keep


# ----------------------------------------------------------------------------------------------------------
# SVD truncation: exact from the factors where the merged delta is a weighted sum of the LoRAs; otherwise (pruned or
# sign-elected deltas, or a clamp) as PEFT does it, on the N×K matrix.
# ----------------------------------------------------------------------------------------------------------

def _compute_dtype(terms: Sequence[Term]) -> torch.dtype:
    """float64 where an adapter is float64, else float32 (PEFT's SVD takes no half-precision matrix)."""
    return torch.float64 if any(t.lora_A.dtype == torch.float64 for t in terms) else torch.float32


def _padded(lora_A: Tensor, lora_B: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """(A, B) with zero rows of A / columns of B appended up to ``rank`` (the merged product is unchanged)."""
    missing = rank - lora_A.shape[0]
    if missing > 0:
        lora_A = torch.cat([lora_A, lora_A.new_zeros(missing, lora_A.shape[1])])
        lora_B = torch.cat([lora_B, lora_B.new_zeros(lora_B.shape[0], missing)], dim=1)
    return lora_A, lora_B


def lowrank_svd(terms: Sequence[Term], rank: int) -> tuple[Tensor, Tensor]:
    """The rank-``rank`` truncated SVD of Σ wᵢsᵢBᵢAᵢ as LoRA factors ``(A' (rank, K), B' (N, rank))``, B' = U·S and
    A' = Vᴴ as PEFT's ``svd`` gives them, in float32 (float64 for float64 adapters), without forming the N×K sum.

    With B = [B₁ … Bₙ] (N, R), A = [A₁; …; Aₙ] (R, K), R = Σrᵢ, and D = diag(wᵢsᵢ, each repeated rᵢ times): the
    thin QRs B = Q_B R_B and Aᵀ = Q_A R_A give Σ wᵢsᵢBᵢAᵢ = Q_B (R_B D R_Aᵀ) Q_Aᵀ, so the SVD U_c S V_cᴴ of the small
    core R_B D R_Aᵀ gives the sum's: U = Q_B U_c, V = Q_A V_c, the same S. O((N + K)·R²) time and O((N + K)·R)
    memory. The sum has rank at most min(N, K, R); a larger ``rank`` is padded with zeros. Singular vectors are unique
    only up to sign (and within repeated singular values), so compare products B'A', not factors.
    """
    dtype = _compute_dtype(terms)
    stacked_B = torch.cat([t.lora_B.detach().to(dtype) for t in terms], dim=1)
    stacked_A = torch.cat([t.lora_A.detach().to(dtype) for t in terms], dim=0)
    # PEFT's deltas are scaled by sᵢ and then by wᵢ rounded to float32: the same coefficients here.
    coefficient = torch.cat([torch.full((t.lora_A.shape[0],), float(torch.tensor(t.weight)) * t.scaling, dtype=dtype)
                             for t in terms]).to(stacked_A.device)
    q_b, r_b = torch.linalg.qr(stacked_B)
    q_a, r_a = torch.linalg.qr(stacked_A.T)
    core = (r_b * coefficient) @ r_a.T
    u, s, vh = torch.linalg.svd(core)
    kept = min(rank, s.numel())
    lora_B = q_b @ (u[:, :kept] * s[:kept])
    lora_A = vh[:kept] @ q_a.T
    return _padded(lora_A, lora_B, rank)


def truncated_svd(delta: Tensor, rank: int, clamp: float | None = None, full_matrices: bool = True,
                  driver: str | None = None) -> tuple[Tensor, Tensor]:
    """PEFT's truncation of a merged delta (N, K): ``torch.linalg.svd``, B' = U[:, :rank]·diag(S[:rank]), A' =
    Vᴴ[:rank]; with ``clamp``, both clamped to ±(the ``clamp`` quantile of all their entries). Returns ``(A', B')``,
    padded with zeros up to ``rank`` where the layer has fewer singular values (PEFT fails there, or makes factors
    whose rank differs from its config's). ``driver`` is cuSOLVER's, passed on for CUDA matrices only (PEFT's call
    refuses it on a CPU)."""
    extra = {"driver": driver} if driver is not None and delta.is_cuda else {}
    u, s, vh = torch.linalg.svd(delta, full_matrices=full_matrices, **extra)
    kept = min(rank, s.numel())
    lora_B = u[:, :kept] @ torch.diag(s[:kept])
    lora_A = vh[:kept, :]
    if clamp is not None:
        # The quantile is over the signed entries: flipping a singular pair's sign changes it, so a clamped result is
        # PEFT's only with the singular vectors of this same LAPACK/cuSOLVER call on this same matrix.
        high = torch.quantile(torch.cat([lora_B.flatten(), lora_A.flatten()]), clamp)
        lora_B, lora_A = lora_B.clamp(-high, high), lora_A.clamp(-high, high)
    return _padded(lora_A, lora_B, rank)


def _delta_rows(term: Term, dtype, transposed: bool) -> Callable[[int, int], Tensor]:
    """Rows r0:r1 of PEFT's delta of ``term``: (B·A)·s (N, K), or its transpose (K, N) for a ``transposed`` layer,
    computed from the factors (a column block of A for the transpose's rows)."""
    lora_A, lora_B = term.lora_A.detach().to(dtype), term.lora_B.detach().to(dtype)
    if transposed:
        return lambda r0, r1: (lora_B @ lora_A[:, r0:r1]).T * term.scaling
    return lambda r0, r1: (lora_B[r0:r1] @ lora_A) * term.scaling


def _torch_merged_delta(terms: Sequence[Term], options: MergeOptions, generator, transposed: bool) -> Tensor:
    dtype = _compute_dtype(terms)
    n, k = terms[0].lora_B.shape[0], terms[0].lora_A.shape[1]
    out = torch.empty(n, k, dtype=dtype, device=terms[0].lora_A.device)
    task_rows = [_delta_rows(t, dtype, transposed) for t in terms]
    merge_elementwise(lambda i, r0, r1: task_rows[i](r0, r1), len(terms), out.T if transposed else out,
                      options.combination_type, [t.weight for t in terms], options.density,
                      options.majority_sign_method, generator, transposed)
    return out


def _triton_merged_delta(terms: Sequence[Term], options: MergeOptions, generator, transposed: bool) -> Tensor:
    """The kernel's pass (kernels/merging.py). Each adapter's threshold is found on its |delta| as the kernel forms
    it (one N×K buffer, reused); where one needs PEFT's row order among entries tied at it, the torch path runs."""
    from ..kernels import merging as kernels
    prune, elect = RULES[options.combination_type]
    if options.density is not None and options.density >= 1:
        prune = None
    stacked = kernels.Stacked([t.lora_A for t in terms], [t.lora_B for t in terms], [t.scaling for t in terms],
                              [t.weight for t in terms])
    thresholds = None
    if prune == "magnitude":
        scratch, values = None, []
        for task in range(len(terms)):
            scratch = kernels.delta_magnitudes(stacked, task, scratch)
            threshold = _magnitude_threshold(scratch, options.density)
            if threshold.all_equal:
                values.append(threshold.value)
            elif threshold.ties == 0:  # keep |x| > t: the kernel keeps |x| ≥ the next float above t
                values.append(torch.nextafter(threshold.value, threshold.value.new_tensor(math.inf)))
            else:
                return _torch_merged_delta(terms, options, generator, transposed)
        thresholds = torch.stack(values).float()
        del scratch
    mode = (kernels.WEIGHTED_SUM if not elect else
            kernels.TIES_TOTAL if options.majority_sign_method == "total" else kernels.TIES_FREQUENCY)
    return kernels.merge_deltas(stacked, mode, thresholds)


def _triton_reasons(options: MergeOptions) -> list[str]:
    if RULES[options.combination_type][0] == "random":
        return ["DARE's masks are PEFT's random numbers, drawn by torch's generator (the torch path)"]
    return []


# The element-wise pass of the types that truncate a full matrix: the chunked torch path (any device), the Triton
# kernel (CUDA; the CPU only under the interpreter, for tests), which forms every adapter's delta tile in registers.
MERGE_BACKENDS = {
    "torch": Backend(forward=_torch_merged_delta),
    "triton": Backend(forward=_triton_merged_delta, reasons=_triton_reasons),
}


def merged_delta(terms: Sequence[Term], options: MergeOptions, generator=None, transposed: bool = False,
                 backend: str | None = None) -> Tensor:
    """The merged delta (N, K) of a ``*_svd`` type (or of ``svd``) before its truncation, as PEFT's merge of the
    layer's ``get_delta_weight`` forms it: float32 (float64 for float64 adapters). ``backend`` as for
    :func:`fastpeft.lora_linear` ("cuda" has no kernel here and runs the torch path): "torch" runs
    :func:`merge_elementwise` over row chunks; "triton" the kernel (not DARE)."""
    if requested_backend(backend) == "cuda":
        backend = "torch"
    factors = [f for t in terms for f in (t.lora_A, t.lora_B)]
    name = select_backend(backend, factors, MERGE_BACKENDS, call=(options,))
    return MERGE_BACKENDS[name].forward(terms, options, generator, transposed)


def _factor_merge(terms: Sequence[Term], options: MergeOptions, generator) -> tuple[Tensor, Tensor]:
    """The types merging A and B separately: the rule on the Aᵢ with weights ±√|wᵢsᵢ| (the sign on A only, so that
    it is not squared away) and on the Bᵢ with √|wᵢsᵢ|, in the adapters' dtype, A's masks drawn before B's."""
    weights_A, weights_B = [], []
    for t in terms:
        product = t.weight * t.scaling
        weights_A.append(math.sqrt(abs(product)) * (1 if product >= 0 else -1))
        weights_B.append(math.sqrt(abs(product)))
    merged = []
    for factors, weights in (([t.lora_A.detach() for t in terms], weights_A),
                             ([t.lora_B.detach() for t in terms], weights_B)):
        out = torch.empty_like(factors[0])
        merge_elementwise(lambda i, r0, r1, factors=factors: factors[i][r0:r1], len(factors), out,
                          options.combination_type, weights, options.density, options.majority_sign_method,
                          generator)
        merged.append(out)
    return merged[0], merged[1]


def _is_weighted_sum(options: MergeOptions) -> bool:
    """Whether the delta a type truncates is Σ wᵢsᵢBᵢAᵢ itself: ``svd``, and the pruning types at density 1 (PEFT
    prunes nothing then); sign election changes the sum, so TIES never is."""
    prune, elect = RULES[options.combination_type]
    return not elect and (prune is None or (options.density is not None and options.density >= 1))


def merge_lora_factors(terms: Sequence[Term], options: MergeOptions, generator: torch.Generator | None = None,
                       transposed: bool = False, backend: str | None = None) -> tuple[Tensor, Tensor]:
    """One layer's merged LoRA factors ``(A' (rank, K), B' (N, rank))`` from its adapters' ``terms``, as PEFT's
    ``add_weighted_adapter`` computes that layer's (see the module's docstring for each type).

    ``svd`` (and ``dare_linear_svd`` / ``magnitude_prune_svd`` at density 1), without ``svd_clamp``: the exact
    low-rank SVD (:func:`lowrank_svd`). The other ``*_svd`` types, and any clamp: PEFT's merged N×K delta, formed in
    row chunks or by the Triton kernel (:func:`merged_delta`; ``backend`` picks), and its full SVD
    (:func:`truncated_svd`). ``generator``: DARE's random numbers (None: the default generator, drawing what PEFT
    draws). ``transposed``: PEFT's delta of this layer is (B·A)ᵀ (``fan_in_fan_out``, embeddings), which decides the
    order DARE's masks are drawn in. Float32 results (float64 for float64 adapters); the factor types keep the
    adapters' dtype.
    """
    kind, rank = options.combination_type, options.rank
    if kind == "cat":
        lora_A = torch.cat([t.lora_A.detach() * t.weight * t.scaling for t in terms])
        lora_B = torch.cat([t.lora_B.detach() for t in terms], dim=1)
        return _padded(lora_A, lora_B, rank)
    if kind in FACTOR_TYPES:
        return _factor_merge(terms, options, generator)
    if options.svd_clamp is None and _is_weighted_sum(options):
        return lowrank_svd(terms, rank)
    delta = merged_delta(terms, options, generator, transposed, backend)
    return truncated_svd(delta, rank, options.svd_clamp, options.svd_full_matrices, options.svd_driver)
