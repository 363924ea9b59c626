"""Smoke test of the benchmark's quick mode (never timed: numbers are not checked)."""

from __future__ import annotations

import argparse
import json

import pytest

from laplace_hfl.benchmark import main, register


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
