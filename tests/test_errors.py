"""Bad input: exact exception types, actionable messages, nothing corrupted."""

from __future__ import annotations

import pytest
import torch
from conftest import DT, assert_unchanged, loader, saddle_regression, snapshot
from laplace import Laplace
from torch.utils.data import DataLoader, TensorDataset

from laplace_hfl import (
    HFLNotFittedError,
    IndefiniteHessianError,
    NonStationaryMAPWarning,
    RefitConvergenceWarning,
)


@pytest.fixture
def fitted(regression_1d):
    model, X, y = regression_1d
    la = Laplace(model, "regression", "all", "hfl", sigma_noise=0.3)
    la.fit(loader(X, y))
    return la, model, X, y


@pytest.mark.parametrize("subset", ["all", "last_layer"])
def test_predict_before_fit(regression_1d, subset):
    model, X, _ = regression_1d
    snap = snapshot(model)
    la = Laplace(model, "regression", subset, "hfl")
    with pytest.raises(HFLNotFittedError, match="fit"):
        la(X[:2])
    with pytest.raises(HFLNotFittedError, match="fit"):
        la.functional_variance(torch.zeros(1, 1, la.n_params or 1, dtype=DT))
    assert_unchanged(model, snap)


@pytest.mark.parametrize("subset", ["all", "last_layer"])
def test_wrong_target_shape(regression_1d, subset):
    model, X, y = regression_1d
    snap = snapshot(model)
    la = Laplace(model, "regression", subset, "hfl")
    with pytest.raises(ValueError, match="reshape"):
        la.fit(loader(X, y.squeeze(-1)))
    with pytest.raises(HFLNotFittedError):
        la(X[:2])  # the failed fit left the estimator unfitted
    assert_unchanged(model, snap)


def test_wrong_classification_targets(classification):
    model, X, y = classification
    la = Laplace(model, "classification", "all", "hfl")
    with pytest.raises(ValueError, match="class indices"):
        la.fit(loader(X, y.to(DT)))


@pytest.mark.parametrize("subset", ["all", "last_layer"])
def test_empty_loader(regression_1d, subset):
    model, X, y = regression_1d
    snap = snapshot(model)
    la = Laplace(model, "regression", subset, "hfl")
    empty = DataLoader(TensorDataset(X[:0], y[:0]), batch_size=4)
    with pytest.raises(ValueError, match="no batches"):
        la.fit(empty)
    assert_unchanged(model, snap)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_loss_at_map(fitted, bad):
    la, model, X, y = fitted
    snap = snapshot(model)
    before = la(X[:3])[1]
    y_bad = y.clone()
    y_bad[3] = bad
    with pytest.raises(ValueError, match="not finite"):
        la.fit(loader(X, y_bad))
    # the earlier fit is intact: same predictions as before the bad call
    assert torch.allclose(la(X[:3])[1], before)
    assert_unchanged(model, snap)


def test_unknown_target_and_bad_options(regression_1d):
    model, _, _ = regression_1d
    snap = snapshot(model)
    with pytest.raises(ValueError, match="'ggn'"):
        Laplace(model, "regression", "all", "hfl", target="kfac")
    for kw in ({"eps": 0.0}, {"eps": -1e-3}, {"rtol": 0}, {"max_iter": 0}):
        with pytest.raises(ValueError):
            Laplace(model, "regression", "all", "hfl", **kw)
    with pytest.raises(ValueError, match="chunk_size"):
        Laplace(model, "regression", "last_layer", "hfl", chunk_size=0)
    with pytest.raises(ValueError, match="regression"):
        Laplace(model, "poisson", "all", "hfl")
    with pytest.raises(NotImplementedError, match="enable_backprop"):
        Laplace(model, "regression", "all", "hfl", enable_backprop=True, amortize=8)
    assert_unchanged(model, snap)


def test_subnetwork_rejected(regression_1d):
    model, _, _ = regression_1d
    with pytest.raises(ValueError, match="[Ss]ubnetwork"):
        Laplace(model, "regression", "subnetwork", "hfl")


def test_gridsearch_needs_val_loader(fitted):
    la, model, X, y = fitted
    snap = snapshot(model)
    with pytest.raises(ValueError, match="val_loader"):
        la.optimize_prior_precision(method="gridsearch")
    assert_unchanged(model, snap)


@pytest.mark.parametrize("pred_type", ["gp"])
def test_pred_type_other_than_glm(fitted, pred_type):
    la, model, X, _ = fitted
    snap = snapshot(model)
    with pytest.raises(NotImplementedError, match="pred_type='glm'"):
        la(X[:2], pred_type=pred_type)
    with pytest.raises(NotImplementedError, match="glm"):
        la.predictive_samples(X[:2], pred_type=pred_type)
    with pytest.raises(NotImplementedError, match="glm"):
        la.functional_samples(X[:2], pred_type=pred_type)
    assert_unchanged(model, snap)


def test_empty_query(fitted):
    la, _, X, _ = fitted
    with pytest.raises(ValueError, match="at least one input"):
        la(X[:0])


def test_wrong_jacobian_shape(fitted):
    la, _, _, _ = fitted
    with pytest.raises(ValueError, match="Jacobians"):
        la.functional_variance(torch.zeros(2, 1, la.n_params + 1, dtype=DT))


def test_indefinite_hessian_detected():
    """A MAP trained without the prior's weight decay is a saddle of L."""
    model, X, y = saddle_regression()
    snap = snapshot(model)
    la = Laplace(
        model, "regression", "all", "hfl", target="hessian",
        sigma_noise=0.05, prior_precision=1e-4,
    )  # fmt: skip
    la.fit(loader(X, y))
    with pytest.raises(IndefiniteHessianError, match="target='ggn'"):
        la(X[:4])
    assert_unchanged(model, snap)
    # the GGN target works on the same model
    la = Laplace(
        model, "regression", "all", "hfl", sigma_noise=0.05, prior_precision=1e-4
    )
    la.fit(loader(X, y))
    assert (la(X[:4])[1] > 0).all()


def test_unconverged_refits_warn_with_numbers(regression_1d):
    model, X, y = regression_1d
    la = Laplace(
        model,
        "regression",
        "all",
        "hfl",
        sigma_noise=0.3,
        max_iter=1,
        max_newton=1,
        precondition_rank=0,
        solver="cg",
    )
    la.fit(loader(X, y))
    with pytest.warns(RefitConvergenceWarning, match=r"did not converge.*max_iter=1"):
        la(X[:2])
    assert not la.last_diagnostics.converged.all()


def test_non_stationary_map_warns_for_hessian_target(regression_1d):
    model, X, y = regression_1d
    with torch.no_grad():
        model[2].bias += 2e-3  # move the MAP off the stationary point
    la = Laplace(
        model, "regression", "all", "hfl", target="hessian", sigma_noise=0.3,
        prior_precision=0.5,
    )  # fmt: skip
    la.fit(loader(X, y))
    with pytest.warns(NonStationaryMAPWarning, match="target='ggn'"):
        la(X[:2])
    assert la.map_gradient_norm > 1e-3


def test_bad_precondition_rank(regression_1d):
    model, _, _ = regression_1d
    for bad in (-1, 2.5, True):
        with pytest.raises(ValueError, match="precondition_rank"):
            Laplace(model, "regression", "all", "hfl", precondition_rank=bad)
