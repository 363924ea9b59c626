"""Minibatch refits (preconditioned SGD with iterate averaging) vs dense GGN.

Tolerance: median relative error of the variance <= 2%, max <= 5% after 100
epochs of 10 shuffled minibatches (the full-batch path is tested to 1e-3 in
test_accuracy.py; minibatch refits converge only in expectation).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import (
    PRIOR,
    SIGMA,
    assert_unchanged,
    dense_reference,
    make_classification,
    make_regression,
    rel_err,
    snapshot,
    train_stationary,
)
from laplace import Laplace
from torch.utils.data import DataLoader, TensorDataset

from laplace_hfl.errors import RefitConvergenceWarning


@pytest.mark.parametrize("likelihood", ["regression", "classification"])
def test_minibatch_refits_match_dense_ggn(likelihood):
    if likelihood == "regression":
        model, X, y = make_regression(n=200, hidden=10, seed=2)
    else:
        model, X, y = make_classification(n=200, seed=2)
    model = train_stationary(model, X, y, likelihood)
    Xq = X[:8] * 1.2
    ref, _ = dense_reference(model, X, y, Xq, likelihood, "ggn")
    loader = DataLoader(
        TensorDataset(X, y), batch_size=20, shuffle=True,
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    la = Laplace(
        model, likelihood, "all", "hfl", prior_precision=PRIOR,
        sigma_noise=SIGMA if likelihood == "regression" else 1.0,
        minibatch_epochs=100,
    )  # fmt: skip
    la.fit(loader, cache_data=False)  # every step sees one minibatch of 20
    _, f_var = la.glm_predictive(Xq)
    err = rel_err(f_var.diagonal(0, 1, 2), ref.diagonal(0, 1, 2))
    assert err.median() <= 0.02, f"median {err.median():.2e}"
    assert err.max() <= 0.05, f"max {err.max():.2e}"
    assert la.last_diagnostics.steps == 100 * 10
    assert (la.last_diagnostics.residual < 0.1).all()


def test_minibatch_refits_need_ggn_target(regression_1d):
    model, _, _ = regression_1d
    with pytest.raises(ValueError, match="minibatch_epochs"):
        Laplace(
            model, "regression", "all", "hfl", minibatch_epochs=10, target="hessian"
        )
    with pytest.raises(ValueError, match="minibatch_epochs"):
        Laplace(model, "regression", "all", "hfl", minibatch_epochs=1)


# --- nothing silent: unconverged minibatch refits warn ------------------------


def _mb_laplace(model, epochs, **kw):
    return Laplace(
        model, "regression", "all", "hfl", prior_precision=PRIOR, sigma_noise=SIGMA,
        minibatch_epochs=epochs, **kw,
    )  # fmt: skip


@pytest.fixture(scope="module")
def mb_regression():
    model, X, y = make_regression(n=200, hidden=10, seed=2)
    return train_stationary(model, X, y, "regression"), X, y


def test_unconverged_minibatch_refits_warn_with_numbers(mb_regression):
    """2 epochs under-estimate the variance by ~60-80%: warn, naming the residual."""
    model, X, y = mb_regression
    la = _mb_laplace(model, 2)
    la.fit(
        DataLoader(TensorDataset(X, y), batch_size=20), cache_data=True
    )  # fmt: skip
    with pytest.warns(RefitConvergenceWarning, match=r"residual.*minibatch_epochs"):
        la.glm_predictive(X[:3])
    assert la.last_diagnostics.residual.max() > 0.3


def test_converged_minibatch_refits_do_not_warn(mb_regression):
    model, X, y = mb_regression
    la = _mb_laplace(model, 100)
    la.fit(DataLoader(TensorDataset(X, y), batch_size=20), cache_data=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RefitConvergenceWarning)
        la.glm_predictive(X[:3])


@pytest.mark.parametrize("cache_data", [True, False])
def test_minibatch_means_the_loaders_batches(mb_regression, cache_data):
    """Batch 20 and 200 must differ (10 and 1 steps per epoch), cached or not."""
    model, X, y = mb_regression
    out = {}
    for bs in (20, 200):
        la = _mb_laplace(model, 4)
        la.fit(DataLoader(TensorDataset(X, y), batch_size=bs), cache_data=cache_data)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RefitConvergenceWarning)
            out[bs] = la.glm_predictive(X[:3])[1]
        assert la.last_diagnostics.steps == 4 * (200 // bs)
    assert not torch.allclose(out[20], out[200])


def test_minibatch_refits_leave_model_unchanged(mb_regression):
    model, X, y = mb_regression
    snap = snapshot(model)
    la = _mb_laplace(model, 3)
    la.fit(DataLoader(TensorDataset(X, y), batch_size=50), cache_data=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RefitConvergenceWarning)
        la(X[:2])
    assert_unchanged(model, snap)
