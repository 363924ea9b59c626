"""Layer-wise and diagonal marginal-likelihood prior tuning: HFL vs FullLaplace.

Rerunnable; writes ``benchmarks/results/marglik_structure.json``::

    python scripts/marglik_structure_timing.py        # ~1 min on a shared 2-core machine

A ``1 -> 28 -> 28 -> 1`` tanh regression MLP (897 weights, float64) trained
with Adam on 300 points. For each ``prior_structure`` (scalar, layerwise,
diag), both estimators are fitted on the same model and data and run
laplace-torch's own loop ``optimize_prior_precision(method="marglik",
prior_structure=...)`` (Adam, 100 steps); recorded: wall-clock seconds of fit
+ tuning, the tuned prior precisions, and the largest relative difference of
HFL's from FullLaplace's. HFL computes the log-determinant exactly from its
dense data GGN here (``P <= 4096``, ``target="ggn"``). No timing is asserted
anywhere; numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import warnings
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's laplace_hfl

from laplace import Laplace  # noqa: E402

import laplace_hfl  # noqa: E402, F401  (registers "hfl")
from laplace_hfl.bench.benchmark.measure import timed  # noqa: E402

DT = torch.float64


def _model(n: int, width: int):
    g = torch.Generator().manual_seed(0)
    X = torch.rand(n, 1, generator=g, dtype=DT) * 8 - 4
    y = torch.sin(X) + 0.1 * torch.randn(n, 1, generator=g, dtype=DT)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(1, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(),
        nn.Linear(width, 1),
    ).to(DT)  # fmt: skip
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(1000):
        opt.zero_grad()
        loss = (model(X) - y).square().sum() / 0.02 + sum(
            p.square().sum() for p in model.parameters()
        )
        loss.backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    return model, X, y


def _tune(structure: str, model, loader, kind: str) -> tuple[float, torch.Tensor, int]:
    la = Laplace(model, "regression", "all", kind, sigma_noise=0.1)

    def run() -> None:
        la.fit(loader)
        la.optimize_prior_precision(method="marglik", prior_structure=structure)

    seconds = timed(run)[1]
    return seconds, la.prior_precision.detach().clone(), la.n_params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-data", type=int, default=300)
    parser.add_argument("--width", type=int, default=28)
    parser.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks/results/marglik_structure.json"
    )
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    model, X, y = _model(args.n_data, args.width)
    loader = DataLoader(TensorDataset(X, y), batch_size=100)
    rows = []
    for structure in ("scalar", "layerwise", "diag"):
        t_full, p_full, n_params = _tune(structure, model, loader, "full")
        t_hfl, p_hfl, _ = _tune(structure, model, loader, "hfl")
        rel = float(((p_hfl - p_full).abs() / p_full.abs()).max())
        row = {
            "prior_structure": structure,
            "n_params": n_params,
            "full_s": t_full,
            "hfl_s": t_hfl,
            "ratio_time": t_hfl / t_full,
            "max_rel_prior_diff": rel,
            "full_prior": p_full.flatten().tolist()[:8],
            "hfl_prior": p_hfl.flatten().tolist()[:8],
        }
        rows.append(row)
        print(
            f"{structure}: P={n_params} full {t_full:.2f} s, hfl {t_hfl:.2f} s "
            f"(x{t_hfl / t_full:.2f}), max rel prior diff {rel:.2e}",
            flush=True,
        )
    meta = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "note": "2 CPU cores shared with other jobs; ratios are from one run",
        "network": f"1-{args.width}-{args.width}-1 tanh, float64, regression",
        "n_data": args.n_data,
        "full_backend": "laplace-torch default (CurvlinopsGGN)",
        "priors_listed": "first 8 values",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
