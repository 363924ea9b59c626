"""Tests of laplace_hfl.bench.evaluation: metrics against hand-computed values, a
smoke run of the harness on the tiny task, failure recording, the CLI."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch

from laplace_hfl.bench.cli import main
from laplace_hfl.bench.evaluation import (
    METHODS,
    TASKS,
    MethodSpec,
    Prediction,
    brier_score,
    classification_metrics,
    expected_calibration_error,
    format_header,
    format_table,
    gaussian_nll,
    ood_auroc,
    plot_confidence_map,
    plot_predictive_std,
    predict_inputs,
    probit_probs,
    regression_metrics,
    run_comparison,
    run_method,
    variance_agreement,
)
from laplace_hfl.bench.evaluation.method_row import error_text, method_row

DT = torch.float64
# Four predictions, each confidence in its own 15-bin ECE bin.
PROBS = torch.tensor([[0.9, 0.1], [0.62, 0.38], [0.28, 0.72], [0.18, 0.82]], dtype=DT)
LABELS = torch.tensor([0, 1, 1, 1])


# ------------------------------------------------------------------- metrics
def test_classification_metrics_by_hand():
    m = classification_metrics(PROBS, LABELS, n_bins=15)
    assert m["accuracy"] == pytest.approx(0.75)
    # |acc - conf| per (singleton) bin: 0.1, 0.62, 0.28, 0.18
    assert m["ece"] == pytest.approx((0.1 + 0.62 + 0.28 + 0.18) / 4, abs=1e-6)
    assert expected_calibration_error(PROBS, LABELS) == pytest.approx(0.295, abs=1e-6)
    brier = (2 * 0.1**2 + 2 * 0.62**2 + 2 * 0.28**2 + 2 * 0.18**2) / 4
    assert m["brier"] == pytest.approx(brier)
    assert brier_score(PROBS, LABELS) == pytest.approx(0.2526)
    nll = -(math.log(0.9) + math.log(0.38) + math.log(0.72) + math.log(0.82)) / 4
    assert m["nll"] == pytest.approx(nll)
    assert "ood_auroc" not in m


def test_ood_auroc_by_hand():
    ood = torch.tensor([[0.5, 0.5], [0.7, 0.3]], dtype=DT)
    # scores 1 - max p: in-dist 0.1, 0.38, 0.28, 0.18; OOD 0.5, 0.3 -> 7 of 8 pairs
    assert ood_auroc(PROBS, ood) == pytest.approx(7 / 8)
    m = classification_metrics(PROBS, LABELS, ood)
    assert m["ood_auroc"] == pytest.approx(7 / 8)
    assert m["ood_mean_conf"] == pytest.approx(0.6)


def test_regression_metrics_by_hand():
    mu = torch.zeros(4, 1, dtype=DT)
    f_var = torch.tensor([0.0, 0.75, 3.0, 0.0], dtype=DT).reshape(4, 1, 1)
    y = torch.tensor([0.5, 2.0, 3.0, -2.5], dtype=DT).reshape(4, 1)
    gap = torch.tensor([False, True, True, False])
    m = regression_metrics(mu, f_var, y, sigma_noise=1.0, gap_mask=gap)
    v = [1.0, 1.75, 4.0, 1.0]
    t = [0.5, 2.0, 3.0, -2.5]
    nll = sum(
        0.5 * math.log(2 * math.pi * vi) + 0.5 * ti**2 / vi for vi, ti in zip(v, t)
    )
    assert m["rmse"] == pytest.approx(math.sqrt(19.5 / 4))
    assert m["nll"] == pytest.approx(nll / 4)
    assert m["coverage95"] == pytest.approx(0.75)  # |-2.5| > 1.96
    assert m["coverage95_gap"] == pytest.approx(1.0)
    assert m["mean_std_gap"] == pytest.approx((math.sqrt(0.75) + math.sqrt(3)) / 2)
    assert m["mean_std_outside"] == pytest.approx(0.0)
    assert "mean_std_data" not in m and "var_ratio_gap_data" not in m
    assert gaussian_nll(mu[:1], torch.ones(1, 1, dtype=DT), mu[:1]) == pytest.approx(
        0.5 * math.log(2 * math.pi)
    )


def test_gap_and_data_metrics_by_hand():
    # 6 points: 2 on the data, 2 in the gap, 2 in the extrapolation region
    mu = torch.zeros(6, 1, dtype=DT)
    f_var = torch.tensor([0.25, 1.0, 4.0, 16.0, 100.0, 0.0], dtype=DT)
    y = torch.tensor([0.5, 3.0, 1.0, 1.0, 0.0, 0.0], dtype=DT)
    gap = torch.tensor([False, False, True, True, False, False])
    data = torch.tensor([True, True, False, False, False, False])
    m = regression_metrics(mu, f_var, y, sigma_noise=0.0, gap_mask=gap, data_mask=data)
    assert m["mean_std_data"] == pytest.approx((0.5 + 1.0) / 2)
    assert m["mean_std_gap"] == pytest.approx((2.0 + 4.0) / 2)
    assert m["mean_std_outside"] == pytest.approx((0.5 + 1.0 + 10.0 + 0.0) / 4)
    # mean variance in gap / on data = ((4 + 16) / 2) / ((0.25 + 1) / 2) = 16
    assert m["var_ratio_gap_data"] == pytest.approx(16.0)
    # data: |0.5| <= 1.96 * 0.5 inside, |3| > 1.96 * 1 outside
    assert m["coverage95_data"] == pytest.approx(0.5)
    assert m["nll_data"] == pytest.approx(
        0.5 * (0.5 * math.log(2 * math.pi * 0.25) + 0.5 * 0.25 / 0.25)
        + 0.5 * (0.5 * math.log(2 * math.pi) + 0.5 * 9.0)
    )
    # zero variance on the data (the MAP): ratio undefined
    m0 = regression_metrics(mu, torch.zeros(6), y, 1.0, gap, data)
    assert math.isnan(m0["var_ratio_gap_data"])


def test_task_masks_follow_intervals(tiny_task):
    X = torch.tensor([[-1.5], [-1.0], [-0.8], [-0.7], [0.0], [0.5], [0.9], [1.2]])
    assert tiny_task.data_intervals == ((-1.0, -0.7), (0.5, 1.0))
    gap = tiny_task.gap_mask(X).tolist()
    data = tiny_task.data_mask(X).tolist()
    assert gap == [False, False, False, False, True, False, False, False]
    assert data == [False, True, True, True, False, True, True, False]


def test_variance_agreement_by_hand():
    var = torch.tensor([1.0, 2.0, 3.0, 4.4], dtype=DT)
    ref = torch.tensor([1.0, 2.0, 5.0, 4.0], dtype=DT)
    a = variance_agreement(var, ref)
    assert a["rel_err"] == pytest.approx(0.05)  # median of 0, 0, 0.4, 0.1
    assert a["max_rel_err"] == pytest.approx(0.4)
    assert a["spearman"] == pytest.approx(0.8)  # 1 - 6 * 2 / (4 * 15)
    assert variance_agreement(ref, ref)["rel_err"] == 0.0


def test_probit_matches_laplace_torch_formula():
    f_mu = torch.tensor([[1.0, 0.0]], dtype=DT)
    f_var = torch.diag(torch.tensor([8 / math.pi, 0.0], dtype=DT)).unsqueeze(0)
    expected = torch.softmax(torch.tensor([[1 / math.sqrt(2), 0.0]], dtype=DT), -1)
    torch.testing.assert_close(probit_probs(f_mu, f_var), expected)


# ------------------------------------------------------------------- harness
def _raise(*args, **kwargs):
    raise NotImplementedError("deliberately broken configuration")


@pytest.fixture(scope="module")
def tiny_task():
    return TASKS["tiny"](0)


def test_smoke_run_records_failure(tiny_task, monkeypatch, tmp_path):
    monkeypatch.setitem(
        METHODS, "broken", MethodSpec("broken", "full", "none", "full", _raise)
    )
    methods = ["map", "hfl_ggn", "full_curvlinops_ggn", "kron_backpack_ggn", "broken"]
    res = run_comparison(tiny_task, methods, seed=0, out=tmp_path, progress=False)
    rows = {r["method"]: r for r in res.rows}
    assert set(rows) == set(methods)
    assert rows["broken"]["status"] == "failed"
    assert rows["broken"]["error"].startswith("NotImplementedError: deliberately")
    for name in ("map", "hfl_ggn", "full_curvlinops_ggn", "kron_backpack_ggn"):
        assert rows[name]["status"] == "ok", rows[name]["error"]
        assert math.isfinite(rows[name]["rmse"])
    # HFL (target="ggn") reproduces the full-GGN reference it converges to
    assert rows["hfl_ggn"]["var_rel_err_vs_ggn"] < 1e-3
    assert rows["full_curvlinops_ggn"]["var_rel_err_vs_ggn"] == 0.0
    assert math.isnan(rows["hfl_ggn"]["var_rel_err_vs_hessian"])  # no reference run
    assert rows["hfl_ggn"]["fit_s"] >= 0 and rows["hfl_ggn"]["predict_s_per_point"] > 0
    assert "broken" not in res.predictions
    # files
    saved = json.loads((tmp_path / "results.json").read_text())
    assert [r["method"] for r in saved] == [r["method"] for r in res.rows]
    assert (tmp_path / "results.csv").read_text().startswith("task,method,")
    assert (tmp_path / "figures" / "tiny_bands.png").stat().st_size > 0
    assert (tmp_path / "figures" / "tiny_variance_vs_ggn.png").stat().st_size > 0
    table = format_table(res.rows, "regression")
    assert "broken: NotImplementedError" in table and "hfl_ggn" in table
    assert "var_gap/data" in table and "cov95_data" in table
    assert (tmp_path / "figures" / "tiny_std.png").stat().st_size > 0
    assert rows["full_curvlinops_ggn"]["var_ratio_gap_data"] > 1
    assert format_header(res.meta).startswith("Task tiny:")


def test_predict_inputs_matches_run_method(tiny_task):
    X = next(iter(tiny_task.test_loader))[0]
    torch.manual_seed(0)
    _, ref = run_method(tiny_task, METHODS["full_curvlinops_ggn"])
    pred = predict_inputs(tiny_task, "full_curvlinops_ggn", X[:7])
    assert torch.allclose(pred.f_mu, ref.f_mu[:7])
    assert torch.allclose(pred.f_var, ref.f_var[:7])
    x_new = torch.tensor([[-3.0], [0.1]], dtype=DT)
    pred = predict_inputs(tiny_task, METHODS["map"], x_new)
    assert pred.f_mu.shape == (2, 1) and bool((pred.f_var == 0).all())
    with pytest.raises(KeyError, match="Unknown method"):
        predict_inputs(tiny_task, "no_such_method", x_new)


def test_std_and_confidence_figures():
    x = torch.linspace(-2, 2, 11, dtype=DT).reshape(-1, 1)
    preds = {
        "a": Prediction(torch.zeros(11, 1), torch.full((11, 1, 1), 0.04)),
        "b": Prediction(torch.zeros(11, 1), (x**2).reshape(11, 1, 1) + 1e-3),
        "map": Prediction(torch.zeros(11, 1), torch.zeros(11, 1, 1)),
    }
    fig = plot_predictive_std(x, preds, gap=(-0.7, 0.5), train_x=x[:3])
    (ax,) = fig.axes
    assert ax.get_yscale() == "log"
    lines = {ln.get_label(): ln for ln in ax.get_lines()}
    assert {"a", "b"} <= set(lines) and "map" not in lines  # zero variance skipped
    assert lines["a"].get_ydata() == pytest.approx([0.2] * 11)
    xx, yy = torch.meshgrid(
        torch.linspace(-1, 1, 4), torch.linspace(-1, 1, 3), indexing="xy"
    )
    probs = torch.softmax(
        torch.randn(12, 2, generator=torch.Generator().manual_seed(0)), -1
    )
    cls = {
        k: Prediction(torch.zeros(12, 2), torch.zeros(12, 2, 2), probs) for k in "pq"
    }
    fig = plot_confidence_map(
        xx, yy, cls, train_xy=torch.zeros(2, 2), train_y=torch.tensor([0, 1])
    )
    from matplotlib.collections import QuadMesh

    meshes = [c for a in fig.axes for c in a.collections if isinstance(c, QuadMesh)]
    meshes = [m for m in meshes if m.get_array().size == 12]  # not the colour bar
    assert len(meshes) == 2
    assert {m.get_clim() for m in meshes} == {(0.5, 1.0)}
    assert meshes[0].get_array().max() == pytest.approx(
        float(probs.max(-1).values.max())
    )


def test_unknown_method_raises():
    with pytest.raises(KeyError, match="Unknown method"):
        run_comparison("tiny", ["no_such_method"], progress=False)


def test_registry_spans_backends_and_structures():
    backends = {s.backend for s in METHODS.values()}
    structures = {s.structure for s in METHODS.values()}
    assert {"BackPackGGN", "AsdlGGN", "CurvlinopsGGN", "CurvlinopsHessian"} <= backends
    assert {"full", "kron", "diag", "ll-full", "ll-kron", "hfl-ggn"} <= structures
    assert {"inbetween", "sinusoid", "moons", "digits", "diabetes"} <= set(TASKS)


# ----------------------------------------------------------------------- CLI
def test_cli_list_and_help(capsys):
    assert main(["compare", "--list"]) == 0
    out = capsys.readouterr().out
    assert "inbetween" in out and "hfl_hessian" in out and "hfl_amortized" in out
    assert main([]) == 2
    assert main(["compare", "--task", "nope"]) == 2


def test_cli_compare_tiny(tmp_path, capsys):
    code = main(
        ["compare", "--task", "tiny", "--methods", "map", "hfl_ll",
         "ll_full_curvlinops_ggn", "--out", str(tmp_path), "--no-progress"]
    )  # fmt: skip
    assert code == 0
    out = capsys.readouterr().out
    assert "hyperparameters: fixed" in out and str(tmp_path) in out
    assert (tmp_path / "results.csv").exists() and (tmp_path / "meta.json").exists()


@pytest.mark.slow
def test_inbetween_must_show():
    """On the in-between task HFL matches its exact references to 5% and beats
    every cheaper approximation in accuracy and coverage (about 40 s on one
    core)."""
    methods = [
        "full_curvlinops_hessian", "full_curvlinops_ggn", "hfl_ggn", "hfl_hessian",
        "kron_backpack_ggn", "diag_asdl_ggn", "ll_full_curvlinops_ggn",
        "full_curvlinops_ef",
    ]  # fmt: skip
    rows = {r["method"]: r for r in run_comparison("inbetween", methods).rows}
    assert all(r["status"] == "ok" for r in rows.values())
    assert rows["hfl_hessian"]["var_rel_err_vs_hessian"] <= 0.05
    assert rows["hfl_ggn"]["var_rel_err_vs_ggn"] <= 0.05
    approx = ["kron_backpack_ggn", "diag_asdl_ggn", "ll_full_curvlinops_ggn"]
    for name in approx + ["full_curvlinops_ef"]:
        assert (
            rows[name]["var_rel_err_vs_hessian"]
            > rows["hfl_hessian"]["var_rel_err_vs_hessian"]
        )
        assert rows[name]["var_rel_err_vs_ggn"] > rows["hfl_ggn"]["var_rel_err_vs_ggn"]
    kfac_gap = rows["kron_backpack_ggn"]["coverage95_gap"]
    assert rows["hfl_hessian"]["coverage95_gap"] >= kfac_gap
    assert rows["hfl_ggn"]["coverage95_gap"] >= kfac_gap


def test_tune_selects_prior_from_grid(tiny_task):
    res = run_comparison(
        tiny_task, ["map", "ll_full_curvlinops_ggn"], tune=True, progress=False
    )
    rows = {r["method"]: r for r in res.rows}
    assert rows["map"]["hyper"] == "fixed"
    row = rows["ll_full_curvlinops_ggn"]
    assert row["status"] == "ok" and row["hyper"] == "tuned"
    assert 1e-2 - 1e-12 <= row["prior_precision"] <= 1e2 + 1e-9
    assert "tuned" in res.meta["hyperparameters"]


# ------------------------------------------------------- one method, one row
def test_method_row_hooks_order_and_failures(tiny_task):
    """The shared loop calls prior -> build/fit -> tune -> predict -> finish on a
    copy of the model; a raising hook becomes a failed row with the first line
    of its message, and recorded warnings are named unless ignored."""
    calls = []

    def prior():
        calls.append("prior")
        return 2.0

    def tune(la, model, fit_s):
        assert model is not tiny_task.model and fit_s >= 0
        calls.append(("tune", float(la.prior_precision)))

    def predict(la, model, fit_s, tune_s):
        warnings.warn("kept", RuntimeWarning)
        warnings.warn("dropped", FutureWarning)
        calls.append("predict")
        return "result"

    def finish(la, result, peak_mb):
        calls.append(("finish", result))

    row, out = method_row(
        tiny_task, METHODS["ll_full_curvlinops_ggn"], {"status": "ok"}, prior,
        tune, predict, finish, ignore=(FutureWarning,),
    )  # fmt: skip
    assert out == "result" and row == {"status": "ok", "warnings": "RuntimeWarning"}
    assert calls == ["prior", ("tune", 2.0), "predict", ("finish", "result")]

    def broken(*args):
        raise ValueError("first line\nsecond line")

    row, out = method_row(
        tiny_task, METHODS["map"], {"status": "ok"}, broken, tune, predict, finish
    )
    assert out is None
    assert row == {"status": "failed", "error": "ValueError: first line",
                   "warnings": ""}  # fmt: skip
    assert error_text(ValueError("a\nb" * 200), 5, first_line=False) == (
        "ValueError: a\nba\n"
    )
