"""The variance-bracket stop against the residual rule, at equal accuracy.

``python scripts/bracket_stop.py [--out benchmarks/results/bracket_stop.json]``
trains the test suite's three networks (``tests/conftest.py``: 1-10-1 and
2-8-3 tanh regression, 2-8-3 classification, float64, stationary MAP), and for
200 query directions each, all weights and last layer, with the shell's
preconditioner choice, solves ``(GGN + prior) u = v`` by batched CG:

* the variance stop (bracket within 1e-3, the default);
* the residual rule at rtol 1e-6 (the default before the brackets) and the
  loosest rtol of 1e-1 ... 1e-8 whose largest variance error is at most the
  bracket stop's (equal accuracy).

It records CG products (data passes x directions) and the largest relative
error of ``v^T u`` against the dense float64 truth; and whether every bracket
holds the truth.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings

import torch

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(HERE, "tests"))


def _case(name, model, X, y, likelihood, subset):
    from conftest import PRIOR, SIGMA, dense_reference, loader
    from laplace import Laplace

    from laplace_hfl.engine.functional import ggn_matvec, output_jacobians
    from laplace_hfl.engine.preconditioner import spectrum_floor
    from laplace_hfl.engine.refit import galerkin_refine
    from laplace_hfl.engine.solvers import batched_cg

    kw = {"sigma_noise": SIGMA} if likelihood == "regression" else {}
    la = Laplace(model, likelihood, subset, "hfl", prior_precision=PRIOR,
                 solver="cg", **kw)  # fmt: skip
    la.fit(loader(X, y))
    obj = la.objective()
    g = torch.Generator().manual_seed(1)
    C = y.shape[1] if y.ndim > 1 else (1 if likelihood == "regression" else 3)
    Xq = X[torch.randint(len(X), (200 // C,), generator=g)] * 1.5 + 0.3
    ref, _ = dense_reference(model, X, y, Xq, likelihood, "ggn", subset != "all")
    truth = ref.diagonal(0, 1, 2).flatten()
    Js, _ = output_jacobians(obj.forward, obj.theta_map, la.query_inputs(Xq))
    V = Js.detach().reshape(-1, Js.shape[-1])
    name, pre = la.refit_preconditioner()
    floor = spectrum_floor(obj, pre)

    def solve(rtol, var_rtol=None):
        res = batched_cg(
            lambda idx, W: ggn_matvec(obj, W), V, rtol * V.norm(dim=1), 5000,
            precond=pre, spectrum_floor=floor, var_rtol=var_rtol,
        )  # fmt: skip
        # what the refits report: v^T u after the Rayleigh-Ritz step
        U = galerkin_refine(V, res.x, res.r) if var_rtol else res.x
        err = float(((truth - (V * U).sum(1)).abs() / truth).max())
        if not var_rtol:  # the plain CG estimate
            err = float(((truth - (V * res.x).sum(1)).abs() / truth).max())
        inside = bool(
            (res.lower <= truth * (1 + 1e-10)).all()
            and (res.upper >= truth * (1 - 1e-10)).all()
        )
        return res, err, inside

    res, err, inside = solve(1e-30, 1e-3)
    gauss = float(((truth - res.lower) / truth).max())
    row = {"directions": V.shape[0], "preconditioner": name,
           "bracket_stop": {"products": res.products, "max_rel_error": err,
                            "bracket_holds_truth": inside,
                            "max_rel_error_gauss_bound": gauss}}  # fmt: skip
    _, _, inside_all = solve(1e-30, None)  # brackets at every iteration to the end
    row["bracket_holds_truth_at_convergence"] = inside_all
    r6, e6, _ = solve(1e-6)
    row["residual_rtol_1e-6"] = {"products": r6.products, "max_rel_error": e6}
    for k in range(1, 9):
        rk, ek, _ = solve(10.0**-k)
        if ek <= gauss:  # the certified end of the bracket stop
            row["residual_equal_accuracy"] = {
                "rtol": 10.0**-k,
                "products": rk.products,
                "max_rel_error": ek,
            }
            break
    print(name, subset, json.dumps(row), flush=True)
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="benchmarks/results/bracket_stop.json")
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore")
    from conftest import make_classification, make_regression, train_stationary

    nets = {
        "regression_1d": (make_regression(), "regression"),
        "regression_multi": (
            make_regression(n=40, d_in=2, d_out=3, hidden=8, seed=1), "regression",
        ),
        "classification": (make_classification(), "classification"),
    }  # fmt: skip
    rows = {}
    for name, ((model, X, y), lik) in nets.items():
        train_stationary(model, X, y, lik)
        for subset in ("all", "last_layer"):
            rows[f"{name}/{subset}"] = _case(name, model, X, y, lik, subset)
    out = {"command": "python scripts/bracket_stop.py", "rows": rows}
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()
