"""Reuse of earlier solves of the same system ``A u = v`` (recycled subspace).

A prediction over many query points solves ``A u = v`` chunk after chunk with
the same ``A = h GGN + diag(p_0)``. The solutions ``W`` of earlier chunks and
their products ``A W = V - R`` (CG's residuals: no extra pass) span the part
of the spectrum every later Jacobian row shares, so a later solve starts from
the Galerkin projection onto that span::

    x_0 = W^T c,   (W A W^T) c = W b,   r_0 = b - (A W)^T c,

the best answer in ``span(W)`` in the ``A``-norm, for the price of three
``k x P`` products with the kept vectors (no data pass), and CG corrects the
rest (Erhel & Guyomarc'h, *An augmented conjugate gradient method*, SIAM
J. Matrix Anal. Appl. 2000; Parks et al., *Recycling Krylov subspaces for
sequences of linear systems*, SIAM J. Sci. Comput. 2006).

Certified brackets from any start. With ``r_0 = b - A x_0`` exactly,
``b = A x_0 + r_0`` gives

    b^T A^{-1} b = b^T x_0 + x_0^T r_0 + r_0^T A^{-1} r_0,

and CG on ``A e = r_0`` from zero (what CG from ``x_0`` does) brackets the last
term by the Gauss and Gauss-Radau rules of :mod:`laplace_hfl.engine.solvers`
with the same spectrum floor. ``r_0`` is formed from the stored ``A W``, which
equals ``A W`` up to the rounding of the products that built it (the same
rounding every CG product carries), so the bracket is as certified as CG's own.

Memory: ``2 k P`` numbers of the recurrence dtype (``W`` and ``A W``), at most
:data:`RECYCLE_VECTORS` vectors, :data:`RECYCLE_BUDGET` numbers and ``N / 4``
vectors (:func:`recycle_capacity`: the start stays cheap next to a CG
iteration); the oldest vectors are dropped first.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = [
    "RECYCLE_VECTORS",
    "RECYCLE_BUDGET",
    "RECYCLE_RCOND",
    "RecycledSpace",
    "gram_eigenpairs",
    "projected_solve",
    "recycle_capacity",
]

#: Most vectors a recycled subspace keeps.
RECYCLE_VECTORS = 256
#: Most numbers (``2 k P``: ``W`` and ``A W``) it keeps: 256 MiB of float64.
RECYCLE_BUDGET = 2**25
#: Directions of ``span(W)`` whose ``A``-norm Gram eigenvalue is below this
#: times the largest are left out of a start, by the precision of the products
#: that formed ``A W``: combinations of nearly dependent kept vectors cancel,
#: which multiplies the products' rounding in ``(A W)^T c`` by up to
#: ``rcond^{-1/2}``, and ``r_0`` would then differ from the residual of ``x_0``.
#: Measured: with a rounding-level cut (``k`` eps) in float64, brackets of
#: the 2-8-3 classification net with Nystrom missed the dense truth; with 1e-10
#: and float32 products, by more than 1e-5; none with these values (the
#: float32 brackets hold to the 1e-5 of the solve itself).
RECYCLE_RCOND = {torch.float64: 1e-10, torch.float32: 1e-2}


def gram_eigenpairs(S: Tensor, rcond: float | None = None) -> tuple[Tensor, Tensor]:
    """Eigenvalues ``lam`` and eigenvectors ``Q`` (columns) of a symmetric
    positive semi-definite Gram matrix ``S`` (symmetrised first), those below
    ``rcond`` times the largest dropped (default: its rounding level, ``k``
    eps; the vectors behind ``S`` may be nearly dependent)."""
    lam, Q = torch.linalg.eigh(0.5 * (S + S.T))
    if rcond is None:
        rcond = lam.shape[0] * torch.finfo(lam.dtype).eps
    keep = lam > rcond * lam.abs().max()
    return lam[keep], Q[:, keep]


def projected_solve(S: Tensor, F: Tensor, rcond: float | None = None) -> Tensor:
    """``S^+ F`` over the kept eigenpairs of the Gram matrix ``S``
    (:func:`gram_eigenpairs`)."""
    lam, Q = gram_eigenpairs(S, rcond)
    return Q @ ((Q.T @ F) / lam[:, None])


def recycle_capacity(n_params: int, n_data: int, vectors: int = RECYCLE_VECTORS) -> int:
    """Vectors kept: ``min(vectors, N / 4, RECYCLE_BUDGET / 2P)``.

    A start costs ``~6 k P`` flops per direction (:meth:`RecycledSpace.start`;
    the Gram matrix is updated, not rebuilt), a CG iteration at least ``~6 N P``
    (a JVP and a VJP over the ``N`` training points), so ``k <= N / 4`` keeps
    the start below a quarter of one iteration.
    """
    fits = RECYCLE_BUDGET // max(1, 2 * n_params)
    return max(0, min(vectors, int(n_data) // 4, fits))


@dataclass
class RecycledSpace:
    """Earlier solutions ``W`` ``(k, P)`` of one system and ``A W`` ``(k, P)``.

    Attributes
    ----------
    capacity : int
        Most vectors kept (0: nothing is kept, every solve starts at 0).
    rcond : float
        Relative cut of the Gram matrix's eigenvalues in a start
        (:data:`RECYCLE_RCOND` of the products' dtype).
    W, AW : Tensor or None
        The kept solutions and their products (None until the first :meth:`add`).
    gram : Tensor or None
        ``W A W^T`` ``(k, k)``, updated as vectors come and go.
    """

    capacity: int
    rcond: float = RECYCLE_RCOND[torch.float64]
    W: Tensor | None = field(default=None, repr=False)
    AW: Tensor | None = field(default=None, repr=False)
    gram: Tensor | None = field(default=None, repr=False)

    @property
    def size(self) -> int:
        """Vectors kept."""
        return 0 if self.W is None else int(self.W.shape[0])

    def start(self, B: Tensor) -> tuple[Tensor, Tensor] | None:
        """Galerkin start ``(X_0, R_0 = B - A X_0)`` for the rows of ``B``
        (None when nothing is kept)."""
        if self.size == 0:
            return None
        W, AW = self.W.to(B), self.AW.to(B)
        C = projected_solve(self.gram.to(B), W @ B.T, self.rcond)  # (k, m)
        return C.T @ W, B - C.T @ AW

    def add(self, U: Tensor, AU: Tensor) -> None:
        """Keep the solutions ``U`` and their products ``AU`` (rows), dropping
        the oldest beyond :attr:`capacity`."""
        m = min(int(U.shape[0]), self.capacity)
        if m <= 0:
            return
        U, AU = U[-m:].detach(), AU[-m:].detach()
        old = max(0, min(self.size, self.capacity - m))  # kept from before
        W = U if old == 0 else torch.cat([self.W[self.size - old :], U])
        AW = AU if old == 0 else torch.cat([self.AW[self.size - old :], AU])
        gram = W.new_empty(old + m, old + m)
        if old:
            gram[:old, :old] = self.gram[self.size - old :, self.size - old :]
        cross = W @ AU.T  # (old + m, m): the new columns
        gram[:, old:] = cross
        gram[old:, :] = cross.T
        self.W, self.AW, self.gram = W.clone(), AW.clone(), gram
