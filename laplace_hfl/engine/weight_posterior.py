"""The weight-space posterior ``N(theta_MAP, P^{-1})`` without a matrix.

Pure functions over a :class:`~laplace_hfl.engine.functional.LaplaceObjective`:

* :func:`curvature_matvec`: ``H v`` with ``H`` what laplace-torch's
  ``FullLaplace.H`` holds, the curvature of the summed ``factor * loss``
  (GGN for ``target="ggn"``, exact Hessian for ``"hessian"``), without
  ``_H_factor`` and without the prior;
* :func:`precision_matvec`: ``P v = _H_factor * H v + p_0 * v``, the
  ``posterior_precision`` of ``FullLaplace``;
* :func:`solve_precision`: ``P^{-1} b`` by preconditioned batched CG;
* :func:`weight_samples`: exact draws of ``N(0, P^{-1})`` by
  sample-then-optimise, reusing the amortised mode's random right-hand sides
  (:func:`laplace_hfl.engine.amortized.perturbed_rhs`, ``Cov[b] = P``) and the
  batched CG solver: ``delta = P^{-1} b`` has covariance ``P^{-1}`` exactly,
  up to the CG tolerance (Papandreou & Yuille 2010; Antoran et al. 2023).

Sample-then-optimise needs a square-root factorisation ``P = B B^T`` to build
``b``; the GGN has one (``J^T Lambda^{1/2}``), the exact Hessian of a network
does not. For ``target="hessian"`` :func:`weight_samples` therefore draws
``P^{-1/2} z``, ``z ~ N(0, I)``, by batched Lanczos
(:func:`laplace_hfl.engine.lanczos.lanczos_inv_sqrt`), exact for any positive
definite ``P``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from laplace_hfl.engine.amortized import perturbed_rhs
from laplace_hfl.engine.curvature import Curvature, curvature_of
from laplace_hfl.engine.functional import (
    LaplaceObjective,
    data_only_objective,
    ggn_matvec,
)
from laplace_hfl.engine.lanczos import lanczos_inv_sqrt
from laplace_hfl.engine.solvers import batched_cg
from laplace_hfl.errors import RefitConvergenceWarning, warn_user

__all__ = [
    "WeightSamples",
    "curvature_matvec",
    "precision_matvec",
    "solve_precision",
    "weight_samples",
]

Precond = Callable[[Tensor], Tensor] | None


def precision_matvec(obj: LaplaceObjective, target: str, V: Tensor) -> Tensor:
    """``P v`` for each row ``v`` of ``V`` (``(m, P)``), ``P`` at the MAP.

    Parameters
    ----------
    obj : LaplaceObjective
    target : {"ggn", "hessian"} or Curvature
        The curvature (:mod:`laplace_hfl.engine.curvature`).
    V : Tensor
        ``(m, P)``.

    Returns
    -------
    Tensor
        ``(m, P)``.
    """
    return curvature_of(target).precision_matvec(obj, V)


def curvature_matvec(obj: LaplaceObjective, target: str, V: Tensor) -> Tensor:
    """``H v``: the data curvature alone (no ``_H_factor``, no prior); the
    arguments and the result are those of :func:`precision_matvec`."""
    bare = data_only_objective(obj)
    return precision_matvec(bare, target, V)


def _warn_unconverged(
    what: str, converged: Tensor, rel_residual: Tensor, iterations: Tensor, rtol: float
) -> None:
    bad = ~converged
    n_bad = int(bad.sum())
    if n_bad == 0:
        return
    warn_user(
        f"{what} did not converge for {n_bad} of {converged.numel()} "
        f"right-hand sides (largest relative residual or change "
        f"{float(rel_residual[bad].max()):.3e} > rtol={rtol:.1e} after "
        f"{int(iterations.max())} iterations). The "
        "result is inexact; increase max_iter"
        + ("." if what.endswith("Lanczos") else " or precondition_rank."),
        RefitConvergenceWarning,
    )


def solve_precision(
    obj: LaplaceObjective,
    target: str,
    B: Tensor,
    rtol: float,
    max_iter: int,
    precond: Precond = None,
) -> Tensor:
    """``P^{-1} b`` for every row of ``B`` (``(m, P)``) by batched CG.

    Parameters
    ----------
    obj : LaplaceObjective
    target : {"ggn", "hessian"}
    B : Tensor
        ``(m, P)`` right-hand sides.
    rtol : float
        CG stops at ``||b - P x|| <= rtol * ||b||``.
    max_iter : int
    precond : callable, optional
        Preconditioner applied row-wise (Nystrom).

    Returns
    -------
    Tensor
        ``(m, P)``.

    Raises
    ------
    laplace_hfl.engine.solvers.NegativeCurvature
        ``P`` is not positive definite (only possible for ``"hessian"``).

    Warns
    -----
    RefitConvergenceWarning
        When a solve does not reach ``rtol`` within ``max_iter``.
    """
    b_norm = B.norm(dim=1)
    res = batched_cg(
        lambda idx, V: precision_matvec(obj, target, V),
        B,
        rtol * b_norm,
        max_iter,
        precond,
    )
    rel = res.residual_norm / b_norm.clamp_min(torch.finfo(B.dtype).tiny)
    _warn_unconverged(
        "posterior_covariance @ v: CG", res.converged, rel, res.iterations, rtol
    )
    return res.x


@dataclass
class WeightSamples:
    """Deviations ``theta_s - theta_MAP`` and their solver diagnostics.

    Attributes
    ----------
    deviations : Tensor
        ``(S, P)`` draws of ``N(0, P^{-1})``.
    residual : Tensor
        Per draw ``(S,)``: the relative CG residual ``||b_s - P delta_s|| /
        ||b_s||`` (``"ggn"``) or the relative change of the Lanczos iterate
        over its last check (``"hessian"``).
    iterations : Tensor
        CG or Lanczos iterations per draw ``(S,)``.
    """

    deviations: Tensor
    residual: Tensor
    iterations: Tensor


def weight_samples(
    obj: LaplaceObjective,
    n_samples: int,
    *,
    target: str | Curvature = "ggn",
    generator: torch.Generator | None = None,
    rtol: float = 1e-6,
    max_iter: int = 1000,
    chunk_size: int | None = None,
    precond: Precond = None,
) -> WeightSamples:
    """``S`` exact draws of ``N(0, P^{-1})``.

    ``target="ggn"``: sample-then-optimise (``P^{-1} b`` with ``Cov[b] = P``,
    batched preconditioned CG). ``target="hessian"``: ``P^{-1/2} z`` by
    batched Lanczos (no preconditioner; memory ``k * chunk_size * P``).

    Parameters
    ----------
    obj : LaplaceObjective
    n_samples : int
        ``S >= 1``.
    target : {"ggn", "hessian"} or Curvature, default="ggn"
    generator : torch.Generator, optional
        Source of all randomness (the global generator when None); the same
        generator state and ``chunk_size`` give the same draws.
    rtol : float, default=1e-6
        CG stops at ``||b_s - P delta_s|| <= rtol * ||b_s||``; Lanczos when
        the iterate changes by at most ``rtol`` (relative).
    max_iter : int, default=1000
    chunk_size : int or None
        Draws solved together (memory ``~5 * chunk_size * P``); all when None.
    precond : callable, optional
        Preconditioner of ``P`` applied row-wise (CG only).

    Returns
    -------
    WeightSamples

    Raises
    ------
    laplace_hfl.engine.solvers.NegativeCurvature
        ``target="hessian"`` and ``P`` is not positive definite.

    Warns
    -----
    RefitConvergenceWarning
        When a draw's solve does not reach ``rtol`` within ``max_iter``.
    """
    curvature = curvature_of(target)
    step = chunk_size or n_samples
    parts, res_parts, it_parts, ok_parts = [], [], [], []
    for start in range(0, n_samples, step):
        m = min(step, n_samples - start)
        if not curvature.gauss_newton:  # no J^T J form to perturb: Lanczos
            theta = obj.theta_map
            Z = torch.randn(
                m, theta.numel(), dtype=theta.dtype, device=theta.device,
                generator=generator,
            )  # fmt: skip
            lz = lanczos_inv_sqrt(
                lambda V: curvature.precision_matvec(obj, V), Z, rtol, max_iter
            )
            x, rel, its, ok = lz.x, lz.change, lz.iterations, lz.converged
        else:
            B = perturbed_rhs(obj, m, generator)
            b_norm = B.norm(dim=1)
            res = batched_cg(
                lambda idx, V: ggn_matvec(obj, V), B, rtol * b_norm, max_iter, precond
            )
            x, rel, its = res.x, res.residual_norm / b_norm, res.iterations
            ok = res.converged
        parts.append(x)
        res_parts.append(rel)
        it_parts.append(its)
        ok_parts.append(ok)
    out = WeightSamples(torch.cat(parts), torch.cat(res_parts), torch.cat(it_parts))
    _warn_unconverged(
        f"sample(): {'CG' if curvature.gauss_newton else 'Lanczos'}",
        torch.cat(ok_parts),
        out.residual,
        out.iterations,
        rtol,
    )
    return out
