"""Layer-wise and diagonal marginal-likelihood prior tuning: HFL vs FullLaplace.

Rerunnable; writes ``benchmarks/results/marglik_structure.json``::

    python scripts/marglik_structure_timing.py        # ~2 min on a shared 2-core machine
    python scripts/marglik_structure_timing.py --width 70 --structures layerwise \
        --variants cg,cg-rank128 --out benchmarks/results/marglik_structure_large_layerwise.json

A ``1 -> w -> w -> 1`` tanh regression MLP (``w=28``: 897 weights; ``w=70``:
5,181) in float64, trained with Adam on 300 points. For each
``prior_structure`` (scalar, layerwise, diag), FullLaplace and each HFL variant
are fitted on the same model and data and run laplace-torch's own loop
``optimize_prior_precision(method="marglik", prior_structure=...)`` (Adam, 100
steps); recorded: wall-clock seconds of fit + tuning, the tuned prior
precisions, the largest relative difference of HFL's from FullLaplace's, and
HFL's last log-determinant diagnostics (``la.last_logdet``). HFL variants:

* ``dense``: ``solver="auto"``, the exact log-determinant from the dense data
  GGN where ``P <= 4096`` (CG and the sketch above it);
* ``cg``: ``solver="cg"``, no dense GGN: a scalar prior by one Lanczos run per
  fit, layer-wise / diagonal priors by one Nyström sketch of the GGN per fit
  (``MarglikSettings.sketch_rank``, default 1024, at most ``P``);
* ``cg-rank<k>``: the same with ``sketch_rank=k`` (below the GGN's rank of
  at most 300 here: the remainder is estimated and bounded);
* ``cg-slq``: ``sketch_rank=0``, Lanczos on the posterior precision at every
  prior value (what ran before the sketch).

No timing is asserted anywhere; numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import dataclasses
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
from laplace_hfl.engine.logdet import MarglikSettings  # noqa: E402

DT = torch.float64


def _model(n: int, width: int, d_in: int = 1):
    g = torch.Generator().manual_seed(0)
    X = torch.rand(n, d_in, generator=g, dtype=DT) * 8 - 4
    y = torch.sin(X.sum(1, keepdim=True)) + 0.1 * torch.randn(
        n, 1, generator=g, dtype=DT
    )
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(d_in, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(),
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


def write_results(out: Path, meta: dict, rows: list) -> None:
    """``{"meta": ..., "rows": ...}`` as indented JSON at ``out``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    print(f"wrote {out}")


def _estimator(variant: str, model):
    if variant == "full":
        return Laplace(model, "regression", "all", "full", sigma_noise=0.1)
    solver = "auto" if variant == "dense" else "cg"
    la = Laplace(model, "regression", "all", "hfl", sigma_noise=0.1, solver=solver)
    if variant.startswith("cg-rank"):
        la.marglik_settings = MarglikSettings(sketch_rank=int(variant[7:]))
    elif variant == "cg-slq":
        la.marglik_settings = MarglikSettings(sketch_rank=0)
    return la


def _tune(structure: str, model, loader, variant: str, n_steps: int = 100):
    la = _estimator(variant, model)

    def run() -> None:
        la.fit(loader)
        la.optimize_prior_precision(
            method="marglik", prior_structure=structure, n_steps=n_steps
        )

    seconds = timed(run)[1]
    info = getattr(la, "last_logdet", None)
    info = None if info is None else dataclasses.asdict(info)
    return seconds, la.prior_precision.detach().clone(), la.n_params, info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-data", type=int, default=300)
    parser.add_argument("--width", type=int, default=28)
    parser.add_argument("--n-steps", type=int, default=100, help="Adam steps")
    parser.add_argument(
        "--structures", default="scalar,layerwise,diag", help="comma-separated"
    )
    parser.add_argument(
        "--variants",
        default="dense,cg,cg-rank128",
        help="comma-separated HFL variants: dense, cg, cg-rank<k>, cg-slq",
    )
    parser.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks/results/marglik_structure.json"
    )
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    model, X, y = _model(args.n_data, args.width)
    loader = DataLoader(TensorDataset(X, y), batch_size=100)
    rows = []
    for structure in args.structures.split(","):
        t_full, p_full, n_params, _ = _tune(
            structure, model, loader, "full", args.n_steps
        )
        print(f"{structure}: P={n_params} full {t_full:.2f} s", flush=True)
        for variant in args.variants.split(","):
            t_hfl, p_hfl, _, info = _tune(
                structure, model, loader, variant, args.n_steps
            )
            rel = float(((p_hfl - p_full).abs() / p_full.abs()).max())
            rows.append({
                "prior_structure": structure,
                "hfl_variant": variant,
                "n_params": n_params,
                "full_s": t_full,
                "hfl_s": t_hfl,
                "ratio_time": t_hfl / t_full,
                "max_rel_prior_diff": rel,
                "last_logdet": info,
                "full_prior": p_full.flatten().tolist()[:8],
                "hfl_prior": p_hfl.flatten().tolist()[:8],
            })  # fmt: skip
            print(
                f"  hfl {variant}: {t_hfl:.2f} s (x{t_hfl / t_full:.3f}), max rel "
                f"prior diff {rel:.2e}, logdet {info}",
                flush=True,
            )
    meta = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "note": "2 CPU cores shared with other jobs; ratios are from one run",
        "network": f"1-{args.width}-{args.width}-1 tanh, float64, regression",
        "n_data": args.n_data,
        "adam_steps": args.n_steps,
        "full_backend": "laplace-torch default (CurvlinopsGGN)",
        "priors_listed": "first 8 values",
    }
    write_results(args.out, meta, rows)


if __name__ == "__main__":
    main()
