"""HFL against FullLaplace and KFAC over the number of parameters ``P`` and of
training points ``N``: ``python scripts/hfl_vs_full.py [--out FILE]``.

A 10-w-w-1 tanh regression MLP (``P = w^2 + 13 w + 1``), trained briefly by
Adam on a fixed random regression problem with ``N`` points, for each width
``w`` and ``N``; each method (laplace-torch's ``FullLaplace`` with
``CurvlinopsGGN``, its ``KronLaplace``, and HFL with every option at its
default) is fitted on the same model and predicts the GLM variance of 10 query
points, then of 500 (``N_QUERY``). Recorded: wall times of the fit and of each
prediction (one run each, the machine shared with other jobs: say so when
quoting), the median relative error of the 500 variances against
FullLaplace's, and HFL's choice. Writes JSON (default
``benchmarks/results/hfl_vs_full.json``); the README's "HFL or FullLaplace /
KFAC?" section quotes it.
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

import laplace_hfl  # noqa: F401  (registers hessian_structure="hfl")
from laplace_hfl.bench.evaluation.predict import glm_predictive
from laplace_hfl.bench.evaluation.training import train_realistic

WIDTHS = (16, 32, 64)
N_DATA = (200, 2000)
METHODS = {"full": "full", "kfac": "kron", "hfl": "hfl"}
#: Query points predicted after one fit: a few, then many.
N_QUERY = (10, 500)


def _case(width: int, n: int):
    g = torch.Generator().manual_seed(0)
    X = torch.randn(n, 10, generator=g)
    y = torch.sin(X[:, :3].sum(1, keepdim=True)) + 0.1 * torch.randn(n, 1, generator=g)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(10, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(),
        nn.Linear(width, 1),
    )  # fmt: skip
    train_realistic(model, X, y, "regression", epochs=max(1, 4000 // n))
    Xq = torch.randn(N_QUERY[-1], 10, generator=g)
    return model, X, y, Xq


def run(width: int, n: int) -> dict:
    model, X, y, Xq = _case(width, n)
    loader = DataLoader(TensorDataset(X, y), batch_size=256)
    out = {"width": width, "n_params": sum(p.numel() for p in model.parameters()),
           "n_data": n}  # fmt: skip
    var = {}
    for name, structure in METHODS.items():
        la = Laplace(model, "regression", "all", structure, prior_precision=1.0)
        t0 = time.perf_counter()
        la.fit(loader)
        out[f"{name}_fit_s"] = time.perf_counter() - t0
        for q in N_QUERY:  # after the fit: first a few queries, then many
            t0 = time.perf_counter()
            _, v = glm_predictive(la, Xq[:q])
            out[f"{name}_predict_{q}_s"] = time.perf_counter() - t0
        out[f"{name}_s"] = out[f"{name}_fit_s"] + out[f"{name}_predict_10_s"]
        var[name] = v.flatten().double()
        if name == "hfl":
            out["hfl_choice"] = la.last_diagnostics.choice
    for name in ("kfac", "hfl"):
        err = (var[name] - var["full"]).abs() / var["full"]
        out[f"{name}_rel_err"] = float(err.median())
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/hfl_vs_full.json")
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    rows = []
    for n in N_DATA:
        for w in WIDTHS:
            r = run(w, n)
            rows.append(r)
            q = N_QUERY[-1]
            print(f"P={r['n_params']:6d} N={n:5d}  fit + 10 queries / + {q} more: "
                  f"full {r['full_s']:6.2f} / {r[f'full_predict_{q}_s']:6.2f} s  "
                  f"kfac {r['kfac_s']:5.2f} / {r[f'kfac_predict_{q}_s']:5.2f} s "
                  f"(err {r['kfac_rel_err']:.2f})  "
                  f"hfl {r['hfl_s']:6.2f} / {r[f'hfl_predict_{q}_s']:6.2f} s "
                  f"(err {r['hfl_rel_err']:.1e}) {r['hfl_choice'].split(':')[0]}",
                  flush=True)  # fmt: skip
    out = {
        "command": "python scripts/hfl_vs_full.py",
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, 1 torch thread, "
        "shared with other jobs (one run per cell)",
        "torch": torch.__version__,
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
