"""``load_state_dict`` checks values, not only key names: every corrupted
value is refused with the key named, and a refused state changes nothing."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import loader
from laplace import Laplace


def _pair(model, X, y, **kw):
    la = Laplace(model, "regression", hessian_structure="hfl", **kw)
    la.fit(loader(X, y))
    fresh = Laplace(model, "regression", hessian_structure="hfl", **kw)
    return la, fresh


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
    assert not fresh._fitted
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
