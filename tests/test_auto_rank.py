"""The automatic Nyström rank of ``preconditioner="auto"``: a sketch that
grows by its new columns only, to the level whose expected savings repay it,
and the whole-GGN sketch taken without a probe where it is that cheap."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import dense_reference, fit_hfl, make_regression, rel_err
from hypothesis import given, settings
from hypothesis import strategies as st

import laplace_hfl.engine.precond_objects as po
from laplace_hfl.engine import auto_choice
from laplace_hfl.engine.auto_choice import (
    FIRST_LEVEL,
    WHOLE_SKETCH_ITERATIONS,
    predicted_iterations,
    sketch_levels,
)
from laplace_hfl.engine.preconditioner import SketchColumns, sketch_products


def _psd(P: int, rank: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(P, rank, generator=g, dtype=torch.float64)
    return A @ A.T


def _dense_of(sk) -> torch.Tensor:
    return sk.U @ torch.diag(sk.lam) @ sk.U.T


def test_grown_columns_give_the_one_shot_sketch():
    """A sketch read at rank k from columns extended in steps (and at a
    smaller rank on the way) is the one ``sketch_products`` builds at k, to
    rounding; a sketch at the GGN's rank reproduces it (float64)."""
    G = _psd(40, 12)
    prod = lambda V: V @ G  # noqa: E731
    like = torch.zeros(40, dtype=torch.float64)
    cols = SketchColumns(prod, like, capacity=24, chunk_size=5)
    cols.extend(8)
    small = cols.sketch(8)
    cols.extend(16)
    grown = cols.sketch(16)
    assert cols.k == 16
    assert torch.allclose(
        _dense_of(small), _dense_of(sketch_products(prod, like, 8, 3))
    )
    one = sketch_products(prod, like, 16, chunk_size=7)
    assert torch.allclose(_dense_of(grown), _dense_of(one), atol=1e-9)
    assert torch.allclose(_dense_of(grown), G, atol=1e-8 * float(G.norm()))
    cols.extend(24)
    last = cols.sketch(24, in_place=True)
    assert torch.allclose(_dense_of(last), G, atol=1e-8 * float(G.norm()))


@pytest.mark.parametrize("rank", [0, 25])
def test_sketch_columns_refuse_ranks_outside_the_buffer(rank):
    cols = SketchColumns(lambda V: V, torch.zeros(30, dtype=torch.float64), 24)
    with pytest.raises(ValueError, match="outside"):
        cols.extend(rank)
    cols.extend(4)
    with pytest.raises(ValueError, match="outside the computed"):
        cols.sketch(8)


def test_sketch_levels():
    """Doubling from ``FIRST_LEVEL`` to the capped rank; the whole GGN at once
    where ``min(P, N C)`` is within ``WHOLE_SKETCH_ITERATIONS`` chunks of
    products; nothing without a sketch."""
    W = 64
    whole_max = WHOLE_SKETCH_ITERATIONS * W
    assert sketch_levels(4810, 1024, 6000, W) == (64, 128, 256, 512, 1024)
    assert sketch_levels(4929, 442, 442, W) == (64, 128, 256, 442)
    assert sketch_levels(141, 70, 200, W) == (141,)  # min(P, N C) = P
    assert sketch_levels(5000, 1024, whole_max, W) == (whole_max,)
    assert sketch_levels(5000, 1024, whole_max + 1, W)[0] == FIRST_LEVEL
    assert sketch_levels(5000, 40, 9000, W) == (40,)
    assert sketch_levels(5000, 1024, 500, 4096)[0] == FIRST_LEVEL  # big chunk
    assert sketch_levels(5000, 64, 150, W) == (64,)  # memory caps the sketch
    assert sketch_levels(5000, 100, 150, W) == (150,)
    assert sketch_levels(5000, 0, 9000, W) == ()


@settings(max_examples=60, deadline=None)
@given(
    its=st.floats(1.0, 500.0),
    decay=st.floats(0.5, 0.999),
    k=st.integers(2, 200),
    grow=st.integers(0, 800),
    h=st.floats(1e-3, 1e3),
    mu=st.floats(1e-6, 1e3),
)
def test_predicted_iterations_bounded(its, decay, k, grow, h, mu):
    """A larger sketch is never predicted to need more iterations, nor fewer
    than one; a zero prior predicts no change."""
    lam = 10.0 * decay ** torch.arange(k, dtype=torch.float64)
    ahead = predicted_iterations(its, lam, k + grow, h, mu)
    assert 1.0 <= ahead <= its or (its <= 1.0 and ahead == its)
    assert math.isfinite(ahead)
    assert predicted_iterations(its, lam, k + grow, h, 0.0) == its


def _problem():
    # P = 281, N C = 200: levels (64, 128, 140), the whole GGN at 200
    model, X, y = make_regression(n=200, d_in=5, hidden=40, seed=3)
    return model, X, y


def _timed(monkeypatch, seconds: float) -> list[int]:
    """Report ``seconds`` per product from the probe (the clock of a slower
    or faster machine) and count the sketches built."""
    real = auto_choice.probe_rhs
    monkeypatch.setattr(
        auto_choice,
        "probe_rhs",
        lambda obj, n, seed=0: (real(obj, n, seed)[0], seconds),
    )
    built = []
    for name in ("nystrom_sketch", "nystrom_columns"):
        fn = getattr(po, name)
        monkeypatch.setattr(
            po,
            name,
            lambda *a, fn=fn, name=name, **k: built.append(name) or fn(*a, **k),
        )
    return built


@pytest.mark.parametrize(
    "product_s, grows, chunk", [(1.0, True, None), (1.0, True, 8), (1e-12, False, None)]
)
def test_rank_grows_only_where_it_pays(monkeypatch, product_s, grows, chunk):
    """Products that cost a second each make every saved iteration worth more
    than the eigendecompositions: the sketch grows past its first level (and
    the reason says to which rank), also where memory keeps the chunk small
    (8 directions: the queries to come are not counted by it); products that
    cost nothing leave it at the first level. Either way one set of columns
    is built (never rebuilt after the choice) and the variances are the dense
    reference's."""
    model, X, y = _problem()
    built = _timed(monkeypatch, product_s)
    kw = {} if chunk is None else {"chunk_size": chunk}
    la = fit_hfl(
        model, X, y, "regression", solver="cg", preconditioner="auto", rtol=1e-8, **kw
    )
    Xq = X[:6] + 0.05
    _, var = la.glm_predictive(Xq)
    d = la.last_diagnostics
    assert d.solver == "cg"
    ref, _ = dense_reference(model, X, y, Xq, "regression", "ggn")
    assert rel_err(var, ref).max() <= 1e-5
    if d.preconditioner != "nystrom":  # plain CG won the first probe
        assert not grows
        return
    rank = la.preconditioner_sketch.products
    assert (rank > FIRST_LEVEL) == grows, d.choice
    assert f"at rank {rank}" in d.choice
    assert built == ["nystrom_columns"]  # grown in place, not rebuilt
    la.glm_predictive(Xq * 0.9)
    la.prior_precision = 2.0
    la.glm_predictive(Xq)
    assert built == ["nystrom_columns"] and la.preconditioner_sketch.products == rank


def test_whole_ggn_sketch_is_taken_without_a_probe(monkeypatch):
    """Where ``min(P, N C)`` columns cost at most a few CG iterations of a
    chunk, the sketch holds the whole GGN: no probe runs, every solve takes
    about one iteration and matches the dense reference."""
    model, X, y = make_regression(n=30, hidden=20)  # P = 61, N C = 30
    probes = []
    real = auto_choice.probe_iterations
    monkeypatch.setattr(
        auto_choice,
        "probe_iterations",
        lambda *a, **k: probes.append(1) or real(*a, **k),
    )
    la = fit_hfl(model, X, y, "regression", solver="cg", preconditioner="auto")
    Xq = X[:5] - 0.1
    _, var = la.glm_predictive(Xq)
    d = la.last_diagnostics
    assert not probes
    assert (d.solver, d.preconditioner) == ("cg", "nystrom")
    assert "whole GGN" in d.choice
    assert la.preconditioner_sketch.products == 30
    assert int(d.iterations.max()) <= 2
    ref, _ = dense_reference(model, X, y, Xq, "regression", "ggn")
    assert rel_err(var, ref).max() <= 1e-4


def test_set_rank_is_not_grown(monkeypatch):
    """``precondition_rank`` pins the sketch: ``"auto"`` still picks between
    preconditioners but builds the sketch once, at that rank."""
    model, X, y = _problem()
    built = _timed(monkeypatch, 1.0)
    la = fit_hfl(
        model, X, y, "regression", solver="auto", preconditioner="auto",
        precondition_rank=32,
    )  # fmt: skip
    la.glm_predictive(X[:3])
    la.refit_preconditioner()
    assert la.preconditioner_sketch.products == 32
    assert "nystrom_columns" not in built


def _products(model, X, y, likelihood, Xq, preconditioner):
    """GGN-vector products of a fit and one prediction with ``solver="cg"``:
    the solves' own, the Nyström sketch's columns and KFAC's pass (one
    backward per output)."""
    la = fit_hfl(model, X, y, likelihood, solver="cg", preconditioner=preconditioner)
    la.glm_predictive(Xq)
    d = la.last_diagnostics
    cost = float(d.products)
    if d.preconditioner == "nystrom":
        cost += la.preconditioner_sketch.products
    elif d.preconditioner == "kfac":
        cost += la.n_outputs
    return cost, d.preconditioner


@pytest.mark.parametrize("name", ["tanh_5_20_1", "regression_multi", "classification"])
def test_auto_preconditioner_costs_within_1_5x_of_the_best_fixed(name, request):
    """In GGN-vector products (the machine-independent cost; wall times are in
    ``scripts/auto_choice.py``), ``preconditioner="auto"`` costs at most 1.5x
    the best fixed preconditioner for a fit and 10 query points, on the
    5-20-1 tanh net (P = 141, N = 200) that once made ``"auto"`` pick KFAC at
    17x the best, and on the test suite's networks."""
    if name == "tanh_5_20_1":
        from conftest import train_stationary

        model, X, y = make_regression(n=200, d_in=5, hidden=20, seed=2)
        train_stationary(model, X, y, "regression")
        likelihood = "regression"
    else:
        model, X, y = request.getfixturevalue(name)
        likelihood = "classification" if name == "classification" else "regression"
    Xq = X[:10] * 1.2 + 0.1
    costs = {
        p: _products(model, X, y, likelihood, Xq, p)
        for p in ("none", "kfac", "nystrom", "auto")
    }
    best = min(costs[p][0] for p in ("none", "kfac", "nystrom"))
    assert costs["auto"][0] <= 1.5 * best, costs


def test_failed_probe_leaves_the_estimator_usable(monkeypatch):
    """A probe that fails while growing the sketch (here: an error after a
    larger level was built) raises, commits no choice, and the next call
    probes again and answers as the dense reference does."""
    model, X, y = _problem()
    _timed(monkeypatch, 1.0)
    real = auto_choice.grow_rank

    def failing(obj, B, rtol, levels, sketch_at, *a, **k):
        sketch_at(levels[1])
        raise RuntimeError("probe interrupted")

    monkeypatch.setattr(auto_choice, "grow_rank", failing)
    la = fit_hfl(
        model, X, y, "regression", solver="cg", preconditioner="auto", rtol=1e-8
    )
    Xq = X[:4] - 0.05
    with pytest.raises(RuntimeError, match="probe interrupted"):
        la.glm_predictive(Xq)
    monkeypatch.setattr(auto_choice, "grow_rank", real)
    _, var = la.glm_predictive(Xq)
    assert "at rank" in la.last_diagnostics.choice
    ref, _ = dense_reference(model, X, y, Xq, "regression", "ggn")
    assert rel_err(var, ref).max() <= 1e-5
