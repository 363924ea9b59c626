"""One method on one task, one result row: the loop every harness of the bench runs.

:func:`method_row` copies the task's MAP model, builds and fits the method,
tunes its prior, predicts, under a warnings recorder and a peak-memory meter;
a method that raises becomes a ``failed`` row (:func:`fail_row`). The
comparison (``laplace-hfl compare``) and the real-network benchmark differ
only in the hooks they pass: where the prior comes from (fixed, tuned,
borrowed from another method's row), what is predicted (a test set, shift
levels under a time budget) and what is written into the row.
"""

from __future__ import annotations

import copy
import time
import warnings
from collections.abc import Callable
from typing import Any

from torch import nn

from laplace_hfl.bench.evaluation.memory import PeakMemory
from laplace_hfl.bench.evaluation.registry import MethodSpec
from laplace_hfl.bench.evaluation.tasks import Task

__all__ = ["method_row", "fail_row", "error_text"]


def error_text(err: BaseException, limit: int = 300, first_line: bool = True) -> str:
    """``"Type: message"`` of ``err`` for a result row.

    Parameters
    ----------
    err : BaseException
    limit : int, default=300
        Characters of the message kept.
    first_line : bool, default=True
        Keep only the message's first line (before cutting it to ``limit``).
    """
    msg = str(err)
    if first_line and msg:
        msg = msg.splitlines()[0]
    return f"{type(err).__name__}: {msg[:limit]}"


def fail_row(row: dict[str, Any], err: BaseException) -> dict[str, Any]:
    """Mark ``row`` failed with :func:`error_text` of ``err``."""
    row["status"] = "failed"
    row["error"] = error_text(err)
    return row


def method_row(
    task: Task,
    spec: MethodSpec,
    row: dict[str, Any],
    prior: Callable[[], float],
    tune: Callable[[Any, nn.Module, float], None],
    predict: Callable[[Any, nn.Module, float, float], Any],
    finish: Callable[[Any, Any, float], None],
    ignore: tuple[type[Warning], ...] = (),
) -> tuple[dict[str, Any], Any]:
    """Fit, tune and evaluate ``spec`` on a copy of ``task.model``; never raises.

    Parameters
    ----------
    task : Task
        Model, likelihood, ``sigma_noise`` and ``train_loader`` of the fit.
    spec : MethodSpec
        Built with ``spec.build(model, likelihood, sigma_noise, prior)`` and
        fitted with ``spec.fit_kwargs`` (``build=None``: the MAP, ``la=None``).
    row : dict
        The row to fill; the hooks write their entries into it.
    prior : callable () -> float
        The prior precision to build with (may raise: a failed row).
    tune : callable (la, model, fit_s) -> None
        Called after the fit with its seconds; tunes ``la``'s prior.
    predict : callable (la, model, fit_s, tune_s) -> result
        Predicts; runs inside the peak-memory window.
    finish : callable (la, result, peak_mb) -> None
        Scores ``result`` into the row after the memory window.
    ignore : tuple of Warning classes
        Warning categories left out of ``row["warnings"]``.

    Returns
    -------
    row : dict
        ``row`` with ``status`` ``"ok"`` or ``"failed"`` (and ``error``) and
        the sorted names of the warnings raised (``warnings``).
    result : Any
        ``predict``'s result; ``None`` when the method failed.
    """
    model = copy.deepcopy(task.model)
    caught: list[warnings.WarningMessage] = []
    result = None
    try:
        p = prior()
        with warnings.catch_warnings(record=True) as caught, PeakMemory() as mem:
            warnings.simplefilter("always")
            t0 = time.perf_counter()
            la = (
                None
                if spec.build is None
                else spec.build(model, task.likelihood, task.sigma_noise, p)
            )
            if la is not None:
                la.fit(task.train_loader, **spec.fit_kwargs)
            fit_s = time.perf_counter() - t0
            tune(la, model, fit_s)
            tune_s = time.perf_counter() - t0 - fit_s
            result = predict(la, model, fit_s, tune_s)
        finish(la, result, mem.peak_mb)
    except Exception as err:  # noqa: BLE001 - every failure becomes a row
        fail_row(row, err)
        result = None
    names = {w.category.__name__ for w in caught if not issubclass(w.category, ignore)}
    row["warnings"] = ";".join(sorted(names))
    return row, result
