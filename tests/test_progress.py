"""Long HFL calls show progress without being asked; short ones stay quiet."""

from __future__ import annotations

import time

import pytest
import torch
from conftest import DT, PRIOR, SIGMA, assert_unchanged, dense_reference, loader
from conftest import snapshot as take_snapshot
from laplace import Laplace

from laplace_hfl.engine import progress as progress_mod
from laplace_hfl.engine.progress import format_seconds, progress


def test_bar_appears_when_the_first_step_predicts_a_long_loop(capsys, monkeypatch):
    monkeypatch.setattr(progress_mod, "AUTO_PROGRESS_AFTER_S", 0.05)
    seen = []
    for i in progress(range(4), desc="[job]"):
        seen.append(i)
        time.sleep(0.03)  # 4 steps x 0.03 s = 0.12 s expected > 0.05 s
    err = capsys.readouterr().err
    assert seen == [0, 1, 2, 3]
    assert "[job]" in err and "expected" in err and "4 steps" in err


def test_short_loops_and_single_steps_stay_quiet(capsys, monkeypatch):
    assert list(progress(range(5), desc="[job]")) == list(range(5))
    monkeypatch.setattr(progress_mod, "AUTO_PROGRESS_AFTER_S", 0.0)
    assert list(progress([7], desc="[job]")) == [7]
    assert list(progress([], desc="[job]")) == []
    assert capsys.readouterr().err == ""
    # asked for (progress_bar=True): a bar even for one step
    assert list(progress([7], desc="[asked]", always=True)) == [7]
    assert "[asked]" in capsys.readouterr().err


def test_automatic_bar_counts_the_first_step_in_its_rate(capsys, monkeypatch):
    """The bar opened after the first step shows its elapsed time and rate,
    not ``1/n [00:00<?, ?it/s]``."""
    monkeypatch.setattr(progress_mod, "AUTO_PROGRESS_AFTER_S", 0.05)
    for _ in progress(range(3), desc="[job]"):
        time.sleep(0.06)
    err = capsys.readouterr().err
    assert "?it/s" not in err and "00:00<?" not in err


def test_always_shows_the_bar_from_the_start(capsys):
    assert list(progress(range(3), desc="[asked]", always=True)) == [0, 1, 2]
    assert "[asked]" in capsys.readouterr().err


def test_format_seconds():
    assert format_seconds(42.4) == "42 s"
    assert format_seconds(210) == "3.5 min"
    assert format_seconds(4.5 * 3600) == "4.5 h"


@pytest.mark.parametrize("subset", ["all", "last_layer"])
def test_hfl_prediction_shows_a_bar_only_when_long(
    subset, regression_1d, capsys, monkeypatch
):
    """Same answer (dense GGN reference, rtol 1e-4) with and without the bar;
    the bar appears once the expected time exceeds the threshold."""
    model, X, y = regression_1d
    snap = take_snapshot(model)
    la = Laplace(
        model, "regression", subset, "hfl", sigma_noise=SIGMA,
        prior_precision=PRIOR, chunk_size=2, solver="cg",
    )  # fmt: skip
    la.fit(loader(X, y))
    Xq = X[:6]  # 3 chunks of 2 points (CG refits; the dense solver needs one)
    _, quiet = la(Xq)
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(progress_mod, "AUTO_PROGRESS_AFTER_S", 0.0)
    la.prior_precision = PRIOR * 1.0  # same value: cached base point reused
    _, loud = la(Xq)
    err = capsys.readouterr().err
    assert "[HFL predict]" in err and "expected" in err
    assert torch.equal(quiet, loud)
    ref, _ = dense_reference(
        model, X, y, Xq, "regression", "ggn", last_layer=subset == "last_layer"
    )
    torch.testing.assert_close(loud, ref.to(DT), rtol=1e-4, atol=0.0)
    # functional_variance(Js): one solve over many directions, chunked refits
    Js = torch.randn(6, 1, la.n_params, dtype=DT)
    la.functional_variance(Js)
    assert "[HFL refits]" in capsys.readouterr().err
    assert_unchanged(model, snap)
