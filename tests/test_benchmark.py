"""Smoke test of the benchmark's quick mode (never timed: numbers are not checked)."""

from __future__ import annotations

import argparse
import json

import pytest

from laplace_hfl.bench.benchmark import main, register


def test_register_adds_benchmark_subcommand():
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["benchmark", "--quick", "--out", "x"])
    assert args.command == "benchmark" and args.quick and args.out == "x"
    assert callable(args.func)


@pytest.mark.slow
def test_quick_benchmark_writes_json_and_png(tmp_path):
    assert main(["--quick", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["meta"]["mode"] == "quick"
    for key in ("accuracy_exact", "accuracy_amortized", "timing", "memory"):
        assert results[key], key
    assert "kron_CurvlinopsGGN" in results["kfac_refused"]
    assert (tmp_path / "benchmark.png").stat().st_size > 0


@pytest.mark.slow
def test_solver_benchmark_smoke(tmp_path):
    """``python -m laplace_hfl.bench.benchmark.solvers`` at toy sizes writes its JSON
    and figure, with every preconditioner converging to the reference."""
    from laplace_hfl.bench.benchmark.solvers import main as solvers_main

    out = tmp_path / "solvers.json"
    argv = ["--n-train", "200", "--n-query", "2", "--aw-n-train", "16",
            "--n-dirs", "1", "--ranks", "8", "--ref-n-train", "20",
            "--max-iter", "400", "--device", "cpu",  # the same run with CUDA present
            "--out", str(out)]  # fmt: skip
    assert solvers_main(argv) == 0
    res = json.loads(out.read_text())
    assert res["last_layer"]["rel_err_vs_full_ll_f64_max"] <= 1e-4
    for run in res["all_weights"]["runs"].values():
        assert run["converged"]
        assert run["rel_err_vs_reference_max"] <= 1e-2
    assert out.with_suffix(".png").exists()


@pytest.mark.slow
def test_solver_benchmark_one_preconditioner(tmp_path):
    """``--preconditioners nystrom`` alone runs (no "none" baseline needed)."""
    from laplace_hfl.bench.benchmark.solvers import main as solvers_main

    out = tmp_path / "solvers.json"
    argv = "--n-train 200 --only all_weights --aw-n-train 16 --n-dirs 1 --ranks 8"
    argv = argv.split() + ["--ref-n-train", "20", "--preconditioners", "nystrom"]
    assert solvers_main(argv + ["--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert list(res["all_weights"]["runs"]) == ["nystrom8"]
    assert "iteration_reduction_vs_none" not in res["all_weights"]
    assert res["reference_check"]["reference"] == "FullLaplace(CurvlinopsGGN)"


@pytest.mark.slow
def test_gpu_benchmark_runs_tiny_on_cpu():
    """The device benchmark's cases run at CI sizes on the CPU and report the
    quantities its targets are about."""
    from laplace_hfl.bench.benchmark.gpu import run

    res = run(tiny=True, spawn=False)["cases"]
    exact = res["lenet_exact"]
    assert exact["exact"]["mean_iterations_per_refit"] > 0
    assert exact["exact_over_kfac_per_query"] > 0
    assert 0 <= exact["amortized"]["median_rel_error_vs_exact"] < 10
    assert res["bn_cnn"]["fit_over_epoch"] > 0
    assert res["last_layer"]["hfl_over_kfac"] > 0


@pytest.mark.slow
def test_amortized_benchmark_cg_reference_equals_dual():
    """The CG reference of ``benchmark.amortized`` (used where the dense dual
    does not fit, N > 1500) equals the float64 dual on LeNet at N = 300
    (predicted class of 8 test images; measured 3.6e-8, bound 1e-5)."""
    import torch
    from laplace import Laplace

    from laplace_hfl.bench.benchmark.amortized import cg_variances, dual_variances
    from laplace_hfl.bench.evaluation.networks import mnist_split, train_lenet

    split = mnist_split(n_train=300)
    model, _ = train_lenet(split, epochs=2)
    prior, Xq = 0.3, split.X_test[:8]
    la = Laplace(
        model, "classification", "all", "hfl", prior_precision=prior, amortize=4,
        precondition_rank=64,
    )  # fmt: skip
    la.fit(split.loader("train", 64))
    var, cls, info = cg_variances(la, Xq)
    ref = dual_variances(model, split.X_train, Xq, prior)[torch.arange(8), cls]
    assert info["converged"]
    assert ((var - ref).abs() / ref).max() <= 1e-5
