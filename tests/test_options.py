"""The keyword-only options of both estimator classes (one dataclass), the
quantities derived from ``chunk_size``, and the value keys of hyperparameters."""

from __future__ import annotations

import dataclasses
import inspect
import pickle
import re

import pytest
import torch
from laplace import Laplace
from laplace.baselaplace import ParametricLaplace
from laplace.lllaplace import LLLaplace
from torch import nn

from laplace_hfl import HessianFreeLaplace, HessianFreeLLLaplace
from laplace_hfl._docs import HFL_OPTIONS_DOC
from laplace_hfl.engine.chunks import query_points
from laplace_hfl.engine.keys import TensorKey
from laplace_hfl.options import OPTION_NAMES, HFLOptions, validate_hfl_options


@pytest.mark.parametrize(
    ("cls", "parent"),
    [(HessianFreeLaplace, ParametricLaplace), (HessianFreeLLLaplace, LLLaplace)],
)
def test_signature_is_laplace_torchs_plus_the_options(cls, parent):
    params = list(inspect.signature(cls).parameters.values())
    ours = list(inspect.signature(parent).parameters.values())
    assert params[: len(ours)] == ours
    options = params[len(ours) :]
    assert [p.name for p in options] == list(OPTION_NAMES)
    defaults = HFLOptions()
    for p in options:
        assert p.kind is p.KEYWORD_ONLY
        assert p.default == getattr(defaults, p.name)


def test_every_option_is_documented_in_order():
    documented = re.findall(r"^    (\w+) : ", HFL_OPTIONS_DOC, flags=re.M)
    assert documented == ["enable_backprop", *OPTION_NAMES]


def test_constructor_keeps_options_and_refuses_unknown_keywords():
    model = nn.Linear(3, 2).double()
    la = Laplace(model, "regression", "all", "hfl", chunk_size=5, eps=1e-2)
    assert (la.chunk_size, la.hfl_settings.eps) == (5, 1e-2)
    assert la.hfl_settings == HFLOptions(chunk_size=5, eps=1e-2).settings
    positional = HessianFreeLLLaplace(model, "regression", 0.3, 2.0, eps=1e-2)
    assert float(positional.sigma_noise) == 0.3
    assert float(positional.prior_precision) == 2.0
    with pytest.raises(TypeError, match="unexpected keyword argument 'chunk'"):
        HessianFreeLLLaplace(model, "regression", chunk=5)
    with pytest.raises(TypeError, match="missing a required argument"):
        HessianFreeLaplace(model)
    with pytest.raises(TypeError, match="'chunk' is not an HFL option"):
        validate_hfl_options("regression", False, {"chunk": 5})


def test_validation_returns_clean_values():
    default = validate_hfl_options("regression", False, {})
    assert default == HFLOptions()
    got = validate_hfl_options(
        "regression",
        False,
        {"eps": torch.tensor(0.5), "max_iter": torch.tensor(3).numpy()[()]},
    )
    assert type(got.eps) is float and type(got.max_iter) is int
    assert dataclasses.replace(got, eps=1e-3, max_iter=1000) == default


@pytest.mark.parametrize(
    ("chunk", "outputs", "points"), [(64, 1, 64), (64, 10, 6), (8, 10, 1), (5, 0, 5)]
)
def test_query_points_fill_one_product(chunk, outputs, points):
    assert query_points(chunk, outputs) == points


def test_tensor_key_compares_values_and_survives_in_place_edits():
    t = torch.tensor([1.0, 2.0, 3.0])
    key = TensorKey(t)
    assert key == TensorKey(t.clone()) and hash(key) == hash(TensorKey(t.clone()))
    t[1] = 5.0  # the key holds the values it was made from
    assert key != TensorKey(t)
    assert key == TensorKey(torch.tensor([1.0, 2.0, 3.0]))
    assert key != TensorKey(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
    assert key != TensorKey(torch.tensor([[1.0, 2.0, 3.0]]))
    assert TensorKey(torch.tensor([float("nan")])) != TensorKey(
        torch.tensor([float("nan")])
    )
    assert (key, 1.0) == (TensorKey(torch.tensor([1.0, 2.0, 3.0])), 1.0)
    assert pickle.loads(pickle.dumps(key)) == key
    assert key != (1.0, 2.0, 3.0)


def test_prior_edited_in_place_is_checked_again_at_use(regression_1d):
    model, X, y = regression_1d
    la = Laplace(model, "regression", "all", "hfl", prior_precision=torch.ones(1))
    la.fit(torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), 20))
    la(X[:2])
    la.prior_precision.fill_(-1.0)  # bypasses the setter's check
    with pytest.raises(ValueError, match="prior_precision must be finite and >= 0"):
        la(X[:2])
