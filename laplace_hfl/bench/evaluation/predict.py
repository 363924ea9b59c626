"""The one prediction path of the evaluation and the benchmarks.

Every harness (``laplace-hfl compare``, the real-network and speed
benchmarks) asks a fitted Laplace object for its linearised (GLM) predictive
through :func:`glm_predictive`, in batches through :func:`predict_batched`,
and scores a prior precision by :func:`validation_nll`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from laplace_hfl.bench.evaluation.metrics import (
    classification_metrics,
    probit_probs,
    regression_metrics,
)
from laplace_hfl.engine.batches import batch_size as rows_of
from laplace_hfl.engine.batches import slice_batch

__all__ = ["glm_predictive", "predict_batched", "validation_nll"]


def glm_predictive(la: Any, X: Any) -> tuple[Tensor, Tensor]:
    """Functional predictive ``(f_mu (B, C), f_var (B, C, C))`` of ``la`` at ``X``.

    HFL estimators answer through their public
    :meth:`~laplace_hfl.base.HFLMixin.glm_predictive`. laplace-torch 0.3 has
    no public call that returns the functional mean and covariance for
    classification (``la(x)`` applies the link function), so for its own
    classes this is the one place the bench calls its
    ``_glm_predictive_distribution``.

    Parameters
    ----------
    la : laplace-torch Laplace object, fitted
    X : Tensor or Mapping
        Query inputs, batch first.

    Returns
    -------
    f_mu, f_var : Tensor
    """
    if hasattr(la, "glm_predictive"):
        return la.glm_predictive(X)
    return la._glm_predictive_distribution(X)


def predict_batched(
    la: Any,
    model: nn.Module,
    X: Any,
    batch_size: int,
    dtype: torch.dtype | None = None,
    dict_key_x: str = "input_ids",
) -> tuple[Tensor, Tensor]:
    """``(f_mu (N, C), f_var (N, C, C))`` of ``la``, ``batch_size`` inputs at a time.

    Parameters
    ----------
    la : fitted Laplace object or None
        ``None``: the MAP network ``model`` itself (zero variance).
    model : torch.nn.Module
        The network ``la`` was built on.
    X : Tensor or Mapping
        Inputs, batch first (a dict batch has its rows under ``dict_key_x``).
    batch_size : int
    dtype : torch.dtype, optional
        Cast the results to it (default: as predicted).
    dict_key_x : str, default="input_ids"

    Returns
    -------
    f_mu, f_var : Tensor
        Detached.
    """
    mus, vars_ = [], []
    for i in range(0, rows_of(X, dict_key_x), batch_size):
        x = slice_batch(X, i, i + batch_size)
        if la is None:
            with torch.no_grad():
                mu = model(x)
            var = torch.zeros(*mu.shape, mu.shape[-1], dtype=mu.dtype)
        else:
            mu, var = glm_predictive(la, x)
        n = mu.shape[0]
        mus.append(mu.detach().reshape(n, -1))
        vars_.append(var.detach().reshape(n, mus[-1].shape[1], -1))
    f_mu, f_var = torch.cat(mus), torch.cat(vars_)
    if dtype is not None:
        f_mu, f_var = f_mu.to(dtype), f_var.to(dtype)
    return f_mu, f_var


def validation_nll(
    la: Any,
    model: nn.Module,
    X: Any,
    y: Tensor,
    likelihood: str,
    sigma_noise: float = 1.0,
    batch_size: int = 100,
    dtype: torch.dtype | None = None,
) -> float:
    """Negative log-likelihood of ``(X, y)`` under ``la``'s predictive.

    Gaussian with the latent variance plus ``sigma_noise^2`` (regression),
    probit-approximated class probabilities (classification): what a
    validation grid search over the prior precision minimises.

    Parameters
    ----------
    la, model, X, batch_size, dtype
        As in :func:`predict_batched`.
    y : Tensor
        Targets.
    likelihood : {"regression", "classification"}
    sigma_noise : float, default=1.0
        Observation noise (regression).

    Returns
    -------
    float
    """
    mu, var = predict_batched(la, model, X, batch_size, dtype)
    if likelihood == "regression":
        return regression_metrics(mu, var, y, sigma_noise)["nll"]
    return classification_metrics(probit_probs(mu, var), y)["nll"]
