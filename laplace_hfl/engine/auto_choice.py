"""``solver="auto"`` and ``preconditioner="auto"``, decided by a probe of the
user's own problem.

The probe (:func:`choose`) runs once per fit, at the first solve:

1. **Preconditioner.** The Nyström sketch and none run conjugate
   gradients on the refit system ``(h G + diag(p_0)) u = b`` towards the
   refits' tolerance for :data:`PROBE_COLUMNS` right-hand sides
   ``b = G omega`` (random directions pushed through the data curvature,
   like the Jacobian rows of query points), in one batched run of at most
   :data:`PROBE_MAX_ITER` iterations (one data pass per iteration serves
   both), stopped as soon as one has converged (the other is slower). A
   count is exact where it converged, else extrapolated from the residual
   reduction.

   *The sketch's rank is chosen by cost* (``preconditioner="auto"`` without
   ``precondition_rank``). It starts at :data:`FIRST_LEVEL` columns and
   doubles (:func:`sketch_levels`, up to the memory-capped automatic rank)
   while the iterations a larger sketch is expected to save on a chunk of
   directions outweigh its extra products and eigendecomposition
   (:func:`grow_rank`; the new columns extend the old ones, and the grown
   sketch is probed again). A sketch that is small enough to hold the whole
   GGN, ``min(P, N C)`` columns within :data:`WHOLE_SKETCH_ITERATIONS` CG
   iterations of a chunk, is taken at once, without a probe. A sketch of a thousand columns costs
   more than a thousand products' worth of eigendecompositions on a CPU,
   which a few queries of a small network never repay.

   KFAC, the costliest to build (a pass with a backward per output), is
   built and probed only where the best count so far exceeds
   :data:`KFAC_WORTH_ITERATIONS`, and only until it would lose. Fewest
   iterations wins; a tie goes to the cheaper one to apply (none, then
   KFAC, then the sketch). The chosen one's data part is kept for the
   refits. Counts decide between preconditioners; clock times only the rank
   and the solver (in a distributed fit, whose processes' clocks differ, the
   rank is the automatic one and the choice identical on every process).
2. **Solver.** The dense solver is chosen where its peak memory (``4 P^2``
   numbers) fits :func:`~laplace_hfl.engine.dense.dense_budget` (half the device's
   free memory, capped by :data:`laplace_hfl.engine.dense.DENSE_BUDGET`) and its
   estimated time, forming the curvature and factorising it once, is below
   the estimated time of :data:`DENSE_HORIZON` chunks of CG refits
   (``chunk_size`` directions each, one solve per direction for a
   Gauss-Newton curvature, three for network refits, times the probed
   iterations; the factor serves every later query, so it is bought for a
   few chunks, not one): the per-direction
   product time is measured on a batch of products, and the flop rate of a
   matrix product of the problem's size, so the estimate follows the
   machine. In a distributed fit
   (where clock times differ between processes) the dense solver is chosen
   when it fits the fixed budget :data:`~laplace_hfl.engine.dense.CHUNK_BUDGET`.
   With ``target="hessian"`` (Newton refits of the network, whose cost a
   linear probe does not predict) the dense solver is chosen where it fits
   :data:`~laplace_hfl.engine.dense.CHUNK_BUDGET` (``P <= 2896``), CG above.
   Problems whose dense solve costs under :data:`SMALL_DENSE_FLOPS` (a few
   milliseconds: the test suite's networks) are solved densely without a
   probe. Where the dense solver fits, a candidate preconditioner whose
   build alone costs at least the dense estimate (the Nyström sketch: its
   rank in products) is not built nor probed: the dense solver beats CG with
   it for any number of queries (its own per-query cost is a matrix product).

The choice, the probed iterations and the estimates are in
:attr:`AutoChoice.reason`, which :class:`~laplace_hfl.engine.refit.RefitDiagnostics`
carries as ``la.last_diagnostics.choice``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from laplace_hfl.engine.curvature import curvature_of
from laplace_hfl.engine.dense import CHUNK_BUDGET, dense_fits
from laplace_hfl.engine.functional import (
    LaplaceObjective,
    data_only_objective,
    ggn_matvec,
)
from laplace_hfl.engine.solvers import batched_cg

__all__ = [
    "SMALL_DENSE_FLOPS",
    "FIRST_LEVEL",
    "GROWTH_HORIZON",
    "WHOLE_SKETCH_ITERATIONS",
    "DENSE_HORIZON",
    "SketchAt",
    "sketch_levels",
    "grow_rank",
    "predicted_iterations",
    "PROBE_COLUMNS",
    "PROBE_MAX_ITER",
    "AutoChoice",
    "Probe",
    "choose",
    "probe_iterations",
    "probe_rhs",
]

#: Right-hand sides solved by each candidate preconditioner.
PROBE_COLUMNS = 2
#: CG iterations of the probe (all candidates together).
PROBE_MAX_ITER = 10
#: KFAC (the costliest candidate to build: a pass with a backward per output)
#: is probed only when no other candidate converges within this many iterations.
KFAC_WORTH_ITERATIONS = 5
#: Dense problems this small (``2 N C P^2 + P^3`` flops, milliseconds) are
#: solved densely without a probe, which would cost more than they do.
SMALL_DENSE_FLOPS = 1e8
#: Products timed together to measure the cost of one direction's product.
_TIMED_COLUMNS = 16
#: CG solves per direction in a network refit (``target="hessian"``): the
#: first Newton step and the corrections of the + and - refits
#: (:func:`laplace_hfl.engine.refit.perturbed_refits`). A Gauss-Newton refit
#: is quadratic: its first step is the answer, one solve.
_REFIT_SOLVES = 3
#: A sketch of the whole GGN (``min(P, N C)`` columns) is taken without a
#: probe when it costs at most this many CG iterations of a chunk's
#: directions: it leaves each solve about one iteration.
WHOLE_SKETCH_ITERATIONS = 3
#: Chunks of directions the dense solver's one-time cost is weighed against:
#: its factor serves every later query at the cost of a matrix product, so
#: it is bought for a few chunks of queries, not one.
DENSE_HORIZON = 3
#: Smallest Nyström rank of the automatic rank's levels (one chunk of products).
FIRST_LEVEL = 64
#: Share of a chunk's directions (at least :data:`FIRST_LEVEL` of them: a
#: chunk that memory keeps small, LeNet's 13 on a CPU, says nothing about the
#: queries to come) a larger sketch must repay itself on. The
#: number of queries that follow the choice is unknown: a sketch sized for a
#: full chunk costs up to ~2x the best choice on a few queries, one that
#: repays itself on half a chunk stays within ~1.5x there and near the best
#: on many (diabetes MLP, ``docs/cost.md``).
GROWTH_HORIZON = 0.5
#: Apply cost order for ties: cheaper first.
_APPLY_ORDER = ("none", "kfac", "nystrom")


@dataclass(frozen=True)
class Probe:
    """One candidate preconditioner's probe.

    Attributes
    ----------
    name : str
    iterations : float
        CG iterations to the refits' tolerance (the largest over the probe's
        columns); when the cap was reached first, extrapolated from the
        residual reduction so far (``inf`` without any reduction).
    converged : bool
        Whether the probe reached the tolerance within its cap.
    """

    name: str
    iterations: float
    converged: bool


@dataclass(frozen=True)
class AutoChoice:
    """What ``"auto"`` chose, and why.

    Attributes
    ----------
    solver : {"dense", "cg"}
    preconditioner : {"kfac", "nystrom", "none"}
    reason : str
        One line: the probed iterations of every candidate and the time
        estimates behind the solver choice.
    probes : tuple of Probe
    rank : int
    """

    solver: str
    preconditioner: str
    reason: str
    probes: tuple[Probe, ...] = ()
    #: The automatic Nyström rank chosen (0: another preconditioner, or a
    #: rank that was not the probe's to choose).
    rank: int = 0


#: Rank -> (preconditioner, the sketch's eigenvalues, seconds of its
#: eigendecomposition): the Nyström candidate at that rank.
SketchAt = Callable[[int], tuple[Callable[[Tensor], Tensor], Tensor, float]]


def _whole_rank(n_params: int, n_rows: int) -> int:
    """``min(P, N C)``: the columns of a sketch that holds the whole GGN
    (``P`` before a fit, ``n_rows`` 0)."""
    return min(n_params, n_rows) if n_rows > 0 else n_params


def sketch_levels(
    n_params: int, max_rank: int, n_rows: int, workload: int
) -> tuple[int, ...]:
    """The ranks the automatic Nyström rank may take, increasing.

    ``(min(P, N C),)`` where that sketch, which holds the whole GGN, costs at
    most :data:`WHOLE_SKETCH_ITERATIONS` CG iterations of a chunk
    (``workload`` directions, counted up to :data:`FIRST_LEVEL`: a large
    accelerator chunk does not make a large sketch "small") and at most
    about twice ``max_rank`` (which caps it by memory); else
    :data:`FIRST_LEVEL` doubled up to ``max_rank`` (the memory-capped
    :func:`~laplace_hfl.engine.preconditioner.default_rank`, at most
    ``N C``), which ends the list; empty where ``max_rank`` is 0.
    """
    whole = _whole_rank(n_params, n_rows)
    if max_rank <= 0:
        return ()
    chunk = min(max(workload, 1), FIRST_LEVEL)
    # max_rank is at most P // 2: twice it, plus the 1 that floor drops
    if whole <= WHOLE_SKETCH_ITERATIONS * chunk and whole <= 2 * max_rank + 1:
        return (whole,)
    levels, r = [], min(FIRST_LEVEL, max_rank)
    while r < max_rank:
        levels.append(r)
        r *= 2
    return (*levels, max_rank)


def _eigenvalue_at(lam: Tensor, j: int) -> float:
    """The ``j``-th largest eigenvalue (1-based): the sketch's where it has
    one, else extrapolated from its decay over its second half (geometric per
    column)."""
    k = lam.numel()
    if j <= k:
        return float(lam[max(j, 1) - 1])
    lo, mid = float(lam[-1]), float(lam[k // 2 - 1])
    if not (lo > 0 and mid > 0):
        return 0.0  # the tail is resolved to zero: the sketch holds the GGN
    return lo * (lo / mid) ** ((j - k) / (k - k // 2))


def predicted_iterations(
    iterations: float, lam: Tensor, rank: int, h_factor: float, mu: float
) -> float:
    """CG iterations expected with a sketch of ``rank`` columns, from those
    measured with the current one (eigenvalues ``lam``, descending).

    Nyström-preconditioned CG converges at the rate of the condition number
    ``1 + h E / mu`` with ``E`` the sketch's error (Frangella, Tropp & Udell
    2023), so iterations scale as its square root. A randomised sketch of
    ``k`` columns resolves about its top ``k / 2`` eigenvalues, so ``E`` is
    taken as ``lam_{k/2}``: read from the sketch for ranks up to twice its
    own, extrapolated beyond (:func:`_eigenvalue_at`). At least 1; the
    measured count where nothing can be predicted (a zero prior).
    """
    k = lam.numel()
    if mu <= 0 or k < 2 or iterations <= 1:
        return iterations
    now = 1 + h_factor * _eigenvalue_at(lam, k // 2) / mu
    ahead = 1 + h_factor * _eigenvalue_at(lam, max(rank, k) // 2) / mu
    return max(1.0, iterations * math.sqrt(ahead / now))


def grow_rank(
    obj: LaplaceObjective,
    B: Tensor,
    rtol: float,
    levels: tuple[int, ...],
    sketch_at: SketchAt,
    count: tuple[float, bool],
    workload: float,
    product_s: float,
    solves: int = 1,
    whole: int = 0,
) -> tuple[int, tuple[float, bool]]:
    """Grow the Nyström sketch through ``levels`` while it pays.

    From each level the larger one with the best net saving is built (none:
    the growth stops): the iterations it is expected to
    save (:func:`predicted_iterations`) on ``workload`` directions' refits
    (``solves`` each, ``product_s`` per product) outweigh what
    it costs: its new columns' products and its eigendecomposition (the
    current one's measured time, scaled as ``k^2``). A level of ``whole``
    columns (``min(P, N C)``) holds the whole GGN: one iteration expected. A
    grown sketch is probed again (its measured count replaces the
    prediction). Stops where the sketch already holds the whole GGN (it
    kept fewer columns than it has).

    Returns
    -------
    rank : int
    count : (iterations, converged)
        The probe's count at ``rank``.
    """
    rank, (its, ok) = levels[0], count
    h, mu = float(obj.h_factor), float(obj.prior_precision.mean())
    _, lam, seconds = sketch_at(rank)
    while rank < levels[-1] and lam.numel() >= rank and its > 1:
        best, best_net = rank, 0.0
        for nxt in (r for r in levels if r > rank):
            ahead = (
                1.0 if 0 < whole <= nxt else predicted_iterations(its, lam, nxt, h, mu)
            )
            gain = solves * workload * (its - ahead) * product_s
            cost = (nxt - rank) * product_s + seconds * (nxt / rank) ** 2
            if gain - cost > best_net:
                best, best_net = nxt, gain - cost
        if best == rank:
            break
        M, lam, seconds = sketch_at(best)
        cap = max(2, math.ceil(its) + 1)
        rank, (its, ok) = best, probe_iterations(obj, B, rtol, cap, [M])[0]
    return rank, (its, ok)


def probe_rhs(obj: LaplaceObjective, n: int, seed: int = 0) -> tuple[Tensor, float]:
    """``n`` right-hand sides ``G omega`` and the time of one direction's
    GGN-vector product, measured on the batch.

    Returns
    -------
    B : Tensor
        ``(n, P)``.
    seconds : float
        Wall time of the batched product divided by ``n``.
    """
    theta = obj.theta_map
    g = torch.Generator(device="cpu").manual_seed(seed)
    omega = torch.randn(n, theta.numel(), generator=g, dtype=theta.dtype)
    t0 = time.perf_counter()
    B = ggn_matvec(data_only_objective(obj), omega.to(theta.device))
    if B.device.type == "cuda":
        torch.cuda.synchronize(B.device)
    return B, (time.perf_counter() - t0) / n


class _Decided(Exception):
    """A candidate converged: the others are slower, the probe can stop."""

    def __init__(self, iterations: int, done: list[int]) -> None:
        super().__init__(iterations)
        self.iterations, self.done = iterations, done


def probe_iterations(
    obj: LaplaceObjective,
    B: Tensor,
    rtol: float,
    max_iter: int,
    preconds: list[Callable[[Tensor], Tensor] | None],
) -> list[tuple[float, bool]]:
    """CG iterations to solve ``(h G + diag(p_0)) u = b`` for the rows of
    ``B`` to ``rtol ||b||`` with each preconditioner of ``preconds``, all in
    one batched CG run (one GGN-vector product pass per iteration serves
    every candidate) that stops when the first candidate has converged on
    every row, or after ``max_iter`` iterations.

    Returns
    -------
    list of (iterations, converged)
        Per preconditioner: the largest count over the rows where they all
        converged; for the others, when the run stopped at the first
        candidate's convergence after ``t`` iterations, ``t + 1`` (a lower
        bound), else (``max_iter`` reached) the extrapolation
        ``max_iter log(rtol) / log(r)`` from the worst relative residual
        ``r`` (``inf`` without reduction).
    """
    m, k = B.shape[0], len(preconds)
    group = torch.arange(k, device=B.device).repeat_interleave(m)
    state = {"idx": None, "calls": 0}  # the active rows of this iteration

    def matvec(idx: Tensor, X: Tensor) -> Tensor:
        if state["calls"] and k > 1:
            done = sorted(set(range(k)) - set(group[idx].tolist()))
            if done:
                raise _Decided(state["calls"], done)
        state["idx"], state["calls"] = idx, state["calls"] + 1
        return ggn_matvec(obj, X)

    def precond(R: Tensor) -> Tensor:
        g = group if state["idx"] is None else group[state["idx"]]
        out = R.clone()
        for i, M in enumerate(preconds):
            sel = g == i
            if M is not None and bool(sel.any()):
                out[sel] = M(R[sel])
        return out

    Bs = B.repeat(k, 1)
    norm = Bs.norm(dim=1)
    try:
        res = batched_cg(matvec, Bs, rtol * norm, max(max_iter, 1), precond)
    except _Decided as stop:
        t = stop.iterations
        return [
            (float(t), True) if i in stop.done else (t + 1.0, False) for i in range(k)
        ]
    out = []
    for i in range(k):
        sel = group == i
        if bool(res.converged[sel].all()):
            out.append((float(res.iterations[sel].max()), True))
            continue
        r = float((res.residual_norm[sel] / norm[sel]).max())
        its = max_iter * math.log(rtol) / math.log(r) if 0 < r < 1 else math.inf
        out.append((its, False))
    return out


def _probe(
    obj: LaplaceObjective,
    B: Tensor,
    rtol: float,
    candidates: dict[str, Callable[[], Callable[[Tensor], Tensor] | None]],
    names: list[str],
    max_iter: int,
) -> list[tuple[float, bool]]:
    preconds = [candidates[n]() for n in names]
    return probe_iterations(obj, B, rtol, max_iter, preconds)


def _flops_per_second(n: int, like: Tensor) -> float:
    """Measured rate of an ``n x n`` matrix product in ``like``'s dtype."""
    n = max(64, min(n, 512))
    # any values time the same; random ones would draw from the global RNG
    a = torch.ones(n, n, dtype=like.dtype, device=like.device)
    a @ a  # warm-up
    t0 = time.perf_counter()
    a @ a
    if a.device.type == "cuda":
        torch.cuda.synchronize(a.device)
    return 2 * n**3 / max(time.perf_counter() - t0, 1e-9)


def _dense_seconds(
    n_params: int, n_outputs: int, n_rows: int, product_s: float, flops: float
) -> float:
    """Forming the GGN and factorising it: ``G = J^T Lambda J`` from
    per-example Jacobians (``C`` backward passes over the data, about one
    product each) and ``2 N C P^2`` flops, then Cholesky and inverse
    (``P^3 / 3 + 2 P^3 / 3``)."""
    P = n_params
    form = n_outputs * product_s + 2.0 * n_rows * P * P / flops
    return form + P**3 / flops


def choose(
    obj: LaplaceObjective,
    candidates: dict[str, Callable[[], Callable[[Tensor], Tensor] | None]],
    *,
    rtol: float,
    target: str,
    allow_dense: bool,
    workload: int,
    n_outputs: int,
    n_rows: int,
    budget: int | None = None,
    build_products: dict[str, float] | None = None,
    levels: tuple[int, ...] = (),
    sketch_at: SketchAt | None = None,
) -> AutoChoice:
    """Probe ``candidates`` and choose the solver and the preconditioner.

    Parameters
    ----------
    obj : LaplaceObjective
        The refit objective (current hyperparameters).
    candidates : dict
        Preconditioner name to a function building it (``None``: no
        preconditioner), in probe order; at least one.
    rtol : float
        The refits' relative tolerance.
    target : {"ggn", "hessian"} or Curvature
        The refits' curvature (:mod:`laplace_hfl.engine.curvature`).
    allow_dense : bool
        Whether the dense solver may be chosen (``solver="auto"`` in the
        classic mode); otherwise only the preconditioner is chosen.
    workload : int
        Directions whose CG refits the dense solver's one-off cost is
        compared with (one chunk).
    n_outputs : int
        Outputs ``C`` of the network.
    n_rows : int
        Rows of the training Jacobian, ``N C`` (all processes).
    budget : int, optional
        Entries the dense solver may hold (default
        :func:`~laplace_hfl.engine.dense.dense_budget`; in a distributed fit pass a
        budget that every process shares).
    build_products : dict, optional
        Preconditioner name to a lower bound on the GGN-vector products its
        build takes (the Nyström sketch: its rank). Where the dense solver
        fits and such a build alone costs at least the dense solver's
        one-time estimate, that candidate is not built: the dense solver beats
        it for any number of queries.
    levels : tuple of int, optional
        The Nyström ranks the automatic rank may take, increasing
        (:func:`sketch_levels`); with ``sketch_at`` the ``"nystrom"``
        candidate is built at the first and grown while it pays
        (:func:`grow_rank`). A single level equal to ``min(P, N C)`` at most
        :data:`WHOLE_SKETCH_ITERATIONS` ``workload`` is the whole GGN: the sketch is
        chosen without a probe.
    sketch_at : callable, optional
        Rank to ``(preconditioner, sketch eigenvalues, seconds)`` of the
        Nyström candidate at that rank (extending the columns of a smaller
        one; ``seconds``: its eigendecomposition, the part of the build that
        is not products).

    Returns
    -------
    AutoChoice
    """
    P = obj.theta_map.numel()
    if obj.reduce is not None:  # no clock times or free memory: same everywhere
        fits = allow_dense and dense_fits(P, CHUNK_BUDGET if budget is None else budget)
        if fits:
            return AutoChoice("dense", "none", f"dense: 4 P^2 (P = {P}) fits")
    else:
        fits = allow_dense and dense_fits(P, budget, like=obj.theta_map)
    if fits and not curvature_of(target).gauss_newton:
        # network refits: Newton steps on the exact Hessian, whose cost a
        # linear probe does not predict; dense up to the fixed budget
        if dense_fits(P, CHUNK_BUDGET):
            return AutoChoice(
                "dense", "none", f"dense: target={target!r} and 4 P^2 (P = {P}) "
                "fits laplace_hfl.engine.dense.CHUNK_BUDGET",
            )  # fmt: skip
        fits = False
    dense_flops = 2.0 * n_rows * P * P + P**3
    if fits and dense_flops <= SMALL_DENSE_FLOPS:
        return AutoChoice(
            "dense",
            "none",
            f"dense: 2 N C P^2 + P^3 = {dense_flops:.1e} flops (P = {P}), "
            "less than a probe would cost",
        )
    names = list(candidates)
    if obj.reduce is not None and len(levels) > 1:
        levels = levels[-1:]  # growing reads clock times, which differ by process
    grow = sketch_at is not None and bool(levels) and "nystrom" in names
    if grow:
        candidates = {**candidates, "nystrom": lambda: sketch_at(levels[0])[0]}
    timed = fits or (grow and len(levels) > 1)
    n_rhs = min(_TIMED_COLUMNS, max(workload, 1)) if timed else PROBE_COLUMNS
    B, product_s = probe_rhs(obj, n_rhs)
    B = B[:PROBE_COLUMNS]
    dense_s = math.inf
    if fits:
        flops = _flops_per_second(P, obj.theta_map)
        dense_s = _dense_seconds(P, n_outputs, n_rows, product_s, flops)
        if dense_s <= workload * product_s:  # below one CG iteration per direction
            return AutoChoice(
                "dense",
                "none",
                f"dense: ~{dense_s:.2g} s once, less than one CG iteration of "
                f"{workload} directions ({product_s:.2g} s per product)",
            )
    whole = _whole_rank(P, n_rows)
    solves = 1 if curvature_of(target).gauss_newton else _REFIT_SOLVES
    if grow and levels == (whole,):
        # the sketch of the whole GGN costs a few CG iterations of a chunk
        # and leaves each solve about one: no probe can beat it
        cg_s = (whole + DENSE_HORIZON * solves * workload) * product_s
        if fits and dense_s <= cg_s:
            return AutoChoice(
                "dense", "none", f"dense: ~{dense_s:.2g} s once, less than "
                f"a whole-GGN sketch of rank {whole} and its CG (~{cg_s:.2g} s)",
            )  # fmt: skip
        candidates["nystrom"]()
        return AutoChoice(
            "cg", "nystrom", f"cg/nystrom: the sketch of rank {whole} = "
            f"min(P, N C) holds the whole GGN ({whole} products, at most "
            f"{WHOLE_SKETCH_ITERATIONS} CG iterations of {workload} directions); "
            "no probe",
            rank=whole,
        )  # fmt: skip
    dear = []
    if fits and build_products:
        # building such a candidate alone costs more than the dense solver's
        # whole one-time work, which then beats it for any number of queries
        first_build = {**build_products, **({"nystrom": levels[0]} if grow else {})}
        dear = [n for n in names if first_build.get(n, 0) * product_s >= dense_s]
    if dear and len(dear) == len(names):
        return AutoChoice(
            "dense",
            names[0],
            f"dense: ~{dense_s:.2g} s once, less than building the "
            f"preconditioner ({', '.join(dear)}) of CG ({product_s:.2g} s per product)",
        )
    default, names = names[0], [n for n in names if n not in dear]
    skipped = (
        f"; {', '.join(dear)} not built (building costs more than dense)"
        if dear
        else ""
    )
    cheap = [n for n in names if n != "kfac"] or names
    counts = dict(zip(cheap, _probe(obj, B, rtol, candidates, cheap, PROBE_MAX_ITER)))
    grow = grow and "nystrom" in counts
    rank, grown = (levels[0] if grow else 0), ""
    if grow and counts["nystrom"][0] <= min(c for c, _ in counts.values()):
        rank, counts["nystrom"] = grow_rank(
            obj, B, rtol, levels, sketch_at, counts["nystrom"],
            GROWTH_HORIZON * max(workload, FIRST_LEVEL), product_s, solves, whole,
        )  # fmt: skip
        if len(levels) > 1:
            grown = f" at rank {rank} (levels {levels[0]}..{levels[-1]})"
    best_count = min(c for c, _ in counts.values())
    if "kfac" in names and "kfac" not in counts:
        if best_count <= KFAC_WORTH_ITERATIONS:
            skipped += f"; kfac not built (<= {KFAC_WORTH_ITERATIONS} to save)"
        else:  # it can only win by converging within the best count
            cap = max(1, min(PROBE_MAX_ITER, math.ceil(best_count)))
            its, ok = probe_iterations(obj, B, rtol, cap, [candidates["kfac"]()])[0]
            counts["kfac"] = (its, True) if ok else (max(its, cap + 1.0), False)
    probes = [Probe(n, *counts[n]) for n in names if n in counts]
    best = min(
        probes,
        key=lambda p: (
            p.iterations,
            _APPLY_ORDER.index(p.name) if p.name in _APPLY_ORDER else 9,
        ),
    )
    shown = ", ".join(
        f"{p.name} {p.iterations:.0f}{'' if p.converged else '+'}"
        + (grown if p.name == "nystrom" else "")
        for p in probes
    )
    reason = f"CG iterations to rtol on {B.shape[0]} probe directions: {shown}{skipped}"
    solver = "cg"
    if allow_dense and not fits:
        reason += f"; dense: 4 P^2 (P = {P}) exceeds the memory budget"
    elif allow_dense:
        cg_s = DENSE_HORIZON * solves * workload * best.iterations * product_s
        solver = "dense" if dense_s <= cg_s else "cg"
        reason += (
            f"; dense ~{dense_s:.2g} s once vs CG ~{cg_s:.2g} s per "
            f"{DENSE_HORIZON} x {workload} directions ({product_s:.2g} s per product)"
        )
    reason = f"{solver}/{best.name if solver == 'cg' else 'none'}: {reason}"
    # CG elsewhere (posterior_covariance) keeps the default of unbuilt ones
    precond = default if solver == "dense" and dear else best.name
    rank = rank if precond == "nystrom" else 0
    return AutoChoice(solver, precond, reason, tuple(probes), rank)
