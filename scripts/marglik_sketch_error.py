"""Error of the sketched marginal likelihood against the exact dense one.

Rerunnable; writes ``benchmarks/results/marglik_sketch_error.json``::

    python scripts/marglik_sketch_error.py        # ~1 min on a shared 2-core machine

An 8-24-24-1 tanh MLP (the model of ``scripts/marglik_structure_timing.py``
with 8 inputs: 841 weights, float64, 600 points; its GGN has no small
numerical rank, unlike the 1-input network's). For each sketch rank
``k`` (``MarglikSettings.sketch_rank``, ``solver="cg"``) and each of a
layer-wise and a diagonal prior: the log-determinant of the posterior precision
against the exact one (HFL's dense path, ``solver="auto"``), with the reported
standard error and truncation, and the layer-wise / diagonal prior tuned by
laplace-torch's Adam loop against the exactly tuned one. No assertion; the
numbers are documented in ``docs/marglik.md``.
"""

from __future__ import annotations

import argparse
import math
import sys
import warnings
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's laplace_hfl
sys.path.insert(0, str(ROOT / "scripts"))

from laplace import Laplace  # noqa: E402
from marglik_structure_timing import _model, write_results  # noqa: E402

import laplace_hfl  # noqa: E402, F401  (registers "hfl")
from laplace_hfl.bench.benchmark.measure import timed  # noqa: E402
from laplace_hfl.engine.logdet import MarglikSettings  # noqa: E402


def _laplace(model, loader, solver: str, rank: int | None = None):
    la = Laplace(model, "regression", "all", "hfl", sigma_noise=0.1, solver=solver)
    if rank is not None:  # the sketch alone, however large its remainder
        la.marglik_settings = MarglikSettings(
            sketch_rank=rank, sketch_tolerance=math.inf
        )
    la.fit(loader)
    return la


def _priors(la) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "layerwise": 0.2 + torch.rand(la.n_layers, generator=g, dtype=torch.float64),
        "diag": 0.2 + torch.rand(la.n_params, generator=g, dtype=torch.float64),
    }


def _tuned(la, structure: str) -> tuple[torch.Tensor, float]:
    seconds = timed(
        lambda: la.optimize_prior_precision(method="marglik", prior_structure=structure)
    )[1]
    return la.prior_precision.detach().clone(), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", default="64,128,256,512,700")
    parser.add_argument("--n-data", type=int, default=600)
    parser.add_argument("--d-in", type=int, default=8)
    parser.add_argument("--width", type=int, default=24)
    parser.add_argument(
        "--out",
        type=Path,
        default=ROOT / "benchmarks/results/marglik_sketch_error.json",
    )
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    model, X, y = _model(args.n_data, args.width, args.d_in)
    loader = DataLoader(TensorDataset(X, y), batch_size=100)
    exact = _laplace(model, loader, "auto")
    priors = _priors(exact)
    ref_logdet, ref_tuned = {}, {}
    for structure, prior in priors.items():
        exact.prior_precision = prior
        ref_logdet[structure] = float(exact.log_det_posterior_precision)
        ref_tuned[structure] = _tuned(exact, structure)[0]
    rows = []
    for rank in (int(r) for r in args.ranks.split(",")):
        for structure, prior in priors.items():
            la = _laplace(model, loader, "cg", rank)
            la.prior_precision = prior
            value = float(la.log_det_posterior_precision)
            info = la.last_logdet
            tuned, seconds = _tuned(la, structure)
            rel_all = (tuned - ref_tuned[structure]).abs() / ref_tuned[structure]
            rel, median = float(rel_all.max()), float(rel_all.median())
            row = {
                "sketch_rank": rank,
                "prior_structure": structure,
                "logdet": value,
                "logdet_exact": ref_logdet[structure],
                "error": value - ref_logdet[structure],
                "stderr": info.stderr,
                "truncation": info.truncation,
                "exact": info.exact,
                "tuned_max_rel_diff": rel,
                "tuned_median_rel_diff": median,
                "tune_s": seconds,
            }
            rows.append(row)
            print(
                f"k={rank} {structure}: logdet {value:.3f} vs {ref_logdet[structure]:.3f} "
                f"(error {row['error']:+.3f}, stderr {info.stderr:.3f}, truncation "
                f"{info.truncation:.3f}, exact {info.exact}); tuned prior rel diff max "
                f"{rel:.2e} median {median:.2e} ({seconds:.1f} s)",
                flush=True,
            )
    meta = {
        "network": f"{args.d_in}-{args.width}-{args.width}-1 tanh, float64, "
        f"regression, {args.n_data} points",
        "n_params": exact.n_params,
        "reference": "HFL dense path (exact log det; equals FullLaplace)",
        "note": "2 CPU cores shared with other jobs",
    }
    write_results(args.out, meta, rows)


if __name__ == "__main__":
    main()
