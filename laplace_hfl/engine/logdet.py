"""Log-determinant of the posterior precision without forming it.

laplace-torch's posterior precision is ``A = h G + diag(p_0)`` with
``h = 1/(sigma^2 T)`` (``_H_factor``), ``G`` the data GGN (``target="ggn"``) or
the exact data Hessian (``target="hessian"``) at the MAP, and ``p_0`` the
diagonal prior precision. ``log det A`` enters the Laplace marginal likelihood;
this module estimates it and its gradients from curvature-vector products only,
by stochastic Lanczos quadrature (:mod:`laplace_hfl.engine.slq`).

Two paths:

* **Scalar prior** ``p_0 = lambda 1``: ``h G + lambda I`` has the Krylov spaces
  of ``G``, so one Lanczos run on ``G`` (independent of ``h`` and ``lambda``)
  gives nodes ``theta_j`` and weights ``w_j`` with
  ``log det(h G + lambda I) ~= scale * sum w_j log(h theta_j + lambda)``
  for *every* ``(h, lambda)``: :func:`isotropic_logdet` is a plain torch
  expression, differentiable by autograd, with no further data passes. Build
  the rule once per fit (:func:`curvature_quadrature`).
* **Layer-wise or diagonal prior**: Lanczos on ``A`` itself
  (:func:`posterior_logdet`), wrapped in an autograd function whose backward
  uses ``d log det A / d p_0 = diag(A^-1)`` and
  ``d log det A / d h = tr(A^-1 G) = (P - p_0 . diag(A^-1)) / h``, with
  ``diag(A^-1) ~= scale * sum_j z_j * A^-1 z_j`` from batched CG on the same
  probes (:func:`diag_inverse`).

With ``P <= max(n_probes, exact_max)`` the probes are the basis vectors and
everything is exact (to CG tolerance). Where the estimator holds the dense data
curvature ``G`` anyway (its dense solver), :func:`dense_logdet` (any prior: one
Cholesky factor per value, autograd through it) and :func:`eigen_logdet`
(scalar prior: eigenvalues of ``G`` once per fit) are exact at any ``P``. See
``docs/marglik.md``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor

from laplace_hfl.engine.functional import LaplaceObjective, data_only_objective
from laplace_hfl.engine.slq import (
    Probes,
    Quadrature,
    lanczos_quadrature,
    make_probes,
    quadrature_estimate,
)
from laplace_hfl.engine.solvers import NegativeCurvature, batched_cg
from laplace_hfl.engine.weight_posterior import precision_matvec
from laplace_hfl.errors import (
    IndefiniteHessianError,
    RefitConvergenceWarning,
    warn_user,
)

__all__ = [
    "MarglikSettings",
    "LogDetEstimate",
    "posterior_rows",
    "curvature_quadrature",
    "isotropic_logdet",
    "isotropic_trace_inverse",
    "posterior_logdet",
    "diag_inverse",
    "precision_quadratic",
    "dense_logdet",
    "eigen_logdet",
]


@dataclass(frozen=True)
class MarglikSettings:
    """Settings of the log-determinant estimator.

    Parameters
    ----------
    n_probes : int, default=64
        Rademacher probes; models with ``P <= max(n_probes, exact_max)`` use
        the ``P`` basis vectors instead and are exact.
    exact_max : int, default=256
        Largest ``P`` run in exact mode even above ``n_probes`` (``P`` probes,
        up to ``P`` Lanczos steps each: ``P^2`` curvature-vector products
        instead of ``n_probes * lanczos_steps``). 0 disables it.
    lanczos_steps : int, default=64
        Lanczos steps per probe for random probes (exact mode runs until each
        Krylov space is exhausted, at most ``P``).
    seed : int, default=0
        Seed of the probes (fixed: the same probes at every hyperparameter).
    cg_rtol : float, default=1e-8
        Relative residual of the CG solves behind the gradients.
    cg_max_iter : int, default=1000
        CG iteration limit.
    sketch_rank : int, default=1024
        Rank ``k`` of the Nyström sketch of the GGN that layer-wise and
        diagonal priors use above ``exact_max`` where no dense GGN is held
        (:mod:`laplace_hfl.engine.sketch_logdet`: ``k`` products once per fit,
        exact where the GGN's rank is below ``k``; ``n_probes`` probes of the
        remainder otherwise). Capped at ``P`` and at ``k P <= 2^27`` entries.
        0 runs Lanczos on the posterior precision at every prior value instead.
    sketch_tolerance : float, default=1.0
        Largest remainder (nats: the width of the interval the exact value lies
        in) a sketch below the GGN's rank may leave; a prior value where it
        leaves more runs Lanczos on the posterior precision instead (warned
        once per fit).
    """

    n_probes: int = 64
    exact_max: int = 256
    lanczos_steps: int = 64
    seed: int = 0
    cg_rtol: float = 1e-8
    cg_max_iter: int = 1000
    sketch_rank: int = 1024
    sketch_tolerance: float = 1.0

    def __post_init__(self) -> None:
        for name in ("n_probes", "lanczos_steps", "cg_max_iter"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        for name in ("exact_max", "sketch_rank"):
            value = getattr(self, name)
            if isinstance(value, bool) or not (isinstance(value, int) and value >= 0):
                raise ValueError(
                    f"{name} must be a non-negative integer, got {value!r}."
                )
        tol = self.sketch_tolerance
        if isinstance(tol, bool) or not (isinstance(tol, float | int) and tol >= 0):
            raise ValueError(
                f"sketch_tolerance must be a non-negative number, got {tol!r}."
            )
        if not (isinstance(self.cg_rtol, float | int) and 0 < self.cg_rtol < 1):
            raise ValueError(f"cg_rtol must lie in (0, 1), got {self.cg_rtol!r}.")


@dataclass(frozen=True)
class LogDetEstimate:
    """Diagnostics of the last log-determinant.

    Attributes
    ----------
    value : float
        ``log det A``.
    stderr : float
        Standard error over the probes (0 in exact mode).
    n_probes : int
    lanczos_steps : int
        Largest number of Lanczos steps a probe took.
    exact : bool
        Basis probes, every Krylov space exhausted (or a sketch that holds all
        of the curvature).
    truncation : float
        Sketched log-determinant (layer-wise / diagonal priors above the exact
        size): the remainder term; the exact value lies in ``[value -
        truncation, value]`` up to ``stderr``. 0 otherwise.
    sketch_rank : int
        Rank of the curvature sketch used (0: none).
    """

    value: float
    stderr: float
    n_probes: int
    lanczos_steps: int
    exact: bool
    truncation: float = 0.0
    sketch_rank: int = 0


def posterior_rows(obj: LaplaceObjective, target: str) -> Callable[[Tensor], Tensor]:
    """``V -> (h G + diag(p_0)) v`` row-wise at the MAP, for ``obj``'s ``h`` and ``p_0``.

    ``target="ggn"`` uses the GGN, ``"hessian"`` the exact Hessian
    (:func:`laplace_hfl.engine.weight_posterior.precision_matvec`).
    """
    return partial(precision_matvec, obj, target)


def _probes(obj: LaplaceObjective, settings: MarglikSettings) -> Probes:
    theta = obj.theta_map
    P = theta.numel()
    n_probes = P if P <= settings.exact_max else settings.n_probes
    return make_probes(P, n_probes, settings.seed, theta.dtype, theta.device)


def _steps(probes: Probes, settings: MarglikSettings) -> int:
    return probes.Z.shape[1] if probes.exact else settings.lanczos_steps


def curvature_quadrature(
    obj: LaplaceObjective, target: str, settings: MarglikSettings
) -> Quadrature:
    """Lanczos rules of the data curvature ``G`` alone (``h = 1``, no prior).

    Independent of ``h`` and of a scalar prior: build it once per fit and
    evaluate :func:`isotropic_logdet` at any ``(h, lambda)``.
    """
    probes = _probes(obj, settings)
    matvec = posterior_rows(data_only_objective(obj), target)
    return lanczos_quadrature(matvec, probes, _steps(probes, settings))


def _indefinite_posterior(ritz: float) -> IndefiniteHessianError:
    return IndefiniteHessianError(
        "The posterior precision (exact Hessian + prior) is not positive "
        f"definite at the MAP (Lanczos found the Ritz value {ritz:.3e}), so it "
        "has no log-determinant. Use target='ggn' (positive definite by "
        "construction), a larger prior precision, or train the MAP to a "
        "minimum of the Laplace objective."
    )


def isotropic_logdet(quad: Quadrature, h: Tensor, lam: Tensor) -> tuple[Tensor, float]:
    """``log det(h G + lam I)`` from the rules of ``G``; differentiable in ``h``, ``lam``.

    Raises
    ------
    IndefiniteHessianError
        A Ritz value of ``h G + lam I`` is not positive.
    """
    shifted = h * quad.nodes + lam
    low = float(shifted.detach().min())
    if not low > 0:
        raise _indefinite_posterior(low)
    return quadrature_estimate(quad, shifted.log())


def isotropic_trace_inverse(quad: Quadrature, h: Tensor, lam: Tensor) -> Tensor:
    """``tr (h G + lam I)^{-1}`` from the rules of ``G`` (no data pass)."""
    return quadrature_estimate(quad, 1.0 / (h * quad.nodes + lam))[0]


def diag_inverse(
    obj: LaplaceObjective,
    target: str,
    settings: MarglikSettings,
    precond: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """``diag(A^-1)`` estimate ``scale * sum_j z_j * A^{-1} z_j`` by batched CG.

    Exact (to ``cg_rtol``) with basis probes.

    Raises
    ------
    IndefiniteHessianError
        CG met non-positive curvature (``target="hessian"``).
    """
    probes = _probes(obj, settings)
    matvec = posterior_rows(obj, target)
    Z = probes.Z
    tol = settings.cg_rtol * Z.norm(dim=-1)
    try:
        res = batched_cg(
            lambda idx, V: matvec(V), Z, tol, settings.cg_max_iter, precond=precond
        )
    except NegativeCurvature as err:
        raise _indefinite_posterior(err.curvature) from err
    if not bool(res.converged.all()):
        warn_user(
            f"{int((~res.converged).sum())} of {Z.shape[0]} CG solves behind the "
            "marginal-likelihood gradient stopped before cg_rtol="
            f"{settings.cg_rtol:g} (largest residual "
            f"{float(res.residual_norm.max()):.3e}); the gradient is biased. Raise "
            "la.marglik_settings.cg_max_iter.",
            RefitConvergenceWarning,
        )
    return probes.scale * (Z * res.x).sum(0)


class _PosteriorLogDet(torch.autograd.Function):
    """``log det(h G + diag(p_0))`` with gradients from ``diag(A^-1)``."""

    @staticmethod
    def forward(ctx, h, p0, value, diag_fn):  # noqa: ANN001, ANN205
        ctx.save_for_backward(h, p0)
        ctx.diag_fn = diag_fn
        return value.detach().clone()

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        h, p0 = ctx.saved_tensors
        d = ctx.diag_fn()
        grad_h = grad_p0 = None
        if ctx.needs_input_grad[0]:
            grad_h = grad * (p0.numel() - (p0 * d).sum()) / h
        if ctx.needs_input_grad[1]:
            grad_p0 = grad * d
        return grad_h, grad_p0, None, None


def posterior_logdet(
    obj: LaplaceObjective,
    target: str,
    h: Tensor,
    p0: Tensor,
    settings: MarglikSettings,
    precond: Callable[[Tensor], Tensor] | None = None,
    backward_context: Callable[[], AbstractContextManager] = nullcontext,
) -> tuple[Tensor, LogDetEstimate]:
    """``log det(h G + diag(p_0))`` for any (layer-wise, diagonal) prior.

    Lanczos on the posterior precision itself; the result is differentiable
    w.r.t. ``h`` (0-dim) and ``p_0`` (``(P,)``): the backward pass runs
    :func:`diag_inverse` on the same probes (only when a gradient is asked for;
    in exact mode the Lanczos rules give ``diag(A^-1)`` without a solve).

    Parameters
    ----------
    obj : LaplaceObjective
        Any objective of the fit; its ``h_factor`` and ``prior_precision`` are
        replaced by ``h`` and ``p_0``.
    target : {"ggn", "hessian"}
    h, p0 : Tensor
        ``_H_factor`` and ``prior_precision_diag`` (may require grad).
    settings : MarglikSettings
    precond : callable, optional
        Preconditioner of the CG solves for these ``h``, ``p_0``.
    backward_context : callable, optional
        Context the backward pass's solves run in (e.g. the model's eval
        mode: the backward runs after the caller's own context has closed).

    Raises
    ------
    IndefiniteHessianError
        A Ritz value (or a CG curvature) of ``A`` is not positive.
    """
    at = dataclasses.replace(
        obj,
        h_factor=float(h.detach()),
        prior_precision=p0.detach().to(obj.theta_map.dtype),
    )
    probes = _probes(at, settings)
    quad = lanczos_quadrature(
        posterior_rows(at, target), probes, _steps(probes, settings)
    )
    low = float(quad.nodes.min())
    if not low > 0:
        raise _indefinite_posterior(low)
    value, stderr = quadrature_estimate(quad, quad.nodes.log())
    cache: list[Tensor] = []

    def diag_fn() -> Tensor:
        if not cache:
            if quad.exact:
                # Basis probe i: [A^-1]_ii = sum_j w_ij / theta_ij, exact once the
                # Krylov space is exhausted; no solve needed.
                cache.append((quad.weights / quad.nodes).sum(-1))
            else:
                with backward_context():
                    cache.append(diag_inverse(at, target, settings, precond))
        return cache[0].to(p0.dtype)

    out = _PosteriorLogDet.apply(h, p0, value.to(p0.dtype), diag_fn)
    info = LogDetEstimate(
        float(value), stderr, probes.Z.shape[0], int(quad.steps.max()), quad.exact
    )
    return out, info


def precision_quadratic(obj: LaplaceObjective, target: str, delta: Tensor) -> Tensor:
    """``delta_i^T A delta_i`` for each row of ``delta`` ``(n, P)`` (one data pass)."""
    return (delta * posterior_rows(obj, target)(delta)).sum(-1)


def _not_positive_definite(what: str) -> IndefiniteHessianError:
    return IndefiniteHessianError(
        f"The posterior precision (curvature + prior) is not positive definite "
        f"({what}), so it has no log-determinant: the prior precision is zero on "
        "directions the curvature does not determine. Use a positive prior "
        "precision."
    )


def dense_logdet(curvature: Tensor, h: Tensor, p0: Tensor) -> tuple[Tensor, Tensor]:
    """``log det(h G + diag(p_0))`` exactly, by one Cholesky factor.

    Differentiable w.r.t. ``h`` (0-dim) and ``p0`` (``(P,)``) by autograd
    through the factorisation (``d/dp_0 = diag(A^-1)``).

    Returns
    -------
    (Tensor, Tensor)
        The 0-dim log-determinant and the lower factor ``L`` (``A = L L^T``).

    Raises
    ------
    IndefiniteHessianError
        ``A`` is not positive definite.
    """
    A = h * curvature + torch.diag(p0.to(curvature.dtype))
    L, info = torch.linalg.cholesky_ex(A)
    if int(info) != 0:
        raise _not_positive_definite(f"Cholesky failed at pivot {int(info)}")
    return 2 * L.diagonal().log().sum(), L


def eigen_logdet(eigenvalues: Tensor, h: Tensor, lam: Tensor) -> Tensor:
    """``log det(h G + lam I) = sum_i log(h e_i + lam)`` from the eigenvalues
    ``e_i`` of ``G`` (formed once per fit); exact and differentiable in ``h``
    and ``lam`` at the cost of ``P`` logarithms.

    Raises
    ------
    IndefiniteHessianError
        ``h e_i + lam <= 0`` for some ``i``.
    """
    shifted = h * eigenvalues + lam
    low = float(shifted.detach().min())
    if not low > 0:
        raise _not_positive_definite(f"eigenvalue {low:.3e}")
    return shifted.log().sum()
