"""Metric functions shared by the harness, notebooks and the benchmark.

All functions take plain tensors and return dicts of Python floats. torchmetrics
is used where it has the metric (accuracy, ECE, AUROC, Spearman).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torchmetrics.functional import spearman_corrcoef
from torchmetrics.functional.classification import (
    binary_auroc,
    multiclass_accuracy,
    multiclass_calibration_error,
)

__all__ = [
    "Z95",
    "gaussian_nll",
    "interval_coverage",
    "regression_metrics",
    "probit_probs",
    "expected_calibration_error",
    "brier_score",
    "classification_nll",
    "ood_auroc",
    "ood_auroc_variance",
    "classification_metrics",
    "variance_agreement",
]

#: Two-sided 95% standard-normal quantile.
Z95 = 1.959963984540054


def gaussian_nll(mean: Tensor, var: Tensor, y: Tensor) -> float:
    """Mean Gaussian negative log-likelihood ``0.5 log(2 pi v) + (y-m)^2/(2v)``.

    Parameters
    ----------
    mean, var, y : Tensor
        Same shape; ``var`` is the *predictive* variance (``f_var + sigma^2``).
    """
    var = var.double()
    r2 = (y.double() - mean.double()) ** 2
    return float((0.5 * torch.log(2 * math.pi * var) + 0.5 * r2 / var).mean())


def interval_coverage(mean: Tensor, var: Tensor, y: Tensor, z: float = Z95) -> float:
    """Fraction of ``y`` inside ``mean +/- z sqrt(var)`` (NaN when empty)."""
    if y.numel() == 0:
        return float("nan")
    inside = (y.double() - mean.double()).abs() <= z * var.double().sqrt()
    return float(inside.double().mean())


def regression_metrics(
    f_mu: Tensor, f_var: Tensor, y: Tensor, sigma_noise: float,
    gap_mask: Tensor | None = None, data_mask: Tensor | None = None,
) -> dict[str, float]:  # fmt: skip
    """RMSE, Gaussian NLL and 95% coverage (overall, in the gap, on the data).

    Parameters
    ----------
    f_mu : Tensor
        Predictive means, ``(N,)`` or ``(N, 1)``.
    f_var : Tensor
        Functional (epistemic) variances, ``(N,)``, ``(N, 1)`` or ``(N, 1, 1)``.
    y : Tensor
        Targets, ``(N,)`` or ``(N, 1)``.
    sigma_noise : float
        Observation noise; the predictive variance is ``f_var + sigma_noise^2``.
    gap_mask : Tensor of bool, optional
        Test points in the gap (no training data); adds ``coverage95_gap``,
        ``nll_gap``, ``mean_std_gap`` and ``mean_std_outside`` (every point
        outside the gap: data *and* extrapolation region).
    data_mask : Tensor of bool, optional
        Test points inside the training-data input intervals; adds
        ``coverage95_data``, ``nll_data``, ``mean_std_data`` and, with
        ``gap_mask``, ``var_ratio_gap_data`` = mean ``f_var`` in the gap /
        mean ``f_var`` on the data (NaN when the latter is 0, e.g. the MAP).

    Returns
    -------
    dict of str to float
        ``rmse``, ``nll``, ``coverage95`` and the gap / data entries.
    """
    m, fv, t = f_mu.reshape(-1), f_var.reshape(-1), y.reshape(-1)
    fv = fv.double().clamp_min(0)
    v = fv + sigma_noise**2
    out = {
        "rmse": float(((m.double() - t.double()) ** 2).mean().sqrt()),
        "nll": gaussian_nll(m, v, t),
        "coverage95": interval_coverage(m, v, t),
    }

    def mean(a: Tensor) -> float:
        return float(a.mean()) if a.numel() else float("nan")

    masks = {"gap": gap_mask, "data": data_mask}
    for key, mask in masks.items():
        if mask is None:
            continue
        g = mask.reshape(-1).bool()
        out[f"coverage95_{key}"] = interval_coverage(m[g], v[g], t[g])
        out[f"nll_{key}"] = gaussian_nll(m[g], v[g], t[g]) if g.any() else float("nan")
        out[f"mean_std_{key}"] = mean(fv[g].sqrt())
        if key == "gap":
            out["mean_std_outside"] = mean(fv[~g].sqrt())
    if gap_mask is not None and data_mask is not None:
        var_gap = mean(fv[gap_mask.reshape(-1).bool()])
        var_data = mean(fv[data_mask.reshape(-1).bool()])
        out["var_ratio_gap_data"] = var_gap / var_data if var_data > 0 else float("nan")
    return out


def probit_probs(f_mu: Tensor, f_var: Tensor) -> Tensor:
    """laplace-torch's probit approximation of ``E[softmax(f)]``.

    ``softmax(f_mu / sqrt(1 + pi/8 diag(f_var)))``, as ``la(x,
    link_approx="probit")`` computes it.

    Parameters
    ----------
    f_mu : Tensor
        Logit means ``(N, C)``.
    f_var : Tensor
        Logit covariances ``(N, C, C)`` or variances ``(N, C)``.
    """
    d = f_var.diagonal(dim1=-2, dim2=-1) if f_var.ndim == 3 else f_var
    kappa = 1.0 / torch.sqrt(1.0 + math.pi / 8 * d.clamp_min(0))
    return torch.softmax(kappa * f_mu, dim=-1)


def expected_calibration_error(probs: Tensor, y: Tensor, n_bins: int = 15) -> float:
    """Top-label ECE with ``n_bins`` equal-width bins (L1 norm, torchmetrics).

    All predictions are binned (unlike Laplace Redux's code, which drops
    confidences >= 0.99).
    """
    C = probs.shape[-1]
    return float(
        multiclass_calibration_error(
            probs.double(), y.long(), num_classes=C, n_bins=n_bins, norm="l1"
        )
    )


def brier_score(probs: Tensor, y: Tensor) -> float:
    """Multi-class Brier score ``mean_n sum_k (p_nk - 1[y_n = k])^2``."""
    onehot = torch.nn.functional.one_hot(y.long(), probs.shape[-1]).double()
    return float(((probs.double() - onehot) ** 2).sum(-1).mean())


def classification_nll(probs: Tensor, y: Tensor) -> float:
    """Mean ``-log p(y)`` (probabilities clamped at 1e-12)."""
    p = probs.double().gather(-1, y.long().reshape(-1, 1)).clamp_min(1e-12)
    return float(-p.log().mean())


def ood_auroc(probs_in: Tensor, probs_out: Tensor) -> float:
    """AUROC of detecting OOD inputs by low maximum probability.

    Score ``1 - max_k p_k``, OOD inputs are the positive class.
    """
    score = torch.cat([1 - probs_in.max(-1).values, 1 - probs_out.max(-1).values])
    label = torch.cat(
        [
            torch.zeros(len(probs_in), dtype=torch.long),
            torch.ones(len(probs_out), dtype=torch.long),
        ]
    )
    return float(binary_auroc(score.double(), label))


def ood_auroc_variance(var_in: Tensor, var_out: Tensor) -> float:
    """AUROC of detecting OOD inputs by high *epistemic* (latent) variance.

    Score: the trace of the latent covariance ``sum_k Var[f_k(x)]``; OOD inputs
    are the positive class. Unlike :func:`ood_auroc`, this score ignores
    aleatoric ambiguity (inputs near the decision boundary), so it measures
    whether a method knows where it has no data. A method without epistemic
    variance (the MAP) scores 0.5.

    Parameters
    ----------
    var_in, var_out : Tensor
        Latent covariances ``(N, C, C)`` (or per-point scores ``(N,)``) on test
        and OOD inputs.
    """

    def score(v: Tensor) -> Tensor:
        v = v.double()
        return v.diagonal(dim1=-2, dim2=-1).sum(-1) if v.dim() == 3 else v

    s = torch.cat([score(var_in), score(var_out)])
    label = torch.cat(
        [
            torch.zeros(len(var_in), dtype=torch.long),
            torch.ones(len(var_out), dtype=torch.long),
        ]
    )
    return float(binary_auroc(s, label))


def classification_metrics(
    probs: Tensor,
    y: Tensor,
    probs_ood: Tensor | None = None,
    n_bins: int = 15,
    var: Tensor | None = None,
    var_ood: Tensor | None = None,
) -> dict[str, float]:
    """Accuracy, NLL, ECE (``n_bins`` bins), Brier and OOD AUROCs.

    Parameters
    ----------
    probs : Tensor
        Predictive class probabilities ``(N, C)``.
    y : Tensor
        Class indices ``(N,)``.
    probs_ood : Tensor, optional
        Probabilities on OOD / shifted inputs; adds ``ood_auroc`` and
        ``ood_mean_conf``.
    n_bins : int, default=15
    var, var_ood : Tensor, optional
        Latent covariances ``(N, C, C)`` on the test and OOD inputs; add
        ``ood_auroc_var`` (:func:`ood_auroc_variance`).

    Returns
    -------
    dict of str to float
    """
    C = probs.shape[-1]
    out = {
        "accuracy": float(
            multiclass_accuracy(probs, y.long(), num_classes=C, average="micro")
        ),
        "nll": classification_nll(probs, y),
        "ece": expected_calibration_error(probs, y, n_bins),
        "brier": brier_score(probs, y),
    }
    if probs_ood is not None:
        out["ood_auroc"] = ood_auroc(probs, probs_ood)
        out["ood_mean_conf"] = float(probs_ood.max(-1).values.double().mean())
    if var is not None and var_ood is not None:
        out["ood_auroc_var"] = ood_auroc_variance(var, var_ood)
    return out


def variance_agreement(var: Tensor, ref: Tensor) -> dict[str, float]:
    """Agreement of a predictive variance with a reference.

    Parameters
    ----------
    var, ref : Tensor
        Variances at the same points (any shape, flattened).

    Returns
    -------
    dict of str to float
        ``rel_err`` (median of ``|var - ref| / ref``), ``max_rel_err`` and
        ``spearman`` (rank correlation; NaN if either is constant).
    """
    v, r = var.reshape(-1).double(), ref.reshape(-1).double()
    rel = (v - r).abs() / r.abs().clamp_min(1e-300)
    if v.std() == 0 or r.std() == 0:
        rho = float("nan")
    else:
        rho = float(spearman_corrcoef(v, r))
    return {
        "rel_err": float(rel.quantile(0.5)),
        "max_rel_err": float(rel.max()),
        "spearman": rho,
    }
