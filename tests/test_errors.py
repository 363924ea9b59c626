"""Bad input: exact exception types, actionable messages, nothing corrupted.

Every input and option that could give NaN, an arbitrary result or a raw
internal error raises a sentence naming the value and the fix
(docs/errors.md), before any state changes. What a failed call leaves behind
is checked attribute by attribute in ``tests/test_failed_calls.py``; corrupted
states in ``tests/test_state.py``."""

from __future__ import annotations

import pytest
import torch
from conftest import (
    DT,
    assert_unchanged,
    is_fitted,
    loader,
    saddle_regression,
    snapshot,
)
from laplace import Laplace
from torch import nn
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


def test_unconverged_refits_under_the_residual_rule_warn(regression_1d):
    """A tight rtol switches the variance stop off (residual rule only): the
    warning names rtol and max_iter, and no variance tolerance."""
    model, X, y = regression_1d
    la = Laplace(
        model, "regression", "all", "hfl", sigma_noise=0.3, rtol=1e-9,
        max_iter=1, precondition_rank=0, solver="cg",
    )  # fmt: skip
    la.fit(loader(X, y))
    with pytest.warns(RefitConvergenceWarning, match=r"rtol=1\.0e-09\) after") as rec:
        la(X[:2])
    assert "var_rtol" not in str(rec[0].message)


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


# ------------ values that would give NaN, an arbitrary result or a raw error
def _relu_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(1, 5), nn.ReLU(), nn.Linear(5, 1)).to(DT)


@pytest.mark.parametrize("amortize", [None, 8])
def test_overflowing_network_raises_in_every_mode(regression_1d, amortize):
    _, X, y = regression_1d
    model = _relu_net()
    la = Laplace(model, "regression", "all", "hfl", amortize=amortize)
    la.fit(loader(X, y))
    with pytest.raises(FloatingPointError, match="overflows"):
        la(torch.full((2, 1), 1e200, dtype=DT))


def test_soft_targets_must_be_probabilities(classification):
    model, X, y = classification
    snap = snapshot(model)
    soft = nn.functional.one_hot(y, 3).to(DT)
    la = Laplace(model, "classification", "all", "hfl")
    with pytest.raises(ValueError, match="summing to 1"):
        la.fit(loader(X, 0.5 * soft))
    negative = soft.clone()
    negative[0] = torch.tensor([1.5, -0.5, 0.0], dtype=DT)  # sums to 1
    with pytest.raises(ValueError, match=r"rows \[0\]"):
        la.fit(loader(X, negative))
    assert not is_fitted(la)
    la.fit(loader(X, soft))  # proper probabilities are accepted
    assert_unchanged(model, snap)


@pytest.mark.parametrize("dtype", [torch.int32, torch.uint8, torch.bool])
def test_class_indices_must_be_long(classification, dtype):
    model, X, y = classification
    la = Laplace(model, "classification", "all", "hfl")
    labels = (y > 0) if dtype == torch.bool else y.to(dtype)
    with pytest.raises(ValueError, match=r"torch\.long"):
        la.fit(loader(X, labels))


def _fitted(model, X, y, likelihood="regression", **kw):
    la = Laplace(model, likelihood, kw.pop("subset", "all"), "hfl", **kw)
    la.fit(loader(X, y))
    return la


def _nan_loss(*args, **kwargs):
    return torch.tensor(float("nan"))


TUNING = {
    "NaN grid loss": (dict(method="gridsearch", loss=_nan_loss), ValueError, "NaN"),
    "string loss": (dict(method="gridsearch", loss="nll"), ValueError, "callable"),
    "empty grid": (dict(method="gridsearch", grid_size=0), ValueError, "grid_size"),
    "no steps": (dict(n_steps=0), ValueError, "n_steps"),
    "NaN lr": (dict(lr=float("nan"), n_steps=2), ValueError, "lr"),
    "pred_type": (dict(pred_type="foo"), ValueError, "prediction types"),
    "method": (dict(method="foo"), ValueError, "method"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(TUNING))
def test_tuning_options_refused_before_any_change(regression_1d, case):
    model, X, y = regression_1d
    la = _fitted(model, X, y, prior_precision=0.7)
    kwargs, err, match = TUNING[case]
    if kwargs.get("method") == "gridsearch":
        kwargs = dict(kwargs, val_loader=loader(X, y))
    with pytest.raises(err, match=match):
        la.optimize_prior_precision(**kwargs)
    assert la.prior_precision.item() == pytest.approx(0.7)


def test_predictive_arguments_refused(regression_1d, classification):
    model, X, y = regression_1d
    la = _fitted(model, X, y)
    with pytest.raises(TypeError, match="foo"):
        la(X[:2], foo=1)
    with pytest.raises(ValueError, match="torch.Tensor"):
        la(X[:2].tolist())
    with pytest.raises(ValueError, match="torch.Tensor"):
        la(X[:2].numpy())
    with pytest.raises(ValueError, match=r"\(batch, outputs, parameters\)"):
        la.functional_variance(torch.zeros(2, la.n_params, dtype=DT))
    with pytest.raises(ValueError, match="n_samples"):
        la.predictive_samples(X[:2], n_samples=-5)
    with pytest.raises(ValueError, match="torch.Generator"):
        la.functional_samples(X[:2], generator=0)
    with pytest.raises(ValueError, match="GiB"):
        la.sample(10**12)
    with pytest.raises(ValueError, match="prior_precision must be a number"):
        la.log_marginal_likelihood(prior_precision="1")
    model, X, y = classification
    lc = _fitted(model, X, y, "classification")
    for n in (0, -5):
        with pytest.raises(ValueError, match="n_samples"):
            lc(X[:2], link_approx="mc", n_samples=n)
    with pytest.raises(TypeError, match="n_samples"):
        lc(X[:2], link_approx="mc", n_samples=10.5)


def test_model_and_constructor_refusals(regression_1d):
    model, X, y = regression_1d
    with pytest.raises(ValueError, match="single number"):
        Laplace(model, "regression", "all", "hfl", sigma_noise=torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="not a module"):
        Laplace(model, "regression", "last_layer", "hfl", last_layer_name="nope")
    with pytest.raises(ValueError, match="no parameters"):
        Laplace(nn.Sequential(nn.Tanh()), "regression", "last_layer", "hfl")
    mixed = nn.Sequential(nn.Linear(1, 3), nn.Tanh(), nn.Linear(3, 1).to(DT))
    with pytest.raises(ValueError, match="mixes floating dtypes"):
        Laplace(mixed, "regression", "all", "hfl").fit(loader(X, y))
    snap = snapshot(model)
    for p in model[-1].parameters():
        p.requires_grad_(False)
    la = Laplace(model, "regression", "last_layer", "hfl")
    with pytest.raises(ValueError, match="requires_grad=False"):
        la.fit(loader(X, y))
    assert not is_fitted(la)
    for p in model[-1].parameters():
        p.requires_grad_(True)
    assert_unchanged(model, snap)


def test_tiny_sigma_is_not_blamed_on_the_prior(regression_1d):
    model, X, y = regression_1d
    la = _fitted(model, X, y, sigma_noise=1e-8, solver="dense")
    with pytest.raises(ValueError, match="sigma_noise"):
        la(X[:2])
