"""The Hessian-free Laplace estimator: perturbed refits and central differences.

For a direction ``v = grad_theta f_c(x*)`` (one output of one query point) the
estimator re-optimises the Laplace objective perturbed by the linear term
``-/+ eps * <v, theta>``, warm-started where the unperturbed refit ends, and
reads the posterior covariance from the two displacements::

    theta_{+/-} = argmin_theta L(theta) -/+ eps <v, theta>
    u = (theta_+ - theta_-) / (2 eps)          ~=  P^{-1} v
    Cov[f_k(x'), f_c(x*)] ~= J_k(x') u

Two refit targets:

``"ggn"``
    refit the Gauss-Newton model of ``L`` at the MAP (the linearised network,
    with the loss expanded to second order in the outputs; for regression this
    *is* the linearised network). Its curvature is GGN + prior, the matrix
    laplace-torch's GGN backends form, so the limit is ``FullLaplace`` with a
    GGN backend. The objective is quadratic: each refit is one conjugate-gradient
    solve and the central difference is exact for any ``eps`` and any MAP,
    stationary or not.
``"hessian"``
    refit the network itself (the paper's form) by Newton-CG, so the limit is
    ``J H^{-1} J^T`` with ``H`` the exact Hessian of ``L``. Negative curvature
    (an indefinite Hessian, where the refit would run away) is detected and
    raised as :class:`~laplace_hfl.errors.IndefiniteHessianError`.

Only Jacobian-vector, vector-Jacobian and Hessian-vector products are used; no
Hessian, GGN or Jacobian matrix of the training data is ever formed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from laplace_hfl.engine.curvature import CURVATURES, Curvature
from laplace_hfl.engine.functional import (
    LaplaceObjective,
    objective_grad,
    objective_value,
)
from laplace_hfl.engine.krylov_reuse import RecycledSpace, projected_solve
from laplace_hfl.engine.preconditioner import spectrum_floor
from laplace_hfl.engine.progress import progress
from laplace_hfl.engine.solvers import (
    RECURRENCE_DTYPE,
    NegativeCurvature,
    batched_cg,
    mixed_precision,
)
from laplace_hfl.errors import (
    IndefiniteHessianError,
    NonStationaryMAPWarning,
    RefitConvergenceWarning,
    warn_user,
)

__all__ = [
    "TARGETS",
    "RefitSettings",
    "BasePoint",
    "RefitDiagnostics",
    "unperturbed_refit",
    "perturbed_refits",
]

#: The ``target`` names (:data:`laplace_hfl.engine.curvature.CURVATURES`).
TARGETS = tuple(CURVATURES)

#: Default relative width of a variance's certified bracket at which a
#: ``"ggn"`` refit stops (:attr:`RefitSettings.variance_rtol`).
VARIANCE_RTOL = 1e-3
_DEFAULT_RTOL = 1e-6

_INDEFINITE_HINT = (
    "The exact Hessian of the Laplace objective is indefinite at the MAP, so "
    "the network refit (target='hessian') runs away instead of converging. "
    "Use target='ggn' (GGN + prior, positive definite by construction), or "
    "train the MAP to a minimum of the Laplace objective (summed loss, "
    "weight decay equal to the prior precision)."
)


@dataclass(frozen=True)
class RefitSettings:
    """Numerical settings of the refits.

    Parameters
    ----------
    target : {"ggn", "hessian"}
        What is refit: the Gauss-Newton model at the MAP or the network (a
        name of :data:`~laplace_hfl.engine.curvature.CURVATURES`; the object
        is :attr:`curvature`).
    eps : float
        Relative perturbation size. Column ``j`` is perturbed by
        ``eps_j = eps / sqrt(v_j^T A^{-1} v_j)`` on the *summed* objective,
        with ``A^{-1} v_j`` from the refit's first Newton step, so each refit
        shifts ``f_c(x*)`` by ``eps`` posterior standard deviations and lowers
        ``L`` by ``eps^2 / 2``: inside the quadratic regime, far above the
        solver's resolution.
    rtol : float
        A refit has converged when its residual gradient norm is at most
        ``rtol * eps_j * ||v_j||``; the unperturbed refit when it is at most
        ``rtol`` times the gradient scale at the MAP.
    var_rtol : float or None
        Variance tolerance of the ``"ggn"`` refits: a direction also stops
        (whichever rule comes first) once the certified bracket of its
        variance ``v^T A^{-1} v`` (:mod:`laplace_hfl.engine.solvers`) is within
        ``var_rtol`` relative. None: :data:`VARIANCE_RTOL` (1e-3) when ``rtol``
        is at its default 1e-6 or looser; a tighter ``rtol`` asks for the
        residual rule's accuracy, and the variance stop is then off (the
        bracket is still recorded). The bracket certifies the variances
        (diagonal entries); after the Rayleigh-Ritz step of
        :func:`galerkin_refine` a covariance is off by at most
        ``sqrt(gap_i gap_j) <= var_rtol sqrt(var_i var_j)`` within one step's
        block (all directions of a call up to :data:`GALERKIN_BUDGET`, else a
        chunk); across blocks by at most ``sqrt(var_i gap_j)``.
    max_iter : int
        Conjugate-gradient iterations per linear solve.
    max_newton : int
        Newton steps per refit (``target="hessian"``).
    """

    target: str = "ggn"
    eps: float = 1e-3
    rtol: float = _DEFAULT_RTOL
    max_iter: int = 1000
    max_newton: int = 20
    var_rtol: float | None = None

    def __post_init__(self) -> None:
        if self.target not in CURVATURES:
            raise ValueError(
                f"Unknown HFL target {self.target!r}: use 'ggn' (refit the "
                "linearised network; limit = FullLaplace with a GGN backend) or "
                "'hessian' (refit the network; limit = exact-Hessian Laplace)."
            )
        if not (isinstance(self.eps, int | float) and self.eps > 0):
            raise ValueError(f"eps must be a positive number, got {self.eps!r}.")
        if not (isinstance(self.rtol, int | float) and self.rtol > 0):
            raise ValueError(f"rtol must be a positive number, got {self.rtol!r}.")
        if self.var_rtol is not None and not (
            isinstance(self.var_rtol, int | float) and 0 < self.var_rtol < 1
        ):
            raise ValueError(
                f"var_rtol must be None or in (0, 1), got {self.var_rtol!r}."
            )
        for name in ("max_iter", "max_newton"):
            value = getattr(self, name)
            if not (isinstance(value, int) and value >= 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")

    @property
    def curvature(self) -> Curvature:
        """The curvature object ``target`` names."""
        return CURVATURES[self.target]

    @property
    def variance_rtol(self) -> float | None:
        """The variance tolerance in force (``var_rtol`` or its default;
        None: residual rule only)."""
        if self.var_rtol is not None:
            return float(self.var_rtol)
        return VARIANCE_RTOL if self.rtol >= _DEFAULT_RTOL else None


@dataclass(frozen=True)
class BasePoint:
    """Where the unperturbed refit ends; all perturbed refits start there.

    Attributes
    ----------
    theta : Tensor
        Parameters ``(P,)`` (for ``"ggn"`` the minimiser of the Gauss-Newton
        model, for ``"hessian"`` the nearby minimum of ``L``).
    residual : Tensor
        Gradient of the refit objective at ``theta`` ``(P,)``.
    map_grad_norm : float
        ``||grad L(theta_MAP)||``: how far the MAP is from stationary.
    displacement : float
        ``||theta - theta_MAP||``.
    iterations : int
        Conjugate-gradient iterations spent.
    """

    theta: Tensor
    residual: Tensor
    map_grad_norm: float
    displacement: float
    iterations: int


@dataclass(frozen=True)
class RefitDiagnostics:
    """Per-refit diagnostics of :func:`perturbed_refits`.

    Attributes
    ----------
    eps : Tensor
        Perturbation ``eps_j`` per column ``(m,)``.
    residual : Tensor
        Residual gradient norm of each refit relative to ``eps_j ||v_j||``,
        ``(2, m)`` for the ``+`` and ``-`` refits.
    iterations : Tensor
        Conjugate-gradient iterations per refit ``(2, m)``.
    converged : Tensor
        Whether each refit met ``rtol`` ``(2, m)``.
    solver : {"cg", "dense"}
        How the refits were solved: conjugate gradients, or one Cholesky
        factor of the dense curvature (:mod:`laplace_hfl.engine.dense`; then ``eps`` is
        0, ``iterations`` 0 and ``residual`` the relative linear residual).
    preconditioner : {"kfac", "nystrom", "none"}
        Preconditioner of the CG solves.
    variance_lower, variance_upper : Tensor or None
        Certified bracket of each direction's variance ``v_j^T A^{-1} v_j``
        ``(m,)`` (float64), from the Gauss and Gauss-Radau quadrature of the
        CG coefficients (:mod:`laplace_hfl.engine.solvers`); NaN where none is
        certified (``target="hessian"``: no lower bound of the Hessian's
        spectrum; a zero prior precision). The reported variance ``v^T u``
        (after :func:`galerkin_refine`) is itself a Gauss lower bound; the
        lower end is the larger of it and CG's. None for other solvers.
    products : float
        Cost in GGN-product equivalents: data passes x directions (CG
        products, Newton gradients), comparable across machines.
    passes : float
        Data passes (each serves every direction still iterating).
    choice : str
        Why this solver and preconditioner: the options as set, or what the
        probe of ``"auto"`` measured (:mod:`laplace_hfl.engine.auto_choice`).

    ``repr`` is one line (:meth:`summary`); the per-column tensors stay
    available as attributes.
    """

    eps: Tensor
    residual: Tensor
    iterations: Tensor
    converged: Tensor
    solver: str = "cg"
    preconditioner: str = "none"
    variance_lower: Tensor | None = None
    variance_upper: Tensor | None = None
    products: float = 0.0
    passes: float = 0.0
    choice: str = ""

    def summary(self) -> str:
        """One line: solver, preconditioner, refits converged, iterations and
        residuals (largest), and why this solver."""
        n = self.converged.numel()
        ok = int(self.converged.sum()) if n else 0
        its = int(self.iterations.max()) if n else 0
        res = float(self.residual.max()) if n else 0.0
        why = f"; {self.choice}" if self.choice else ""
        cost = f", {self.products:.0f} products" if self.products else ""
        return (
            f"{self.solver}/{self.preconditioner}: {ok}/{n} refits converged, "
            f"max {its} iterations, max residual {res:.1e}{cost}{why}"
        )

    def __repr__(self) -> str:
        return f"RefitDiagnostics({self.summary()})"

    @staticmethod
    def concat(parts: list[RefitDiagnostics]) -> RefitDiagnostics:
        def cat(name: str) -> Tensor | None:
            values = [getattr(p, name) for p in parts]
            return None if any(v is None for v in values) else torch.cat(values)

        return RefitDiagnostics(
            torch.cat([p.eps for p in parts]),
            torch.cat([p.residual for p in parts], dim=1),
            torch.cat([p.iterations for p in parts], dim=1),
            torch.cat([p.converged for p in parts], dim=1),
            parts[0].solver,
            parts[0].preconditioner,
            cat("variance_lower"),
            cat("variance_upper"),
            float(sum(p.products for p in parts)),
            float(sum(p.passes for p in parts)),
            parts[0].choice,
        )


def _raise_indefinite(err: NegativeCurvature, where: str) -> None:
    raise IndefiniteHessianError(
        f"Negative curvature {err.curvature:.3e} (Rayleigh quotient p^T H p / "
        f"p^T p) met during {where}. " + _INDEFINITE_HINT
    ) from err


def _gradient_scale(obj: LaplaceObjective, g0: Tensor) -> float:
    prior_grad = obj.prior_precision * (obj.theta_map - obj.prior_mean)
    return float(prior_grad.norm() + g0.norm()) or 1.0


def unperturbed_refit(
    obj: LaplaceObjective,
    settings: RefitSettings,
    precond: Callable[[Tensor], Tensor] | None = None,
) -> BasePoint:
    """Re-optimise the unperturbed refit objective, warm-started at the MAP.

    At a stationary MAP this returns the MAP itself after one gradient
    evaluation. Its end point is shared by every perturbed refit, and its
    residual cancels in the central differences.

    Parameters
    ----------
    obj : LaplaceObjective
    settings : RefitSettings
    precond : callable, optional
        Preconditioner of the conjugate-gradient solves (see
        :mod:`laplace_hfl.engine.preconditioner`); speeds convergence only.

    Returns
    -------
    BasePoint

    Raises
    ------
    IndefiniteHessianError
        ``target="hessian"`` and Newton-CG meets negative curvature.
    """
    theta0 = obj.theta_map
    g0 = objective_grad(obj, theta0[None])[0]
    g0_norm = float(g0.norm())
    tol = settings.rtol * _gradient_scale(obj, g0)
    if g0_norm <= tol:
        return BasePoint(theta0, g0, g0_norm, 0.0, 0)

    curvature = settings.curvature
    if curvature.gauss_newton:
        res = batched_cg(
            lambda idx, V: curvature.products(obj, theta0[None], idx, V),
            -g0[None],
            torch.tensor([tol], dtype=g0.dtype, device=g0.device),
            settings.max_iter,
            precond=precond,
        )
        delta = res.x[0]
        residual = (
            g0 + curvature.products(obj, theta0[None], slice(None), delta[None])[0]
        )
        return BasePoint(
            theta0 + delta,
            residual,
            g0_norm,
            float(delta.norm()),
            int(res.iterations[0]),
        )

    theta, g, iterations = theta0, g0, 0
    value = objective_value(obj, theta)
    for _ in range(settings.max_newton):
        if float(g.norm()) <= tol:
            break
        inner_tol = torch.tensor(
            [max(1e-3 * float(g.norm()), 0.5 * tol)], dtype=g.dtype, device=g.device
        )
        try:
            res = batched_cg(
                lambda idx, V, th=theta: curvature.products(obj, th[None], idx, V),
                -g[None],
                inner_tol,
                settings.max_iter,
                precond=precond,
            )
        except NegativeCurvature as err:
            _raise_indefinite(err, "the unperturbed network refit at the MAP")
        iterations += int(res.iterations[0])
        step = res.x[0]
        for _ in range(30):  # backtracking keeps Newton from overshooting
            new_value = objective_value(obj, theta + step)
            if torch.isfinite(new_value) and new_value <= value + 1e-12 * abs(value):
                break
            step = step / 2
        theta, value = theta + step, new_value
        g = objective_grad(obj, theta[None])[0]
    if float(g.norm()) > tol:
        warn_user(
            f"The unperturbed network refit stopped after {settings.max_newton} "
            f"Newton steps with gradient norm {float(g.norm()):.3e} > tolerance "
            f"{tol:.3e} (MAP gradient norm {g0_norm:.3e}). Increase max_newton or "
            "use target='ggn'.",
            RefitConvergenceWarning,
        )
    displacement = float((theta - theta0).norm())
    if displacement > 1e-3 * (float(theta0.norm()) + 1e-12):
        warn_user(
            f"The MAP is not a stationary point of the Laplace objective "
            f"(||grad L|| = {g0_norm:.3e}); the network refit moved "
            f"{displacement:.3e} (relative {displacement / float(theta0.norm()):.2e}) "
            "to a nearby minimum before any perturbation, and target='hessian' "
            "describes that minimum. target='ggn' is exact at any MAP.",
            NonStationaryMAPWarning,
        )
    return BasePoint(theta, g, g0_norm, displacement, iterations)


#: Largest ``m^2 P`` (flops / 2) of one Rayleigh-Ritz step over all the
#: directions of a call (~7e10: seconds on a CPU core, small next to the CG
#: products it refines); above it the step runs per chunk.
GALERKIN_BUDGET = 2**35


def galerkin_refine(V: Tensor, U: Tensor, R: Tensor) -> Tensor:
    """The best answers in the span of a chunk's CG solutions (Rayleigh-Ritz).

    CG answers ``A x_j = v_j`` column by column, each in its own Krylov space,
    so a cross term ``v_i^T u_j`` is off by ``v_i^T e_j``: first order in the
    errors ``e_j`` (a covariance matrix then need not be positive semi-definite).
    Projecting every ``x_j`` A-orthogonally onto ``W = span(u_1..u_m)``
    (``S = U A U^T = U (V - R)^T`` from the residuals, no product) gives
    ``u~_j`` with ``v_i^T u~_j = u~_i^T A u~_j``: symmetric, positive
    semi-definite, off by ``e~_i^T A e~_j`` (second order,
    ``|.| <= sqrt(gap_i gap_j)``), and each variance no worse (a bigger space).
    Costs ``2 m^2 P`` flops per chunk of ``m`` directions.
    """
    C = projected_solve(U @ (V - R).T, U @ V.T)  # S^+ F
    return C.T @ U


_EPS_REDUCTIONS = 4
#: Largest relative asymmetry ``||D+ + D-|| / ||D+ - D-||`` of a pair of
#: network refits accepted as quadratic (measured: 2e-2 at the default eps on
#: a 1-10-1 tanh regression net, where the central difference is 6e-6 off).
ASYMMETRY_TOL = 0.03
#: eps / 10 refinements of non-quadratic refits before warning.
_REFINEMENTS = 3


def _newton_corrections(
    base: BasePoint,
    V: Tensor,
    u0: Tensor,
    eps: Tensor,
    first_iterations: Tensor,
    curvature: Callable[[Tensor, Tensor, Tensor], Tensor],
    refit_grad: Callable[[Tensor], Tensor],
    settings: RefitSettings,
    precond: Callable[[Tensor], Tensor] | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, list[int]]:
    """Start both refits at the first Newton step and correct until converged.

    Returns the displacements, residual gradients, signed perturbations, goals,
    iterations and the cost ``[products, passes]`` spent here. Raises
    :class:`NegativeCurvature` from the inner solves.
    """
    v_norm = V.norm(dim=1)
    W = torch.cat([eps[:, None] * V, -eps[:, None] * V])  # signed perturbations
    D = torch.cat([eps[:, None] * u0, -eps[:, None] * u0])
    goal = settings.rtol * torch.cat([eps * v_norm, eps * v_norm])
    iterations = torch.cat([first_iterations, first_iterations])
    G = refit_grad(base.theta + D) - W
    cost = [D.shape[0], 1]
    for _ in range(settings.max_newton):
        g_norm = G.norm(dim=1)
        idx = torch.nonzero(g_norm > goal).flatten()
        if idx.numel() == 0:
            break
        thetas = base.theta + D[idx]
        res = batched_cg(
            lambda j, X, th=thetas: curvature(th, j, X),
            -G[idx],
            torch.maximum(1e-3 * g_norm[idx], 0.5 * goal[idx]),
            settings.max_iter,
            precond=precond,
        )
        iterations[idx] += res.iterations
        D[idx] += res.x
        G[idx] = refit_grad(base.theta + D[idx]) - W[idx]
        cost[0] += res.products + idx.numel()
        cost[1] += res.passes + 1
    return D, G, W, goal, iterations, cost


def _perturbed_chunk(
    obj: LaplaceObjective,
    base: BasePoint,
    V: Tensor,
    settings: RefitSettings,
    precond: Callable[[Tensor], Tensor] | None,
    refinements: int = _REFINEMENTS,
    recycle: RecycledSpace | None = None,
) -> tuple[Tensor, RefitDiagnostics, Tensor | None]:
    """Refits of one chunk: displacements ``(m, P)``, diagnostics, and for
    ``"ggn"`` the CG residuals (for :func:`galerkin_refine`; None else).
    ``"ggn"`` solves start from ``recycle``'s Galerkin projection and add
    their solutions to it."""
    m = V.shape[0]
    v_norm = V.norm(dim=1)
    kind = settings.curvature
    gauss_newton = kind.gauss_newton

    def curvature(thetas: Tensor, idx: Tensor, X: Tensor) -> Tensor:
        return kind.products(obj, thetas, idx, X)

    def refit_grad(thetas: Tensor) -> Tensor:
        return kind.refit_gradient(obj, base.theta, base.residual, thetas)

    # First Newton step of a refit under a unit perturbation: A u0 = v. It is
    # shared (up to sign) by the + and - refits and sets the scale of eps_j.
    # For "ggn" it is the whole answer (see below), and it carries the
    # certified bracket of v^T A^-1 v.
    where = "the first Newton step of the network refits"
    floor = spectrum_floor(obj, precond) if gauss_newton else None

    def first_matvec(idx: Tensor, X: Tensor) -> Tensor:
        return curvature(base.theta.expand(m, -1), idx, X)

    matvec, cg_precond = first_matvec, precond
    if gauss_newton and obj.theta_map.dtype != RECURRENCE_DTYPE:
        # float32 products, float64 recurrences (V arrives in float64 here)
        matvec, cg_precond = mixed_precision(matvec, precond, obj.theta_map.dtype)
    try:
        first = batched_cg(
            matvec,
            V,
            settings.rtol * v_norm,
            settings.max_iter,
            precond=cg_precond,
            spectrum_floor=floor,
            var_rtol=settings.variance_rtol,
            start=recycle.start(V) if gauss_newton and recycle else None,
        )
    except NegativeCurvature as err:
        _raise_indefinite(err, where)
    u0 = first.x
    if gauss_newton and recycle is not None:
        recycle.add(u0, V - first.r)  # A u0 = V - R: no product
    var0 = (V * u0).sum(1)
    finite = torch.isfinite(var0) & torch.isfinite(first.residual_norm)
    if not bool(finite.all()):
        raise FloatingPointError(
            "The first refit solve returned NaN/inf (v^T A^-1 v): the query "
            "Jacobians or the training Jacobian products overflow. Check the "
            "network for exploding activations at these inputs."
        )
    if gauss_newton and bool((var0 <= 0).any()):
        j = int(torch.nonzero(var0 <= 0)[0])
        raise FloatingPointError(
            f"The first GGN refit solve returned v^T A^-1 v = "
            f"{float(var0[j]):.3e} <= 0 for column {j}, although GGN + prior is "
            "positive semi-definite: the solve is too inaccurate. Lower rtol "
            f"(now {settings.rtol:g}) or raise max_iter; with a zero prior "
            "precision the GGN may be singular: use a positive prior."
        )
    if bool((var0 <= 0).any()):
        j = int(torch.nonzero(var0 <= 0)[0])
        raise IndefiniteHessianError(
            f"Non-positive curvature v^T A^-1 v = {float(var0[j]):.3e} for "
            f"column {j} during {where}. " + _INDEFINITE_HINT
        )
    nan = torch.full((m,), float("nan"), dtype=torch.float64, device=V.device)
    if gauss_newton:
        # The refit objective is quadratic: each of the +/- refits converges
        # to base -/+ eps_j A^-1 v_j up to the same correction for the base
        # point's residual, which cancels in the central difference exactly,
        # so (theta_+ - theta_-) / (2 eps_j) = A^-1 v_j: the first step
        # already is the refits' answer, certified by its bracket.
        eps = settings.eps / var0.sqrt()
        rel = (first.residual_norm / v_norm).expand(2, m)
        lower = nan if first.lower is None else first.lower
        upper = nan if first.upper is None else first.upper
        diag = RefitDiagnostics(
            eps=eps,
            residual=rel.clone(),
            iterations=first.iterations.expand(2, m).clone(),
            converged=first.converged.expand(2, m).clone(),
            variance_lower=lower,
            variance_upper=upper,
            products=float(first.products),
            passes=float(first.passes),
        )
        return u0, diag, first.r
    # Each refit moves f_c by eps posterior sd. If a network refit meets
    # negative curvature away from the base point (a Hessian that is nearly
    # singular at the MAP turns indefinite within the step), shrink eps: the
    # perturbed minimum exists for small enough eps whenever A is positive
    # definite at the base point, which the first step has just checked.
    scale = settings.eps
    for attempt in range(_EPS_REDUCTIONS + 1):
        eps = scale / var0.sqrt()
        try:
            D, G, W, goal, iterations, cost = _newton_corrections(
                base,
                V,
                u0,
                eps,
                first.iterations,
                curvature,
                refit_grad,
                settings,
                precond,
            )
            break
        except NegativeCurvature as err:
            if attempt == _EPS_REDUCTIONS:
                _raise_indefinite(err, "a perturbed network refit")
            scale /= 10

    U = (D[:m] - D[m:]) / (2 * eps[:, None])
    residual = (G.norm(dim=1) / (goal / settings.rtol)).view(2, m)
    iterations = iterations.view(2, m)
    if not gauss_newton:
        # Inside the quadratic regime D+ = -D-; their relative asymmetry is the
        # displacement's second-order term (eps * ||w|| / ||u||). Refit the
        # columns outside it with eps / 10 (the central difference's bias falls
        # as eps^2), a few times, then warn.
        asym = (D[:m] + D[m:]).norm(dim=1) / (D[:m] - D[m:]).norm(dim=1)
        bad = torch.nonzero(asym > ASYMMETRY_TOL).flatten()
        if bad.numel() and refinements > 0:
            sub = dataclasses.replace(settings, eps=scale / 10)
            U_b, d_b, _ = _perturbed_chunk(
                obj, base, V[bad], sub, precond, refinements - 1
            )
            U[bad], eps[bad] = U_b, d_b.eps
            residual[:, bad] = d_b.residual
            iterations[:, bad] += d_b.iterations
            cost[0] += d_b.products
            cost[1] += d_b.passes
        elif bad.numel():
            warn_user(
                f"{bad.numel()} network refits stayed outside the quadratic "
                f"regime (asymmetry of the +/- refits up to "
                f"{float(asym.max()):.2e} > {ASYMMETRY_TOL}) after shrinking eps "
                f"to {scale:.1e}: the central difference may be biased. The "
                "Hessian is nearly singular or strongly non-quadratic at the "
                "MAP; use target='ggn'.",
                RefitConvergenceWarning,
            )
    diag = RefitDiagnostics(
        eps=eps,
        residual=residual,
        iterations=iterations,
        converged=residual <= settings.rtol * (1 + 1e-6),
        variance_lower=nan,
        variance_upper=nan,
        products=float(first.products + cost[0]),
        passes=float(first.passes + cost[1]),
    )
    if not gauss_newton:
        var = (V * U).sum(1)
        if bool((var <= 0).any()):
            j = int(torch.nonzero(var <= 0)[0])
            raise IndefiniteHessianError(
                f"The network refit returned a non-positive variance "
                f"{float(var[j]):.3e} for column {j}. " + _INDEFINITE_HINT
            )
    return U, diag, None


def perturbed_refits(
    obj: LaplaceObjective,
    base: BasePoint,
    V: Tensor,
    settings: RefitSettings,
    chunk_size: int = 64,
    progress_bar: bool = False,
    precond: Callable[[Tensor], Tensor] | None = None,
    recycle: RecycledSpace | None = None,
) -> tuple[Tensor, RefitDiagnostics]:
    """Refit under ``-/+ eps_j <v_j, theta>`` for every row ``v_j`` of ``V``.

    Parameters
    ----------
    obj : LaplaceObjective
    base : BasePoint
        Result of :func:`unperturbed_refit`.
    V : Tensor
        Perturbation directions ``(m, P)``: Jacobian rows ``grad f_c(x*)``.
    settings : RefitSettings
    chunk_size : int, default=64
        Directions refit together (each costs two refits); memory grows as
        ``chunk_size * P``. With ``target="ggn"`` and a float32 objective the
        products run in float32 and CG's recurrences, brackets and the
        Rayleigh-Ritz step in float64 (:func:`laplace_hfl.engine.solvers.mixed_precision`).
    progress_bar : bool, default=False
        Show a tqdm bar over chunks from the start (otherwise one appears when
        the chunks are expected to take long: :func:`laplace_hfl.engine.progress.progress`).
    precond : callable, optional
        Preconditioner of the conjugate-gradient solves; speeds convergence only.
    recycle : RecycledSpace, optional
        Earlier solutions of the same system (``"ggn"`` only): every chunk's
        solve starts from their Galerkin projection and adds its solutions
        (:mod:`laplace_hfl.engine.krylov_reuse`); changes the iterations and
        the answers within their brackets, not the brackets' validity.

    Returns
    -------
    U : Tensor
        Central differences ``(theta_+ - theta_-) / (2 eps_j)`` ``(m, P)``,
        estimates of ``P^{-1} v_j``.
    diagnostics : RefitDiagnostics

    Warns
    -----
    RefitConvergenceWarning
        If a refit's residual gradient exceeds the tolerance.

    Raises
    ------
    IndefiniteHessianError
        ``target="hessian"`` and negative curvature is met.
    """
    out_dtype = V.dtype
    ggn = settings.curvature.gauss_newton
    if ggn:  # CG recurrences and the Rayleigh-Ritz step in float64
        V = V.to(RECURRENCE_DTYPE)
    U = torch.zeros_like(V)
    nonzero = torch.nonzero(V.norm(dim=1) > 0).flatten()
    parts: list[RefitDiagnostics] = []
    R = torch.zeros_like(V) if ggn else None
    starts = range(0, nonzero.numel(), chunk_size)
    for start in progress(starts, desc="[HFL refits]", always=progress_bar):
        idx = nonzero[start : start + chunk_size]
        U[idx], diag, R_c = _perturbed_chunk(
            obj, base, V[idx], settings, precond, recycle=recycle
        )
        if R is not None:
            R[idx] = R_c
        parts.append(diag)
    if parts:
        diag = RefitDiagnostics.concat(parts)
    else:
        empty = V.new_zeros(0)
        diag = RefitDiagnostics(
            empty,
            V.new_zeros(2, 0),
            V.new_zeros(2, 0, dtype=torch.long),
            V.new_zeros(2, 0, dtype=torch.bool),
        )
    if R is not None and parts:
        # one Rayleigh-Ritz step over all directions of the call when it is
        # cheap, else per chunk (covariances across chunks stay first order)
        m = nonzero.numel()
        block = m if m * m * V.shape[1] <= GALERKIN_BUDGET else chunk_size
        for start in range(0, m, block):
            idx = nonzero[start : start + block]
            U[idx] = galerkin_refine(V[idx], U[idx], R[idx])
        if diag.variance_lower is not None:  # the refined v^T u: a Gauss bound
            refined = (V[nonzero] * U[nonzero]).sum(1).to(diag.variance_lower)
            lower = torch.maximum(diag.variance_lower, refined)  # NaN stays NaN
            diag = dataclasses.replace(diag, variance_lower=lower)
    if diag.converged.numel() and not bool(diag.converged.all()):
        n_bad = int((~diag.converged).sum())
        warn_user(
            f"{n_bad} of {diag.converged.numel()} refits did not converge: largest "
            f"residual gradient {float(diag.residual.max()):.3e} x eps*||J|| "
            f"(tolerance rtol={settings.rtol:.1e}"
            + (
                f", or a certified variance bracket within "
                f"var_rtol={settings.variance_rtol:.1e}"
                if ggn and settings.variance_rtol is not None
                else ""
            )
            + ") after at most "
            f"{int(diag.iterations.max())} CG iterations (max_iter="
            f"{settings.max_iter}). Variances are biased towards 0; increase "
            "max_iter"
            + (
                " or use target='ggn'."
                if not ggn
                else " or raise the prior precision (better conditioning)."
            ),
            RefitConvergenceWarning,
        )
    return U.to(out_dtype), diag
