"""Accuracy of the refit precisions: float64, float32 products with float64
recurrences (what ``compute_dtype=torch.float32`` now runs), plain float32
CG (the previous float32 behaviour), and what ``compute_dtype="auto"`` (the
default) chooses.

``python scripts/precision_choice.py [--out benchmarks/results/precision_choice.json]``
uses the test suite's 2-8-3 classification and regression networks
(``tests/conftest.py``, float64 stationary MAP; 198 query directions each) and
reports, for variance tolerances 1e-3 and 1e-6 (plain float32: residual
rtol 1e-3 and 1e-6, the bracket not being available in float32 recurrences),
the largest relative variance error against the dense float64 truth (of the
reported ``v^T u``, after the Rayleigh-Ritz step where there is a bracket), the
iterations, and whether every bracket holds the truth (to 1e-6).

For ``"auto"`` it records the rule's choice
(:func:`laplace_hfl.engine.precision.auto_compute_dtype`) for a float32 and a
float64 model on the CPU and on CUDA at the default tolerance (the CUDA choice
is the row of the same mode above), and the estimator's own prediction with
``compute_dtype="auto"`` on this machine for a float32 copy of the network
(largest relative error of ``la(x)``'s variances against the dense float64
truth of that float32 network).
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


def _case(model, X, y, likelihood):
    from conftest import PRIOR, SIGMA, dense_reference, loader
    from laplace import Laplace

    from laplace_hfl.engine.functional import ggn_matvec, output_jacobians
    from laplace_hfl.engine.preconditioner import spectrum_floor
    from laplace_hfl.engine.refit import galerkin_refine
    from laplace_hfl.engine.solvers import batched_cg, mixed_precision

    g = torch.Generator().manual_seed(1)
    Xq = X[torch.randint(len(X), (66,), generator=g)] * 1.5 + 0.3
    ref, _ = dense_reference(model, X, y, Xq, likelihood, "ggn")
    truth = ref.diagonal(0, 1, 2).flatten()
    kw = {"sigma_noise": SIGMA} if likelihood == "regression" else {}
    rows = {}
    for dtype in (torch.float64, torch.float32):
        la = Laplace(model, likelihood, "all", "hfl", prior_precision=PRIOR,
                     solver="cg", preconditioner="nystrom", precondition_rank=8,
                     compute_dtype=dtype, **kw)  # fmt: skip
        la.fit(loader(X, y))
        obj = la.objective()
        _, pre = la.refit_preconditioner()
        Js, _ = output_jacobians(obj.forward, obj.theta_map, la.query_inputs(Xq))
        V = Js.detach().reshape(-1, Js.shape[-1])
        floor = spectrum_floor(obj, pre)
        mv = lambda idx, W: ggn_matvec(obj, W)  # noqa: E731
        modes = {"float64": (mv, pre, V)} if dtype == torch.float64 else {
            "float32 products, float64 recurrences": (
                *mixed_precision(mv, pre, torch.float32), V.double()),
            "float32 (plain CG)": (mv, pre, V),
        }  # fmt: skip
        for name, (m, p, B) in modes.items():
            for tol in (1e-3, 1e-6):
                plain = B.dtype == torch.float32
                res = batched_cg(
                    m, B, (tol if plain else 1e-30) * B.norm(dim=1), 2000,
                    precond=p, spectrum_floor=None if plain else floor,
                    var_rtol=None if plain else tol,
                )  # fmt: skip
                # what the refits report: v^T u after the Rayleigh-Ritz step
                U = res.x if plain else galerkin_refine(B, res.x, res.r)
                var = (B * U).sum(1).double()
                row = {
                    "max_rel_error": float(((var - truth).abs() / truth).max()),
                    "mean_iterations": float(res.iterations.float().mean()),
                    "converged": bool(res.converged.all()),
                }
                if not plain:
                    row["bracket_holds_truth"] = bool(
                        (res.lower <= truth * (1 + 1e-6)).all()
                        and (res.upper >= truth * (1 - 1e-6)).all()
                    )
                rows[f"{name}, tol {tol:g}"] = row
    rows["auto"] = _auto_rows(model, X, y, Xq, likelihood, kw)
    return rows


def _auto_rows(model, X, y, Xq, likelihood, kw):
    """What ``compute_dtype="auto"`` picks, and its prediction's error here."""
    import copy

    from conftest import PRIOR, dense_reference, loader
    from laplace import Laplace

    from laplace_hfl.engine.precision import auto_compute_dtype
    from laplace_hfl.engine.refit import VARIANCE_RTOL

    rule = {
        f"{device}, {str(dt).removeprefix('torch.')} model": str(
            auto_compute_dtype(device, dt, VARIANCE_RTOL)[0]
        )
        for device in ("cpu", "cuda")
        for dt in (torch.float32, torch.float64)
    }
    m32 = copy.deepcopy(model).float()
    la = Laplace(m32, likelihood, "all", "hfl", prior_precision=PRIOR,
                 solver="cg", preconditioner="nystrom", precondition_rank=8,
                 **kw)  # fmt: skip
    la.fit(loader(X.float(), y if y.dtype == torch.long else y.float()))
    _, f_var = la._glm_predictive_distribution(Xq.float())
    var = f_var.diagonal(0, 1, 2).flatten().double()
    # the truth of the float32 network itself (its rounded weights and inputs)
    Xr, Xqr = X.float().double(), Xq.float().double()
    ref, _ = dense_reference(copy.deepcopy(m32).double(), Xr, y, Xqr, likelihood, "ggn")
    truth = ref.diagonal(0, 1, 2).flatten()
    return {
        "rule_at_default_tolerance": rule,
        "this_machine_float32_model": {
            "chosen": str(la.compute_dtype),
            "max_rel_error": float(((var - truth).abs() / truth).max()),
            "mean_iterations": float(la.last_diagnostics.iterations.float().mean()),
        },
    }


def _networks():
    """The test suite's 2-8-3 networks at a stationary MAP."""
    from conftest import make_classification, make_regression, train_stationary

    for name, (model, X, y), lik in (
        ("classification 2-8-3", make_classification(), "classification"),
        ("regression 2-8-3", make_regression(n=40, d_in=2, d_out=3, hidden=8, seed=1),
         "regression"),
    ):  # fmt: skip
        yield name, train_stationary(model, X, y, lik), X, y, lik


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="benchmarks/results/precision_choice.json")
    warnings.simplefilter("ignore")
    args = parser.parse_args(argv)
    out = {"command": "python scripts/precision_choice.py", "rows": {}}
    for name, model, X, y, lik in _networks():
        out["rows"][name] = _case(model, X, y, lik)
        print(name, json.dumps(out["rows"][name], indent=1), flush=True)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()
