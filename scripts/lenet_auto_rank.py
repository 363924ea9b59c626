"""The automatic Nyström rank on a CNN on the CPU: LeNet (44,426 parameters, all
weights) on 1,000 MNIST digits, ``solver="cg"``, ``rtol=1e-4``, one thread.

``python scripts/lenet_auto_rank.py [--out benchmarks/results/lenet_auto_rank.json]``
(~12 minutes on 2 CPU cores). For ``preconditioner="auto"`` and fixed ranks 64,
256 and 1,024: seconds for the first image (fit, probe / sketch, one query of
10 outputs) and for the next one, its CG iterations and GGN-vector products
(machine-independent); laplace-torch's all-weights KFAC in the same run as the
library's reference time per image.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
import warnings

import torch

PRIOR = 2.0
N_TRAIN = 1000


def _row(model, X, y, Xq, **kw) -> dict:
    from laplace import Laplace

    import laplace_hfl  # noqa: F401  (registers hessian_structure="hfl")
    from laplace_hfl.bench.evaluation.training import tensor_loader

    la = Laplace(model, "classification", "all", "hfl", prior_precision=PRIOR,
                 solver="cg", rtol=1e-4, **kw)  # fmt: skip
    t0 = time.perf_counter()
    la.fit(tensor_loader(X, y, batch_size=250))
    la.glm_predictive(Xq[:1])
    t1 = time.perf_counter()
    la.glm_predictive(Xq[1:2])
    t2 = time.perf_counter()
    d = la.last_diagnostics
    return {
        "first_image_s": t1 - t0,
        "next_image_s": t2 - t1,
        "next_image_products": float(d.products),
        "mean_iterations": float(d.iterations.float().mean()),
        "rank": la.preconditioner_sketch.products
        if d.preconditioner == "nystrom"
        else 0,
        "choice": d.choice,
    }


def _kfac(model, X, y, Xq) -> dict:
    from laplace import Laplace

    from laplace_hfl.bench.evaluation.training import tensor_loader

    la = Laplace(model, "classification", "all", "kron", prior_precision=PRIOR)
    t0 = time.perf_counter()
    la.fit(tensor_loader(X, y, batch_size=250))
    la(Xq[:1], link_approx="probit")
    t1 = time.perf_counter()
    la(Xq[1:2], link_approx="probit")
    return {"first_image_s": t1 - t0, "next_image_s": time.perf_counter() - t1}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/lenet_auto_rank.json")
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    from laplace_hfl.bench.evaluation.networks import train_lenet

    model, split = train_lenet()
    X, y = split.X_train[:N_TRAIN], split.y_train[:N_TRAIN]
    Xq = split.X_test[:2]
    rows = {"kfac_all_weights": _kfac(model, X, y, Xq)}
    print("kfac_all_weights", rows["kfac_all_weights"], flush=True)
    configs = {
        "auto": {"preconditioner": "auto"},
        "nystrom_64": {"preconditioner": "nystrom", "precondition_rank": 64},
        "nystrom_256": {"preconditioner": "nystrom", "precondition_rank": 256},
        "nystrom_1024": {"preconditioner": "nystrom", "precondition_rank": 1024},
    }
    for name, kw in configs.items():
        rows[name] = _row(model, X, y, Xq, **kw)
        print(name, {k: v for k, v in rows[name].items() if k != "choice"}, flush=True)
    kfac_next = rows["kfac_all_weights"]["next_image_s"]
    for name in configs:
        rows[name]["next_image_vs_kfac"] = rows[name]["next_image_s"] / kfac_next
    out = {
        "command": "python scripts/lenet_auto_rank.py",
        "network": "LeNet-5, 44,426 parameters, all weights, float32 model",
        "data": f"{N_TRAIN} MNIST training images, prior precision {PRIOR}",
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, 1 torch thread",
        "torch": torch.__version__,
        "rows": rows,
    }
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(out, fh, indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
