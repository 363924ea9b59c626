"""Prior-precision grid search that tells the user what it is doing.

laplace-torch's grid search scores each prior precision on validation data.
Two things go wrong silently with HFL:

* For regression its default loss is the mean squared error of the predictive
  *mean*, which the prior precision does not change (the GLM predictive mean
  is the MAP output): every grid value scores the same and the "tuned" prior
  is arbitrary. :func:`gaussian_nll_loss` is the loss to pass instead, and
  :func:`check_loss` warns when the loss cannot see the variance.
* Every grid value costs a full HFL prediction of the validation set (exact
  mode) or a fresh draw of all posterior samples (amortised mode).
  :func:`run_gridsearch` times the first value and warns with the expected
  total before doing the rest; a tqdm bar follows the remaining values.
"""

from __future__ import annotations

import inspect
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torchmetrics
from torch import Tensor

from laplace_hfl.engine.progress import format_seconds, is_long, progress
from laplace_hfl.errors import warn_user

__all__ = [
    "VarianceBlindLossWarning",
    "GridSearchCostWarning",
    "gaussian_nll_loss",
    "check_loss",
    "run_gridsearch",
]


class VarianceBlindLossWarning(UserWarning):
    """The grid-search loss ignores the predictive variance, so the chosen
    prior precision is arbitrary."""


class GridSearchCostWarning(UserWarning):
    """The grid search is expected to take long (estimate in the message)."""


def gaussian_nll_loss(sigma_noise: float | Tensor) -> Callable[..., Tensor]:
    """Gaussian negative log-likelihood for ``optimize_prior_precision(loss=...)``.

    laplace-torch calls an (offline) callable loss as ``loss(f_mu, f_var, y)``
    with the GLM predictive of the whole validation set. The returned loss is
    the mean over points and outputs of
    ``0.5 log(2 pi s^2) + (y - f_mu)^2 / (2 s^2)`` with
    ``s^2 = diag(f_var) + sigma_noise^2``: it depends on the prior precision
    through ``f_var``, unlike the default mean squared error.

    Parameters
    ----------
    sigma_noise : float or Tensor
        Observation noise standard deviation (``la.sigma_noise``).

    Returns
    -------
    callable
        ``loss(f_mu (N, C), f_var (N, C, C) or (N, C), y) -> Tensor`` (scalar).

    Raises
    ------
    ValueError
        ``sigma_noise`` is not a positive finite number.
    """
    sigma = torch.as_tensor(sigma_noise, dtype=torch.float64).detach()
    if sigma.numel() != 1 or not bool(torch.isfinite(sigma)) or float(sigma) <= 0:
        raise ValueError(
            f"sigma_noise must be a positive finite number, got {sigma_noise!r}."
        )

    def loss(f_mu: Tensor, f_var: Tensor, y: Tensor) -> Tensor:
        mu = f_mu.double().reshape(f_mu.shape[0], -1)
        var = f_var.double()
        if var.dim() == 3:
            var = var.diagonal(dim1=-2, dim2=-1)
        s2 = var.reshape(mu.shape).clamp_min(0) + sigma.to(mu) ** 2
        r2 = (y.double().reshape(mu.shape) - mu) ** 2
        return (0.5 * torch.log(2 * np.pi * s2) + 0.5 * r2 / s2).mean()

    return loss


def _positional_arity(fn: Callable[..., Any]) -> float:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return float("inf")
    if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params):
        return float("inf")
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return sum(p.kind in kinds for p in params)


def check_loss(likelihood: str, loss: Any) -> None:
    """Warn when a regression grid-search loss cannot see the variance.

    Variance-blind: ``None`` (laplace-torch then uses the mean squared error)
    or a ``torchmetrics.Metric`` whose ``update`` takes only
    ``(preds, target)`` (MSE, MAE, ...: laplace-torch passes it the mean).

    Warns
    -----
    VarianceBlindLossWarning
        With the loss to pass instead.
    """
    if loss is not None and not callable(loss):
        raise ValueError(
            f"The grid-search loss must be callable (a torchmetrics metric or a "
            f"function of the predictive), got {loss!r}; e.g. "
            "loss=laplace_hfl.engine.gridsearch.gaussian_nll_loss(la.sigma_noise)."
        )
    if likelihood != "regression":
        return
    if loss is None:
        what = "the default loss (mean squared error of the predictive mean)"
    elif isinstance(loss, torchmetrics.Metric) and _positional_arity(loss.update) < 3:
        what = f"loss={type(loss).__name__}() (it sees only the predictive mean)"
    else:
        return
    warn_user(
        f"Grid search with {what} cannot tune the prior precision: the predictive "
        "mean does not depend on it, so every grid value scores the same and the "
        "chosen prior is arbitrary. Pass a loss that scores the predictive "
        "variance, e.g. loss=laplace_hfl.engine.gridsearch.gaussian_nll_loss(la.sigma_noise).",
        VarianceBlindLossWarning,
    )


def run_gridsearch(
    la: Any,
    interval: Sequence[Tensor],
    score: Callable[[], float],
    progress_bar: bool = False,
) -> Tensor:
    """Set each prior precision of ``interval`` on ``la``, score it, return the best.

    Parameters
    ----------
    la : HFL estimator
        Its ``prior_precision`` is set to each grid value in turn.
    interval : sequence of Tensor
        Grid values.
    score : callable
        Validation loss of ``la`` at its current prior precision (``inf`` for a
        failed value).
    progress_bar : bool, default=False
        tqdm bar from the start; otherwise one appears when the first value
        predicts a long total, and a :class:`GridSearchCostWarning` when the
        second value (without the fit's one-time work) predicts that the
        remaining values take above
        :data:`laplace_hfl.engine.progress.AUTO_PROGRESS_AFTER_S`.

    Returns
    -------
    Tensor
        The grid value with the lowest score (the first on ties).

    Warns
    -----
    GridSearchCostWarning
        The rest of the grid is expected to take longer than the threshold.
    """
    results: list[float] = []
    n = len(interval)
    t0 = time.perf_counter()
    for i, prior in enumerate(
        progress(interval, desc="[HFL grid search]", always=progress_bar)
    ):
        la.prior_precision = prior
        value = float(score())
        if math.isnan(value):
            raise ValueError(
                f"The grid-search loss is NaN at prior precision "
                f"{prior.flatten().tolist()}: the search would pick an arbitrary "
                "value. Check the loss and the validation data."
            )
        results.append(value)
        # The first value also pays the fit's one-time work (curvature, probe,
        # preconditioner): the estimate takes the second value's time for the
        # others.
        if i == 0:
            first = time.perf_counter() - t0
        elif i == 1 and n > 2:
            each = time.perf_counter() - t0 - first
            expected = first + (n - 1) * each
            if is_long(expected - first - each):
                per = (
                    f"redraws all amortize={la.amortize} posterior samples"
                    if la.amortize is not None
                    else "runs HFL refits for every validation point"
                )
                warn_user(
                    f"Grid search over {n} prior precisions: ~"
                    f"{format_seconds(expected)} expected (the first value took "
                    f"{format_seconds(first)} with the fit's one-time work, the "
                    f"second {format_seconds(each)}); each value {per}. For less, "
                    "pass a smaller grid_size or narrower log_prior_prec_min/max, "
                    "or a smaller val_loader.",
                    GridSearchCostWarning,
                )
    return interval[int(np.argmin(results))]
