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

    Returns
    -------
    CGResult

    Raises
    ------
    NegativeCurvature
        If a search direction has non-positive curvature.
    """
    m = B.shape[0]
    X = torch.zeros_like(B)
    R = B.clone()
    Pdir = R.clone()
    rs = (R * R).sum(-1)
    iterations = torch.zeros(m, dtype=torch.long, device=B.device)
    active = rs.sqrt() > tol
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
        alpha = rs[idx] / pAp
        X[idx] += alpha[:, None] * P_a
        R[idx] -= alpha[:, None] * AP
        rs_new = (R[idx] * R[idx]).sum(-1)
        beta = rs_new / rs[idx]
        Pdir[idx] = R[idx] + beta[:, None] * P_a
        rs[idx] = rs_new
        iterations[idx] += 1
        active = rs.sqrt() > tol
    res = rs.sqrt()
    return CGResult(X, res, iterations, res <= tol)
