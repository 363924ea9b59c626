"""The comparison harness: every method on one task, one tidy row each."""

from __future__ import annotations

import copy
import os
import time
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from laplace_hfl.bench.evaluation.memory import PeakMemory
from laplace_hfl.bench.evaluation.method_row import method_row
from laplace_hfl.bench.evaluation.metrics import (
    classification_metrics,
    probit_probs,
    regression_metrics,
    variance_agreement,
)
from laplace_hfl.bench.evaluation.predict import predict_batched, validation_nll
from laplace_hfl.bench.evaluation.registry import (
    REFERENCE_GGN,
    REFERENCE_HESSIAN,
    MethodSpec,
    resolve_methods,
)
from laplace_hfl.bench.evaluation.report import write_results
from laplace_hfl.bench.evaluation.results import ComparisonResult, Prediction
from laplace_hfl.bench.evaluation.tasks import TASKS, Task

__all__ = [
    "Prediction",
    "ComparisonResult",
    "PeakMemory",
    "run_method",
    "predict_inputs",
    "run_comparison",
    "DEFAULT_TUNE_GRID",
]

#: Prior precisions tried by ``tune=True`` (log-spaced 1e-2 ... 1e2).
DEFAULT_TUNE_GRID = tuple(float(p) for p in np.logspace(-2, 2, 9))


def _cat_loader(loader: DataLoader) -> tuple[Tensor, Tensor]:
    xs, ys = zip(*[(x, y) for x, y in loader])
    return torch.cat(xs), torch.cat(ys)


def _score(task: Task, pred: Prediction, y: Tensor, X: Tensor) -> dict[str, float]:
    if task.likelihood == "regression":
        return regression_metrics(
            pred.f_mu, pred.f_var, y, task.sigma_noise, task.gap_mask(X),
            task.data_mask(X),
        )  # fmt: skip
    return classification_metrics(
        pred.probs, y, pred.probs_ood, var=pred.f_var, var_ood=pred.f_var_ood
    )


def _tune(
    task: Task,
    la: Any,
    model: torch.nn.Module,
    prior: float,
    tune: bool | str,
    tune_grid: tuple[float, ...],
    batch_size: int,
) -> float:
    """Tune ``la``'s prior precision (``tune``) and return the one in use.

    ``la=None`` (the MAP) and ``tune=False`` keep ``prior``.
    """
    if la is None:
        return prior
    if tune == "marglik":
        # laplace-torch's default tuning (Adam on the Laplace marginal
        # likelihood, scalar prior); no validation data.
        la.optimize_prior_precision(method="marglik")
        prior = float(la.prior_precision)
    elif tune:
        X_val, y_val = _cat_loader(task.val_loader)
        scores = []
        for p in tune_grid:
            la.prior_precision = p
            scores.append(
                validation_nll(la, model, X_val, y_val, task.likelihood,
                               task.sigma_noise, batch_size)
            )  # fmt: skip
        prior = tune_grid[int(np.nanargmin(scores))]
        la.prior_precision = prior
    return prior


def _prediction(
    task: Task, la: Any, model: torch.nn.Module, X: Tensor, batch_size: int
) -> Prediction:
    """:class:`Prediction` at ``X`` (probit probabilities for classification).

    Raises
    ------
    FloatingPointError
        A non-finite predictive variance.
    """
    f_mu, f_var = predict_batched(la, model, X, batch_size)
    if not torch.isfinite(f_var).all():
        raise FloatingPointError("non-finite predictive variance")
    pred = Prediction(f_mu, f_var)
    if task.likelihood == "classification":
        pred.probs = probit_probs(f_mu, f_var)
    return pred


def predict_inputs(
    task: Task,
    spec_or_name: MethodSpec | str,
    X: Tensor,
    prior_precision: float | None = None,
    tune: bool | str = False,
    tune_grid: tuple[float, ...] = DEFAULT_TUNE_GRID,
    batch_size: int = 100,
) -> Prediction:
    """Fit one method on ``task`` as :func:`run_method` does, then predict at ``X``.

    For figures on arbitrary inputs (e.g. a 2-D grid for
    :func:`~laplace_hfl.bench.evaluation.plot_confidence_map`). Unlike
    :func:`run_method` it raises when the method fails.

    Parameters
    ----------
    task : Task
    spec_or_name : MethodSpec or str
        A spec or a name in :data:`~laplace_hfl.bench.evaluation.METHODS`.
    X : Tensor
        Inputs ``(N, D)`` in the dtype of the task's model.
    prior_precision, tune, tune_grid, batch_size
        As in :func:`run_method`.

    Returns
    -------
    Prediction
        ``f_mu``, ``f_var`` and, for classification, probit ``probs`` at ``X``.
    """
    spec = (
        resolve_methods([spec_or_name])[0]
        if isinstance(spec_or_name, str)
        else spec_or_name
    )
    prior = task.prior_precision if prior_precision is None else prior_precision
    model = copy.deepcopy(task.model)
    la = None
    if spec.build is not None:
        la = spec.build(model, task.likelihood, task.sigma_noise, prior)
        la.fit(task.train_loader, **spec.fit_kwargs)
    _tune(task, la, model, prior, tune, tune_grid, batch_size)
    return _prediction(task, la, model, X, batch_size)


def run_method(
    task: Task,
    spec: MethodSpec,
    prior_precision: float | None = None,
    tune: bool | str = False,
    tune_grid: tuple[float, ...] = DEFAULT_TUNE_GRID,
    batch_size: int = 100,
) -> tuple[dict[str, Any], Prediction | None]:
    """Fit and evaluate one method; never raises for a failing method.

    Parameters
    ----------
    task : Task
    spec : MethodSpec
    prior_precision : float, optional
        Overrides ``task.prior_precision``.
    tune : bool or {"gridsearch", "marglik"}, default=False
        Choose the prior precision from ``tune_grid`` by validation NLL (the
        method's own predictive; ``True`` or ``"gridsearch"``), or by
        laplace-torch's marginal-likelihood loop (``"marglik"``), instead of
        keeping it fixed.
    tune_grid : tuple of float
    batch_size : int, default=100
        Prediction batch size.

    Returns
    -------
    row : dict
        Tidy row; ``status`` is ``"ok"`` or ``"failed"`` (with ``error``).
    prediction : Prediction or None
        ``None`` when the method failed.
    """
    prior = task.prior_precision if prior_precision is None else prior_precision
    row: dict[str, Any] = {
        "task": task.name,
        "method": spec.name,
        "family": spec.family,
        "backend": spec.backend,
        "structure": spec.structure,
        "status": "ok",
        "error": "",
        "sigma_noise": task.sigma_noise,
        "prior_precision": prior,
        "hyper": ("marglik" if tune == "marglik" else "tuned")
        if tune and spec.build is not None
        else "fixed",
    }
    X, y = _cat_loader(task.test_loader)
    X_ood = _cat_loader(task.ood_loader)[0] if task.ood_loader is not None else None
    times: dict[str, float] = {}

    def tuned(la: Any, model: torch.nn.Module, fit_s: float) -> None:
        row["prior_precision"] = _tune(
            task, la, model, prior, tune, tune_grid, batch_size
        )

    def predict(la: Any, model: torch.nn.Module, fit_s: float, tune_s: float):
        t1 = time.perf_counter()
        pred = _prediction(task, la, model, X, batch_size)
        times["fit_s"] = fit_s + tune_s
        times["predict_s_per_point"] = (time.perf_counter() - t1) / X.shape[0]
        if task.likelihood == "classification" and X_ood is not None:
            mu_ood, pred.f_var_ood = predict_batched(la, model, X_ood, batch_size)
            pred.probs_ood = probit_probs(mu_ood, pred.f_var_ood)
        return pred

    def finish(la: Any, pred: Prediction, peak_mb: float) -> None:
        row.update(_score(task, pred, y, X))
        row.update(times)
        row["peak_mem_mb"] = peak_mb
        if la is not None and hasattr(la, "map_gradient_norm"):
            row["map_grad_norm"] = la.map_gradient_norm

    return method_row(
        task, spec, row, lambda: prior, tuned, predict, finish,
        ignore=(DeprecationWarning, FutureWarning),
    )  # fmt: skip


def run_comparison(
    task: str | Task = "inbetween",
    methods: list[str] | None = None,
    seed: int = 0,
    out: str | os.PathLike | None = None,
    tune: bool | str = False,
    prior_precision: float | None = None,
    progress: bool = True,
    figures: bool = True,
) -> ComparisonResult:
    """Run every method on one task with shared hyperparameters.

    Parameters
    ----------
    task : str or Task, default="inbetween"
        A name in :data:`~laplace_hfl.bench.evaluation.TASKS` or a built task.
    methods : list of str, optional
        Names in :data:`~laplace_hfl.bench.evaluation.METHODS` (default: all).
    seed : int, default=0
        Seeds data, MAP training and every method.
    out : path, optional
        Directory for ``results.csv``, ``results.json`` and ``figures/``
        (nothing is written when ``None``).
    tune : bool or {"gridsearch", "marglik"}, default=False
        Tune each method's prior precision on the validation NLL (``True`` /
        ``"gridsearch"``; slow for HFL: one prediction pass per grid value) or
        by the Laplace marginal likelihood (``"marglik"``). Sigma stays fixed.
    prior_precision : float, optional
        Overrides the task's fixed prior precision.
    progress : bool, default=True
        tqdm progress bar over methods.
    figures : bool, default=True
        Write PNG figures when ``out`` is given.

    Returns
    -------
    ComparisonResult
        ``rows`` (one dict per method, failures included) and the
        ``predictions`` of the methods that succeeded.
    """
    torch.manual_seed(seed)
    np.random.seed(seed)
    t_build = time.perf_counter()
    if isinstance(task, str):
        if task not in TASKS:
            raise KeyError(f"Unknown task {task!r}; known: {sorted(TASKS)}.")
        if progress:  # training is silent otherwise: say what is happening
            print(f"{task}: building the task (data, MAP training) ...", flush=True)
        task = TASKS[task](seed)
        if progress:
            print(f"{task.name}: task built in {time.perf_counter() - t_build:.0f} s; "
                  "fitting the methods", flush=True)  # fmt: skip
    t_build = time.perf_counter() - t_build
    specs = resolve_methods(methods)
    rows, preds = [], {}
    bar = tqdm(specs, desc=f"{task.name}", disable=not progress, leave=True)
    for spec in bar:
        bar.set_postfix_str(spec.name)
        torch.manual_seed(seed)
        row, pred = run_method(task, spec, prior_precision, tune)
        rows.append(row)
        if pred is not None:
            preds[spec.name] = pred
    for ref_name, key in ((REFERENCE_HESSIAN, "hessian"), (REFERENCE_GGN, "ggn")):
        ref = preds.get(ref_name)
        for row in rows:
            agree = {"rel_err": float("nan"), "spearman": float("nan")}
            if ref is not None and row["method"] in preds and row["family"] != "map":
                agree = variance_agreement(
                    preds[row["method"]].variances, ref.variances
                )
            row[f"var_rel_err_vs_{key}"] = agree["rel_err"]
            row[f"var_spearman_vs_{key}"] = agree["spearman"]
    meta = {
        "task": task.name,
        "description": task.description,
        "likelihood": task.likelihood,
        "n_params": task.n_params,
        "seed": seed,
        "sigma_noise": task.sigma_noise,
        "prior_precision": task.prior_precision
        if prior_precision is None
        else prior_precision,
        "hyperparameters": "fixed, shared by all methods"
        if not tune
        else "tuned per method by the marginal likelihood (prior precision; sigma fixed)"
        if tune == "marglik"
        else "tuned per method on validation NLL (prior precision; sigma fixed)",
        "map_protocol": task.map_protocol,
        "map_grad_norm": task.map_grad_norm,
        "task_build_s": t_build,
        "references": {"hessian": REFERENCE_HESSIAN, "ggn": REFERENCE_GGN},
    }
    result = ComparisonResult(task, rows, preds, meta)
    if out is not None:
        write_results(result, out, figures=figures)
    return result
