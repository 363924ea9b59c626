"""Randomised Nyström preconditioner for the refit solves.

Every refit solve shares one matrix: ``A = H_factor * G + diag(p_0)`` with ``G``
the data part of the GGN (``target="ggn"``), or the exact Hessian, which is close
to it near a minimum (``target="hessian"``). A rank-``k`` Nyström sketch of
``G`` (Frangella, Tropp & Udell, *Randomized Nyström Preconditioning*, SIAM
J. Matrix Anal. Appl. 2023), built from ``k`` GGN-vector products in one batched
pass, flattens the top of the spectrum so that conjugate gradients needs a few
iterations instead of hundreds. It only changes how fast the refits converge,
never what they converge to: the solves keep their tolerance.

The sketch does not depend on the prior precision, ``sigma_noise`` or the
temperature (they enter :func:`nystrom_apply` only), so one sketch per fit
serves grid searches over the prior.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from laplace_hfl.functional import LaplaceObjective, ggn_matvec

__all__ = ["NystromSketch", "default_rank", "nystrom_sketch", "nystrom_apply"]

#: Largest number of float64 entries the sketch may hold (256 MiB).
SKETCH_BUDGET = 2**25


@dataclass(frozen=True)
class NystromSketch:
    """``G ~= U diag(lam) U^T`` with orthonormal ``U`` ``(P, k)``, ``lam`` descending.

    ``rank`` is the sketch size asked for; ``U`` has fewer columns when the
    sketch met directions it cannot resolve (treated as ``lam = 0``).
    """

    U: Tensor
    lam: Tensor
    rank: int = -1


def default_rank(n_params: int) -> int:
    """Sketch rank used when none is given.

    ``min(256, P // 2)`` when that sketch holds at most 256 MiB of float64
    (``P`` up to ~130k), else 0 (off), so that memory stays that of training.
    :func:`nystrom_sketch` holds one ``(P, k)`` buffer, so its peak stays
    within that budget (plus ``chunk_size`` columns and ``O(k^2)``).
    """
    rank = min(256, n_params // 2)
    return rank if rank * n_params <= SKETCH_BUDGET else 0


def _omega(P: int, cols: range, seed: int, like: Tensor) -> Tensor:
    """Columns ``cols`` of the Gaussian test matrix, regenerated on demand."""
    g = torch.Generator(device="cpu").manual_seed(seed * 1_000_003 + cols.start)
    return torch.randn(P, len(cols), generator=g, dtype=like.dtype).to(like.device)


def _rowwise_matmul_(Y: Tensor, M: Tensor, rows: int) -> Tensor:
    """``Y[:, :M.shape[1]] = Y @ M`` in place, ``rows`` rows at a time."""
    k_out = M.shape[1]
    for r in range(0, Y.shape[0], rows):
        Y[r : r + rows, :k_out] = Y[r : r + rows] @ M
    return Y[:, :k_out]


def nystrom_sketch(
    obj: LaplaceObjective, rank: int, chunk_size: int = 64, seed: int = 0
) -> NystromSketch:
    """Rank-``rank`` Nyström approximation of the data GGN at the MAP.

    Memory: one ``(P, rank)`` buffer (the sketch ``Y = G Omega``, turned into
    ``U`` in place), plus ``chunk_size`` columns of the Gaussian test matrix
    ``Omega`` (regenerated from ``seed`` when needed, never held whole) and
    ``O(rank^2)``; so at most ``rank * P <= SKETCH_BUDGET`` numbers for the
    default rank. Directions the sketch cannot resolve (singular values below
    ``1e-6`` of the largest) are left out: ``U`` may have fewer than ``rank``
    columns.

    Parameters
    ----------
    obj : LaplaceObjective
    rank : int
        Sketch size ``k``; costs ``k`` GGN-vector products and ``k P`` memory.
    chunk_size : int, default=64
        Products computed together.
    seed : int, default=0
        Seed of the Gaussian test matrix (the sketch is reproducible).

    Returns
    -------
    NystromSketch
    """
    theta = obj.theta_map
    P = theta.numel()
    data_only = dataclasses.replace(
        obj, h_factor=1.0, prior_precision=torch.zeros_like(obj.prior_precision)
    )
    blocks = [range(i, min(i + chunk_size, rank)) for i in range(0, rank, chunk_size)]
    Y = torch.empty(P, rank, dtype=theta.dtype, device=theta.device)
    for cols in blocks:
        Y[:, cols.start : cols.stop] = ggn_matvec(
            data_only, _omega(P, cols, seed, theta).T
        ).T
    shift = (P**0.5) * torch.finfo(Y.dtype).eps * Y.norm()
    core = torch.empty(rank, rank, dtype=Y.dtype, device=Y.device)
    for cols in blocks:  # Y += shift * Omega; core = Omega^T Y (shifted)
        om = _omega(P, cols, seed, theta)
        Y[:, cols.start : cols.stop] += shift * om
    for cols in blocks:
        core[cols.start : cols.stop] = _omega(P, cols, seed, theta).T @ Y
    # Nystrom: (G + shift) ~= Y core^{-1} Y^T = B B^T with B = Y T, T = core^{-1/2}
    d, V = torch.linalg.eigh(0.5 * (core + core.T))
    d = d.clamp_min(d.max() * 1e-14)
    T = V @ torch.diag(d.rsqrt()) @ V.T
    rows = max(1, (chunk_size * P) // max(rank, 1))
    gram = torch.zeros_like(core)
    for r in range(0, P, rows):
        Yr = Y[r : r + rows]
        gram += Yr.T @ Yr
    s2, W = torch.linalg.eigh(T @ gram @ T)  # B^T B = W S^2 W^T
    keep = s2 > s2.max() * 1e-12
    s2, W = s2[keep].flip(0), W[:, keep].flip(1)
    U = _rowwise_matmul_(Y, T @ W @ torch.diag(s2.rsqrt()), rows)  # U = B W S^-1
    # One Cholesky-QR pass restores the orthonormality that the Gram route
    # loses (~eps * cond^2): U = Q R, U S^2 U^T = Q (R S^2 R^T) Q^T = (Q Z) L (Q Z)^T.
    gram = torch.zeros(U.shape[1], U.shape[1], dtype=U.dtype, device=U.device)
    for r in range(0, P, rows):
        gram += U[r : r + rows].T @ U[r : r + rows]
    R = torch.linalg.cholesky(0.5 * (gram + gram.T), upper=True)
    lam2, Z = torch.linalg.eigh(R @ torch.diag(s2) @ R.T)
    lam2, Z = lam2.flip(0), Z.flip(1)
    eye = torch.eye(R.shape[0], dtype=R.dtype, device=R.device)
    U = _rowwise_matmul_(U, torch.linalg.solve_triangular(R, eye, upper=True) @ Z, rows)
    return NystromSketch(U, (lam2 - shift).clamp_min(0), rank)


def nystrom_apply(
    sketch: NystromSketch, h_factor: float, prior_precision: Tensor
) -> Callable[[Tensor], Tensor]:
    """The preconditioner ``M^{-1}`` for ``A = h G + diag(p_0)``, row-wise.

    ``M^{-1} r = (h lam_k + mu) U (h lam + mu)^{-1} U^T r + (I - U U^T) r`` with
    ``mu`` the mean prior precision (exact for a scalar prior).

    Returns
    -------
    callable
        Maps residuals ``(m, P)`` to preconditioned residuals ``(m, P)``.
    """
    U, lam = sketch.U, sketch.lam
    mu = prior_precision.mean()
    scaled = h_factor * lam + mu
    floor = mu if U.shape[1] < sketch.rank else scaled[-1]

    def apply(R: Tensor) -> Tensor:
        UR = R @ U
        return (floor * UR / scaled - UR) @ U.T + R

    return apply
