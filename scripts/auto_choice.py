"""``solver="auto"`` / ``preconditioner="auto"`` against every fixed choice,
in one run: ``python scripts/auto_choice.py [--out FILE] [--cases NAME ...]
[--queries N ...] [--ranks R ...]`` (``--ranks``: also ``cg``/``nystrom`` at
these fixed sketch ranks, e.g. ``--cases diabetes_mlp --ranks 64 128 256 442``).

Cases: the 5-20-1 tanh regression net (P = 141, N = 200), a digits MLP
(64-64-10, P = 4,810, N = 600 of sklearn's digits), the diabetes MLP
(10-64-64-1, P = 4,929, N = 442) and the test suite's tiny networks. Each
configuration is a fresh ``Laplace(..., "all", "hfl")``: fit, then the GLM
predictive of ``N`` query points, one call (wall time, CG iterations, the
choice and its reason), for each workload of ``--queries`` (default 10 and
100 points: the issue's few queries and a small test set; which fixed choice
is best depends on it, while ``"auto"`` decides at the first solve
without knowing how many queries follow). For each case the JSON records, per auto setting, the ratio of its
time to the best fixed choice's: ``cg/auto`` against ``cg/{none,kfac,nystrom}``
and ``auto/auto`` (the defaults) against those and ``dense``. Times are
wall-clock on whatever machine runs this (say which when quoting them),
the faster of two or three interleaved runs;
iteration counts are machine-independent. Results are written after each
case into ``--out``, keeping the cases of earlier runs (so that the long cases
can run one per invocation, each under 10 minutes).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import warnings
from pathlib import Path

import torch
from laplace import Laplace
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import laplace_hfl  # noqa: E402, F401  (registers hessian_structure="hfl")
from laplace_hfl.bench.evaluation.training import train_realistic  # noqa: E402
from tests.conftest import (  # noqa: E402
    make_classification,
    make_regression,
    train_stationary,
)

FIXED = [("dense", "auto"), ("cg", "none"), ("cg", "kfac"), ("cg", "nystrom")]
AUTO = [("cg", "auto"), ("auto", "auto")]
#: Query points per workload (the first ``N`` of each case's query pool).
QUERIES = (10, 100)


def _tanh_net():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(200, 5, generator=g)
    y = torch.sin(X.sum(1, keepdim=True)) + 0.1 * torch.randn(200, 1, generator=g)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 20), nn.Tanh(), nn.Linear(20, 1))
    train_realistic(model, X, y, "regression", epochs=200)
    return model, X, y, "regression", X + 0.3, 1e-1


def _digits_mlp():
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X = torch.tensor(X[:600] / 16.0, dtype=torch.float32)
    y = torch.tensor(y[:600])
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10))
    train_realistic(model, X, y, "classification", epochs=30)
    return (
        model,
        X,
        y,
        "classification",
        torch.tensor(load_digits().data[600:] / 16.0, dtype=torch.float32),
        1.0,
    )


def _diabetes_mlp():
    from sklearn.datasets import load_diabetes

    X, y = load_diabetes(return_X_y=True)
    X = torch.tensor((X - X.mean(0)) / X.std(0), dtype=torch.float32)
    y = torch.tensor((y - y.mean()) / y.std(), dtype=torch.float32)[:, None]
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(10, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1)
    )
    train_realistic(model, X, y, "regression", epochs=100)
    return model, X, y, "regression", X.flip(0), 1.0


def _suite_regression():
    model, X, y = make_regression(n=40, d_in=2, d_out=3, hidden=8, seed=1)
    train_stationary(model, X, y, "regression")
    return model, X, y, "regression", torch.cat([X, -X, 2 * X]) + 0.2, 0.5


def _suite_classification():
    model, X, y = make_classification()
    train_stationary(model, X, y, "classification")
    return model, X, y, "classification", torch.cat([X, -X]) * 1.3, 0.5


CASES = {
    "tanh_5_20_1": _tanh_net,
    "digits_mlp": _digits_mlp,
    "diabetes_mlp": _diabetes_mlp,
    "suite_regression_multi": _suite_regression,
    "suite_classification": _suite_classification,
}


def run_config(model, X, y, likelihood, Xq, prior, solver, precond, **kw) -> dict:
    la = Laplace(
        model, likelihood, "all", "hfl", prior_precision=prior,
        solver=solver, preconditioner=precond, **kw,
    )  # fmt: skip
    loader = DataLoader(TensorDataset(X, y), batch_size=256)
    t0 = time.perf_counter()
    la.fit(loader)
    la.glm_predictive(Xq)
    seconds = time.perf_counter() - t0
    d = la.last_diagnostics
    return {
        "solver": solver,
        "preconditioner": precond,
        "seconds": seconds,
        "used": f"{d.solver}/{d.preconditioner}",
        "mean_iterations": float(d.iterations.float().mean()),
        "converged": bool(d.converged.all()),
        "choice": d.choice,
    }


def rank_sweep(case: tuple, ranks: list[int]) -> dict:
    """``cg``/``nystrom`` at each fixed ``precondition_rank`` (faster of two
    runs): what the automatic rank chooses between; not counted as a fixed
    choice above."""
    out = {}
    for rank in ranks:
        runs = [
            run_config(*case, "cg", "nystrom", precondition_rank=rank) for _ in range(2)
        ]
        best = min(runs, key=lambda t: t["seconds"])
        out[str(rank)] = {k: best[k] for k in ("seconds", "mean_iterations")}
        print(f"  rank {rank:5d} {best['seconds']:7.2f} s "
              f"{best['mean_iterations']:6.1f} it", flush=True)  # fmt: skip
    return out


def run_workload(name: str, case: tuple, n_query: int, ranks: list[int]) -> dict:
    case = (*case[:4], case[4][:n_query], case[5])
    P = sum(p.numel() for p in case[0].parameters())
    # The machine is shared: a second round re-runs the auto settings and the
    # fixed choices within 2x of the fastest, interleaved, and each keeps its
    # faster run (sub-second cases: every configuration, three rounds).
    configs = [f"{s}/{p}" for s, p in FIXED + AUTO]
    runs: dict[str, dict] = {}
    rounds = 3 if P < 1000 else 2
    for r in range(rounds):
        if r == 0:
            todo = configs
        else:
            fastest = min(runs[f"{s}/{p}"]["seconds"] for s, p in FIXED)
            todo = [
                k for k in configs
                if P < 1000 or k in ("cg/auto", "auto/auto")
                or runs[k]["seconds"] <= 2 * fastest
            ]  # fmt: skip
        for key in todo:
            solver, precond = key.split("/")
            t = run_config(*case, solver, precond)
            if key not in runs or t["seconds"] < runs[key]["seconds"]:
                runs[key] = t
            print(f"  {name} {n_query:4d} pts {key:14s} {t['seconds']:7.2f} s  "
                  f"{t['used']:12s} {t['mean_iterations']:6.1f} it", flush=True)  # fmt: skip
    cg_fixed = {k: runs[k]["seconds"] for k in ("cg/none", "cg/kfac", "cg/nystrom")}
    all_fixed = {**cg_fixed, "dense/auto": runs["dense/auto"]["seconds"]}
    best_cg, best_all = (
        min(cg_fixed, key=cg_fixed.get),
        min(all_fixed, key=all_fixed.get),
    )
    sweep = {"rank_sweep": rank_sweep(case, ranks)} if ranks else {}
    return {
        "n_query": int(case[4].shape[0]),
        "runs": runs,
        **sweep,
        "cg_auto_vs_best_cg": runs["cg/auto"]["seconds"] / cg_fixed[best_cg],
        "best_cg": best_cg,
        "auto_vs_best_fixed": runs["auto/auto"]["seconds"] / all_fixed[best_all],
        "best_fixed": best_all,
    }


def run_case(name: str, queries: list[int], ranks: list[int]) -> dict:
    case = CASES[name]()
    model, X = case[0], case[1]
    run_config(*case[:4], case[4][:2], case[5], "cg", "none")  # warm-up
    return {
        "n_params": sum(p.numel() for p in model.parameters()),
        "n_data": int(X.shape[0]),
        "workloads": {str(n): run_workload(name, case, n, ranks) for n in queries},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/auto_choice.json")
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--queries", nargs="+", type=int, default=list(QUERIES))
    parser.add_argument(
        "--ranks", nargs="*", type=int, default=[],
        help="also time cg/nystrom at these fixed precondition_rank values",
    )  # fmt: skip
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    path = Path(args.out)
    old = json.loads(path.read_text())["cases"] if path.exists() else {}
    out = {
        "command": "python scripts/auto_choice.py --cases NAME ... (each case "
        "in one run; cases of earlier runs kept)",
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, "
        f"{torch.get_num_threads()} torch thread, shared with other jobs",
        "torch": torch.__version__,
        "cases": old,
    }
    for name in args.cases:
        print(name, flush=True)
        out["cases"][name] = res = run_case(name, args.queries, args.ranks)
        for n, w in res["workloads"].items():
            print(f"  -> {n} points: cg/auto {w['cg_auto_vs_best_cg']:.2f}x best CG "
                  f"({w['best_cg']}); auto/auto {w['auto_vs_best_fixed']:.2f}x "
                  f"best fixed ({w['best_fixed']})", flush=True)  # fmt: skip
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
