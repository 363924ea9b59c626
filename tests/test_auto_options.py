"""``compute_dtype="auto"`` and ``chunk_size="auto"`` (the defaults).

The precision rule is a pure function of device type, model dtype, target and
variance tolerance, so its CUDA branch is tested here without a GPU; the real
CUDA cases are skipped where no CUDA device is present. Accuracy is checked
against the dense float64 ``torch.func`` reference of ``J P^{-1} J^T``
(``conftest.dense_reference``) of the network the estimator sees.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import DT, PRIOR, SIGMA, dense_reference, loader, rel_err
from laplace import Laplace

import laplace_hfl.engine.chunk_memory as chunk_memory
from laplace_hfl.engine.chunk_memory import (
    CPU_CHUNK,
    chunk_for_memory,
    forward_bytes,
    model_bytes_per_direction,
)
from laplace_hfl.engine.precision import FLOAT32_CERTIFIES, auto_compute_dtype

F32, F64 = torch.float32, torch.float64
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


# ------------------------------------------------------------- precision rule
@pytest.mark.parametrize(
    ("device", "model", "var_rtol", "target", "want"),
    [
        ("cpu", F32, 1e-3, "ggn", F64),  # the CPU keeps float64 (as before)
        ("cpu", F64, 1e-3, "ggn", F64),
        ("cuda", F32, 1e-3, "ggn", F32),  # float32 products, float64 recurrences
        ("cuda", torch.bfloat16, 1e-3, "ggn", F32),
        ("cuda", F64, 1e-3, "ggn", F64),  # a float64 model stays float64
        ("cuda", F32, None, "ggn", F64),  # rtol below default: residual rule
        ("cuda", F32, FLOAT32_CERTIFIES / 10, "ggn", F64),
        ("cuda", F32, FLOAT32_CERTIFIES, "ggn", F32),
        ("cuda", F32, 1e-3, "hessian", F64),  # no mixed path for Newton refits
        ("mps", F32, 1e-3, "ggn", F32),  # no float64 there
    ],
)
def test_auto_precision_rule(device, model, var_rtol, target, want):
    dtype, reason = auto_compute_dtype(device, model, var_rtol, target)
    assert dtype == want
    assert reason.startswith("compute_dtype auto: " + str(want).removeprefix("torch."))


def test_auto_dtype_is_concrete_and_explained(classification):
    model, X, y = classification
    m32 = copy.deepcopy(model).float()
    la = Laplace(m32, "classification", "all", "hfl", prior_precision=PRIOR)
    assert la.compute_dtype == F64  # before fit: already a dtype (CPU rule)
    la.fit(loader(X.float(), y))
    la.glm_predictive(X[:2].float())
    assert la.compute_dtype == F64
    assert "compute_dtype auto: float64" in la.last_diagnostics.choice
    tight = Laplace(m32, "classification", "all", "hfl", rtol=1e-8)
    assert tight.compute_dtype == F64


@pytest.mark.parametrize("lik", ["regression", "classification"])
def test_auto_dtype_float32_model_matches_float64_reference(
    regression_1d, classification, lik
):
    """The CPU choice (float64 refits) on the float32 copy of a test-suite
    network: within the default variance tolerance 1e-3 of the dense float64
    truth of that float32 network (its rounded weights)."""
    model, X, y = regression_1d if lik == "regression" else classification
    m32 = copy.deepcopy(model).float()
    X32, y32 = X.float(), (y.float() if lik == "regression" else y)
    Xq = torch.linspace(-3, 3, 9, dtype=DT)[:, None].expand(-1, X.shape[1]).float()
    ref, _ = dense_reference(copy.deepcopy(m32).double(), X32.double(),
                             y32.double() if lik == "regression" else y,
                             Xq.double(), lik, "ggn")  # fmt: skip
    kw = {"sigma_noise": SIGMA} if lik == "regression" else {}
    la = Laplace(m32, lik, "all", "hfl", prior_precision=PRIOR, **kw)
    la.fit(loader(X32, y32))
    _, f_var = la.glm_predictive(Xq)
    err = rel_err(f_var.diagonal(0, 1, 2).double(), ref.diagonal(0, 1, 2))
    assert float(err.max()) <= 1e-3, f"{lik}: {float(err.max()):.2e}"


@cuda
def test_auto_dtype_on_cuda_runs_float32_products(classification):
    """On a GPU the float32 model is refit with float32 products and float64
    recurrences; variances within 1e-3 of the float64 truth."""
    model, X, y = classification
    m32 = copy.deepcopy(model).float()
    Xq = X[:6].float() * 1.1
    ref, _ = dense_reference(copy.deepcopy(m32).double(), X.float().double(), y,
                             Xq.double(), "classification", "ggn")  # fmt: skip
    la = Laplace(m32.cuda(), "classification", "all", "hfl", prior_precision=PRIOR,
                 solver="cg")  # fmt: skip
    assert la.compute_dtype == F32
    la.fit(loader(X.float().cuda(), y.cuda()))
    _, f_var = la.glm_predictive(Xq.cuda())
    err = rel_err(f_var.diagonal(0, 1, 2).double().cpu(), ref.diagonal(0, 1, 2))
    assert float(err.max()) <= 1e-3
    assert "float32 products" in la.last_diagnostics.choice


# --------------------------------------------------------------------- state
@pytest.mark.parametrize("saved", ["auto", F32, F64])
def test_state_restores_into_auto_estimator(classification, saved):
    """A state fitted with any precision loads into an estimator built with
    ``compute_dtype="auto"``, which then runs in the state's precision and
    predicts what the saved estimator predicts."""
    model, X, y = classification
    m32 = copy.deepcopy(model).float()
    kw = dict(prior_precision=PRIOR, solver="cg", preconditioner="none")
    la = Laplace(m32, "classification", "last_layer", "hfl", compute_dtype=saved, **kw)
    la.fit(loader(X.float(), y))
    Xq = X[:4].float()
    _, want = la.glm_predictive(Xq)
    new = Laplace(m32, "classification", "last_layer", "hfl", **kw)
    new.load_state_dict(la.state_dict())
    assert new.compute_dtype == la.compute_dtype
    name = str(la.compute_dtype).removeprefix("torch.")
    assert new.auto_choices["compute_dtype"].startswith(f"compute_dtype auto: {name}")
    _, got = new.glm_predictive(Xq)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)


def test_state_of_other_precision_still_refused_by_explicit_dtype(classification):
    model, X, y = classification
    la = Laplace(model, "classification", "last_layer", "hfl", compute_dtype=F32)
    la.fit(loader(X, y))
    other = Laplace(model, "classification", "last_layer", "hfl", compute_dtype=F64)
    with pytest.raises(ValueError, match="compute_dtype"):
        other.load_state_dict(la.state_dict())


# -------------------------------------------------------------- memory model
def test_chunk_for_memory_bounds():
    assert chunk_for_memory(100.0, None, 64) == 64  # free memory unknown
    assert chunk_for_memory(100.0, 10**9, 64) == 64  # capped
    assert chunk_for_memory(100.0, 1000, 64) == 5  # half of 1000 bytes / 100
    assert chunk_for_memory(100.0, 10, 64) == 1  # at least one direction


def test_forward_bytes_counts_what_the_forward_produces():
    lin = torch.nn.Linear(3, 4).double()
    X = torch.randn(5, 3, dtype=DT)
    n = forward_bytes(lambda th, x: lin(x), torch.zeros(1, dtype=DT), X)
    assert n >= 5 * 4 * 8  # at least the output
    assert model_bytes_per_direction(10, n) > n


def test_auto_chunk_cpu_default_and_reason(classification):
    model, X, y = classification
    la = Laplace(model, "classification", "all", "hfl", prior_precision=PRIOR)
    assert la.chunk_size == CPU_CHUNK
    la.fit(loader(X, y))
    la.glm_predictive(X[:2])
    assert la.chunk_size == CPU_CHUNK  # the tiny net fits: the CPU cap
    assert "chunk_size auto: 64 (at most" in la.last_diagnostics.choice


@pytest.mark.parametrize("subset", ["all", "last_layer"])
def test_memory_bound_auto_chunk_matches_fixed_chunk_and_reference(
    classification, monkeypatch, subset
):
    """Where memory allows only a few directions per product, ``"auto"``
    chooses fewer; the predictions are those of a fixed ``chunk_size=64``
    (tight residual rule, rtol 1e-10: the grouping of directions, and with it
    the Rayleigh-Ritz blocks, changes only rounding: 1e-8 relative) and of
    the dense float64 reference (1e-6)."""
    model, X, y = classification
    Xq = X[:30] * 1.1  # 90 directions: several chunks either way
    ref, _ = dense_reference(model, X, y, Xq, "classification", "ggn",
                             last_layer=subset == "last_layer")  # fmt: skip
    kw = dict(prior_precision=PRIOR, solver="cg", preconditioner="none", rtol=1e-10)
    fixed = Laplace(model, "classification", subset, "hfl", chunk_size=64, **kw)
    fixed.fit(loader(X, y))
    _, want = fixed.glm_predictive(Xq)

    real = chunk_memory.model_bytes_per_direction
    per = {}

    def spy(n_params, activation_bytes):
        per["bytes"] = real(n_params, activation_bytes)
        return per["bytes"]

    monkeypatch.setattr(chunk_memory, "model_bytes_per_direction", spy)
    monkeypatch.setattr(
        chunk_memory, "available_bytes", lambda device: int(14 * per["bytes"]) + 1
    )
    auto = Laplace(model, "classification", subset, "hfl", **kw)
    auto.fit(loader(X, y))
    assert auto.chunk_size == 7  # half of 14 directions' bytes
    _, got = auto.glm_predictive(Xq)
    assert "chunk_size auto: 7 (memory-bound" in auto.last_diagnostics.choice
    torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-12)
    err = rel_err(got.diagonal(0, 1, 2), ref.diagonal(0, 1, 2))
    assert float(err.max()) <= 1e-6


def test_cpu_chunk_bounded_in_bytes(classification, monkeypatch):
    """On the CPU a chunk holds at most ``CPU_CHUNK_BYTES`` (larger chunks ran
    slower per direction there), whatever memory is free."""
    model, X, y = classification
    per = chunk_memory.CPU_CHUNK_BYTES / 10
    monkeypatch.setattr(chunk_memory, "model_bytes_per_direction", lambda *a: per)
    monkeypatch.setattr(chunk_memory, "available_bytes", lambda device: 2**50)
    la = Laplace(model, "classification", "all", "hfl", prior_precision=PRIOR)
    la.fit(loader(X, y))
    assert la.chunk_size == 10
    assert "GB per chunk on the CPU" in la.auto_choices["chunk_size"]
    la.chunk_size = 3  # the user's value is kept by the next fit
    la.fit(loader(X, y))
    assert la.chunk_size == 3
    la.glm_predictive(X[:2])
    assert "chunk_size auto" not in la.last_diagnostics.choice


@cuda
def test_cuda_probe_measures_bytes_per_direction(classification):
    model, X, y = classification
    la = Laplace(model.cuda(), "classification", "all", "hfl", prior_precision=PRIOR)
    la.fit(loader(X.cuda(), y.cuda()))
    assert 1 <= la.chunk_size <= chunk_memory.MAX_CHUNK
    assert "measured by a probe" in la.auto_choices["chunk_size"]


def test_auto_options_validation():
    from laplace_hfl.options import validate_hfl_options

    with pytest.raises(ValueError, match="'auto'"):
        validate_hfl_options("regression", False, {"chunk_size": "big"})
    with pytest.raises(ValueError, match="'auto'"):
        validate_hfl_options("regression", False, {"compute_dtype": "fast"})
    opts = validate_hfl_options("regression", False, {})
    assert (opts.chunk_size, opts.compute_dtype) == ("auto", "auto")


def test_auto_choices_name_only_what_auto_chose(regression_1d):
    """``la.auto_choices`` says why for each option ``"auto"`` decided, and
    drops ``chunk_size`` once the user sets it."""
    model, X, y = regression_1d
    la = Laplace(model, "regression", "all", "hfl")
    la.fit(loader(X, y))
    assert set(la.auto_choices) == {"compute_dtype", "chunk_size"}
    la.chunk_size = la.chunk_size + 1
    assert set(la.auto_choices) == {"compute_dtype"}
    fixed = Laplace(model, "regression", "all", "hfl", compute_dtype=DT, chunk_size=8)
    fixed.fit(loader(X, y))
    assert fixed.auto_choices == {}


def test_refused_state_leaves_the_auto_reasons(classification):
    """A state whose values fail the checks changes nothing, also not why
    ``"auto"`` chose the compute dtype (edited in place, so not covered by
    putting attributes back)."""
    model, X, y = classification
    m32 = copy.deepcopy(model).float()
    kw = dict(prior_precision=PRIOR, solver="cg", preconditioner="none")
    la = Laplace(m32, "classification", "last_layer", "hfl", compute_dtype=F32, **kw)
    la.fit(loader(X.float(), y))
    state = la.state_dict()
    state["mean"] = torch.full_like(state["mean"], float("nan"))
    new = Laplace(m32, "classification", "last_layer", "hfl", **kw)
    before = dict(new.auto_choices)
    with pytest.raises(ValueError, match="'mean'"):
        new.load_state_dict(state)
    assert new.auto_choices == before
    assert new.compute_dtype == F64


def test_failed_fit_leaves_the_auto_reasons(regression_1d, monkeypatch):
    """A fit that fails after ``chunk_size="auto"`` chose its value (here:
    forming the dense GGN, which fit does after the choice) puts the choice
    and its reason back (the reasons are rebound, never edited in place, so
    the rollback of attributes covers them)."""
    import laplace_hfl.engine.curvature as curvature

    model, X, y = regression_1d
    la = Laplace(model, "regression", "all", "hfl", sigma_noise=SIGMA)
    before = dict(la.auto_choices)

    def failing(*args, **kwargs):
        raise MemoryError("simulated: the curvature does not fit")

    monkeypatch.setattr(curvature, "data_ggn", failing)
    with pytest.raises(MemoryError):
        la.fit(loader(X, y))
    assert la.auto_choices == before
    monkeypatch.undo()
    la.fit(loader(X, y))  # the same fit succeeds and records its choice
    assert la.auto_choices["chunk_size"] != before["chunk_size"]
