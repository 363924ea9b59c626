"""Unit tests of ``laplace_hfl.engine.mackay``: MacKay's fixed point on a
dense float64 curvature reaches a stationary point of the log marginal
likelihood in the group prior precisions (its gradient, by autograd on the
dense formula, vanishes), for one group and for several.
"""

from __future__ import annotations

import pytest
import torch
from conftest import DT

from laplace_hfl.engine.mackay import mackay_fixed_point

P = 12


def _problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    J = torch.randn(30, P, generator=g, dtype=DT)
    G = J.T @ J / 4  # data curvature, h G with h folded in
    delta = torch.randn(P, generator=g, dtype=DT)  # theta_MAP - mu_0
    return G, delta


def _log_marglik(G, delta, group, log_p):
    """``-1/2 [log det(G + diag(p)) - sum log p_i + sum p_i delta_i^2]``."""
    p = log_p.exp()[group]
    A = G + torch.diag(p)
    return -0.5 * (torch.logdet(A) - p.log().sum() + (p * delta.square()).sum())


def _trace(G, group, n_groups):
    def group_trace(p):
        diag = torch.linalg.inv(G + torch.diag(p[group])).diagonal()
        return torch.zeros(n_groups, dtype=DT).index_add_(0, group, diag)

    return group_trace


@pytest.mark.parametrize("n_groups", [1, 3])
def test_fixed_point_is_a_stationary_point_of_the_marginal_likelihood(n_groups):
    G, delta = _problem()
    group = torch.arange(P) % n_groups
    init = torch.ones(n_groups, dtype=DT)
    res = mackay_fixed_point(_trace(G, group, n_groups), group, delta, init, tol=1e-12)
    assert res.converged and 1 < res.iterations < 100
    log_p = res.prior_precision.log().requires_grad_(True)
    (grad,) = torch.autograd.grad(_log_marglik(G, delta, group, log_p), log_p)
    assert float(grad.abs().max()) <= 1e-9
    # and it is a maximum along each group's direction: moving away lowers it
    base = float(_log_marglik(G, delta, group, log_p.detach()))
    for k in range(n_groups):
        for step in (-0.1, 0.1):
            moved = log_p.detach().clone()
            moved[k] += step
            assert float(_log_marglik(G, delta, group, moved)) < base


def test_unconverged_after_max_iter():
    G, delta = _problem()
    group = torch.zeros(P, dtype=torch.long)
    res = mackay_fixed_point(
        _trace(G, group, 1), group, delta, torch.tensor([1e-6], dtype=DT), max_iter=1
    )
    assert not res.converged and res.iterations == 1


def test_weights_at_the_prior_mean_have_no_optimum():
    G, delta = _problem()
    group = (torch.arange(P) >= 6).long()
    delta[6:] = 0
    with pytest.raises(ValueError, match="prior mean exactly"):
        mackay_fixed_point(_trace(G, group, 2), group, delta, torch.ones(2, dtype=DT))
