"""Terminal table, CSV / JSON files and figures of a comparison."""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from laplace_hfl.bench.evaluation.results import ComparisonResult

__all__ = [
    "format_table",
    "format_header",
    "format_legend",
    "write_results",
    "write_rows",
    "LEGEND",
]

_COMMON_HEAD = [("method", "method", "s"), ("structure", "structure", "s")]
_COMMON_TAIL = [
    ("var_rel_err_vs_hessian", "relerr_H", ".2e"), ("var_spearman_vs_hessian", "rho_H", ".3f"),
    ("var_rel_err_vs_ggn", "relerr_GGN", ".2e"), ("var_spearman_vs_ggn", "rho_GGN", ".3f"),
    ("fit_s", "fit_s", ".2f"), ("predict_s_per_point", "ms/pt", "ms"),
    ("peak_mem_mb", "MiB", ".3g"),
]  # fmt: skip
_REGRESSION = [
    ("rmse", "rmse", ".3f"), ("nll", "nll", ".3f"), ("coverage95", "cov95", ".3f"),
    ("coverage95_gap", "cov95_gap", ".3f"), ("coverage95_data", "cov95_data", ".3f"),
    ("var_ratio_gap_data", "var_gap/data", ".3g"),
]  # fmt: skip
_CLASSIFICATION = [
    ("accuracy", "acc", ".3f"), ("nll", "nll", ".3f"), ("ece", "ece", ".3f"),
    ("brier", "brier", ".3f"), ("ood_auroc", "ood_auroc", ".3f"),
    ("ood_auroc_var", "ood_auroc_var", ".3f"),
]  # fmt: skip


#: One line per table column: what it measures and which way is better.
LEGEND = {
    "method": "registry name (laplace-hfl compare --list)",
    "structure": "posterior structure (hfl-ggn / hfl-hessian: HFL refits; full, kron, "
    "diag; ll-*: last layer only)",
    "status": "ok, or failed (error listed under the table)",
    "rmse": "root mean squared error of the predictive mean on the test set (lower "
    "is better)",
    "nll": "mean negative log-likelihood of the test targets under the predictive "
    "(lower is better)",
    "cov95": "fraction of noisy test targets inside the 95% predictive interval "
    "(0.95 is calibrated)",
    "cov95_gap": "cov95 on test points in the gap without training data (0.95 is "
    "calibrated; a too-small value means overconfidence where it matters)",
    "cov95_data": "cov95 on test points where there is training data",
    "var_gap/data": "mean epistemic variance in the gap / on the data (> 1: the "
    "method knows where it has no data)",
    "acc": "fraction of test points classified correctly (higher is better)",
    "ece": "expected calibration error, 15 bins (lower is better)",
    "brier": "Brier score (lower is better)",
    "ood_auroc": "AUROC of telling OOD inputs from test inputs by low confidence "
    "1 - max_k p_k (0.5: chance; below 0.5 when test points near the class "
    "boundary are less confident than off-data points, see docs/evaluation.md)",
    "ood_auroc_var": "AUROC of telling OOD inputs from test inputs by epistemic "
    "(latent) variance alone (1: perfect; the MAP has none and scores 0.5)",
    "relerr_H": "median relative error of the latent variances against full "
    "exact-Hessian Laplace (REFERENCE_HESSIAN; 0 is exact)",
    "rho_H": "Spearman rank correlation of the variances with the same reference "
    "(1 is the same ranking)",
    "relerr_GGN": "as relerr_H, against full GGN Laplace (REFERENCE_GGN)",
    "rho_GGN": "as rho_H, against full GGN Laplace",
    "fit_s": "seconds to fit (and tune the prior, with --tune)",
    "ms/pt": "milliseconds of prediction per test point (HFL's refits happen here)",
    "MiB": "peak memory allocated during fit + predict, above the level before "
    "(C heap in use on CPU, allocator peak on CUDA)",
}


def format_legend(columns: list[str]) -> str:
    """``legend:`` lines explaining each of ``columns`` (table header names)."""
    width = max(len(c) for c in columns)
    lines = ["legend:"]
    lines += [f"  {c.ljust(width)}  {LEGEND[c]}" for c in columns if c in LEGEND]
    return "\n".join(lines)


def _fmt(value: Any, spec: str) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, float) and math.isnan(value):
        return "-"
    if spec == "s":
        return str(value)
    if spec == "ms":
        return f"{1e3 * value:.2f}"
    return format(value, spec)


def format_header(meta: dict[str, Any]) -> str:
    """Lines stating the task, hyperparameters and MAP protocol."""
    return (
        f"Task {meta['task']}: {meta['description']} ({meta['n_params']} params)\n"
        f"  likelihood={meta['likelihood']}  sigma_noise={meta['sigma_noise']}  "
        f"prior_precision={meta['prior_precision']}  hyperparameters: "
        f"{meta['hyperparameters']}\n"
        f"  MAP: {meta['map_protocol']} protocol, ||grad L(MAP)|| = "
        f"{meta['map_grad_norm']:.2e}; seed={meta['seed']}; references: "
        f"exact Hessian = {meta['references']['hessian']}, "
        f"GGN = {meta['references']['ggn']}"
    )


def format_table(
    rows: list[dict[str, Any]], likelihood: str, legend: bool = True
) -> str:
    """Fixed-width table of the rows of one task, failures and a legend below.

    Parameters
    ----------
    rows : list of dict
        Rows of :func:`~laplace_hfl.bench.evaluation.run_comparison`.
    likelihood : {"regression", "classification"}
        Selects the metric columns.
    legend : bool, default=True
        Explain every column below the table.

    Returns
    -------
    str
    """
    mid = _REGRESSION if likelihood == "regression" else _CLASSIFICATION
    cols = _COMMON_HEAD + [("status", "status", "s")] + mid + _COMMON_TAIL
    cells = [[c[1] for c in cols]]
    for r in rows:
        cells.append([_fmt(r.get(k), spec) for k, _, spec in cols])
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    lines = []
    for j, row in enumerate(cells):
        parts = [
            c.ljust(w) if i < 3 else c.rjust(w)
            for i, (c, w) in enumerate(zip(row, widths))
        ]
        lines.append("  ".join(parts))
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    failed = [r for r in rows if r.get("status") != "ok"]
    if failed:
        lines.append("failed configurations (recorded, run continued):")
        lines += [f"  {r['method']}: {r['error']}" for r in failed]
    if legend:
        lines.append(format_legend([c[1] for c in cols]))
    return "\n".join(lines)


def write_rows(rows: list[dict[str, Any]], out: str | os.PathLike) -> tuple[Path, Path]:
    """Write ``results.csv`` and ``results.json`` (rows only) into ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    csv_path, json_path = out / "results.csv", out / "results.json"
    with open(csv_path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    with open(json_path, "w") as fh:
        json.dump(rows, fh, indent=1, default=str)
    return csv_path, json_path


def write_results(
    result: ComparisonResult | list[ComparisonResult],
    out: str | os.PathLike,
    figures: bool = True,
) -> dict[str, Any]:
    """Write the rows of all tasks and each task's figures into ``out``.

    Files: ``results.csv`` / ``results.json`` (tidy rows of every task),
    ``meta.json`` (per-task hyperparameters and MAP protocol) and
    ``figures/<task>_*.png``.

    Returns
    -------
    dict
        ``{"csv": path, "json": path, "meta": path, "figures": [paths]}``.
    """
    from laplace_hfl.bench.evaluation.figures import (
        plot_predictive_bands,
        plot_predictive_std,
        plot_reliability,
        plot_variance_scatter,
    )
    from laplace_hfl.bench.evaluation.registry import REFERENCE_GGN, REFERENCE_HESSIAN

    results = result if isinstance(result, list) else [result]
    out = Path(out)
    rows = [r for res in results for r in res.rows]
    csv_path, json_path = write_rows(rows, out)
    meta_path = out / "meta.json"
    with open(meta_path, "w") as fh:
        json.dump({res.task.name: res.meta for res in results}, fh, indent=1)
    paths: list[Path] = []
    if figures:
        import matplotlib.pyplot as plt

        fig_dir = out / "figures"
        for res in results:
            task, preds = res.task, res.predictions
            name = task.name
            if not preds:
                continue
            if task.likelihood == "regression" and task.grid is not None:
                X = next(iter(task.test_loader))[0]
                p = fig_dir / f"{name}_bands.png"
                plot_predictive_bands(
                    X, preds, task.sigma_noise, task.train_xy,
                    task.gap_intervals,
                    p, f"{name}: mean, 95% epistemic (dark) and predictive bands",
                )  # fmt: skip
                paths.append(p)
                p = fig_dir / f"{name}_std.png"
                train_x = task.train_xy[0] if task.train_xy is not None else None
                plot_predictive_std(
                    X, preds, task.gap_intervals, train_x=train_x, path=p,
                    title=f"{name}: epistemic standard deviation",
                )  # fmt: skip
                paths.append(p)
            if task.likelihood == "classification":
                y = next(iter(task.test_loader))[1]
                p = fig_dir / f"{name}_reliability.png"
                plot_reliability(preds, y, path=p, title=f"{name}: reliability")
                paths.append(p)
            for ref, key in ((REFERENCE_HESSIAN, "hessian"), (REFERENCE_GGN, "ggn")):
                if ref in preds:
                    p = fig_dir / f"{name}_variance_vs_{key}.png"
                    plot_variance_scatter(
                        preds, ref, p, f"{name}: latent variance vs {ref}"
                    )
                    paths.append(p)
            plt.close("all")
    return {"csv": csv_path, "json": json_path, "meta": meta_path, "figures": paths}
