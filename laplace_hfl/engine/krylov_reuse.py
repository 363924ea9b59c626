"""Reuse of earlier solves of the same system ``A u = v`` (recycled subspace).

A prediction over many query points solves ``A u = v`` chunk after chunk with
the same ``A = h GGN + diag(p_0)``. The solutions ``W`` of earlier chunks and
their products ``A W = V - R`` (CG's residuals: no extra pass) span the part
of the spectrum every later Jacobian row shares, so a later solve starts from
the Galerkin projection onto that span::

    x_0 = W^T c,   (W A W^T) c = W b,   r_0 = b - (A W)^T c,

the best answer in ``span(W)`` in the ``A``-norm, for the price of two
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
:data:`RECYCLE_VECTORS` vectors and :data:`RECYCLE_BUDGET` numbers; the oldest
vectors are dropped first.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = [
    "RECYCLE_VECTORS",
    "RECYCLE_BUDGET",
    "RecycledSpace",
    "projected_solve",
    "recycle_capacity",
]

#: Most vectors a recycled subspace keeps.
RECYCLE_VECTORS = 256
#: Most numbers (``2 k P``: ``W`` and ``A W``) it keeps: 256 MiB of float64.
RECYCLE_BUDGET = 2**25


def projected_solve(S: Tensor, F: Tensor) -> Tensor:
    """``S^+ F`` for a symmetric positive semi-definite Gram matrix ``S``,
    directions below its rounding level dropped (the kept vectors may be
    nearly dependent)."""
    S = 0.5 * (S + S.T)
    lam, Q = torch.linalg.eigh(S)
    keep = lam > lam.shape[0] * torch.finfo(lam.dtype).eps * lam.abs().max()
    Q, lam = Q[:, keep], lam[keep]
    return Q @ ((Q.T @ F) / lam[:, None])


def recycle_capacity(n_params: int, vectors: int = RECYCLE_VECTORS) -> int:
    """Vectors kept for ``P = n_params``: ``min(vectors, RECYCLE_BUDGET / 2P)``."""
    return max(0, min(vectors, RECYCLE_BUDGET // max(1, 2 * n_params)))


@dataclass
class RecycledSpace:
    """Earlier solutions ``W`` ``(k, P)`` of one system and ``A W`` ``(k, P)``.

    Attributes
    ----------
    capacity : int
        Most vectors kept (0: nothing is kept, every solve starts at 0).
    W, AW : Tensor or None
        The kept solutions and their products (None until the first :meth:`add`).
    """

    capacity: int
    W: Tensor | None = field(default=None, repr=False)
    AW: Tensor | None = field(default=None, repr=False)

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
        C = projected_solve(W @ AW.T, W @ B.T)  # (k, m)
        return C.T @ W, B - C.T @ AW

    def add(self, U: Tensor, AU: Tensor) -> None:
        """Keep the solutions ``U`` and their products ``AU`` (rows), dropping
        the oldest beyond :attr:`capacity`."""
        if self.capacity <= 0 or U.shape[0] == 0:
            return
        U, AU = U.detach(), AU.detach()
        if self.W is not None:
            U, AU = torch.cat([self.W, U]), torch.cat([self.AW, AU])
        self.W, self.AW = U[-self.capacity :].clone(), AU[-self.capacity :].clone()
