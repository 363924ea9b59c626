"""Solver benchmark on LeNet / MNIST: dense last layer, preconditioned all-weights CG.

``python -m laplace_hfl.bench.benchmark.solvers [--n-train 4000] [--aw-n-train 4000]``
writes ``benchmarks/results/solvers.json`` and ``solvers.png``:

(a) last-layer HFL (``solver="auto"`` -> dense Cholesky) per query against
    last-layer KFAC per query, same model, same run; its variances against
    ``FullLLLaplace`` (CurvlinopsGGN);
(b) all-weights exact HFL (``target="ggn"``, ``solver="cg"``): CG iterations to
    ``rtol`` with no preconditioner, the Nyström sketch and KFAC, at equal
    accuracy against a tight-tolerance reference solve; per-query time beside
    all-weights KFAC's. The reference solve itself is checked against
    ``FullLaplace`` on a small CNN where ``FullLaplace`` fits;
(c) peak RSS of each mode (``VmHWM`` reset through ``/proc/self/clear_refs``)
    against its documented budget.

Everything is measured in one process, one run; timings are wall-clock on
whatever machine runs it (ratios are the result, not absolute times).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
from pathlib import Path

import torch
from laplace import Laplace
from laplace.curvature import CurvlinopsGGN
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from laplace_hfl.bench.benchmark.measure import describe_device, pick_device, timed
from laplace_hfl.bench.evaluation.memory import device_peak_mb, reset_peak, rss_mb
from laplace_hfl.bench.evaluation.networks import LeNet, mnist_split, train_classifier
from laplace_hfl.bench.evaluation.predict import glm_predictive
from laplace_hfl.engine.dense import dense_budget
from laplace_hfl.engine.preconditioner import default_rank

__all__ = ["cg_run", "full_reference", "main", "run"]

PRIOR = 1.0


def _median_time(la, X: torch.Tensor, repeats: int = 7) -> float:
    """Median wall-clock seconds of the GLM predictive at ``X``."""
    ts = sorted(timed(lambda: glm_predictive(la, X))[1] for _ in range(repeats))
    return ts[repeats // 2]


def _diag_var(f_var: torch.Tensor) -> torch.Tensor:
    return torch.diagonal(f_var, dim1=-2, dim2=-1).double()


def full_reference(
    model: nn.Module, subset: str, loader: DataLoader, Xq: torch.Tensor
) -> tuple[torch.Tensor, str]:
    """Dense ``J (GGN + prior)^-1 J^T`` of ``Xq`` and what computed it.

    On the CPU laplace-torch's ``FullLaplace``/``FullLLLaplace`` with
    ``CurvlinopsGGN``. On other devices that backend cannot fit (laplace-torch
    0.3, ``laplace/curvature/curvlinops.py:141``: ``full()`` multiplies by a
    ``torch.eye`` made on the CPU), so there the reference is the project's
    own dense float64 GGN (:mod:`laplace_hfl.engine.dense`, ``solver="dense"``), whose
    agreement with ``FullLaplace`` the CPU run and the test suite check.
    """
    device = next(model.parameters()).device
    if device.type == "cpu":
        full = Laplace(
            model, "classification", subset, "full", prior_precision=PRIOR,
            backend=CurvlinopsGGN,
        )  # fmt: skip
        full.fit(loader)
        return glm_predictive(full, Xq)[1], "FullLaplace(CurvlinopsGGN)"
    dense = Laplace(
        model, "classification", subset, "hfl", prior_precision=PRIOR,
        solver="dense", compute_dtype=torch.float64,
    )  # fmt: skip
    dense.fit(loader)
    return glm_predictive(dense, Xq)[1], "dense float64 GGN (solver='dense')"


def last_layer_case(model, split, n_query: int) -> dict:
    """(a) last-layer HFL (dense) vs last-layer KFAC vs FullLLLaplace."""
    train = split.loader("train", 1000)
    Xq = split.X_test[:n_query]
    out: dict = {"n_query": n_query}
    base = reset_peak()
    la = Laplace(model, "classification", "last_layer", "hfl", prior_precision=PRIOR)
    _, out["hfl_fit_s"] = timed(lambda: la.fit(train))
    _, out["hfl_first_call_s"] = timed(lambda: la(Xq[:1]))  # forms G, factor
    (_, v_hfl), _ = timed(lambda: glm_predictive(la, Xq))
    # n_query images in one call, median of 7 calls
    out["hfl_per_query_s"] = _median_time(la, Xq) / n_query
    out["hfl_solver"] = la.last_diagnostics.solver
    P = la.n_params
    out["n_params"] = P
    out["hfl_peak_rss_mb"] = rss_mb() - base
    out["hfl_peak_device_mb"] = device_peak_mb()
    # stored: G, A, Sigma and Sigma's upper blocks for the features (<= 4 P^2);
    # while factorising ~7 P^2; plus one forward pass of a training batch
    out["dense_stored_mb"] = 4 * P * P * 8 / 2**20
    out["dense_factorising_peak_mb"] = 7 * P * P * 8 / 2**20
    out["dense_budget_mb"] = dense_budget() * 8 / 2**20

    base = reset_peak()
    kron = Laplace(model, "classification", "last_layer", "kron", prior_precision=PRIOR)
    _, out["ll_kron_fit_s"] = timed(lambda: kron.fit(train))
    out["ll_kron_fit_peak_rss_mb"] = rss_mb() - base  # its forward passes
    glm_predictive(kron, Xq[:1])
    out["ll_kron_per_query_s"] = _median_time(kron, Xq) / n_query

    # FullLLLaplace (CurvlinopsGGN) on the float32 model and on a float64 copy
    for tag, net, dtype in (
        ("", model, torch.float32),
        ("_f64", copy.deepcopy(model).double(), torch.float64),
    ):
        loader = DataLoader(
            TensorDataset(split.X_train.to(dtype), split.y_train), batch_size=1000
        )
        (v_full, out["reference"]), out[f"full_ll{tag}_fit_s"] = timed(
            lambda: full_reference(net, "last_layer", loader, Xq.to(dtype))
        )
        rel = (_diag_var(v_hfl) - _diag_var(v_full)).abs() / _diag_var(v_full)
        out[f"rel_err_vs_full_ll{tag}_max"] = float(rel.max())
        out[f"rel_err_vs_full_ll{tag}_median"] = float(rel.median())
    out["hfl_over_ll_kron_per_query"] = (
        out["hfl_per_query_s"] / out["ll_kron_per_query_s"]
    )
    # one image per call (median of 20): fixed per-call costs dominate here
    for tag, est in (("hfl", la), ("ll_kron", kron)):
        out[f"{tag}_single_query_s"] = _median_time(est, Xq[:1], repeats=21)
    out["hfl_over_ll_kron_single_query"] = (
        out["hfl_single_query_s"] / out["ll_kron_single_query_s"]
    )
    return out


def _small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 2, 5, stride=3), nn.ReLU(), nn.Flatten(), nn.Linear(128, 10)
    )  # fmt: skip


def reference_check(split, n_train: int, rtol: float) -> dict:
    """Tight-tolerance CG refits against FullLaplace on a CNN where it fits."""
    torch.manual_seed(0)
    X, y = split.X_train[:n_train], split.y_train[:n_train]
    model = train_classifier(_small_cnn().to(X.device), X, y, epochs=4)
    loader = DataLoader(TensorDataset(X, y), batch_size=n_train)
    Xq = split.X_test[:8]
    la = Laplace(
        model, "classification", "all", "hfl", prior_precision=PRIOR, solver="cg",
        rtol=rtol, max_iter=5000,
    )  # fmt: skip
    la.fit(loader)
    _, v = glm_predictive(la, Xq)
    v_full, reference = full_reference(model, "all", loader, Xq)
    rel = (_diag_var(v) - _diag_var(v_full)).abs() / _diag_var(v_full)
    return {
        "reference": reference,
        "n_params": la.n_params,
        "n_train": n_train,
        "rtol": rtol,
        "rel_err_vs_full_max": float(rel.max()),
        "rel_err_vs_full_median": float(rel.median()),
    }


def cg_run(obj, V: torch.Tensor, precond, rtol: float, max_iter: int) -> dict:
    """Preconditioned batched CG on ``A u = v`` (the refits' linear system):
    iterations, time, and the variances ``v^T u``."""
    from laplace_hfl.engine.functional import ggn_matvec
    from laplace_hfl.engine.solvers import batched_cg

    res, t = timed(
        lambda: batched_cg(
            lambda idx, W: ggn_matvec(obj, W),
            V,
            rtol * V.norm(dim=1),
            max_iter,
            precond=precond,
        )
    )
    return {
        "var": (V * res.x).sum(1).double(),
        "iterations": res.iterations,
        "converged": bool(res.converged.all()),
        "solve_s": t,
    }


def all_weights_case(
    model, split, n_train: int, n_dirs: int, rtol: float, max_iter: int,
    ranks: list[int], preconditioners: tuple[str, ...] = ("none", "kfac", "nystrom"),
) -> dict:  # fmt: skip
    """(b) CG iterations on ``(GGN + prior) u = J(x*)^T`` with no
    preconditioner, KFAC and Nyström sketches of several ranks, at equal
    accuracy against a float64 reference; per-query time beside KFAC's."""
    from laplace_hfl.engine.functional import output_jacobians

    X, y = split.X_train[:n_train], split.y_train[:n_train]
    train = DataLoader(TensorDataset(X, y), batch_size=1000)
    xq = split.X_test[:1]
    out: dict = {"n_train": n_train, "rtol": rtol, "n_directions": n_dirs}

    def setup(dtype):
        la = Laplace(
            model, "classification", "all", "hfl", prior_precision=PRIOR,
            solver="cg", compute_dtype=dtype,
        )  # fmt: skip
        la.fit(train)
        obj = la.objective()
        Js, _ = output_jacobians(obj.forward, obj.theta_map, la.query_inputs(xq))
        return la, obj, Js.detach().reshape(-1, Js.shape[-1])[:n_dirs]

    def build(la, obj, name, rank):
        la.preconditioner = name
        la.precondition_rank = rank if name == "nystrom" else None
        return timed(lambda: la.refit_preconditioner(rebuild=True)[1])

    # reference: float64, Nystrom-preconditioned, rtol 1e-9 (float32 cannot go there)
    la64, obj64, V64 = setup(torch.float64)
    M64, _ = build(la64, obj64, "nystrom", max(ranks))
    ref = cg_run(obj64, V64, M64, 1e-9, 20 * max_iter)
    out["reference"] = {
        "dtype": "float64", "rtol": 1e-9, "preconditioner": f"nystrom{max(ranks)}",
        "iterations_max": int(ref["iterations"].max()),
        "converged": ref["converged"],
    }  # fmt: skip
    del la64, obj64, M64
    la, obj, V = setup(torch.float32)
    out["n_params"] = obj.theta_map.numel()
    P = out["n_params"]
    runs = {}
    plans = [(name, 0) for name in ("none", "kfac") if name in preconditioners]
    if "nystrom" in preconditioners:
        plans += [("nystrom", r) for r in ranks]
    for name, rank in plans:
        base = reset_peak()
        M, t_build = build(la, obj, name, rank)
        run = cg_run(obj, V, M, rtol, max_iter)
        key = f"nystrom{rank}" if name == "nystrom" else name
        runs[key] = {
            "iterations_mean": float(run["iterations"].float().mean()),
            "iterations_max": int(run["iterations"].max()),
            "converged": run["converged"],
            "rel_err_vs_reference_max": float(
                ((run["var"] - ref["var"]).abs() / ref["var"]).max()
            ),
            "solve_s": run["solve_s"],
            "build_s": t_build,
            "peak_rss_mb": rss_mb() - base,
            "peak_device_mb": device_peak_mb(),
        }
        if name == "nystrom":
            runs[key]["rank"] = rank
            runs[key]["sketch_mb"] = rank * P * 4 / 2**20  # float32 compute
        print(key, json.dumps(runs[key]), flush=True)
    out["runs"] = runs
    if "none" in runs:  # the baseline, when it was run
        none = runs["none"]["iterations_mean"]
        out["iteration_reduction_vs_none"] = {
            k: none / v["iterations_mean"] for k, v in runs.items() if k != "none"
        }
    kron = Laplace(model, "classification", "all", "kron", prior_precision=PRIOR)
    _, out["kron_fit_s"] = timed(lambda: kron.fit(train))
    glm_predictive(kron, xq)
    _, out["kron_per_query_s"] = timed(lambda: glm_predictive(kron, xq))
    # per query = all C outputs of one image; the solves above did n_dirs of them
    C = 10
    out["hfl_per_query_s_est"] = {k: v["solve_s"] * C / n_dirs for k, v in runs.items()}
    return out


def run(args: argparse.Namespace) -> dict:
    device = pick_device(args.device)
    torch.manual_seed(args.seed)
    split = mnist_split(n_train=args.n_train).to(device)
    model, t_train = timed(
        lambda: train_classifier(
            LeNet().to(device), split.X_train, split.y_train, epochs=8
        )
    )
    result: dict = {
        "machine": platform.platform(),
        "device": describe_device(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "n_train": args.n_train,
        "map_train_8_epochs_s": t_train,
        "command": "python -m laplace_hfl.bench.benchmark.solvers "
        + " ".join(args.argv),
    }
    print("trained LeNet in %.1f s" % t_train, flush=True)
    if args.only in (None, "last_layer"):
        result["last_layer"] = last_layer_case(model, split, args.n_query)
        print(json.dumps(result["last_layer"], indent=1), flush=True)
    if args.only in (None, "all_weights") and args.aw_n_train > 0:
        result["reference_check"] = reference_check(split, args.ref_n_train, 1e-10)
        print(json.dumps(result["reference_check"], indent=1), flush=True)
        ranks = args.ranks or [default_rank(sum(p.numel() for p in model.parameters()))]
        result["all_weights"] = all_weights_case(
            model, split, args.aw_n_train, args.n_dirs, args.rtol, args.max_iter,
            ranks, tuple(args.preconditioners),
        )  # fmt: skip
        print(json.dumps(result["all_weights"], indent=1), flush=True)
    return result


def _figure(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    ll = result.get("last_layer")
    if ll is not None:
        axes[0].bar(
            ["LL HFL\n(dense)", "LL KFAC"],
            [ll["hfl_per_query_s"] * 1e3, ll["ll_kron_per_query_s"] * 1e3],
        )
        axes[0].set_ylabel("ms per query image")
        axes[0].set_title(f"(a) last layer, n={result['n_train']}")
    if "all_weights" in result:
        runs = result["all_weights"]["runs"]
        names = list(runs)
        axes[1].bar(names, [runs[n]["iterations_mean"] for n in names])
        axes[1].set_ylabel(f"CG iterations to rtol={result['all_weights']['rtol']:g}")
        axes[1].set_title(f"(b) all weights, n={result['all_weights']['n_train']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    import sys

    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # fmt: off
    p.add_argument("--n-train", type=int, default=4000)
    p.add_argument("--n-query", type=int, default=64)
    p.add_argument("--aw-n-train", type=int, default=1000,
                   help="training images of the all-weights case (0: skip)")
    p.add_argument("--ref-n-train", type=int, default=200)
    p.add_argument("--n-dirs", type=int, default=2,
                   help="outputs of one query image refit in case (b)")
    p.add_argument("--rtol", type=float, default=1e-4)
    p.add_argument("--max-iter", type=int, default=2000)
    p.add_argument("--ranks", type=int, nargs="*", default=[256, 1024],
                   help="Nystrom ranks")
    p.add_argument("--preconditioners", nargs="+", choices=["none", "kfac", "nystrom"],
                   default=["none", "kfac", "nystrom"],
                   help="preconditioners compared in case (b) (none is the baseline)")
    # fmt: on
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--device",
        default="auto",
        help="cpu, cuda or auto (cuda when present); ratios are within one device",
    )
    p.add_argument(
        "--only",
        choices=["last_layer", "all_weights"],
        default=None,
        help="run one part and update it in an existing --out file",
    )
    p.add_argument("--out", default="benchmarks/results/solvers.json")
    args = p.parse_args(argv)  # fmt: skip
    args.argv = argv
    result = run(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.only is not None and out.exists():  # update one part, keep the other
        previous = json.loads(out.read_text())
        parts = {"last_layer": ["last_layer"],
                 "all_weights": ["reference_check", "all_weights"]}  # fmt: skip
        runs = previous.get("runs", {})
        runs[args.only] = {k: v for k, v in result.items() if k not in
                           ("last_layer", "reference_check", "all_weights")}  # fmt: skip
        for key in parts[args.only]:
            if key in result:
                previous[key] = result[key]
        previous["runs"] = runs
        result = previous
    out.write_text(json.dumps(result, indent=1) + "\n")
    _figure(result, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
