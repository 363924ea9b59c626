"""Time HFL's matrix-free weight samples against FullLaplace's dense ones.

Rerunnable; writes ``benchmarks/results/weight_space_timing.json``::

    python scripts/weight_space_timing.py            # P ~ 0.5k, 2k, 5k (~2 min)
    python scripts/weight_space_timing.py --widths 16 64
    python scripts/weight_space_timing.py --widths 66 --solvers auto dense \
        --out benchmarks/results/weight_space_timing_p5215.json

Regression MLPs ``d -> h -> h -> 1`` (tanh, float64) briefly trained with Adam
on ``N`` synthetic points. Per model, wall-clock seconds of

* ``full_fit``: ``FullLaplace(backend=CurvlinopsGGN).fit`` (forms the P x P GGN);
* ``full_sample``: its first ``sample(S)`` (eigendecomposition + draws);
* ``full_nn``: its ``la(x, pred_type="nn", link_approx="mc", n_samples=S)``;
* ``hfl_fit``, ``hfl_sample``, ``hfl_nn``: the same calls with ``"hfl"``
  (sample-then-optimise: batched preconditioned CG, one data pass per
  iteration, ``chunk_size = S`` draws together);

``hfl_nn`` is HFL's nn call with a seeded generator, ``hfl_nn_second`` the
same call again with a generator seeded alike (it reuses the first call's
draws); ``ratio_sample = hfl_sample / (full_fit + full_sample)`` and
``ratio_hfl_nn_second = hfl_nn_second / full_nn`` (FullLaplace's nn call, global
generator), measured in the same run. ``--solvers auto dense`` repeats the HFL calls per solver (keys
``hfl_dense_*`` for ``solver="dense"``). No timing is asserted anywhere; numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's laplace_hfl

from laplace import Laplace  # noqa: E402
from laplace.curvature import CurvlinopsGGN  # noqa: E402

import laplace_hfl  # noqa: E402, F401  (registers "hfl")

DT = torch.float64


def _model(width: int, d_in: int, n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d_in, generator=g, dtype=DT)
    y = torch.sin(X.sum(1, keepdim=True)) + 0.1 * torch.randn(
        n, 1, generator=g, dtype=DT
    )
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(d_in, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(),
        nn.Linear(width, 1),
    ).to(DT)  # fmt: skip
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(300):
        opt.zero_grad()
        loss = (model(X) - y).square().mean() + 1e-3 * sum(
            p.square().sum() for p in model.parameters()
        )
        loss.backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    return model, X, y


def _timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def run(width: int, d_in: int, n: int, S: int, solvers: list[str]) -> dict:
    model, X, y = _model(width, d_in, n)
    loader = DataLoader(TensorDataset(X, y), batch_size=256)
    Xq = X[:32]
    kw = {"sigma_noise": 0.3, "prior_precision": 1.0}
    row = {"width": width, "n_data": n, "n_samples": S}
    full = Laplace(model, "regression", "all", "full", backend=CurvlinopsGGN, **kw)
    _, row["full_fit"] = _timed(lambda: full.fit(loader))
    gen = torch.Generator().manual_seed(0)
    _, row["full_sample"] = _timed(lambda: full.sample(S, generator=gen))
    _, row["full_nn"] = _timed(
        lambda: full(Xq, pred_type="nn", link_approx="mc", n_samples=S)
    )
    for solver in solvers:
        pre = "hfl" if solver == "auto" else f"hfl_{solver}"
        hfl = Laplace(
            model, "regression", "all", "hfl", chunk_size=S, solver=solver, **kw
        )
        _, row[f"{pre}_fit"] = _timed(lambda: hfl.fit(loader))
        gen = torch.Generator().manual_seed(0)
        _, row[f"{pre}_sample"] = _timed(lambda: hfl.sample(S, generator=gen))
        for key in (f"{pre}_nn", f"{pre}_nn_second"):  # same seed twice
            gen = torch.Generator().manual_seed(1)
            _, row[key] = _timed(
                lambda g=gen: hfl(
                    Xq, pred_type="nn", link_approx="mc", n_samples=S, generator=g
                )
            )
        row[f"ratio_{pre}_nn_second"] = row[f"{pre}_nn_second"] / row["full_nn"]
    row["n_params"] = hfl.n_params
    if "hfl_sample" in row:
        row["ratio_sample"] = row["hfl_sample"] / (row["full_fit"] + row["full_sample"])
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[16, 40, 66])
    parser.add_argument("--d-in", type=int, default=10)
    parser.add_argument("--n-data", type=int, default=2000)
    parser.add_argument("--n-samples", type=int, default=100)
    parser.add_argument(
        "--solvers", nargs="+", default=["auto"], choices=["auto", "cg", "dense"]
    )
    parser.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks/results/weight_space_timing.json"
    )
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    rows = []
    for width in args.widths:
        row = run(width, args.d_in, args.n_data, args.n_samples, args.solvers)
        rows.append(row)
        print(
            " ".join(
                f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                for k, v in row.items()
            ),
            flush=True,
        )
    meta = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
