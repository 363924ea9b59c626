"""MacKay's fixed point for the marginal-likelihood prior precision.

For a fixed MAP, the Laplace log marginal likelihood depends on the prior
precision ``p_g`` of a group ``g`` of ``n_g`` weights (all weights, a layer, or
one weight) through ``-1/2 [log det A - n_g log p_g + p_g s_g]`` with
``A = h G + diag(p_0)`` and ``s_g = sum_{i in g} (theta_i - mu_0,i)^2``. Its
stationary points satisfy (MacKay, *Bayesian interpolation*, 1992)::

    p_g = gamma_g / s_g,    gamma_g = n_g - p_g sum_{i in g} [A^-1]_ii

with ``gamma_g`` the effective number of parameters the data determine.
Iterating this map converges in a few steps where the gradient loop of
laplace-torch takes ``n_steps`` Adam steps; each step needs one estimate of the
group traces of ``A^-1`` (:func:`laplace_hfl.engine.logdet.isotropic_trace_inverse`
without a data pass for a scalar prior, :func:`laplace_hfl.engine.logdet.diag_inverse`
otherwise).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["FixedPointResult", "mackay_fixed_point"]


@dataclass(frozen=True)
class FixedPointResult:
    """Prior precision per group, iterations used, whether it converged."""

    prior_precision: Tensor
    iterations: int
    converged: bool


def mackay_fixed_point(
    group_trace: Callable[[Tensor], Tensor],
    group: Tensor,
    delta: Tensor,
    init: Tensor,
    *,
    max_iter: int = 100,
    tol: float = 1e-6,
) -> FixedPointResult:
    """Iterate ``p_g <- gamma_g / s_g`` to a stationary point of the marginal likelihood.

    Parameters
    ----------
    group_trace : callable
        ``group_trace(p)`` returns ``sum_{i in g} [A^-1]_ii`` per group ``(G,)``
        for the posterior precision with group prior precisions ``p`` ``(G,)``.
    group : Tensor
        Group index of every weight ``(P,)`` (long, values ``0..G-1``).
    delta : Tensor
        ``theta_MAP - mu_0`` ``(P,)``.
    init : Tensor
        Initial prior precisions ``(G,)``, positive.
    max_iter : int, default=100
    tol : float, default=1e-6
        Stop when every ``|log p_new - log p|`` is below ``tol``.

    Returns
    -------
    FixedPointResult

    Raises
    ------
    ValueError
        A group has ``s_g = 0`` (weights exactly at the prior mean: the
        marginal likelihood grows without bound in ``p_g``).
    """
    n_groups = init.numel()
    n_g = torch.zeros(n_groups, dtype=delta.dtype, device=delta.device)
    n_g.index_add_(0, group, torch.ones_like(delta))
    s_g = torch.zeros_like(n_g).index_add_(0, group, delta.square())
    if bool((s_g <= 0).any()):
        raise ValueError(
            "Some weights equal the prior mean exactly in every entry of a prior "
            "group, so the marginal likelihood has no finite optimum there; use "
            "prior_structure='scalar' or method='gridsearch'."
        )
    p = init.to(delta.dtype).clone()
    for it in range(1, max_iter + 1):
        gamma = (n_g - p * group_trace(p)).clamp(min=1e-12 * n_g, max=n_g)
        p_new = gamma / s_g
        step = float((p_new.log() - p.log()).abs().max())
        p = p_new
        if step < tol:
            return FixedPointResult(p, it, True)
    return FixedPointResult(p, max_iter, False)
