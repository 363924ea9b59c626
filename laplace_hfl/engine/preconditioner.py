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

Spectrum floor (for the certified variance brackets of
:mod:`laplace_hfl.engine.solvers`). The Nyström approximation lies below the GGN,
``G_k = G^{1/2} Pi G^{1/2} <= G`` (``Pi`` an orthogonal projection; dropping
unresolved eigenvalues keeps it below), so with ``d = min(p_0)``::

    A = h G + diag(p_0) >= h G_k + d I >= d M,

because ``M`` (:func:`nystrom_apply`) equals ``(h lam + mu) / floor`` on the
sketch's range and 1 on its complement, and ``floor >= mu >= d``. Hence
``lambda_min(M^{-1} A) >= d``: the prior's smallest precision, in the
objective's own scaling (``A`` is ``h G + diag(p_0)`` with ``p_0`` the prior
precision as laplace-torch holds it). The floor handed to the solver is
``SPECTRUM_SAFETY * d``, which leaves room for the rounding of the sketch
(``G_k`` exceeds ``G`` by ``~eps ||G||`` in the working precision).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor

from laplace_hfl.engine.device_memory import available_bytes
from laplace_hfl.engine.functional import (
    LaplaceObjective,
    data_only_objective,
    ggn_matvec,
)

__all__ = [
    "NystromSketch",
    "Preconditioner",
    "default_rank",
    "memory_rank",
    "nystrom_sketch",
    "nystrom_columns",
    "sketch_products",
    "SketchColumns",
    "nystrom_apply",
    "resolved",
    "spectrum_floor",
]

#: Fraction of the proven spectrum floor handed to the solver (module doc).
SPECTRUM_SAFETY = 0.5

#: Largest number of entries an automatic CPU sketch may hold (1 GiB of
#: float64): ``k P``.
CPU_SKETCH_BUDGET = 2**27

#: Rows of the test matrix drawn from one seeded generator: the sketch is
#: reproducible and independent of ``chunk_size``.
_OMEGA_BLOCK = 16
#: Rows of the ``(P, k)`` buffer multiplied at a time (temporaries ``_ROWS k``).
_ROWS = 1024


@dataclass(frozen=True)
class NystromSketch:
    """``G ~= U diag(lam) U^T`` with orthonormal ``U`` ``(P, r)``, ``lam``
    descending, ``r <= k`` (directions the sketch cannot resolve are dropped)."""

    U: Tensor
    lam: Tensor
    #: GGN-vector products the sketch cost (its rank ``k``).
    products: int = 0


@dataclass(frozen=True)
class Preconditioner:
    """A row-wise ``M^{-1}`` with a proven lower bound of the spectrum of
    ``M^{-1} A`` (``None`` where none is known).

    Called like the function it wraps: ``precond(R)``.
    """

    apply: Callable[[Tensor], Tensor]
    floor: float | None = None

    def __call__(self, R: Tensor) -> Tensor:
        return self.apply(R)


def spectrum_floor(
    obj: LaplaceObjective, precond: Callable[[Tensor], Tensor] | None
) -> float | None:
    """A lower bound of the spectrum of ``M^{-1} (h G + diag(p_0))``.

    Without a preconditioner ``min(p_0)`` (``G`` is positive semi-definite);
    with one, the floor it carries (:class:`Preconditioner`). None where no
    positive bound is known (a zero prior, a preconditioner without one).
    """
    if precond is None:
        floor = float(obj.prior_precision.min())
    else:
        floor = getattr(precond, "floor", None)
    return floor if floor is not None and floor > 0 else None


def default_rank(n_params: int, like: Tensor | None = None) -> int:
    """Sketch rank used when none is given.

    On the CPU (or without ``like``): ``min(1024, P // 2)`` when that sketch
    holds at most 1 GiB of float64 (:data:`CPU_SKETCH_BUDGET`, ``P`` up to
    ~130k), else 0 (off; a rank-256 tier within 256 MiB would end at the same
    ``P``). Rank 1,024
    costs 768 more products once per fit than 256 and pays off from ~7 query
    images (LeNet on 1,000 digits: 4.0 instead of 16.3 CG iterations per
    refit, ``docs/cost.md``). On an accelerator (``like`` a tensor there):
    :func:`memory_rank` of its free memory, up to :data:`DEVICE_MAX_RANK`.
    """
    if like is not None and like.device.type == "cuda":
        free = available_bytes(like.device)
        return memory_rank(n_params, free, like.element_size())
    rank = min(1024, n_params // 2)
    return rank if rank * n_params <= CPU_SKETCH_BUDGET else 0


#: Largest automatic rank on an accelerator. The sketch costs ``k`` products
#: once per fit; past ~1,024 the iterations it saves cannot repay that (LeNet,
#: 1,000 digits: 4.0 CG iterations per refit at 1,024, so at most ~3 more to
#: save per direction; ``docs/cost.md``). Memory caps it below that.
DEVICE_MAX_RANK = 1024
#: Share of the free device memory the sketch may take (its ``(P, k)`` buffer;
#: the build's chunk of products and the solves' directions use the rest).
DEVICE_MEMORY_SHARE = 0.25


def memory_rank(n_params: int, free_bytes: int, item_bytes: int) -> int:
    """The Nyström rank that fits :data:`DEVICE_MEMORY_SHARE` of ``free_bytes``.

    ``min(DEVICE_MAX_RANK, P // 2, share * free / (P * item_bytes))``, rounded
    down to a multiple of 64 (one product chunk); 0 below 64.
    """
    fits = int(DEVICE_MEMORY_SHARE * free_bytes) // max(1, n_params * item_bytes)
    rank = min(DEVICE_MAX_RANK, n_params // 2, fits)
    return rank // 64 * 64


def _omega_rows(
    n_params: int, start: int, stop: int, seed: int, like: Tensor
) -> Tensor:
    """Rows ``start:stop`` of the Gaussian test matrix ``Omega^T`` ``(k, P)``,
    drawn on demand (``Omega`` itself is never held)."""
    out = like.new_empty(stop - start, n_params)
    for b in range(start // _OMEGA_BLOCK, (stop - 1) // _OMEGA_BLOCK + 1):
        g = torch.Generator(device="cpu").manual_seed(seed * 1_000_003 + b)
        block = torch.randn(_OMEGA_BLOCK, n_params, generator=g, dtype=like.dtype)
        lo, hi = max(start, b * _OMEGA_BLOCK), min(stop, (b + 1) * _OMEGA_BLOCK)
        out[lo - start : hi - start] = block[
            lo - b * _OMEGA_BLOCK : hi - b * _OMEGA_BLOCK
        ]
    return out


def _right_multiply_(Y: Tensor, W: Tensor, rows: int) -> Tensor:
    """``Y[:, :r] = Y @ W`` in place, ``rows`` rows at a time (``W`` ``(k, r)``,
    ``r <= k``); returns the view ``Y[:, :r]``."""
    r = W.shape[1]
    for i in range(0, Y.shape[0], rows):
        Y[i : i + rows, :r] = Y[i : i + rows] @ W
    return Y[:, :r]


def resolved(eigenvalues: Tensor) -> Tensor:
    """Eigenvalues resolved in this precision (relative to the largest)."""
    tol = eigenvalues.shape[0] * torch.finfo(eigenvalues.dtype).eps
    return eigenvalues > tol * eigenvalues.abs().max().clamp_min(
        torch.finfo(eigenvalues.dtype).tiny
    )


def nystrom_sketch(
    obj: LaplaceObjective, rank: int, chunk_size: int = 64, seed: int = 0
) -> NystromSketch:
    """Rank-``rank`` Nyström approximation of the data GGN at the MAP
    (:func:`sketch_products` with GGN-vector products)."""
    data_only = data_only_objective(obj)
    return sketch_products(
        partial(ggn_matvec, data_only), obj.theta_map, rank, chunk_size, seed
    )


def sketch_products(
    products: Callable[[Tensor], Tensor],
    like: Tensor,
    rank: int,
    chunk_size: int = 64,
    seed: int = 0,
) -> NystromSketch:
    """Rank-``rank`` Nyström approximation of a positive semi-definite ``G``
    known by its products ``products(V) = V G`` (rows ``(m, P)``).

    ``G ~= Y (Omega^T Y)^+ Y^T`` with ``Y = G Omega`` for a Gaussian test
    matrix ``Omega`` ``(P, k)``, then eigendecomposed into orthonormal
    ``U`` and ``lam``. Memory: the one ``(P, k)`` buffer that holds ``Y`` and
    then ``U`` in place (``k P`` numbers, at most :data:`CPU_SKETCH_BUDGET` with
    :func:`default_rank` on the CPU), plus one chunk of GGN-vector products (what a
    solve of ``chunk_size`` directions uses); ``Omega`` is drawn from its
    seed one chunk at a time and never held whole (each chunk also gives its
    block row of ``Omega^T Y``), and every other intermediate is ``k x k``. Directions the sketch does not resolve in the
    working precision (a GGN of rank below ``k``) are dropped, not inverted.

    Parameters
    ----------
    products : callable
        Row-wise products with ``G``.
    like : Tensor
        ``(P,)``: the dimension, dtype and device.
    rank : int
        Sketch size ``k``; costs ``k`` products.
    chunk_size : int, default=64
        Products computed together.
    seed : int, default=0
        Seed of the Gaussian test matrix (the sketch is reproducible).

    Returns
    -------
    NystromSketch
    """
    columns = SketchColumns(products, like, rank, chunk_size, seed)
    columns.extend(rank)
    return columns.sketch(rank, in_place=True)


class SketchColumns:
    """The columns ``Y = G Omega`` and the core ``Omega^T G Omega`` of a
    Nyström sketch, computed on demand up to ``capacity`` columns.

    A sketch of rank ``k`` read from them (:meth:`sketch`) is the one
    :func:`sketch_products` builds at rank ``k`` (the same test columns, drawn
    from the seed whatever the chunking), so a rank can grow by its new
    columns' products only: what the automatic rank of ``"auto"`` does
    (:func:`laplace_hfl.engine.auto_choice.sketch_levels`).

    Parameters
    ----------
    products, like, chunk_size, seed
        As for :func:`sketch_products`.
    capacity : int
        Largest rank; the ``(P, capacity)`` buffer is allocated at once.
    """

    def __init__(
        self,
        products: Callable[[Tensor], Tensor],
        like: Tensor,
        capacity: int,
        chunk_size: int = 64,
        seed: int = 0,
    ) -> None:
        self.products, self.like, self.seed = products, like, seed
        self.step = max(1, min(chunk_size, capacity))
        self.Y = like.new_empty(like.numel(), capacity)
        self.core = like.new_zeros(capacity, capacity)
        #: Columns computed so far (the GGN-vector products spent).
        self.k = 0

    @property
    def capacity(self) -> int:
        return self.Y.shape[1]

    def extend(self, rank: int) -> None:
        """Compute the columns up to ``rank`` (at most ``capacity``)."""
        if not 0 < rank <= self.capacity:
            raise ValueError(f"rank {rank} outside 1..{self.capacity}")
        P, Y, core = self.like.numel(), self.Y, self.core
        for i in range(self.k, rank, self.step):
            stop = min(i + self.step, rank)
            rows = _omega_rows(P, i, stop, self.seed, self.like)
            Y[:, i:stop] = self.products(rows).T
            # lower block row of core = Omega^T G Omega, from the columns so far
            core[i:stop, :stop] = rows @ Y[:, :stop]
        self.k = max(self.k, rank)

    def sketch(self, rank: int, *, in_place: bool = False) -> NystromSketch:
        """The rank-``rank`` sketch from the first ``rank`` columns (computed).

        ``in_place`` overwrites the buffer (no copy of ``Y``); the columns
        cannot be read again.
        """
        if not 0 < rank <= self.k:
            raise ValueError(f"rank {rank} outside the computed 1..{self.k}")
        Y = self.Y[:, :rank] if in_place else self.Y[:, :rank].clone()
        core = self.core[:rank, :rank]
        core = torch.tril(core) + torch.tril(core, -1).T
        d, W = torch.linalg.eigh(core)  # core^+ = W d^-1 W^T on resolved d
        keep = resolved(d)
        B = _right_multiply_(Y, W[:, keep] / d[keep].sqrt(), _ROWS)  # G ~= B B^T
        s2, V = torch.linalg.eigh(B.T @ B)  # B = U S V^T
        keep = resolved(s2)
        s2, V = s2[keep].flip(0), V[:, keep].flip(1)
        U = _right_multiply_(B, V / s2.sqrt(), _ROWS)
        # One re-orthonormalisation (Cholesky QR): U R^-1 with U^T U = R^T R,
        # and G ~= U (R diag(s2) R^T) U^T re-diagonalised (all k x k).
        R = torch.linalg.cholesky(U.T @ U, upper=True)
        T = R * s2 @ R.T
        lam, Z = torch.linalg.eigh(0.5 * (T + T.T))
        U = _right_multiply_(
            U, torch.linalg.solve_triangular(R, Z.flip(1), upper=True), _ROWS
        )
        return NystromSketch(U, lam.flip(0).clamp_min(0), rank)


def nystrom_columns(
    obj: LaplaceObjective, capacity: int, chunk_size: int = 64, seed: int = 0
) -> SketchColumns:
    """The extendable columns of the data GGN's Nyström sketch at the MAP
    (:class:`SketchColumns` with GGN-vector products; nothing computed yet)."""
    data_only = data_only_objective(obj)
    return SketchColumns(
        partial(ggn_matvec, data_only), obj.theta_map, capacity, chunk_size, seed
    )


def nystrom_apply(
    sketch: NystromSketch, h_factor: float, prior_precision: Tensor
) -> Preconditioner:
    """The preconditioner ``M^{-1}`` for ``A = h G + diag(p_0)``, row-wise.

    ``M^{-1} r = (h lam_k + mu) U (h lam + mu)^{-1} U^T r + (I - U U^T) r`` with
    ``mu`` the mean prior precision (exact for a scalar prior).

    Returns
    -------
    Preconditioner
        Maps residuals ``(m, P)`` to preconditioned residuals ``(m, P)``;
        its ``floor`` is ``SPECTRUM_SAFETY * min(p_0)`` (module doc).
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

    return Preconditioner(apply, SPECTRUM_SAFETY * float(prior_precision.min()))
