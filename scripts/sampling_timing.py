"""Time ``sample(20)`` and ``pred_type="nn"`` of HFL against FullLaplace on a
963-parameter classifier.

Rerunnable; writes ``benchmarks/results/sampling_timing.json``::

    python scripts/sampling_timing.py        # ~15 s on a shared 2-core machine

A ``20 -> 40 -> 3`` tanh classifier (963 weights, float64) briefly trained
with Adam on ``N = 1000`` synthetic points. Wall-clock seconds, both
estimators fitted on the same model and data, in the same run:

* ``fit``: ``la.fit(loader)`` (both form the data GGN here: FullLaplace by
  its backend; HFL where its dense solver is used with ``target="ggn"``,
  after ``solver="auto"``'s probe);
* ``nn_first``: ``la(x, pred_type="nn", link_approx="mc", n_samples=20)`` on
  5 points right after a fit (both factorise the posterior precision here);
* on a second estimator, after its fit: ``sample``, the first
  ``la.sample(20)`` (factor + draws), ``sample_second`` (fresh draws from
  the stored factor), ``nn`` (the call above, fresh draws);
* ``nn_seeded_second``: the same call twice with a generator seeded alike;
  the second call's time (HFL reuses the draws of the first).

``ratio_*`` = HFL / FullLaplace; ``ratio_sample`` and ``ratio_nn_first`` are
the first calls alone (after each method's fit), ``ratio_fit`` the fits alone,
``ratio_fit_sample`` and ``ratio_fit_nn_first`` fit plus the first call; the
``first_call`` block repeats these with the times. No timing is asserted
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


def _model(n: int, d_in: int = 20, width: int = 40, classes: int = 3):
    g = torch.Generator().manual_seed(0)
    X = torch.randn(n, d_in, generator=g, dtype=DT)
    W = torch.randn(d_in, classes, generator=g, dtype=DT)
    y = (X @ W + 0.5 * torch.randn(n, classes, generator=g, dtype=DT)).argmax(1)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(d_in, width), nn.Tanh(), nn.Linear(width, classes)
    ).to(DT)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(300):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(X), y, reduction="sum")
        loss.backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    return model, X, y


def _timed(fn) -> float:
    return timed(fn)[1]


def _measure(make, loader, Xq, S: int) -> dict:
    nn_call = lambda g=None: make.la(  # noqa: E731
        Xq, pred_type="nn", link_approx="mc", n_samples=S, generator=g
    )
    make.la = make()
    row = {"fit": _timed(lambda: make.la.fit(loader))}
    row["nn_first"] = _timed(nn_call)
    make.la = make()
    make.la.fit(loader)
    row["sample"] = _timed(lambda: make.la.sample(S))
    row["sample_second"] = _timed(lambda: make.la.sample(S))
    row["nn"] = _timed(nn_call)
    for _ in range(2):
        gen = torch.Generator().manual_seed(0)
        row["nn_seeded_second"] = _timed(lambda g=gen: nn_call(g))
    row["n_params"] = int(make.la.n_params)
    return row


class _Maker:
    def __init__(self, model, structure: str) -> None:
        self.model, self.structure, self.la = model, structure, None

    def __call__(self):
        return Laplace(
            self.model, "classification", "all", self.structure, prior_precision=1.0
        )


def main() -> None:
    warnings.simplefilter("ignore")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    out = ROOT / "benchmarks/results/sampling_timing.json"
    parser.add_argument("--out", type=Path, default=out)
    parser.add_argument("--n-data", type=int, default=1000)
    parser.add_argument("--n-samples", type=int, default=20)
    args = parser.parse_args()
    model, X, y = _model(args.n_data)
    loader = DataLoader(TensorDataset(X, y), batch_size=256)
    Xq = X[:5]
    rows = {
        "full": _measure(_Maker(model, "full"), loader, Xq, args.n_samples),
        "hfl": _measure(_Maker(model, "hfl"), loader, Xq, args.n_samples),
    }
    times = [k for k in rows["full"] if k != "n_params"]
    ratios = {f"ratio_{k}": rows["hfl"][k] / rows["full"][k] for k in times}
    for a in ("sample", "nn_first"):
        ratios[f"ratio_fit_{a}"] = (rows["hfl"]["fit"] + rows["hfl"][a]) / (
            rows["full"]["fit"] + rows["full"][a]
        )
    meta = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "note": "2 CPU cores shared with other jobs; ratios are from one run",
        "n_params": rows["hfl"]["n_params"],
        "n_data": args.n_data,
        "n_samples": args.n_samples,
        "full_backend": "laplace-torch default (CurvlinopsGGN)",
    }
    first_call = {
        k: {
            "hfl_s": sum(rows["hfl"][p] for p in parts),
            "full_s": sum(rows["full"][p] for p in parts),
        }
        for k, parts in {
            "sample": ("sample",),
            "nn": ("nn_first",),
            "fit": ("fit",),
            "fit_plus_sample": ("fit", "sample"),
            "fit_plus_nn": ("fit", "nn_first"),
        }.items()
    }
    for v in first_call.values():
        v["ratio"] = v["hfl_s"] / v["full_s"]
    out = {"meta": meta, **rows, **ratios, "first_call": first_call}
    print(json.dumps(out, indent=1))
    for k, v in first_call.items():
        print(
            f"{k:>16}: HFL {v['hfl_s']:.3f} s, FullLaplace {v['full_s']:.3f} s, "
            f"ratio {v['ratio']:.2f}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
