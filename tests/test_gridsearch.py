"""Grid search that cannot silently pick an arbitrary prior, and says when it
will take long."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torchmetrics
from conftest import DT, PRIOR, SIGMA, assert_unchanged, loader, snapshot
from laplace import Laplace
from laplace.curvature import CurvlinopsGGN

from laplace_hfl.engine import progress as progress_mod
from laplace_hfl.engine.gridsearch import (
    GridSearchCostWarning,
    VarianceBlindLossWarning,
    gaussian_nll_loss,
)

GRID = {"grid_size": 5, "log_prior_prec_min": -2, "log_prior_prec_max": 2}


def _hfl(model, **kw):
    return Laplace(
        model, "regression", "all", "hfl", sigma_noise=SIGMA,
        prior_precision=PRIOR, **kw,
    )  # fmt: skip


def test_gaussian_nll_loss_matches_torch():
    g = torch.Generator().manual_seed(0)
    mu, y = torch.randn(7, 2, generator=g), torch.randn(7, 2, generator=g)
    A = torch.randn(7, 2, 2, generator=g)
    f_var = A @ A.transpose(-1, -2)
    ref = torch.nn.functional.gaussian_nll_loss(
        mu.double(), y.double(), f_var.diagonal(dim1=-2, dim2=-1).double() + 0.3**2,
        full=True,
    )  # fmt: skip
    loss = gaussian_nll_loss(0.3)
    torch.testing.assert_close(loss(mu, f_var, y), ref, rtol=1e-12, atol=0)
    diag = f_var.diagonal(dim1=-2, dim2=-1)
    torch.testing.assert_close(loss(mu, diag, y), ref, rtol=1e-12, atol=0)


@pytest.mark.parametrize("bad", [0.0, -1.0, math.nan, math.inf])
def test_gaussian_nll_loss_rejects_bad_sigma(bad):
    with pytest.raises(ValueError, match="sigma_noise must be a positive"):
        gaussian_nll_loss(bad)


@pytest.mark.parametrize(
    "loss", [None, torchmetrics.MeanSquaredError()], ids=["default", "mse"]
)
def test_variance_blind_loss_warns_and_names_the_fix(regression_1d, loss):
    model, X, y = regression_1d
    la = _hfl(model)
    la.fit(loader(X, y))
    with pytest.warns(VarianceBlindLossWarning, match="gaussian_nll_loss"):
        la.optimize_prior_precision(
            method="gridsearch", val_loader=loader(X[:8], y[:8]), loss=loss, **GRID
        )


def test_gaussian_nll_grid_search_matches_full_laplace(regression_1d):
    """Same loss, same grid: HFL picks the prior FullLaplace(CurvlinopsGGN)
    picks (a dense reference), and it is not the arbitrary first grid value."""
    model, X, y = regression_1d
    snap = snapshot(model)
    val = loader(X[::3], y[::3])
    chosen = {}
    for name, la in (
        ("hfl", _hfl(model)),
        ("full", Laplace(model, "regression", "all", "full", sigma_noise=SIGMA,
                         prior_precision=PRIOR, backend=CurvlinopsGGN)),
    ):  # fmt: skip
        la.fit(loader(X, y))
        with warnings.catch_warnings():
            warnings.simplefilter("error", VarianceBlindLossWarning)
            la.optimize_prior_precision(
                method="gridsearch", val_loader=val,
                loss=gaussian_nll_loss(SIGMA), **GRID,
            )  # fmt: skip
        chosen[name] = float(la.prior_precision)
        if name == "hfl":  # (laplace-torch's own grid search sets eval mode)
            assert_unchanged(model, snap)
    assert chosen["hfl"] == pytest.approx(chosen["full"], rel=1e-6)
    assert chosen["hfl"] != pytest.approx(1e-2)


def test_classification_loss_is_not_flagged(classification):
    model, X, y = classification
    la = Laplace(model, "classification", "last_layer", "hfl", prior_precision=PRIOR)
    la.fit(loader(X, y))
    with warnings.catch_warnings():
        warnings.simplefilter("error", VarianceBlindLossWarning)
        warnings.simplefilter("ignore", UserWarning)  # laplace-torch's link note
        la.optimize_prior_precision(
            method="gridsearch", val_loader=loader(X[:9], y[:9]), grid_size=2
        )


@pytest.mark.parametrize(
    ("kw", "fragment"),
    [({}, "refits for every validation point"), ({"amortize": 4}, "amortize=4")],
    ids=["exact", "amortized"],
)
def test_long_grid_search_warns_with_expected_time(
    regression_1d, monkeypatch, capsys, kw, fragment
):
    model, X, y = regression_1d
    la = _hfl(model, **kw)
    la.fit(loader(X, y))
    monkeypatch.setattr(progress_mod, "AUTO_PROGRESS_AFTER_S", 0.0)
    with pytest.warns(GridSearchCostWarning, match="expected") as rec:
        la.optimize_prior_precision(
            method="gridsearch", val_loader=loader(X[:8], y[:8]),
            loss=gaussian_nll_loss(SIGMA), **GRID,
        )  # fmt: skip
    assert fragment in str(rec[0].message) and "grid_size" in str(rec[0].message)
    assert "[HFL grid search]" in capsys.readouterr().err


def test_short_grid_search_is_quiet(regression_1d, capsys):
    model, X, y = regression_1d
    la = _hfl(model, amortize=4)
    la.fit(loader(X, y))
    with warnings.catch_warnings():
        warnings.simplefilter("error", GridSearchCostWarning)
        la.optimize_prior_precision(
            method="gridsearch", val_loader=loader(X[:8], y[:8]),
            loss=gaussian_nll_loss(SIGMA), **GRID,
        )  # fmt: skip
    assert "[HFL grid search]" not in capsys.readouterr().err
    assert torch.isfinite(la.prior_precision).all()
    assert la.prior_precision.dtype == DT


def test_cost_estimate_leaves_out_the_first_values_one_time_work(monkeypatch):
    """The first value pays the fit's one-time work (100 s on this fake clock),
    each later one 1 s: 5 values are ~104 s, not 5 x 100 s."""
    from types import SimpleNamespace

    from laplace_hfl.engine import gridsearch

    clock = [0.0]
    monkeypatch.setattr(gridsearch.time, "perf_counter", lambda: clock[0])
    monkeypatch.setattr(progress_mod, "AUTO_PROGRESS_AFTER_S", 2.0)
    la = SimpleNamespace(prior_precision=None, amortize=None)

    def score():
        clock[0] += 100.0 if clock[0] == 0.0 else 1.0
        return float(la.prior_precision)

    grid = [torch.tensor(v) for v in (3.0, 1.0, 2.0, 4.0, 5.0)]
    with pytest.warns(GridSearchCostWarning) as rec:
        best = gridsearch.run_gridsearch(la, grid, score)
    assert float(best) == 1.0
    msg = str(rec[0].message)
    assert "~1.7 min expected" in msg and "second 1 s" in msg  # 104 s
