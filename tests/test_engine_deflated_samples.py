"""Deflated amortised samples: the subspace of the Nyström sketch handled
exactly, the samples projected onto its complement; unbiased, and at equal S
closer to the dense float64 truth than the plain samples."""

from __future__ import annotations

import pytest
import torch
from conftest import DT, engine_objective

from laplace_hfl.engine.amortized import amortized_covariance, posterior_samples
from laplace_hfl.engine.deflated_samples import deflated_factor, deflation_products
from laplace_hfl.engine.functional import ggn_matvec
from laplace_hfl.engine.preconditioner import nystrom_sketch


def _setup(net, rank):
    model, X, y = net
    lik = "classification" if y.dtype == torch.long else "regression"
    obj = engine_objective(model, X, y, lik)
    P = obj.theta_map.numel()
    A = ggn_matvec(obj, torch.eye(P, dtype=DT))
    A = 0.5 * (A + A.T)
    W = nystrom_sketch(obj, rank).U.T.contiguous()
    truth = amortized_covariance(
        obj.forward,
        obj.theta_map,
        X,
        torch.linalg.cholesky(torch.linalg.inv(A)).T * P**0.5,
    )[1].diagonal(0, 1, 2)  # rows with F^T F / P = A^-1: the exact J A^-1 J^T
    return obj, X, A, W, truth


@pytest.mark.parametrize("net", ["regression_multi", "classification"])
def test_deflated_estimate_is_unbiased(net, request):
    """The estimator is linear in the samples' second moment: with a second
    moment equal to A^-1 it returns A^-1 exactly (to rounding), for the
    sketch's subspace, a random one and one with a repeated direction."""
    obj, X, A, W, _ = _setup(request.getfixturevalue(net), 8)
    P = A.shape[0]
    Sigma = torch.linalg.inv(A)
    root = torch.linalg.cholesky(Sigma).T * P**0.5  # rows: root^T root / P = A^-1
    g = torch.Generator().manual_seed(0)
    for basis in (W, torch.randn(5, P, generator=g, dtype=DT)):
        F = deflated_factor(root, basis, basis @ A)
        est = F.T @ F / F.shape[0]
        assert torch.allclose(est, Sigma, rtol=1e-9, atol=1e-10 * Sigma.abs().max())
    # a dependent direction is dropped: the same estimate, no more rows
    twice = torch.cat([W, W[:1]])
    F2 = deflated_factor(root, twice, twice @ A)
    assert F2.shape[0] == P + W.shape[0]
    est = F2.T @ F2 / F2.shape[0]
    assert torch.allclose(est, Sigma, rtol=1e-9, atol=1e-10 * Sigma.abs().max())


def test_deflated_estimate_converges_with_many_samples(classification):
    """S = 4096 sample-then-optimise draws: variances within 2% (median) of
    the dense truth, as the plain samples; A W by GGN products equals the
    dense product."""
    obj, X, A, W, truth = _setup(classification, 16)
    AW = deflation_products(obj, W, chunk_size=5)
    assert torch.allclose(AW, W @ A, rtol=1e-10, atol=1e-12)
    state = posterior_samples(obj, 4096, rtol=1e-10, seed=1)
    F = deflated_factor(state.samples, W, AW)
    var = amortized_covariance(obj.forward, obj.theta_map, X, F)[1].diagonal(0, 1, 2)
    assert float(((var - truth).abs() / truth).median()) < 0.02


@pytest.mark.parametrize(
    "net",
    # regression: ~60 CG iterations per sample without a preconditioner (~10 s)
    [pytest.param("regression_multi", marks=pytest.mark.slow), "classification"],
)
def test_deflation_lowers_the_error_at_equal_samples(net, request):
    """S = 64, 8 fixed seeds, the rank-24 sketch of the 51-parameter nets'
    GGN handled exactly: the deflated variances' median relative error against
    the dense truth, averaged over the seeds, is below 0.8 times the plain
    samples' (the same samples, projected)."""
    obj, X, A, W, truth = _setup(request.getfixturevalue(net), 24)
    AW = W @ A
    plain, deflated = [], []
    for seed in range(8):
        samples = posterior_samples(obj, 64, rtol=1e-6, seed=seed).samples
        for rows, out in (
            (samples, plain),
            (deflated_factor(samples, W, AW), deflated),
        ):
            var = amortized_covariance(obj.forward, obj.theta_map, X, rows)[1]
            err = (var.diagonal(0, 1, 2) - truth).abs() / truth
            out.append(float(err.median()))
    plain, deflated = sum(plain) / 8, sum(deflated) / 8
    assert deflated < 0.8 * plain, (deflated, plain)
