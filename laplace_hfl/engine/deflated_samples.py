"""Amortised samples with a subspace handled exactly (deflation).

Amortised HFL estimates ``Sigma = A^{-1}`` (``A = h GGN + diag(p_0)``) by
``1/S sum_s delta_s delta_s^T`` with ``delta_s ~ N(0, A^{-1})``
(:mod:`laplace_hfl.engine.amortized`); a variance carries the Monte Carlo error
``sqrt(2/S)``. For any ``k`` directions ``W`` (rows, ``(k, P)``; e.g. the top
eigenvectors of the Nyström sketch of the GGN) and ``K = (W A W^T)^{-1}``, the
``A``-orthogonal projector ``Pi = W^T K (A W)`` splits ``A^{-1}`` exactly::

    A^{-1} = W^T K W  +  (I - Pi) A^{-1} (I - Pi)^T

(the cross terms vanish: ``Pi A^{-1} (I - Pi)^T = W^T K W - W^T K (W A W^T) K W = 0``).
The first term is known once ``A W`` is (``k`` GGN products, one batched
pass); the second is the covariance of the projected samples
``eps_s = (I - Pi) delta_s``. So

    Sigma_S = W^T K W + 1/S sum_s eps_s eps_s^T

is unbiased for any ``W`` and ``S`` (the same samples, projected), positive
semi-definite, and converges to ``A^{-1}`` as ``S`` grows; its Monte Carlo error
is only that of the complement term, i.e. a variance ``v^T Sigma v`` carries
``sqrt(2/S)`` times the share ``v^T (I-Pi) A^{-1} (I-Pi)^T v / v^T A^{-1} v``
instead of the whole. That share is what a query's Jacobian has outside the
subspace (measured in ``docs/cost.md``: the top of the GGN holds a modest part
of a variance, since ``A^{-1}`` is small there).

:func:`deflated_factor` returns rows ``F`` (``(S + k, P)``) with
``F^T F / (S + k) = Sigma_S``, so every reader of amortised samples
(:func:`~laplace_hfl.engine.amortized.amortized_covariance`,
:func:`~laplace_hfl.engine.amortized.amortized_solve`, which divide by the
number of rows) reads the deflated estimate unchanged: the exact term costs
``k`` more JVPs per query point.
"""

from __future__ import annotations

import torch
from torch import Tensor

from laplace_hfl.engine.functional import LaplaceObjective, ggn_matvec
from laplace_hfl.engine.krylov_reuse import gram_eigenpairs

__all__ = ["deflation_products", "deflated_factor"]


def deflation_products(
    obj: LaplaceObjective, W: Tensor, chunk_size: int = 64
) -> Tensor:
    """``A W`` for the rows of ``W`` (``k`` GGN products, ``chunk_size`` at a time)."""
    return torch.cat(
        [
            ggn_matvec(obj, W[i : i + chunk_size])
            for i in range(0, W.shape[0], chunk_size)
        ]
    )


def deflated_factor(samples: Tensor, W: Tensor, AW: Tensor) -> Tensor:
    """Rows ``F`` with ``F^T F / (S + k) = W^T K W + 1/S sum_s eps_s eps_s^T``.

    Parameters
    ----------
    samples : Tensor
        ``(S, P)`` samples ``delta_s ~ N(0, A^{-1})``.
    W : Tensor
        ``(k, P)`` directions handled exactly (combinations that ``W A W^T``
        cannot resolve in the working precision are dropped).
    AW : Tensor
        ``(k, P)``: ``A`` applied to each row of ``W``.

    Returns
    -------
    Tensor
        ``(S + k, P)`` (``k`` the kept directions): the projected samples ``eps_s`` scaled by
        ``sqrt((S + k) / S)``, then the rows of ``sqrt(S + k) K^{1/2} W``.
    """
    S = samples.shape[0]
    # dependent directions (W A W^T singular to rounding) are dropped: the
    # estimate is that of the kept combinations Q^T W, unbiased as any basis
    lam, Q = gram_eigenpairs(W @ AW.T)
    k = int(lam.numel())
    # eps = delta - W^T K (AW delta), K = Q diag(1/lam) Q^T
    coef = ((samples @ AW.T) @ Q) / lam
    eps = samples - (coef @ Q.T) @ W
    exact = (Q / lam.sqrt()).T @ W  # K^{1/2} W up to an orthogonal factor
    n = S + k
    return torch.cat([eps * (n / S) ** 0.5, exact * n**0.5])
