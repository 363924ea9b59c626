"""``A^{-1/2} z`` for a symmetric positive definite ``A`` known by products.

Batched Lanczos (one product of ``A`` serves every right-hand side) with full
reorthogonalisation: after ``k`` steps ``A^{-1/2} z ~ ||z|| Q_k T_k^{-1/2} e_1``
with ``Q_k`` the Krylov basis and ``T_k`` the tridiagonal Lanczos matrix; the
approximation is exact once the Krylov space is invariant (``k <= P``) and
converges like CG on ``A`` before that. With ``z ~ N(0, I)`` the result is a
draw of ``N(0, A^{-1})`` for any positive definite ``A``, so it samples the
exact-Hessian Laplace posterior, which has no square-root factorisation for
sample-then-optimise. Memory: the basis, ``k * m * P`` numbers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from laplace_hfl.engine.solvers import NegativeCurvature

__all__ = ["LanczosResult", "lanczos_inv_sqrt"]


@dataclass
class LanczosResult:
    """Solutions and diagnostics of :func:`lanczos_inv_sqrt`.

    Attributes
    ----------
    x : Tensor
        ``A^{-1/2} z`` per row ``(m, P)``.
    change : Tensor
        Relative change of each row's iterate over the last check ``(m,)``
        (0 when the Krylov space became invariant: exact).
    iterations : Tensor
        Lanczos steps per row ``(m,)``.
    converged : Tensor
        ``change <= rtol`` per row ``(m,)``.
    """

    x: Tensor
    change: Tensor
    iterations: Tensor
    converged: Tensor


def _coefficients(alphas: list[Tensor], betas: list[Tensor]) -> tuple[Tensor, Tensor]:
    """``T_k^{-1/2} e_1`` per row ``(m, k)`` and the smallest Ritz value ``(m,)``."""
    T = torch.diag_embed(torch.stack(alphas, dim=1))
    if betas:
        off = torch.diag_embed(torch.stack(betas, dim=1), offset=1)
        T = T + off + off.transpose(1, 2)
    evals, evecs = torch.linalg.eigh(T)
    inv_sqrt = evals.clamp_min(torch.finfo(evals.dtype).tiny).rsqrt()
    y = torch.einsum("mij,mj->mi", evecs, inv_sqrt * evecs[:, 0, :])
    return y, evals[:, 0]


def lanczos_inv_sqrt(
    matvec: Callable[[Tensor], Tensor],
    Z: Tensor,
    rtol: float = 1e-6,
    max_iter: int = 1000,
    check_every: int = 4,
) -> LanczosResult:
    """``A^{-1/2} z`` for every row ``z`` of ``Z`` (``(m, P)``) by batched Lanczos.

    Parameters
    ----------
    matvec : callable
        ``matvec(V)`` returns ``A v`` for each row of ``V`` (``(m, P)``).
    Z : Tensor
        ``(m, P)`` non-zero right-hand sides.
    rtol : float, default=1e-6
        A row has converged when its iterate changed by at most ``rtol``
        (relative) over the last ``check_every`` steps.
    max_iter : int, default=1000
        Steps at most (never more than ``P``, where the result is exact).
    check_every : int, default=4
        Steps between convergence checks (each costs an ``m x k x k``
        eigendecomposition).

    Returns
    -------
    LanczosResult

    Raises
    ------
    laplace_hfl.engine.solvers.NegativeCurvature
        A Ritz value of ``A`` is not positive: ``A`` is not positive definite.
    """
    m, P = Z.shape
    beta0 = Z.norm(dim=1)
    q = Z / beta0[:, None]
    q_prev = torch.zeros_like(Z)
    b_prev = Z.new_zeros(m)
    basis: list[Tensor] = []
    alphas: list[Tensor] = []
    betas: list[Tensor] = []
    X = torch.zeros_like(Z)
    change = torch.full((m,), float("inf"), dtype=Z.dtype, device=Z.device)
    iterations = torch.zeros(m, dtype=torch.long, device=Z.device)
    active = torch.ones(m, dtype=torch.bool, device=Z.device)
    y_prev: Tensor | None = None
    scale = Z.new_zeros(m)
    k_max = max(1, min(int(max_iter), P))
    for k in range(1, k_max + 1):
        basis.append(q)
        w = matvec(q) - b_prev[:, None] * q_prev
        a = (q * w).sum(1)
        w = w - a[:, None] * q
        Q = torch.stack(basis)  # (k, m, P)
        for _ in range(2):  # full reorthogonalisation, twice is enough
            w = w - torch.einsum("km,kmp->mp", torch.einsum("kmp,mp->km", Q, w), Q)
        b = w.norm(dim=1)
        alphas.append(a)
        scale = torch.maximum(scale, a.abs() + b)
        invariant = active & (b <= 1e-10 * scale)
        last = k == k_max
        if last or bool(invariant.any()) or k % check_every == 0:
            y, ritz_min = _coefficients(alphas, betas)
            bad = active & (ritz_min <= 0)
            if bool(bad.any()):
                col = int(torch.nonzero(bad)[0])
                raise NegativeCurvature(col, float(ritz_min[col]))
            if y_prev is None and k > 1:  # stopped before the first check
                y_prev = _coefficients(alphas[:-1], betas[:-1])[0]
            if y_prev is not None:
                pad = torch.nn.functional.pad(y_prev, (0, k - y_prev.shape[1]))
                change = torch.where(
                    active, (y - pad).norm(dim=1) / y.norm(dim=1), change
                )
            exact = invariant | (active & (k == P))
            change = torch.where(exact, torch.zeros_like(change), change)
            done = active & (exact | (change <= rtol) | last)
            if bool(done.any()):
                X[done] = beta0[done, None] * torch.einsum(
                    "mk,kmp->mp", y[done], Q[:, done]
                )
                iterations[done] = k
                active = active & ~done
            y_prev = y
        if not bool(active.any()):
            break
        betas.append(b)
        q_prev, b_prev = q, b
        safe = torch.where(active, b, torch.ones_like(b))
        q = torch.where(active[:, None], w / safe[:, None], torch.zeros_like(w))
    return LanczosResult(X, change, iterations, change <= rtol)
