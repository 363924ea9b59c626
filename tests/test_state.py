"""The estimator's state: ``state_dict`` / ``load_state_dict`` round trips and
what a state holds, values (not only key names) checked on loading (every
corrupted value refused with the key named, and a refused state changes
nothing), pickling and deep copies."""

from __future__ import annotations

import copy
import math
import pickle

import pytest
import torch
from conftest import DT, PRIOR, SIGMA, is_fitted, loader
from laplace import Laplace
from torch import nn
from torch.utils.data import DataLoader

from laplace_hfl import HFLNotFittedError

SUBSETS = ["all", "last_layer"]

MODES = {
    "all-cg": dict(subset_of_weights="all", solver="cg"),
    "all-dense": dict(subset_of_weights="all", solver="dense"),
    "last-layer-cg": dict(subset_of_weights="last_layer", solver="cg"),
    "last-layer-dense": dict(subset_of_weights="last_layer", solver="dense"),
    "amortised": dict(subset_of_weights="all", amortize=8),
}


def _pair(model, X, y, **kw):
    la = Laplace(model, "regression", hessian_structure="hfl", **kw)
    la.fit(loader(X, y))
    fresh = Laplace(model, "regression", hessian_structure="hfl", **kw)
    return la, fresh


# ------------------------------------------------------------------ round trips
def test_state_dict_round_trip_all_weights(regression_1d):
    model, X, y = regression_1d
    la = Laplace(
        model, "regression", "all", "hfl", sigma_noise=SIGMA, prior_precision=2.0
    )
    la.fit(loader(X, y))
    _, v = la(X[:4])
    state = la.state_dict()
    assert not any(isinstance(s, DataLoader) for s in state.values())
    new = Laplace(model, "regression", "all", "hfl")
    new.load_state_dict(state)
    assert float(new.prior_precision) == 2.0 and float(new.sigma_noise) == SIGMA
    with pytest.raises(HFLNotFittedError, match=r"la\.fit\(train_loader\)"):
        new(X[:4])
    new.fit(loader(X, y))
    assert torch.allclose(new(X[:4])[1], v)


def test_state_dict_round_trip_last_layer(classification):
    model, X, y = classification
    la = Laplace(model, "classification", "last_layer", "hfl", prior_precision=PRIOR)
    la.fit(loader(X, y))
    p = la(X[:4])
    new = Laplace(copy.deepcopy(model), "classification", "last_layer", "hfl")
    new.load_state_dict(la.state_dict())
    assert torch.allclose(new(X[:4]), p)  # cached features travel in the state


@pytest.mark.parametrize("subset", SUBSETS)
def test_state_dict_keeps_operators(regression_1d, subset):
    """Last-layer state holds its features (H works after loading); all-weights
    state holds no data (products say to call fit)."""
    model, X, y = regression_1d
    la = Laplace(model, "regression", subset, "hfl", sigma_noise=SIGMA)
    la.fit(loader(X, y))
    la2 = Laplace(copy.deepcopy(model), "regression", subset, "hfl", sigma_noise=SIGMA)
    la2.load_state_dict(la.state_dict())
    v = torch.ones(la.n_params, dtype=DT)
    if subset == "last_layer":
        assert torch.allclose(la2.H @ v, la.H @ v, rtol=1e-12, atol=0)
    else:
        assert la2.H is not None
        with pytest.raises(HFLNotFittedError, match="fit"):
            la2.posterior_precision @ v
        with pytest.raises(HFLNotFittedError, match="fit"):
            la2.sample(2)


def test_state_dict_rejects_other_estimators(regression_1d):
    model, X, y = regression_1d
    la = Laplace(model, "regression", "all", "hfl")
    la.fit(loader(X, y))
    with pytest.raises(ValueError, match="target"):
        Laplace(model, "regression", "all", "hfl", target="hessian").load_state_dict(
            la.state_dict()
        )
    with pytest.raises(ValueError, match="subset_of_weights"):
        Laplace(model, "regression", "last_layer", "hfl").load_state_dict(
            la.state_dict()
        )


# ---------------------------------------------------------- values checked on load


def _nan_like(t):
    t = t.clone()
    t.view(-1)[0] = math.nan
    return t


CORRUPT = {
    "nan mean": ("mean", _nan_like, "'mean'"),
    "negative n_data": ("n_data", lambda v: -5, "'n_data'"),
    "eps outside (0, 1]": ("hfl_eps", lambda v: 5.0, "eps must be in"),
    "nan loss": ("loss", lambda v: math.nan, "'loss'"),
    "nan prior": ("prior_precision", lambda v: torch.tensor(math.nan), "'prior_precision'"),
    "zero sigma": ("sigma_noise", lambda v: torch.tensor(0.0), "'sigma_noise'"),
    "other weights": ("mean", lambda v: v + 1e-3, "differs from the model's"),
}  # fmt: skip


@pytest.mark.parametrize("subset", ["all", "last_layer"])
@pytest.mark.parametrize("case", sorted(CORRUPT))
def test_corrupted_state_values_are_refused(regression_1d, subset, case):
    model, X, y = regression_1d
    la, fresh = _pair(model, X, y, subset_of_weights=subset)
    key, corrupt, match = CORRUPT[case]
    state = la.state_dict()
    state[key] = corrupt(state[key])
    before = dict(fresh.__dict__)
    with pytest.raises(ValueError, match=match):
        fresh.load_state_dict(state)
    assert not is_fitted(fresh)
    assert fresh.__dict__.keys() == before.keys()


def test_amortised_samples_checked(regression_1d):
    model, X, y = regression_1d
    la, fresh = _pair(model, X, y, subset_of_weights="all", amortize=4)
    state = la.state_dict()
    for samples in (
        _nan_like(state["amortized_samples"]),
        state["amortized_samples"][:1],
    ):
        bad = dict(state, amortized_samples=samples)
        with pytest.raises(ValueError, match="'amortized_samples'"):
            fresh.load_state_dict(bad)
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh(X[:2])[1], la(X[:2])[1])


def test_wrongly_shaped_cached_features_refused(regression_1d):
    model, X, y = regression_1d
    la, fresh = _pair(model, X, y, subset_of_weights="last_layer")
    state = la.state_dict()
    bad = dict(state, training_X=[x[:, :-1] for x in state["training_X"]])
    with pytest.raises(ValueError, match="'training_X'"):
        fresh.load_state_dict(bad)
    bad = dict(state, training_y=[t[:-1] for t in state["training_y"]])
    with pytest.raises(ValueError, match="'training_X'"):
        fresh.load_state_dict(bad)
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh(X[:2])[1], la(X[:2])[1])


# ------------------------------------------------------- pickling and copies
@pytest.mark.parametrize("mode", sorted(MODES))
def test_pickle_and_deepcopy_predict_the_same(regression_1d, mode):
    model, X, y = regression_1d
    la, _ = _pair(model, X, y, sigma_noise=0.3, prior_precision=0.5, **MODES[mode])
    Xq = X[:3]
    mu, var = la(Xq)  # after a prediction: caches and hooks have run
    for clone in (pickle.loads(pickle.dumps(la)), copy.deepcopy(la)):
        assert torch.equal(clone.mean, la.mean)
        mu2, var2 = clone(Xq)
        torch.testing.assert_close(mu2, mu, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(var2, var, rtol=1e-8, atol=1e-12)


def test_unfitted_estimator_pickles_with_its_zero_curvature():
    """An unfitted estimator's ``H`` is the zero operator (as laplace-torch's
    ``zeros(P, P)``) before and after a pickle round trip."""
    model = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 1)).double()
    la = Laplace(model, "regression", "all", "hfl")
    copy_ = pickle.loads(pickle.dumps(la))
    v = torch.randn(la.n_params, dtype=torch.float64)
    assert torch.equal(la.H @ v, torch.zeros_like(v))
    assert torch.equal(copy_.H @ v, torch.zeros_like(v))


@pytest.mark.parametrize("prior", ["scalar", "layerwise", "diag"])
def test_loaded_amortised_samples_serve_their_own_prior(regression_1d, prior):
    """A loaded amortised state without data predicts from its stored samples
    for the prior they were drawn for (scalar, per layer or per parameter, in
    the model's dtype), and says to refit for any other prior."""
    model, X, y = regression_1d
    la = Laplace(model, "regression", "all", "hfl", sigma_noise=SIGMA, amortize=4)
    shape = {"scalar": (1,), "layerwise": (la.n_layers,), "diag": (la.n_params,)}
    la.prior_precision = torch.linspace(0.5, 2.0, shape[prior][0], dtype=DT)
    la.fit(loader(X, y))
    _, v = la(X[:3])
    new = Laplace(model, "regression", "all", "hfl", sigma_noise=SIGMA, amortize=4)
    new.load_state_dict(la.state_dict())
    assert torch.equal(new(X[:3])[1], v)
    new.prior_precision = new.prior_precision * 2
    with pytest.raises(HFLNotFittedError, match="other hyperparameters"):
        new(X[:3])
