"""Minibatch refits (preconditioned SGD with iterate averaging) vs dense GGN.

Tolerance: median relative error of the variance <= 2%, max <= 5% after 100
epochs of 10 shuffled minibatches (the full-batch path is tested to 1e-3 in
test_accuracy.py; minibatch refits converge only in expectation).
"""

from __future__ import annotations

import pytest
import torch
from conftest import (
    PRIOR,
    SIGMA,
    dense_reference,
    make_classification,
    make_regression,
    rel_err,
    train_stationary,
)
from laplace import Laplace
from torch.utils.data import DataLoader, TensorDataset


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
    _, f_var = la._glm_predictive_distribution(Xq)
    err = rel_err(f_var.diagonal(0, 1, 2), ref.diagonal(0, 1, 2))
    assert err.median() <= 0.02, f"median {err.median():.2e}"
    assert err.max() <= 0.05, f"max {err.max():.2e}"
    assert la.last_diagnostics.steps == 100 * 10
    assert (la.last_diagnostics.residual < 0.1).all()


def test_minibatch_refits_need_ggn_target(regression_1d):
    model, _, _ = regression_1d
    for kw in ({"target": "hessian"}, {"amortize": 8}):
        with pytest.raises(ValueError, match="minibatch_epochs"):
            Laplace(model, "regression", "all", "hfl", minibatch_epochs=10, **kw)
    with pytest.raises(ValueError, match="minibatch_epochs"):
        Laplace(model, "regression", "all", "hfl", minibatch_epochs=1)
