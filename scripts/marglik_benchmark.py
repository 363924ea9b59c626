"""Marginal-likelihood prior tuning: HFL vs FullLaplace vs KFAC, same models.

Rerunnable source of the numbers in ``docs/marglik.md``::

    OMP_NUM_THREADS=2 python scripts/marglik_benchmark.py          # ~5 min, 2 cores
    python scripts/marglik_benchmark.py --skip-wide               # small models only
    python scripts/marglik_benchmark.py --float64-check           # seconds

The benchmark models are float32, so FullLaplace forms and factorises its
matrix in float32 while HFL computes in float64; ``--float64-check`` reruns the
in-between case with the model in float64, where the two agree.

For every model it fits each method, runs laplace-torch's default tuning
``optimize_prior_precision(method="marglik")`` (Adam, 100 steps, scalar prior)
and records the wall time, the tuned prior precision and the log marginal
likelihood at it; for HFL also the fixed-point fast path
(``fixed_point=True``) and the log-determinant's standard error. FullLaplace is
skipped where its ``P x P`` float64 matrix would exceed ``--dense-limit-gb``.
Writes ``benchmarks/results/marglik.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import warnings
from pathlib import Path

import torch
from laplace import Laplace
from laplace.curvature import BackPackGGN

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import laplace_hfl  # noqa: E402, F401
from laplace_hfl.bench.benchmark import cases as C  # noqa: E402


def _run(case: C.Case, structure: str, fixed_point: bool = False) -> dict:
    kw = {"sigma_noise": case.sigma_noise} if case.likelihood == "regression" else {}
    if structure == "full":
        kw["backend"] = BackPackGGN
    la = Laplace(case.model, case.likelihood, "all", structure, **kw)
    t0 = time.perf_counter()
    la.fit(case.loader())
    t1 = time.perf_counter()
    if fixed_point:
        la.optimize_prior_precision(method="marglik", fixed_point=True)
    else:
        la.optimize_prior_precision(method="marglik")
    t2 = time.perf_counter()
    lml = float(la.log_marginal_likelihood().detach())
    row = {
        "method": f"{structure}{'_fixed_point' if fixed_point else ''}",
        "fit_s": t1 - t0,
        "tune_s": t2 - t1,
        "prior_precision": float(la.prior_precision),
        "log_marglik": lml,
    }
    info = getattr(la, "last_logdet", None)
    if info is not None:
        row.update(
            logdet=info.value,
            logdet_stderr=info.stderr,
            n_probes=info.n_probes,
            lanczos_steps=info.lanczos_steps,
            exact=info.exact,
        )
    if fixed_point:
        row["fixed_point_iterations"] = la.last_fixed_point.iterations
    return row


def _case_rows(case: C.Case, dense_limit_gb: float) -> dict:
    P = case.n_params
    dense_gb = P * P * 8 / 2**30
    rows = []
    for structure, fp in (
        ("hfl", False),
        ("hfl", True),
        ("full", False),
        ("kron", False),
    ):
        if structure == "full" and dense_gb > dense_limit_gb:
            rows.append(
                {
                    "method": "full",
                    "skipped": f"P x P float64 posterior precision needs "
                    f"{dense_gb:.1f} GiB (> {dense_limit_gb} GiB)",
                }
            )
            continue
        print(f"  {case.name}: {structure}{' fixed point' if fp else ''}", flush=True)
        rows.append(_run(case, structure, fp))
    ref = next(
        (r for r in rows if r["method"] == "full" and "prior_precision" in r), None
    )
    for r in rows:
        if ref is not None and "prior_precision" in r:
            r["prior_rel_to_full"] = r["prior_precision"] / ref["prior_precision"] - 1
    return {"case": case.name, "n_params": P, "n_data": len(case.X), "rows": rows}


def float64_check() -> None:
    """In-between case in float32 and float64: FullLaplace vs HFL marglik prior."""
    import copy

    from torch.utils.data import DataLoader, TensorDataset

    case = C.in_between()
    m64 = copy.deepcopy(case.model).double()
    data64 = TensorDataset(case.X.double(), case.y.double())
    for model, data, tag in (
        (case.model, case.loader(), "float32"),
        (m64, DataLoader(data64, batch_size=len(case.X)), "float64"),
    ):
        for structure in ("full", "hfl"):
            kw = {"backend": BackPackGGN} if structure == "full" else {}
            la = Laplace(model, "regression", "all", structure, sigma_noise=0.1, **kw)
            la.fit(data)
            la.optimize_prior_precision()
            lml = float(la.log_marginal_likelihood().detach())
            print(
                f"{tag} {structure:4s} marglik prior {float(la.prior_precision):.8f}"
                f"  log marglik {lml:.8f}"
            )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/marglik.json"))
    p.add_argument("--skip-wide", action="store_true", help="skip the ~94k model")
    p.add_argument("--width", type=int, default=300, help="wide MLP width")
    p.add_argument("--dense-limit-gb", type=float, default=4.0)
    p.add_argument("--float64-check", action="store_true")
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    if args.float64_check:
        float64_check()
        return
    torch.manual_seed(0)
    cases = [C.in_between(), C.digits()]
    if not args.skip_wide:
        cases.append(C.wide_mlp(width=args.width, n=500))
    t0 = time.perf_counter()
    results = [_case_rows(case, args.dense_limit_gb) for case in cases]
    out = {
        "description": "laplace-torch's optimize_prior_precision(method='marglik') "
        "(Adam, 100 steps, scalar prior) per method; HFL also fixed_point=True",
        "platform": platform.platform(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "total_s": time.perf_counter() - t0,
        "cases": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    for res in results:
        print(f"{res['case']} (P={res['n_params']})")
        for r in res["rows"]:
            if "skipped" in r:
                print(f"  {r['method']:16s} skipped: {r['skipped']}")
                continue
            extra = ""
            if "logdet_stderr" in r:
                extra = f"  logdet {r['logdet']:.1f} +- {r['logdet_stderr']:.1f}"
            rel = r.get("prior_rel_to_full")
            rel_s = "" if rel is None else f" ({rel:+.2%} vs full)"
            print(
                f"  {r['method']:16s} prior {r['prior_precision']:.4g}{rel_s}  "
                f"lml {r['log_marglik']:.2f}  fit {r['fit_s']:.2f}s  "
                f"tune {r['tune_s']:.2f}s{extra}"
            )
    print(f"wrote {args.out} ({out['total_s']:.0f} s)")


if __name__ == "__main__":
    main()
