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

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from laplace_hfl.functional import LaplaceObjective, data_only_objective, ggn_matvec

__all__ = ["NystromSketch", "default_rank", "nystrom_sketch", "nystrom_apply"]

#: Largest number of float64 entries the sketch may hold (256 MiB).
SKETCH_BUDGET = 2**25


@dataclass(frozen=True)
class NystromSketch:
    """``G ~= U diag(lam) U^T`` with orthonormal ``U`` ``(P, k)``, ``lam`` descending."""

    U: Tensor
    lam: Tensor


def default_rank(n_params: int) -> int:
    """Sketch rank used when none is given.

    ``min(256, P // 2)`` when that sketch holds at most 256 MiB of float64
    (``P`` up to ~130k), else 0 (off), so that memory stays that of training.
    """
    rank = min(256, n_params // 2)
    return rank if rank * n_params <= SKETCH_BUDGET else 0


def nystrom_sketch(
    obj: LaplaceObjective, rank: int, chunk_size: int = 64, seed: int = 0
) -> NystromSketch:
    """Rank-``rank`` Nyström approximation of the data GGN at the MAP.

    Parameters
    ----------
    obj : LaplaceObjective
    rank : int
        Sketch size ``k``; costs ``k`` GGN-vector products and ``2 k P`` memory.
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
    data_only = data_only_objective(obj)
    g = torch.Generator(device="cpu").manual_seed(seed)
    omega = torch.randn(P, rank, generator=g, dtype=theta.dtype).to(theta.device)
    omega, _ = torch.linalg.qr(omega)
    Y = torch.cat(
        [
            ggn_matvec(data_only, omega.T[i : i + chunk_size])
            for i in range(0, rank, chunk_size)
        ]
    ).T
    shift = torch.finfo(Y.dtype).eps * Y.norm()
    Y_shift = Y + shift * omega
    core = omega.T @ Y_shift
    C = torch.linalg.cholesky(0.5 * (core + core.T))
    B = torch.linalg.solve_triangular(C, Y_shift.T, upper=False).T
    U, S, _ = torch.linalg.svd(B, full_matrices=False)
    return NystromSketch(U, (S.square() - shift).clamp_min(0))


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
    mu = float(prior_precision.mean())
    scaled = h_factor * lam + mu
    # A zero prior with a rank-deficient sketch would make scaled[-1] = 0 and
    # 0/0 = NaN below; any positive floor keeps M positive definite (the
    # preconditioner changes the speed of CG, never its answer).
    positive = scaled[scaled > 0]
    floor = float(positive.min()) if positive.numel() else 1.0
    scaled = scaled.clamp_min(floor)

    def apply(R: Tensor) -> Tensor:
        UR = R @ U
        return (floor * UR / scaled - UR) @ U.T + R

    return apply
