"""Amortised HFL at training cost on LeNet / MNIST.

``python -m laplace_hfl.bench.benchmark.amortized`` trains the LeNet MAP (8 epochs,
timed), fits all-weights KFAC and amortised HFL (``amortize=S`` drawn by
minibatch sample-then-optimise, ``minibatch_epochs=E``) on the same model in the
same run, and compares the amortised predictive variances on ``n_test`` test
images with the exact GGN-Laplace variance ``J (GGN + prior)^{-1} J^T`` (the limit
of exact HFL with ``target="ggn"``), computed densely in float64 in its dual
(Woodbury) form from the training Jacobians: ``(1/d) (J* J*^T - J* Jh^T (d I +
Jh Jh^T)^{-1} Jh J*^T)`` with ``Jh_n = L_n^T J_n``, ``L_n L_n^T = Lambda_n``
(``N C x N C`` kernel: cheap for ``N`` up to ~1000). Above that
(``--reference cg``, the default for ``N > 1500``: at ``N = 4000`` the dual
needs 12.8 GB for the kernel and 14 GB for the Jacobians) the reference is
exact HFL itself: batched CG on ``(GGN + prior) u = J(x*)^T e_c`` for the
predicted class ``c`` of each test image, preconditioned by the estimator's
own Nyström sketch, to ``rtol`` 1e-5 (float32 CG at rtol 1e-4 is within 1.2e-4
of a float64 rtol-1e-9 solve on this LeNet: ``solvers_aw_n4000.json``). Writes
``benchmarks/results/amortized_lenet.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
from laplace import Laplace
from scipy.stats import spearmanr
from torch.func import functional_call, jacrev, vmap

import laplace_hfl  # noqa: F401  (registers hessian_structure="hfl")
from laplace_hfl.bench.benchmark.measure import describe_device, pick_device, timed
from laplace_hfl.bench.evaluation.networks import mnist_split, train_lenet
from laplace_hfl.bench.evaluation.predict import glm_predictive
from laplace_hfl.errors import RefitConvergenceWarning

__all__ = ["dual_variances", "main", "run"]

OUT = Path("benchmarks/results/amortized_lenet.json")


def _jacobians(model64, X: torch.Tensor, chunk: int = 25) -> torch.Tensor:
    """Per-example output Jacobians ``(n, C, P)`` of a float64 model."""
    params = {n: p.detach() for n, p in model64.named_parameters()}
    names = list(params)

    def f(flat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        chunks = torch.split(flat, [params[n].numel() for n in names])
        ps = {n: c.reshape(params[n].shape) for n, c in zip(names, chunks)}
        return functional_call(model64, ps, (x[None],))[0]

    theta = torch.cat([params[n].flatten() for n in names])
    out = []
    for i in range(0, X.shape[0], chunk):
        xb = X[i : i + chunk].double()
        out.append(vmap(jacrev(f), in_dims=(None, 0))(theta, xb).detach())
    return torch.cat(out)


def dual_variances(model, X_train, X_test, prior: float) -> torch.Tensor:
    """Exact ``diag(J* (GGN + prior I)^{-1} J*^T)`` per test image ``(B, C)``."""
    model64 = copy.deepcopy(model).double().eval()
    with torch.no_grad():
        p = torch.softmax(model64(X_train.double()), -1)
    J = _jacobians(model64, X_train)  # (n, C, P)
    s = p.sqrt()
    # L^T J with L = diag(sqrt p) - p sqrt(p)^T  (L L^T = diag(p) - p p^T)
    LtJ = s[:, :, None] * J - s[:, :, None] * torch.einsum("nc,ncp->np", p, J)[:, None]
    del J
    Jh = LtJ.reshape(-1, LtJ.shape[-1])
    del LtJ
    K = Jh @ Jh.T
    K.diagonal().add_(prior)
    Jq = _jacobians(model64, X_test)  # (B, C, P)
    B, C, P = Jq.shape
    Jqf = Jq.reshape(-1, P)
    cross = Jqf @ Jh.T  # (B C, N C)
    sol = torch.linalg.solve(K, cross.T)  # (N C, B C)
    var = ((Jqf * Jqf).sum(1) - (cross * sol.T).sum(1)) / prior
    return var.reshape(B, C)


def cg_variances(
    la, X_test: torch.Tensor, rtol: float = 1e-5, max_iter: int = 2000
) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Exact ``e_c^T J* (GGN + prior I)^{-1} J*^T e_c`` for the predicted
    class ``c`` of each test image, by batched CG (the refits' own system).

    Uses the objective and the Nyström preconditioner of the fitted
    estimator ``la``; returns ``(variances (B,), classes (B,), info)``.
    """
    from laplace_hfl.bench.benchmark.solvers import cg_run
    from laplace_hfl.engine.batches import eval_mode
    from laplace_hfl.engine.functional import output_jacobians

    with eval_mode(la.model):
        obj = la.objective()
        Js, f = output_jacobians(obj.forward, obj.theta_map, la.query_inputs(X_test))
        cls = f.argmax(-1)
        V = Js.detach()[torch.arange(len(cls), device=cls.device), cls]  # (B, P)
        res = cg_run(obj, V, la.refit_preconditioner()[1], rtol, max_iter)
    info = {
        "iterations_max": int(res["iterations"].max()),
        "converged": res["converged"],
        "rtol": rtol,
    }
    return res["var"], cls, info


def _spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(
        spearmanr(a.flatten().cpu().numpy(), b.flatten().cpu().numpy()).statistic
    )


def _timed(fn, label: str = ""):
    out, dt = timed(fn)
    if label:
        print(f"{label}: {dt:.2f} s", file=sys.stderr, flush=True)
    return out, dt


def run(
    n_train: int = 1000,
    n_test: int = 64,
    samples: int = 64,
    epochs: int = 4,
    precondition_rank: int = 0,
    compute_dtype: torch.dtype = torch.float32,
    threads: int | None = None,
    batch_size: int = 64,
    reference: str = "auto",
    device: str = "auto",
) -> dict[str, Any]:
    """Measure fit and per-query time and accuracy; returns the result dict."""
    if threads:
        torch.set_num_threads(threads)
    dev = pick_device(device)
    split = mnist_split(n_train=n_train).to(dev)
    (model, _), t_train = _timed(lambda: train_lenet(split, epochs=8), "MAP 8 epochs")
    Xq = split.X_test[:n_test]
    loader = split.loader("train", batch_size=64)
    hfl_loader = split.loader("train", batch_size=batch_size)
    prior = 2 * 5e-4 * n_train  # the Adam weight decay of train_lenet as a prior

    kfac = Laplace(model, "classification", "all", "kron", prior_precision=prior)
    _, t_kfac_fit = _timed(lambda: kfac.fit(loader), "KFAC fit")
    (_, var_kfac), t_kfac_q = _timed(lambda: glm_predictive(kfac, Xq), "KFAC predict")

    hfl = Laplace(
        model, "classification", "all", "hfl", prior_precision=prior,
        amortize=samples, minibatch_epochs=epochs or None, chunk_size=samples,
        compute_dtype=compute_dtype, precondition_rank=precondition_rank,
    )  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RefitConvergenceWarning)
        _, t_hfl_fit = _timed(lambda: hfl.fit(hfl_loader), "HFL amortised fit")
    (_, var_hfl), t_hfl_q = _timed(lambda: glm_predictive(hfl, Xq), "HFL predict")
    state = hfl.amortized_samples()

    if reference == "auto":
        reference = "dual" if n_train <= 1500 else "cg"
    est = torch.diagonal(var_hfl, 0, 1, 2).double()
    kf = torch.diagonal(var_kfac, 0, 1, 2).double()
    if reference == "dual":
        ref, t_ref = _timed(
            lambda: dual_variances(model, split.X_train, Xq, prior), "reference"
        )
        ref_info = {"method": "dense dual (Woodbury) GGN-Laplace, float64"}
    else:  # one output per image: the predicted class
        (ref, cls, ref_info), t_ref = _timed(lambda: cg_variances(hfl, Xq), "reference")
        rows = torch.arange(len(cls), device=cls.device)
        est, kf = est[rows, cls], kf[rows, cls]
        ref_info["method"] = (
            "exact HFL (ggn) by batched CG, Nystrom-preconditioned, predicted "
            "class of each test image"
        )
    rel = ((est - ref).abs() / ref).flatten()
    rel_kfac = ((kf - ref).abs() / ref).flatten()
    return {
        "config": {
            "n_train": n_train, "n_test": n_test, "samples": samples,
            "minibatch_epochs": epochs, "hfl_batch_size": batch_size, "prior_precision": prior,
            "precondition_rank": precondition_rank, "compute_dtype": str(compute_dtype),
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            "machine": platform.processor() or platform.machine(),
            "device": describe_device(dev),
        },
        "map_train_8_epochs_s": t_train,
        "kfac": {"fit_s": t_kfac_fit, "per_query_s": t_kfac_q / n_test,
                 "median_rel_err_var": float(rel_kfac.median()),
                 "spearman": _spearman(kf, ref)},
        "hfl_amortized": {
            "fit_s": t_hfl_fit,
            "fit_over_map_training": t_hfl_fit / t_train,
            "per_query_s": t_hfl_q / n_test,
            "per_query_over_kfac": t_hfl_q / t_kfac_q,
            "median_rel_err_var": float(rel.median()),
            "spearman": _spearman(est, ref),
            "residual_median": float(state.residual.median()),
            "residual_max": float(state.residual.max()),
            "sgd_steps_or_cg_iterations_max": int(state.iterations.max()),
            "solver": "full-batch CG" if not epochs else "minibatch SGD",
            "warnings": [str(w.message) for w in caught],
        },
        "reference": {**ref_info, "time_s": t_ref},
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # fmt: off
    ap.add_argument("--n-train", type=int, default=1000)
    ap.add_argument("--n-test", type=int, default=64)
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=4,
                    help="minibatch SGD epochs per sample; 0: full-batch CG (exact to rtol)")
    ap.add_argument("--precondition-rank", type=int, default=0)
    ap.add_argument("--float64", action="store_true")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--reference", choices=["auto", "dual", "cg"], default="auto",
                    help="exact variances: dense dual (N <= ~1500) or CG (auto: by N)")
    ap.add_argument("--device", default="auto",
                    help="cpu, cuda or auto (cuda when present)")
    # fmt: on
    ap.add_argument("--out", type=Path, default=OUT)
    a = ap.parse_args(argv)
    res = run(
        a.n_train, a.n_test, a.samples, a.epochs, a.precondition_rank,
        torch.float64 if a.float64 else torch.float32, a.threads, a.batch_size,
        a.reference, a.device,
    )  # fmt: skip
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
