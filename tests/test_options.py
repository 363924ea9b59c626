"""The keyword-only options of both estimator classes (one dataclass), the
quantities derived from ``chunk_size``, and the value keys of hyperparameters.

The options are validated in one place, before any state exists: every
accepted value comes back normalised, every refused one names itself (the same
refusals through the constructors, model unchanged, are in
``tests/test_errors.py``)."""

from __future__ import annotations

import dataclasses
import inspect
import pickle
import re

import numpy as np
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
from laplace_hfl.engine.refit import RefitSettings
from laplace_hfl.engine.validation import MAX_EPS
from laplace_hfl.options import (
    OPTION_NAMES,
    PRECONDITIONERS,
    SOLVERS,
    HFLOptions,
    validate_hfl_options,
)


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


#: The constructors' defaults (``HessianFreeLaplace`` / ``LastLayerHFL``).
DEFAULTS = dict(
    eps=1e-3,
    target="ggn",
    rtol=1e-6,
    max_iter=1000,
    max_newton=20,
    chunk_size="auto",
    compute_dtype="auto",
    progress_bar=False,
    amortize=None,
    precondition_rank=None,
    minibatch_epochs=None,
    solver="auto",
    preconditioner="auto",
)


def _validate(likelihood="regression", enable_backprop=False, **overrides):
    return validate_hfl_options(likelihood, enable_backprop, {**DEFAULTS, **overrides})


def test_defaults_are_accepted_as_given():
    opts = _validate()
    assert isinstance(opts, HFLOptions)
    assert opts.settings == RefitSettings("ggn", 1e-3, 1e-6, 1000, 20)
    assert (opts.chunk_size, opts.compute_dtype, opts.progress_bar) == (
        "auto",
        "auto",
        False,
    )
    assert opts.amortize is opts.precondition_rank is opts.minibatch_epochs is None
    assert (opts.solver, opts.preconditioner) == ("auto", "auto")


def test_numpy_scalars_are_normalised_to_python_numbers():
    opts = _validate(
        eps=np.float32(0.01),
        max_iter=np.int64(50),
        chunk_size=np.int32(8),
        amortize=np.int64(16),
        precondition_rank=np.int16(0),
        progress_bar=np.bool_(True),
    )
    assert type(opts.settings.eps) is float and opts.settings.eps == pytest.approx(0.01)
    assert type(opts.settings.max_iter) is int and opts.settings.max_iter == 50
    assert type(opts.chunk_size) is int and type(opts.amortize) is int
    assert opts.precondition_rank == 0 and opts.progress_bar is True


@pytest.mark.parametrize(
    "likelihood", ["regression", "classification", "reward_modeling"]
)
@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("preconditioner", PRECONDITIONERS)
def test_every_listed_choice_is_accepted(likelihood, solver, preconditioner):
    opts = _validate(likelihood, solver=solver, preconditioner=preconditioner)
    assert (opts.solver, opts.preconditioner) == (solver, preconditioner)


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(solver="lu"), "solver must be one of"),
        (dict(solver=None), "solver must be one of"),
        (dict(preconditioner="jacobi"), "preconditioner must be one of"),
        (dict(solver="dense", amortize=4), "solver='dense' cannot be combined"),
        (dict(solver="dense", minibatch_epochs=3), "solver='dense' cannot be combined"),
        (dict(preconditioner="kfac", precondition_rank=8), "precondition_rank=8"),
        (dict(preconditioner="none", precondition_rank=8), "precondition_rank=8"),
        (dict(eps=0.0), "eps must be in"),
        (dict(eps=2 * MAX_EPS), "eps must be in"),
        (dict(eps="small"), "eps must be a real number"),
        (dict(eps=True), "eps must be a number"),
        (dict(rtol=1.0), "rtol must be in"),
        (dict(rtol=0.0), "rtol must be in"),
        (dict(max_iter=0), "max_iter must be an integer >= 1"),
        (dict(max_newton=2.0), "max_newton must be an integer >= 1"),
        (dict(chunk_size=0), "chunk_size must be an integer >= 1"),
        (dict(progress_bar="yes"), "progress_bar must be True or False"),
        (dict(progress_bar=1), "progress_bar must be True or False"),
        (dict(minibatch_epochs=1), r"minibatch_epochs.*None switches it off"),
        (dict(amortize=1), r"amortize.*None switches it off"),
        (dict(amortize=True), r"amortize.*boolean"),
        (dict(precondition_rank=-1), r"precondition_rank.*None switches it off"),
        (dict(compute_dtype=torch.float16), "compute_dtype must be"),
        (dict(compute_dtype="float16"), "compute_dtype must be 'auto'"),
        (dict(compute_dtype="Auto"), "compute_dtype must be 'auto'"),
        (dict(chunk_size="big"), "chunk_size must be an integer >= 1"),
        (dict(chunk_size=float("nan")), "chunk_size must be an integer >= 1"),
        (dict(target="hessian", minibatch_epochs=3), "target='ggn' only"),
        (dict(target="hessian", amortize=4), "only available with target='ggn'"),
        (dict(target="kfac"), "Unknown HFL target"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_bad_values_are_refused_by_name(overrides, match):
    with pytest.raises(ValueError, match=match):
        _validate(**overrides)


def test_unsupported_likelihood_is_refused():
    with pytest.raises(ValueError, match="not 'poisson'"):
        _validate("poisson")


def test_input_gradients_need_exact_mode():
    with pytest.raises(NotImplementedError, match="enable_backprop=True"):
        _validate(enable_backprop=True, amortize=4)
    assert _validate(enable_backprop=True).amortize is None
