"""Unit tests of ``laplace_hfl.options``: the keyword-only HFL options of the
two estimator classes are validated in one place, before any state exists.

The same refusals through the constructors (and the model left unchanged) are
tested in ``tests/test_errors.py``; this file checks the validation alone:
every accepted value comes back normalised, every refused one names itself.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from laplace_hfl.engine.refit import RefitSettings
from laplace_hfl.engine.validation import MAX_EPS
from laplace_hfl.options import (
    PRECONDITIONERS,
    SOLVERS,
    HFLOptions,
    validate_hfl_options,
)

#: The constructors' defaults (``HessianFreeLaplace`` / ``LastLayerHFL``).
DEFAULTS = dict(
    eps=1e-3,
    target="ggn",
    rtol=1e-6,
    max_iter=1000,
    max_newton=20,
    chunk_size=64,
    compute_dtype=torch.float64,
    progress_bar=False,
    amortize=None,
    precondition_rank=None,
    minibatch_epochs=None,
    solver="auto",
    preconditioner="auto",
)


def _validate(likelihood="regression", enable_backprop=False, **overrides):
    return validate_hfl_options(
        likelihood, enable_backprop, **{**DEFAULTS, **overrides}
    )


def test_defaults_are_accepted_as_given():
    opts = _validate()
    assert isinstance(opts, HFLOptions)
    assert opts.settings == RefitSettings("ggn", 1e-3, 1e-6, 1000, 20)
    assert (opts.chunk_size, opts.compute_dtype, opts.progress_bar) == (
        64,
        torch.float64,
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
