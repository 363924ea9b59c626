"""Amortised HFL (sample-then-optimise) against FullLaplace with a GGN backend."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from conftest import assert_unchanged, reference_glm_predictive, snapshot
from laplace import Laplace
from laplace.curvature import CurvlinopsGGN
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import laplace_hfl  # noqa: F401  (registers hessian_structure="hfl")
from laplace_hfl.bench.benchmark.cases import train_adam
from laplace_hfl.engine.amortized import (
    amortized_covariance,
    loss_hessian_sqrt_apply,
    posterior_samples,
    sample_rtol,
)
from laplace_hfl.errors import RefitConvergenceWarning

DT = torch.float64
SIGMA, PRIOR = 0.3, 0.5
S = 2000  # relative s.e. of a variance sqrt(2/S) = 3.2%: median error ~2%


@pytest.fixture(scope="module")
def regression():
    g = torch.Generator().manual_seed(0)
    X = torch.rand(40, 1, generator=g, dtype=DT) * 4 - 2
    y = torch.sin(2 * X) + 0.1 * torch.randn(40, 1, generator=g, dtype=DT)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 10), nn.Tanh(), nn.Linear(10, 1)).to(DT)
    Xq = torch.linspace(-4, 4, 30, dtype=DT)[:, None]
    return train_adam(model, X, y, "regression", 200), X, y, Xq, "regression"


@pytest.fixture(scope="module")
def classification():
    g = torch.Generator().manual_seed(1)
    centers = 2 * torch.randn(3, 2, generator=g, dtype=DT)
    y = torch.arange(60) % 3
    X = centers[y] + torch.randn(60, 2, generator=g, dtype=DT)
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 3)).to(DT)
    Xq = 3 * torch.randn(25, 2, generator=g, dtype=DT)
    return train_adam(model, X, y, "classification", 200), X, y, Xq, "classification"


def _loader(X, y):
    return DataLoader(TensorDataset(X, y), batch_size=16)


def _reference(model, X, y, Xq, likelihood, subset):
    la = Laplace(
        copy.deepcopy(model), likelihood, subset, "full", sigma_noise=_sigma(likelihood),
        prior_precision=PRIOR, backend=CurvlinopsGGN,
    )  # fmt: skip
    la.fit(_loader(X, y))
    return reference_glm_predictive(la, Xq)


def _hfl(model, likelihood, subset, n_samples=S):
    return Laplace(
        model, likelihood, subset, "hfl", sigma_noise=_sigma(likelihood),
        prior_precision=PRIOR, amortize=n_samples,
    )  # fmt: skip


def _sigma(likelihood):
    return SIGMA if likelihood == "regression" else 1.0


def _rel_err(a, b):
    return ((a - b).abs() / b.abs()).median().item()


def test_loss_hessian_sqrt_is_a_square_root():
    f = torch.randn(5, 4, dtype=DT)
    p = torch.softmax(f, -1)
    Lam = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    eye = torch.eye(4, dtype=DT).expand(5, 4, 4)
    # columns of L: L e_k for every k
    L = loss_hessian_sqrt_apply("classification", f, eye.permute(2, 0, 1))
    L = L.permute(1, 2, 0)
    torch.testing.assert_close(L @ L.transpose(1, 2), Lam)


@pytest.mark.parametrize("case", ["regression", "classification"])
@pytest.mark.parametrize("subset", ["all", "last_layer"])
def test_amortized_matches_full_ggn(case, subset, request):
    model, X, y, Xq, likelihood = request.getfixturevalue(case)
    mu_ref, var_ref = _reference(model, X, y, Xq, likelihood, subset)
    la = _hfl(model, likelihood, subset)
    la.fit(_loader(X, y))
    mu, var = la.glm_predictive(Xq)
    torch.testing.assert_close(mu, mu_ref)
    d, d_ref = torch.diagonal(var, 0, 1, 2), torch.diagonal(var_ref, 0, 1, 2)
    assert _rel_err(d, d_ref) < 0.10
    # full covariance matrices agree in Frobenius norm to a few sqrt(2/S)
    rel_fro = (var - var_ref).flatten(1).norm(dim=1) / var_ref.flatten(1).norm(dim=1)
    assert rel_fro.median().item() < 0.15
    assert la.amortized_samples().residual.max().item() <= sample_rtol(S, 1e-6)


def test_sample_tolerance_is_a_hundredth_of_the_monte_carlo_error():
    assert sample_rtol(64, 1e-6) == pytest.approx(0.01 * (2 / 64) ** 0.5)
    assert sample_rtol(64, 0.05) == 0.05  # a looser rtol wins
    assert sample_rtol(2_000_000, 1e-6) == 1e-5


def test_sample_tolerance_changes_variances_far_below_monte_carlo_error(
    classification,
):
    """The same right-hand sides solved to the amortised tolerance and to
    1e-10: the variances differ by < 1% of their Monte Carlo standard error
    ``sqrt(2/S)`` (median) and < 5% (max)."""
    model, X, y, Xq, likelihood = classification
    la = _hfl(model, likelihood, "all", n_samples=32)
    la.fit(_loader(X, y))
    obj = la.objective()
    tol = sample_rtol(32, la.hfl_settings.rtol)
    loose = posterior_samples(obj, 32, rtol=tol, precond=None)
    tight = posterior_samples(obj, 32, rtol=1e-10, max_iter=5000, precond=None)
    assert loose.iterations.max() < tight.iterations.max()
    assert loose.residual.max() <= tol and tight.residual.max() <= 1e-10
    var = [
        amortized_covariance(obj.forward, obj.theta_map, Xq, st.samples)[1].diagonal(
            dim1=-2, dim2=-1
        )
        for st in (loose, tight)
    ]
    change = ((var[0] - var[1]).abs() / var[1]).flatten()
    mc = (2 / 32) ** 0.5
    assert change.median() < 0.01 * mc and change.max() < 0.05 * mc


def test_amortized_error_shrinks_with_samples(regression):
    model, X, y, Xq, likelihood = regression
    _, var_ref = _reference(model, X, y, Xq, likelihood, "all")
    errs = []
    for n in (16, 1024):
        la = _hfl(model, likelihood, "all", n)
        la.fit(_loader(X, y))
        errs.append(_rel_err(la.glm_predictive(Xq)[1], var_ref))
    assert errs[1] < errs[0]


def test_functional_variance_and_joint(regression):
    model, X, y, Xq, likelihood = regression
    la = _hfl(model, likelihood, "all", 500)
    la.fit(_loader(X, y))
    f_mu, f_cov = la.glm_predictive(Xq[:5], joint=True)
    _, f_var = la.glm_predictive(Xq[:5])
    torch.testing.assert_close(torch.diagonal(f_cov), f_var.flatten())
    from laplace_hfl.engine.functional import output_jacobians

    obj = la.objective()
    Js, _ = output_jacobians(obj.forward, obj.theta_map, Xq[:5])
    torch.testing.assert_close(la.functional_variance(Js), f_var)


@pytest.mark.parametrize("subset", ["all", "last_layer"])
def test_state_dict_predicts_without_training_data(regression, subset):
    model, X, y, Xq, likelihood = regression
    la = _hfl(model, likelihood, subset, 64)
    la.fit(_loader(X, y))
    expected = la(Xq)
    state = la.state_dict()
    fresh = _hfl(copy.deepcopy(model), likelihood, subset, 64)
    fresh.load_state_dict(state)
    assert not any(isinstance(v, DataLoader) for v in state.values())  # no loader
    got = fresh(Xq)
    torch.testing.assert_close(got[0], expected[0])
    torch.testing.assert_close(got[1], expected[1])
    # Changed hyperparameters need the data again: a clear error, not stale samples.
    fresh.prior_precision = 2 * PRIOR
    if subset == "all":
        with pytest.raises(laplace_hfl.HFLNotFittedError, match="fit"):
            fresh(Xq)


def test_amortize_rejects_hessian_target_and_bad_values(regression):
    model = regression[0]
    with pytest.raises(ValueError, match="target='ggn'"):
        Laplace(model, "regression", "all", "hfl", target="hessian", amortize=10)
    for bad in (1, 2.5, True):
        with pytest.raises(ValueError, match="amortize"):
            Laplace(model, "regression", "all", "hfl", amortize=bad)


def test_unconverged_amortized_cg_warns_with_numbers(regression):
    """max_iter=1 leaves a large CG residual: warn with it, never pass silently."""
    model, X, y, _, likelihood = regression
    la = Laplace(
        model, likelihood, "all", "hfl", sigma_noise=SIGMA, prior_precision=PRIOR,
        amortize=8, max_iter=1, precondition_rank=0,
    )  # fmt: skip
    with pytest.warns(RefitConvergenceWarning, match=r"residual.*max_iter"):
        la.fit(_loader(X, y))
    assert la.amortized_samples().residual.max().item() > 1e-3


# --- amortised mode at training cost: sample-then-optimise over minibatches ---


@pytest.mark.slow
@pytest.mark.parametrize("case", ["regression", "classification"])
def test_minibatch_amortized_matches_full_ggn(case, request):
    """SGD samples (batches of 16, 200 epochs, chunks of 500) vs FullLaplace GGN.

    Tolerance as the CG path: median relative variance error < 10% (Monte Carlo
    s.e. sqrt(2/2000) = 3.2% plus the SGD bias), full-batch residual < 5%.
    """
    model, X, y, Xq, likelihood = request.getfixturevalue(case)
    _, var_ref = _reference(model, X, y, Xq, likelihood, "all")
    la = Laplace(
        model, likelihood, "all", "hfl", sigma_noise=_sigma(likelihood),
        prior_precision=PRIOR, amortize=S, minibatch_epochs=200, chunk_size=500,
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("error", RefitConvergenceWarning)
        la.fit(_loader(X, y))
    _, var = la.glm_predictive(Xq)
    d, d_ref = torch.diagonal(var, 0, 1, 2), torch.diagonal(var_ref, 0, 1, 2)
    assert _rel_err(d, d_ref) < 0.10
    assert la.amortized_samples().residual.max().item() < 0.05
    assert int(la.amortized_samples().iterations[0]) == 200 * -(-len(X) // 16)


def test_minibatch_amortized_converges_and_is_reproducible(regression):
    """The right-hand sides are fixed for the run (drawn once per chunk), so
    more epochs lower the full-batch residual; a seed gives the same samples."""
    from laplace_hfl.engine.amortized import sgd_posterior_samples

    model, X, y, _, likelihood = regression
    la = _hfl(model, likelihood, "all", None)
    la.fit(_loader(X, y))
    obj = la.objective()
    res = []
    for epochs in (4, 40):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RefitConvergenceWarning)
            st = sgd_posterior_samples(obj, 8, epochs, batch_rows=16, seed=3)
        res.append(st.residual.max().item())
    assert res[1] < res[0] / 3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RefitConvergenceWarning)
        a = sgd_posterior_samples(obj, 8, 40, batch_rows=16, seed=3)
    torch.testing.assert_close(a.samples, st.samples, rtol=0, atol=0)


def test_unconverged_minibatch_amortized_warns(regression):
    model, X, y, _, likelihood = regression
    snap = snapshot(model)
    la = Laplace(
        model, likelihood, "all", "hfl", sigma_noise=SIGMA, prior_precision=PRIOR,
        amortize=8, minibatch_epochs=2,
    )  # fmt: skip
    with pytest.warns(RefitConvergenceWarning, match=r"residual.*minibatch_epochs"):
        la.fit(_loader(X, y))
    assert la.amortized_samples().residual.max().item() > 0.1
    assert_unchanged(model, snap)


def test_benchmark_dual_reference_matches_dense():
    """The benchmark's exact reference (dense dual/Woodbury form) vs the
    independent dense GGN inverse of conftest, float64: 1e-10 relative."""
    from conftest import PRIOR as P0
    from conftest import dense_reference, make_classification, train_stationary

    from laplace_hfl.bench.benchmark.amortized import dual_variances

    model, X, y = make_classification()
    model = train_stationary(model, X, y, "classification")
    Xq = 1.3 * X[:5]
    ref, _ = dense_reference(model, X, y, Xq, "classification", "ggn")
    got = dual_variances(model, X, Xq, P0)
    torch.testing.assert_close(got, ref.diagonal(0, 1, 2), rtol=1e-10, atol=0)
