"""Matrix-free solvers used by the refits.

:func:`batched_cg` runs conjugate gradients on many right-hand sides at once:
one call of ``matvec`` serves every still-active column, so a pass over the
training data is shared by all query points, outputs and signs being refit.

Certified brackets (Golub & Meurant, *Matrices, Moments and Quadrature with
Applications*, 2010; Meurant & Tichý, *Error Norm Estimation in the Conjugate
Gradient Algorithm*, SIAM 2024). CG started at ``x_0 = 0`` on ``A x = b`` gives,
at no extra cost, a bracket of ``b^T A^{-1} b`` at every iteration ``k``:

* Gauss (lower): ``b^T x_k = sum_{j<k} alpha_j r_j^T z_j``, since
  ``b^T A^{-1} b - b^T x_k = ||x - x_k||_A^2 >= 0``;
* Gauss-Radau (upper): ``b^T x_k + Delta_k`` with ``Delta_0 = r_0^T z_0 / mu`` and
  ``Delta_{k+1} = r_{k+1}^T z_{k+1} (Delta_k - d_k) /
  (mu (Delta_k - d_k) + r_{k+1}^T z_{k+1})``, ``d_k = alpha_k r_k^T z_k``,
  valid for any ``0 < mu <= lambda_min(M^{-1} A)`` (the preconditioned
  operator; ``M = I`` without a preconditioner). It is the Gauss-Radau rule of
  the Lanczos tridiagonal ``T_k`` that CG's coefficients define, with the
  prescribed node ``mu``, in the recurrence form of Meurant & Tichý.

From a nonzero start ``x_0`` (its residual ``r_0 = b - A x_0`` given; e.g. the
Galerkin start of :mod:`laplace_hfl.engine.krylov_reuse`) the bracket is
``b^T x_0 + x_0^T r_0`` plus that of ``r_0^T A^{-1} r_0``, which CG from ``x_0``
(CG on ``A e = r_0`` from zero) brackets in the same way.

For a refit, ``b`` is a query's Jacobian row ``v`` and ``b^T A^{-1} b`` is its
variance, so a column can stop when its bracket is narrow enough
(``var_rtol``) instead of on a residual rule.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["CGResult", "NegativeCurvature", "batched_cg", "mixed_precision"]

#: Precision of the CG recurrences (iterates, residuals, brackets) when the
#: products run in float32: see :func:`mixed_precision`.
RECURRENCE_DTYPE = torch.float64


def mixed_precision(
    matvec: Callable[[Tensor, Tensor], Tensor],
    precond: Callable[[Tensor], Tensor] | None,
    product_dtype: torch.dtype,
) -> tuple[Callable[[Tensor, Tensor], Tensor], Callable[[Tensor], Tensor] | None]:
    """``matvec`` and ``precond`` taking and returning :data:`RECURRENCE_DTYPE`
    vectors while computing in ``product_dtype``.

    CG's recurrences then keep float64 accuracy (orthogonality, the brackets'
    sums) and only the products carry float32 rounding: the solve is that of
    ``A + E`` with ``|E| ~ 1e-7 |A|``, instead of a float32 CG whose attainable
    accuracy stalls near the float32 resolution of the residual.
    """

    def mv(idx: Tensor, X: Tensor) -> Tensor:
        return matvec(idx, X.to(product_dtype)).to(RECURRENCE_DTYPE)

    if precond is None:
        return mv, None

    def pc(R: Tensor) -> Tensor:
        return precond(R.to(product_dtype)).to(RECURRENCE_DTYPE)

    return mv, pc


class NegativeCurvature(ArithmeticError):
    """CG met a direction ``p`` with ``p^T A p <= 0``: ``A`` is not positive definite.

    Parameters
    ----------
    column : int
        Index of the right-hand side whose iteration met the direction.
    curvature : float
        The Rayleigh quotient ``p^T A p / p^T p`` (non-positive).
    """

    def __init__(self, column: int, curvature: float) -> None:
        super().__init__(f"non-positive curvature {curvature:.3e} in column {column}")
        self.column = column
        self.curvature = curvature


@dataclass
class CGResult:
    """Solution and diagnostics of :func:`batched_cg`.

    Attributes
    ----------
    x : Tensor
        Solutions ``(m, P)``.
    residual_norm : Tensor
        Final ``||b - A x||`` per column ``(m,)``.
    iterations : Tensor
        Iterations used per column ``(m,)``.
    converged : Tensor
        Whether each column met its tolerance (residual, or bracket where
        ``var_rtol`` is given) ``(m,)``.
    lower, upper : Tensor or None
        Certified bracket of ``b_j^T A^{-1} b_j`` per column ``(m,)`` (float64;
        only when ``spectrum_floor`` is given, else None).
    products : int
        Matrix-vector products spent (one data pass for one direction each):
        the sum over iterations of the columns still active.
    passes : int
        Calls of ``matvec`` (data passes, each serving all active columns).
    r : Tensor or None
        The recursively updated residuals ``b_j - A x_j`` ``(m, P)``.
    """

    x: Tensor
    residual_norm: Tensor
    iterations: Tensor
    converged: Tensor
    lower: Tensor | None = None
    upper: Tensor | None = None
    products: int = 0
    passes: int = 0
    r: Tensor | None = None


def batched_cg(
    matvec: Callable[[Tensor, Tensor], Tensor],
    B: Tensor,
    tol: Tensor,
    max_iter: int,
    precond: Callable[[Tensor], Tensor] | None = None,
    *,
    spectrum_floor: float | None = None,
    var_rtol: float | None = None,
    start: tuple[Tensor, Tensor] | None = None,
) -> CGResult:
    """Solve ``A x_j = b_j`` for every row of ``B`` with conjugate gradients.

    Parameters
    ----------
    matvec : callable
        ``matvec(idx, V)`` returns ``A_j v`` for the rows ``V`` belonging to
        columns ``idx`` (``A`` may differ between columns, e.g. Hessians at
        different points).
    B : Tensor
        Right-hand sides ``(m, P)``.
    tol : Tensor
        Absolute residual-norm tolerance per column ``(m,)``.
    max_iter : int
        Largest number of iterations.
    precond : callable, optional
        Symmetric positive definite preconditioner ``M^{-1}`` applied row-wise
        (e.g. :func:`laplace_hfl.engine.preconditioner.nystrom_apply`). Changes the
        iteration count, not the solution or the residual tolerance.
    spectrum_floor : float, optional
        A lower bound ``mu > 0`` of the spectrum of ``M^{-1} A`` (of ``A``
        without a preconditioner). Given, every column carries its certified
        bracket of ``b^T A^{-1} b`` (module doc); a wrong (too large) ``mu``
        voids the upper end.
    var_rtol : float, optional
        With ``spectrum_floor``: a column also stops once its bracket is within
        ``var_rtol`` relative (``upper - lower <= var_rtol * lower``), whichever
        of the two rules comes first.
    start : (Tensor, Tensor), optional
        Initial guesses ``X_0`` and their residuals ``B - A X_0`` (both
        ``(m, P)``; e.g. :meth:`laplace_hfl.engine.krylov_reuse.RecycledSpace.start`).
        Default: ``X_0 = 0``. The bracket then is ``b^T x_0 + x_0^T r_0`` plus
        that of ``r_0^T A^{-1} r_0`` (:mod:`laplace_hfl.engine.krylov_reuse`),
        certified when ``r_0`` is the residual of ``x_0``.

    Returns
    -------
    CGResult

    Raises
    ------
    NegativeCurvature
        If a search direction has non-positive curvature.
    """

    def M(R: Tensor) -> Tensor:
        return R if precond is None else precond(R)

    m = B.shape[0]
    if start is None:
        X, R = torch.zeros_like(B), B.clone()
    else:
        X, R = start[0].to(B).clone(), start[1].to(B).clone()
    Z = M(R)
    Pdir = Z.clone()
    rz = (R * Z).sum(-1)
    res = R.norm(dim=-1)
    iterations = torch.zeros(m, dtype=torch.long, device=B.device)
    bracket = spectrum_floor is not None
    if bracket:
        if not spectrum_floor > 0:
            raise ValueError(f"spectrum_floor must be positive, got {spectrum_floor}")
        # The quadrature recurrences run in float64 whatever the products use.
        lower = rz.new_zeros(m, dtype=torch.float64)
        if start is not None:  # b^T x0 + x0^T r0 (module doc of krylov_reuse)
            lower += ((B + R) * X).sum(-1).to(torch.float64)
        gap = rz.to(torch.float64) / spectrum_floor  # Delta_0 = r0^T z0 / mu

    def done() -> Tensor:
        stop = res <= tol
        if bracket and var_rtol is not None:
            stop |= gap <= var_rtol * lower
        return stop

    active = ~done()
    products = passes = 0
    for _ in range(max_iter):
        idx = torch.nonzero(active).flatten()
        if idx.numel() == 0:
            break
        P_a = Pdir[idx]
        AP = matvec(idx, P_a)
        products += idx.numel()
        passes += 1
        pAp = (P_a * AP).sum(-1)
        pp = (P_a * P_a).sum(-1)
        bad = pAp <= 0
        if bool(bad.any()):
            k = int(torch.nonzero(bad)[0])
            raise NegativeCurvature(int(idx[k]), float(pAp[k] / pp[k]))
        alpha = rz[idx] / pAp
        X[idx] += alpha[:, None] * P_a
        R_a = R[idx] - alpha[:, None] * AP
        R[idx] = R_a
        Z_a = M(R_a)
        rz_new = (R_a * Z_a).sum(-1)
        if bracket:
            d = alpha.to(torch.float64) * rz[idx].to(torch.float64)
            lower[idx] += d
            rest = (gap[idx] - d).clamp_min(0)
            rz64 = rz_new.to(torch.float64).clamp_min(0)
            denom = spectrum_floor * rest + rz64
            gap[idx] = torch.where(denom > 0, rz64 * rest / denom, 0.0)
        Pdir[idx] = Z_a + (rz_new / rz[idx])[:, None] * P_a
        rz[idx] = rz_new
        res[idx] = R_a.norm(dim=-1)
        iterations[idx] += 1
        active = ~done()
    return CGResult(
        X,
        res,
        iterations,
        done(),
        lower if bracket else None,
        lower + gap if bracket else None,
        products,
        passes,
        R,
    )
