"""A call that fails changes nothing: the estimator's attributes after a
failed ``fit``, ``optimize_prior_precision``, ``log_marginal_likelihood`` or
``load_state_dict`` are the very ones it had before."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import DT, is_fitted, loader
from laplace import Laplace

from laplace_hfl.engine.gridsearch import gaussian_nll_loss


def _state(la):
    return {k: (v.clone() if torch.is_tensor(v) else v) for k, v in la.__dict__.items()}


def _assert_same(la, before):
    assert la.__dict__.keys() == before.keys()
    for k, v in before.items():
        now = la.__dict__[k]
        if torch.is_tensor(v):
            assert torch.equal(now, v), k
        else:
            assert now is v or now == v, k


def _fitted(regression_1d, **kw):
    """A fitted estimator and a copy of its attributes."""
    model, X, y = regression_1d
    la = Laplace(model, "regression", "all", "hfl", **kw)
    la.fit(loader(X, y))
    return la, _state(la), X, y


def _boom(*args, **kwargs):
    raise RuntimeError("boom")


def test_failed_grid_search_keeps_the_prior(regression_1d):
    la, before, X, y = _fitted(regression_1d, prior_precision=0.7)
    with pytest.raises(RuntimeError, match="boom"):
        la.optimize_prior_precision(
            method="gridsearch", val_loader=loader(X, y), loss=_boom, grid_size=3
        )
    _assert_same(la, before)
    X_bad = X.clone()
    X_bad[3] = math.nan
    with pytest.raises(ValueError, match="rows"):
        la.optimize_prior_precision(
            method="gridsearch", val_loader=loader(X_bad, y), grid_size=3,
            loss=gaussian_nll_loss(la.sigma_noise),
        )  # fmt: skip
    _assert_same(la, before)


def test_failed_refit_keeps_the_fit(regression_1d):
    la, before, X, y = _fitted(regression_1d)
    la.prior_precision.fill_(-1.0)  # made invalid in place: caught at use
    with pytest.raises(ValueError, match="prior_precision"):
        la.fit(loader(X[:20], y[:20]))
    la.prior_precision.fill_(1.0)
    _assert_same(la, before)


def test_last_layer_wrong_prior_length_leaves_it_unfitted(regression_1d):
    model, X, y = regression_1d
    la = Laplace(
        model,
        "regression",
        "last_layer",
        "hfl",
        prior_precision=torch.ones(3, dtype=DT),
    )
    with pytest.raises(ValueError, match="prior precision"):
        la.fit(loader(X, y))
    assert not is_fitted(la) and la.n_params is None
    la.prior_precision = 1.0
    la.fit(loader(X, y))  # a second fit after the failure works
    assert is_fitted(la) and la.n_params == 11


def test_failed_marginal_likelihood_keeps_hyperparameters(regression_1d):
    la, before, _, _ = _fitted(regression_1d, sigma_noise=0.3)
    with pytest.raises(ValueError, match="sigma_noise"):
        la.log_marginal_likelihood(prior_precision=2.0, sigma_noise=-1.0)
    _assert_same(la, before)
