"""Real-network benchmark pieces: the text model and its dict batches, the
BatchNorm CNN, the function-space methods in the evaluation registry, and the
realnets harness (failure rows, variance agreement, JSON/PNG)."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from conftest import assert_unchanged, snapshot
from laplace import Laplace
from laplace.curvature import CurvlinopsGGN
from torch.utils.data import DataLoader

from laplace_hfl.bench.benchmark.realnets import (
    GRID,
    level_order,
    markdown_table,
    plot_realnets,
    run_case,
)
from laplace_hfl.bench.benchmark.realnets_methods import real_methods
from laplace_hfl.bench.evaluation import METHODS, TASKS, run_comparison
from laplace_hfl.bench.evaluation.networks import BNConvNet, LeNet
from laplace_hfl.bench.evaluation.predict import glm_predictive, predict_batched
from laplace_hfl.bench.evaluation.registry import MethodSpec, laplace_builder
from laplace_hfl.bench.evaluation.tasks import Task
from laplace_hfl.bench.evaluation.text import (
    DictDataset,
    TinyTextClassifier,
    synthetic_text,
    train_text_classifier,
)
from laplace_hfl.bench.evaluation.training import batch_loader

DT = torch.float64


# ------------------------------------------------------------- text model/data
def test_synthetic_text_rule_and_padding():
    d = synthetic_text(400, n_classes=4, seq_len=12, n_key=2, label_noise=0.1, seed=3)
    assert d["input_ids"].shape == (400, 12) and d["labels"].shape == (400,)
    assert torch.equal(d["input_ids"] == 0, d["attention_mask"] == 0)  # pads
    # the class of the inserted keywords (tokens 1..16, four per class)
    kw = d["input_ids"].clamp_max(17)
    counts = torch.stack([((kw > 4 * c) & (kw <= 4 * c + 4)).sum(1) for c in range(4)])
    rule = counts.argmax(0)
    agree = float((rule == d["labels"]).double().mean())
    assert 0.85 <= agree < 1.0  # 10% noise, a quarter of it keeps the label
    assert torch.equal(
        d["input_ids"], synthetic_text(400, seq_len=12, seed=3)["input_ids"]
    )
    with pytest.raises(ValueError, match="must exceed"):
        synthetic_text(10, n_classes=4, vocab=18)


def test_text_classifier_learns_with_frozen_backbone():
    data = synthetic_text(512, seed=0)
    model = train_text_classifier(data, pretrain_epochs=4, finetune_epochs=2)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"adapter_down.weight", "adapter_up.weight", "head.weight",
                         "head.bias"}  # fmt: skip
    test = synthetic_text(256, seed=1)
    acc = float((model(test).argmax(-1) == test["labels"]).double().mean())
    assert acc > 0.7  # chance is 0.25, the label-noise ceiling about 0.92


@pytest.fixture(scope="module")
def text_task():
    torch.manual_seed(0)
    model = TinyTextClassifier(vocab=32, n_classes=3, d=8, rank=2).double()
    model.freeze_backbone()
    data = synthetic_text(48, n_classes=3, vocab=32, seq_len=8, seed=0)
    loader = DataLoader(DictDataset(data), batch_size=16)
    query = {k: v[:3] for k, v in synthetic_text(3, 3, 32, 8, seed=1).items()}
    return model.eval(), loader, query


@pytest.mark.parametrize("subset", ["last_layer", "all"])
def test_hfl_on_dict_batches_matches_full_laplace(text_task, subset):
    """HFL on a LoRA-like model with dict batches equals laplace-torch's dense
    FullLaplace / FullLLLaplace (CurvlinopsGGN), float64, to 1e-4 relative."""
    model, loader, query = text_task
    snap = snapshot(model)
    kw = {"prior_precision": 2.0, "dict_key_x": "input_ids", "dict_key_y": "labels"}
    ref = Laplace(copy.deepcopy(model), "classification", subset, "full",
                  backend=CurvlinopsGGN, **kw)  # fmt: skip
    ref.fit(loader)
    la = Laplace(model, "classification", subset, "hfl", target="ggn", rtol=1e-10, **kw)
    la.fit(loader)
    _, v_ref = glm_predictive(ref, query)
    _, v = la.glm_predictive(query)
    if subset == "all":
        assert ref.n_params == 8 * 2 * 2 + 8 * 3 + 3  # adapter + head only
    rel = ((v - v_ref).abs() / v_ref.abs().clamp_min(1e-12)).max()
    assert rel < 1e-4, float(rel)
    assert_unchanged(model, snap)


# ---------------------------------------------------------- function-space gp
def test_function_space_registry_entries_run_in_harness():
    task = TASKS["tiny"](0)
    names = ["full_curvlinops_ggn", "ella", "valla", "gp_sod"]
    rows = {r["method"]: r for r in run_comparison(task, names, progress=False).rows}
    for name in ("ella", "valla", "gp_sod"):
        assert METHODS[name].family == "gp"
        assert rows[name]["status"] == "ok", rows[name]["error"]
        assert math.isfinite(rows[name]["nll"])
        assert rows[name]["var_spearman_vs_ggn"] > 0.9


@pytest.mark.parametrize(
    "kw",
    [{"n_subset": 40},
     {"functional_approximation": "nystrom", "subsample_size": 40, "n_eigenvalues": 10}],
)  # fmt: skip
def test_function_space_on_all_data_equals_full_ggn(kw):
    """With the whole training set (and the full numerical rank for ELLA)
    FunctionalLaplace and ELLA reproduce FullLaplace GGN (float64, 1e-3)."""
    task = TASKS["tiny"](0)
    X = next(iter(task.test_loader))[0]

    def var(build):
        la = build(copy.deepcopy(task.model), "regression", 0.1, 1.0)
        la.fit(task.train_loader)
        return glm_predictive(la, X)[1].reshape(-1)

    ref = var(laplace_builder("all", "full", CurvlinopsGGN))
    v = var(laplace_builder("all", "gp", CurvlinopsGGN, **kw))
    assert v.dtype == DT
    assert ((v - ref).abs() / ref).max() < 1e-3


# ----------------------------------------------------------- realnets harness
def _tiny_case(model):
    g = torch.Generator().manual_seed(0)
    X = torch.rand(64, 1, 28, 28, generator=g)
    y = torch.randint(10, (64,), generator=g)
    loader = DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=32)
    return Task(name="tiny_img", model=model.eval(), train_loader=loader,
                val_loader=batch_loader(X[:16], y[:16]),
                shifts={0: (X[:6], y[:6]), 90: (X[:6].flip(-1), y[:6])},
                description="test")  # fmt: skip


def test_realnets_harness_rows_agreement_and_failures(tmp_path):
    torch.manual_seed(0)
    model = BNConvNet()
    with torch.no_grad():  # non-trivial running statistics
        model.train()(torch.rand(32, 1, 28, 28))
    case = _tiny_case(model)
    by_name = {m.name: m for m in real_methods(n_hfl_ll=3)}
    methods = [by_name[n] for n in ("map", "ll_full", "kron", "hfl_ll")]
    methods.append(MethodSpec("hfl_borrow_failed", tune="from:kron"))
    methods.append(
        MethodSpec("ll_kron_grid", build=by_name["ll_kron"].build, tune="grid")
    )
    methods.append(
        MethodSpec("ll_kron_budget", build=by_name["ll_kron"].build, budget_s=0.0)
    )
    snap = snapshot(model)
    rows = {r["method"]: r for r in run_case(case, methods, n_tune=16, progress=False)}
    assert_unchanged(model, snap)
    assert rows["kron"]["status"] == "failed"  # KFAC refuses BatchNorm
    assert "un-supported layers" in rows["kron"]["error"]
    assert rows["ll_full"]["tuning"] == "marglik"
    assert rows["ll_kron_grid"]["prior_precision"] in GRID
    assert rows["ll_kron_grid"]["tuning"] == "grid on 16 val images"
    assert list(rows["ll_kron_budget"]["levels"]) == ["0"]  # budget spent
    assert rows["ll_kron_budget"]["levels_skipped"] == ["90"]
    assert rows["hfl_borrow_failed"]["error"].startswith("RuntimeError: prior donor")
    hfl, ref = rows["hfl_ll"], rows["ll_full"]
    assert hfl["status"] == ref["status"] == "ok"
    assert hfl["prior_precision"] == ref["prior_precision"]
    assert hfl["levels"]["0"]["n"] == 3 and ref["levels"]["0"]["n"] == 6
    # last-layer HFL is exact: its variances equal FullLLLaplace's (float32 model)
    assert hfl["var_vs_reference"]["reference"] == "ll_full"
    assert hfl["var_vs_reference"]["max_rel_err"] < 1e-3
    for r in (hfl, ref):
        assert r["fit_s"] >= 0 and r["predict_s_per_query"] > 0
        assert math.isfinite(r["levels"]["90"]["ece"])
    results = {"cases": {"bn_cnn": {"rows": list(rows.values())}}}
    json.dumps(results)
    table = markdown_table(results)
    assert "| bn_cnn | kron | failed: NotImplementedError" in table
    assert "| bn_cnn | hfl_ll |" in table
    plot_realnets(results, tmp_path / "r.png")
    assert (tmp_path / "r.png").stat().st_size > 0


def test_level_order_spreads_budgeted_levels():
    assert level_order([0, 15, 30, 45, 60], True) == [0, 30, 60, 15, 45]
    assert level_order([0, 15, 30], False) == [0, 15, 30]


def test_lenet_parameter_count_unchanged_and_bn_count():
    assert sum(p.numel() for p in LeNet().parameters()) == 44_426
    assert sum(p.numel() for p in BNConvNet().parameters()) == 20_570


def test_predict_batched_splits_dict_batches_like_one_call(text_task):
    """The harness's batched prediction of a dict batch equals one call."""
    model, loader, query = text_task
    kw = {"dict_key_x": "input_ids", "dict_key_y": "labels"}
    la = Laplace(copy.deepcopy(model), "classification", "last_layer", "full",
                 backend=CurvlinopsGGN, **kw)  # fmt: skip
    la.fit(loader)
    mu, var = predict_batched(la, model, query, batch_size=2)
    ref_mu, ref_var = glm_predictive(la, query)
    assert torch.allclose(mu, ref_mu) and torch.allclose(var, ref_var)
    mu0, var0 = predict_batched(None, model, query, batch_size=2)
    with torch.no_grad():
        assert torch.allclose(mu0, model(query))
    assert var0.shape == (3, 3, 3) and not var0.any()
