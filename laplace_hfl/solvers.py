"""Matrix-free solvers used by the refits.

:func:`batched_cg` runs conjugate gradients on many right-hand sides at once:
one call of ``matvec`` serves every still-active column, so a pass over the
training data is shared by all query points, outputs and signs being refit.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["CGResult", "NegativeCurvature", "batched_cg"]


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
        Whether each column met its tolerance ``(m,)``.
    """

    x: Tensor
    residual_norm: Tensor
    iterations: Tensor
    converged: Tensor


def batched_cg(
    matvec: Callable[[Tensor, Tensor], Tensor],
    B: Tensor,
    tol: Tensor,
    max_iter: int,
    precond: Callable[[Tensor], Tensor] | None = None,
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
        (e.g. :func:`laplace_hfl.preconditioner.nystrom_apply`). Changes the
        iteration count, not the solution or the residual tolerance.

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
    X = torch.zeros_like(B)
    R = B.clone()
    Z = M(R)
    Pdir = Z.clone()
    rz = (R * Z).sum(-1)
    res = R.norm(dim=-1)
    iterations = torch.zeros(m, dtype=torch.long, device=B.device)
    active = res > tol
    for _ in range(max_iter):
        idx = torch.nonzero(active).flatten()
        if idx.numel() == 0:
            break
        P_a = Pdir[idx]
        AP = matvec(idx, P_a)
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
        Pdir[idx] = Z_a + (rz_new / rz[idx])[:, None] * P_a
        rz[idx] = rz_new
        res[idx] = R_a.norm(dim=-1)
        iterations[idx] += 1
        active = res > tol
    return CGResult(X, res, iterations, res <= tol)
