"""``laplace-hfl benchmark``: HFL (naive, batched, amortised) against the
Hessian structures of laplace-torch and curvlinops' CG inverse, side by side
on the same models in one run. Writes ``results.json`` and PNG figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from laplace_hfl.bench.benchmark import cases as C
from laplace_hfl.bench.benchmark.methods import METHODS, timed_fit_predict
from laplace_hfl.bench.evaluation.method_row import error_text
from laplace_hfl.bench.evaluation.predict import glm_predictive
from laplace_hfl_cli import COMMANDS

__all__ = ["main", "register", "run", "CONFIGS"]

#: Default output folder per mode: a quick run never overwrites the full results.
OUT = {"full": "benchmarks/results", "quick": "benchmarks/results/quick"}

CONFIGS: dict[str, dict[str, Any]] = {
    "quick": {
        "timing_M": [16],
        "naive_queries": 4,
        "per_query_caps": {"hfl_naive": 4},
        "timing_methods": ["hfl_naive", "hfl_batched", "hfl_amortized", "full_ggn",
                           "kron", "diag", "ll_kron", "cg_inverse"],
        "iters": [1, 5, 20],
        "eps": [1e-2],
        "samples": [16, 128],
        "digits_queries": 50,
        "digits_timing": False,
        "bn_queries": 2,
        "wide": None,
        "memory_P": [1e3],
        "memory_methods": ["baseline", "map_train_step", "hfl", "full_ggn"],
        "in_between_steps": 300,
    },
    "full": {
        "timing_M": [16, 128, 1024],
        "naive_queries": 16,
        # one-direction-at-a-time methods are timed on a subset of the queries
        "per_query_caps": {"hfl_naive": 16, "cg_inverse": 64},
        "timing_methods": list(METHODS),
        "iters": [1, 2, 5, 10, 20, 50],
        "eps": [1e-3, 1e-2, 1e-1],
        "samples": [16, 64, 256, 1024],
        "digits_queries": 200,
        "digits_timing": True,
        "bn_queries": 8,
        "wide": {"width": 300, "n": 256, "M": 128, "naive_queries": 1},
        "memory_P": [1e3, 1e4, 1e5, 1e6],
        "memory_methods": ["baseline", "map_train_step", "hfl", "full_ggn", "kron",
                           "diag"],
        "in_between_steps": 2000,
    },
}  # fmt: skip


def _rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float(((a - ref).abs() / ref.abs()).median())


def _spearman(a: torch.Tensor, ref: torch.Tensor) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a.flatten().numpy(), ref.flatten().numpy())[0])


def _diag(var: torch.Tensor) -> torch.Tensor:
    return torch.diagonal(var, 0, -2, -1) if var.ndim == 3 else var


def _reference(case: C.Case) -> torch.Tensor:
    """FullLaplace GGN on a float64 copy: the exact reference (diagonal)."""
    import copy

    c64 = copy.copy(case)
    c64.model = copy.deepcopy(case.model).double()
    c64.train_xy = (
        case.X.double(),
        case.y.double() if case.likelihood == "regression" else case.y,
    )
    out = timed_fit_predict(c64, "full_ggn", case.Xq.double())
    return _diag(out["f_var"])


def _log(msg: str) -> None:
    print(f"[benchmark {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def accuracy_exact(case: C.Case, ref, cfg) -> list[dict]:
    """Error vs the CG budget: ``max_iter`` per solve, one Newton correction.

    With the default ``max_newton`` a small ``max_iter`` is compensated by more
    corrections, so the budget is capped here (``max_newton=1``) to expose the
    trade-off, with and without the Nystrom preconditioner.
    """
    rows = []
    for precond in (0, None):
        for eps in cfg["eps"]:
            for it in cfg["iters"]:
                out = timed_fit_predict(
                    case, "hfl_batched", case.Xq, max_iter=it, max_newton=1, eps=eps,
                    precondition_rank=precond,
                )  # fmt: skip
                d = _diag(out["f_var"])
                rows.append({
                    "case": case.name, "eps": eps, "max_iter": it,
                    "preconditioned": precond is None,
                    "median_rel_err": _rel_err(d, ref), "spearman": _spearman(d, ref),
                    "predict_s": out["predict_s"],
                })  # fmt: skip
    return rows


def accuracy_amortized(case: C.Case, ref, cfg) -> list[dict]:
    rows = []
    for S in cfg["samples"]:
        out = timed_fit_predict(case, "hfl_amortized", case.Xq, amortize=S)
        d = _diag(out["f_var"])
        rows.append({"case": case.name, "samples": S, "median_rel_err": _rel_err(d, ref),
                     "spearman": _spearman(d, ref), "fit_s": out["fit_s"],
                     "predict_s": out["predict_s"],
                     "per_query_s": out["predict_s"] / len(case.Xq)})  # fmt: skip
    return rows


DIGITS_TIMING = ["hfl_amortized", "full_ggn", "kron", "diag", "ll_kron"]


def timing(case: C.Case, methods: list[str], cfg) -> list[dict]:
    rows = []
    g = torch.Generator().manual_seed(1)
    lo, hi = float(case.Xq.min()), float(case.Xq.max())
    for M in cfg["timing_M"]:
        Xq = lo + (hi - lo) * torch.rand(M, case.X.shape[1], generator=g)
        Xq = Xq.sort(0).values if case.X.shape[1] == 1 else Xq
        ref = None
        for method in methods:
            n = min(M, cfg["per_query_caps"].get(method, M))
            try:
                out = timed_fit_predict(case, method, Xq[:n])
            except Exception as err:  # recorded: a method may refuse a model
                rows.append({"case": case.name, "method": method, "M": M,
                             "error": error_text(err, 200, first_line=False)})  # fmt: skip
                continue
            d = _diag(out["f_var"])
            if method == "full_ggn":
                ref = d
            row = {"case": case.name, "method": method, "label": METHODS[method].label,
                   "M": M, "measured_queries": n, "fit_s": out["fit_s"],
                   "predict_s_per_query": out["predict_s"] / n,
                   "total_s_per_query": (out["fit_s"] + out["predict_s"] * M / n) / M,
                   "_diag": d}  # fmt: skip
            rows.append(row)
        for row in rows:
            if row.get("M") == M and "_diag" in row:
                d = row.pop("_diag")
                if ref is not None:
                    row["median_rel_err_vs_full_ggn"] = _rel_err(d, ref[: len(d)])
        _log(f"timing {case.name} M={M} done")
    return rows


def wide_speedup(cfg) -> dict:
    """Naive vs batched exact HFL on a ~94k-parameter MLP, both to full tolerance."""
    w = cfg["wide"]
    case = C.wide_mlp(width=w["width"], n=w["n"], n_query=w["M"])
    out = {"case": case.name, "n_params": case.n_params, "n_train": w["n"],
           "M": w["M"]}  # fmt: skip
    nq = w["naive_queries"]
    runs = {}
    for method in ("hfl_naive", "hfl_batched"):
        Xq = case.Xq[:nq] if method == "hfl_naive" else case.Xq
        runs[method] = timed_fit_predict(case, method, Xq)
        out[f"{method}_s_per_query"] = runs[method]["predict_s"] / len(Xq)
        _log(f"wide {method}: {out[f'{method}_s_per_query']:.2f} s/query")
    naive = _diag(runs["hfl_naive"]["f_var"])
    batched = _diag(runs["hfl_batched"]["f_var"])
    out["median_rel_diff_batched_vs_naive"] = _rel_err(batched[: len(naive)], naive)
    out["speedup"] = out["hfl_naive_s_per_query"] / out["hfl_batched_s_per_query"]
    out["note"] = (
        "Both to the default tolerance (rtol=1e-6). Naive: one query direction "
        "at a time with plain CG; batched: 256 directions per solve with the "
        "Nystrom preconditioner (built once per fit). Batched plain CG is not "
        "run here: ~1200 iterations x 128 directions is hours on 2 CPU cores."
    )
    return out


def memory(cfg) -> list[dict]:
    rows = []
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    for P in cfg["memory_P"]:
        for method in cfg["memory_methods"]:
            cmd = [
                sys.executable,
                "-m",
                "laplace_hfl.bench.benchmark.memory",
                method,
                str(P),
            ]
            try:
                res = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env,
                                     timeout=300)  # fmt: skip
                line = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
                row = (
                    json.loads(line[-1])
                    if line
                    else {"method": method, "status": f"no output: {res.stderr[-300:]}"}
                )
            except subprocess.TimeoutExpired:
                row = {"method": method, "status": "timeout (300 s)"}
            row["target_params"] = P
            rows.append(row)
            _log(f"memory P={P:.0e} {method}: {row.get('status')} "
                 f"{row.get('peak_rss_mb')}")  # fmt: skip
    return rows


def kfac_refused(cfg) -> dict:
    case = C.batchnorm_digits(n_query=cfg["bn_queries"])
    out: dict[str, Any] = {"case": case.name, "n_params": case.n_params}
    for method, backend in (("kron", "AsdlGGN"), ("kron", "BackPackGGN"),
                            ("kron", "CurvlinopsGGN")):  # fmt: skip
        key = f"kron_{backend}"
        try:
            la = __import__("laplace").Laplace(
                __import__("copy").deepcopy(case.model), "classification", "all", "kron",
                backend=getattr(__import__("laplace.curvature", fromlist=[backend]), backend),
            )  # fmt: skip
            la.fit(case.loader())
            glm_predictive(la, case.Xq)
            out[key] = "ran (no error)"
        except Exception as err:
            out[key] = error_text(err, first_line=False)
    hfl = timed_fit_predict(case, "hfl_batched", case.Xq)
    d = _diag(hfl["f_var"])
    out["hfl_predict_s"] = hfl["predict_s"]
    out["hfl_mean_variance"] = float(d.mean())
    try:
        ref = _reference(case)
        out["hfl_median_rel_err_vs_full_ggn"] = _rel_err(d, ref)
        out["hfl_spearman_vs_full_ggn"] = _spearman(d, ref)
    except Exception as err:
        out["full_ggn"] = error_text(err, first_line=False)
    return out


def run(mode: str = "full", out_dir: str | Path = "benchmarks/results") -> dict:
    """Run the benchmark; returns the results dict (also written to disk)."""
    cfg = CONFIGS[mode]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    results: dict[str, Any] = {
        "meta": {
            "mode": mode,
            "command": "python -m laplace_hfl.bench.benchmark" + (" --quick" if mode == "quick" else ""),
            "device": "CPU",
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "sigma_noise": C.SIGMA,
            "prior_precision": C.PRIOR,
            "note": "Times are wall-clock seconds on CPU; every method uses the same "
                    "fixed sigma_noise and prior precision; references are FullLaplace "
                    "(CurvlinopsGGN) in float64 on the same model.",
        }
    }  # fmt: skip
    warnings.simplefilter("ignore")
    _log(f"{mode} run, results to {out_dir}/: training the in-between and digits "
         "models, then the float64 references")  # fmt: skip
    ib = C.in_between(steps=cfg["in_between_steps"])
    dg = C.digits(n_query=cfg["digits_queries"])
    ref_ib, ref_dg = _reference(ib), _reference(dg)
    _log("references done")
    results["accuracy_exact"] = accuracy_exact(ib, ref_ib, cfg)
    _log("exact accuracy done")
    results["accuracy_amortized"] = accuracy_amortized(ib, ref_ib, cfg) + \
        accuracy_amortized(dg, ref_dg, cfg)  # fmt: skip
    _log("amortised accuracy done")
    results["timing"] = timing(ib, cfg["timing_methods"], cfg)
    if cfg["digits_timing"]:
        results["timing"] += timing(dg, DIGITS_TIMING, {**cfg, "timing_M": [16, 128]})
    if cfg["wide"]:
        results["wide_speedup"] = wide_speedup(cfg)
        _log("wide MLP done")
    results["kfac_refused"] = kfac_refused(cfg)
    _log("KFAC-refused network done")
    results["memory"] = memory(cfg)
    results["meta"]["total_s"] = time.perf_counter() - t_start
    with open(out_dir / "results.json", "w") as fh:
        json.dump(results, fh, indent=1)
    try:
        from laplace_hfl.bench.benchmark.plots import plot_all

        results["meta"]["figures"] = plot_all(results, out_dir)
        with open(out_dir / "results.json", "w") as fh:
            json.dump(results, fh, indent=1)
    except Exception as err:  # figures are optional; numbers are not
        _log(f"plotting failed: {err}")
    _log(f"wrote {out_dir} in {results['meta']['total_s']:.0f} s")
    return results


SECTIONS = ("accuracy_exact",)


def update(sections: list[str], mode: str, out_dir: str | Path) -> dict:
    """Recompute ``sections`` of an existing ``results.json`` and redraw figures."""
    cfg = CONFIGS[mode]
    out_dir = Path(out_dir)
    results = json.loads((out_dir / "results.json").read_text())
    warnings.simplefilter("ignore")
    _log(f"{mode} run, results to {out_dir}/: training the in-between and digits "
         "models, then the float64 references")  # fmt: skip
    ib = C.in_between(steps=cfg["in_between_steps"])
    if "accuracy_exact" in sections:
        results["accuracy_exact"] = accuracy_exact(ib, _reference(ib), cfg)
        _log("exact accuracy done")
    results["meta"]["updated_sections"] = sorted(
        set(results["meta"].get("updated_sections", [])) | set(sections)
    )
    from laplace_hfl.bench.benchmark.plots import plot_all

    results["meta"]["figures"] = plot_all(results, out_dir)
    (out_dir / "results.json").write_text(json.dumps(results, indent=1))
    return results


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true",
                        help="smaller smoke run instead of the full benchmark, "
                        "written to its own folder")  # fmt: skip
    parser.add_argument("--only", nargs="+", choices=SECTIONS, default=None,
                        help="recompute these sections of an existing results.json")  # fmt: skip
    parser.add_argument("--out", default=None,
                        help="output folder for results.json and PNGs (default: "
                        f"{OUT['full']}; {OUT['quick']} with --quick)")  # fmt: skip


def _run_from_args(args: argparse.Namespace) -> int:
    mode = "quick" if args.quick else "full"
    out = OUT[mode] if args.out is None else args.out
    if args.only:
        update(args.only, mode, out)
    else:
        run(mode, out)
    return 0


def _plain_doc() -> str:
    """The module docstring without reStructuredText markup (for ``--help``)."""
    return " ".join((__doc__ or "").replace("``", "").split())


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``benchmark`` subcommand to an argparse ``subparsers`` object."""
    parser = subparsers.add_parser(
        "benchmark", help=COMMANDS["benchmark"],
        description=_plain_doc(),
    )  # fmt: skip
    _add_arguments(parser)
    parser.set_defaults(func=_run_from_args)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m laplace_hfl.bench.benchmark",
                                     description=_plain_doc())  # fmt: skip
    _add_arguments(parser)
    return _run_from_args(parser.parse_args(argv))
