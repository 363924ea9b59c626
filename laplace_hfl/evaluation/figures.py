"""PNG figures of a comparison: predictive bands, reliability, variance scatter.

Every function takes the ``predictions`` dict of a
:class:`~laplace_hfl.evaluation.ComparisonResult` (method name to
:class:`~laplace_hfl.evaluation.Prediction`), draws one small panel per method
and returns the matplotlib figure (saved when ``path`` is given).
"""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")  # headless: the CLI writes files only
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch import Tensor  # noqa: E402

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from laplace_hfl.evaluation.runner import Prediction

__all__ = ["plot_predictive_bands", "plot_reliability", "plot_variance_scatter"]


def _grid(n: int, ncols: int = 5, size: float = 2.6) -> tuple[Figure, list]:
    ncols = min(ncols, max(n, 1))
    nrows = math.ceil(max(n, 1) / ncols)
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(size * ncols, size * 0.85 * nrows), squeeze=False
    )
    axes = list(axes.flat)
    for ax in axes[n:]:
        ax.axis("off")
    return fig, axes


def _save(fig: Figure, path: str | os.PathLike | None) -> None:
    if path is not None:
        os.makedirs(os.path.dirname(os.fspath(path)) or ".", exist_ok=True)
        fig.savefig(path, dpi=110, bbox_inches="tight")


def plot_predictive_bands(
    x: Tensor,
    predictions: dict[str, Prediction],
    sigma_noise: float,
    train_xy: tuple[Tensor, Tensor] | None = None,
    gap: tuple[float, float] | tuple[tuple[float, float], ...] | None = None,
    path: str | os.PathLike | None = None,
    title: str = "",
) -> Figure:
    """1-D predictive mean and 95% bands of every method on one grid.

    Dark band: ``f_mu +/- 1.96 sqrt(f_var)`` (epistemic); light band:
    ``f_mu +/- 1.96 sqrt(f_var + sigma^2)`` (predictive).

    Parameters
    ----------
    x : Tensor
        Sorted test inputs ``(N, 1)`` the predictions were made at.
    predictions : dict of str to Prediction
    sigma_noise : float
    train_xy : tuple of Tensor, optional
        Training points to scatter.
    gap : tuple of float or tuple of tuples, optional
        Input interval(s) without data, shaded.
    path : path, optional
        Where to save the PNG.
    title : str
    """
    xs = x.reshape(-1).double().numpy()
    if gap is not None and isinstance(gap[0], (int, float)):
        gap = (gap,)  # type: ignore[assignment]
    fig, axes = _grid(len(predictions))
    ys = [p.f_mu.reshape(-1).double() for p in predictions.values()]
    lo = min(float(y.min()) for y in ys) - 1.5 if ys else -2
    hi = max(float(y.max()) for y in ys) + 1.5 if ys else 2
    for ax, (name, p) in zip(axes, predictions.items()):
        mu = p.f_mu.reshape(-1).double().numpy()
        fv = p.f_var.reshape(-1).double().clamp_min(0)
        sd_f = (1.96 * fv.sqrt()).numpy()
        sd_y = (1.96 * (fv + sigma_noise**2).sqrt()).numpy()
        for lo_hi in gap or ():
            ax.axvspan(*lo_hi, color="0.92", lw=0)
        ax.fill_between(xs, mu - sd_y, mu + sd_y, color="C0", alpha=0.2, lw=0)
        ax.fill_between(xs, mu - sd_f, mu + sd_f, color="C0", alpha=0.45, lw=0)
        ax.plot(xs, mu, color="C0", lw=1)
        if train_xy is not None:
            ax.scatter(
                train_xy[0].reshape(-1).double().numpy(),
                train_xy[1].reshape(-1).double().numpy(),
                s=3,
                color="k",
            )
        ax.set_ylim(lo, hi)
        ax.set_title(name, fontsize=8)
        ax.tick_params(labelsize=6)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    _save(fig, path)
    return fig


def plot_reliability(
    predictions: dict[str, Prediction],
    y: Tensor,
    n_bins: int = 15,
    path: str | os.PathLike | None = None,
    title: str = "",
) -> Figure:
    """Reliability diagrams (top-label accuracy vs confidence), one per method.

    Parameters
    ----------
    predictions : dict of str to Prediction
        Classification predictions with ``probs``.
    y : Tensor
        Test labels.
    n_bins : int, default=15
        Equal-width confidence bins (as in the ECE).
    path : path, optional
    title : str
    """
    preds = {k: p for k, p in predictions.items() if p.probs is not None}
    fig, axes = _grid(len(preds))
    edges = torch.linspace(0, 1, n_bins + 1, dtype=torch.float64)
    centers = (0.5 * (edges[1:] + edges[:-1])).numpy()
    for ax, (name, p) in zip(axes, preds.items()):
        conf, lab = p.probs.double().max(-1)
        correct = (lab == y.long()).double()
        idx = torch.bucketize(conf, edges[1:-1], right=True)
        acc, count = torch.zeros(n_bins, dtype=torch.float64), torch.zeros(n_bins)
        acc.index_add_(0, idx, correct)
        count.index_add_(0, idx, torch.ones_like(correct, dtype=torch.float32))
        frac = (acc / count.clamp_min(1)).numpy()
        ax.bar(centers, frac, width=1 / n_bins, edgecolor="k", lw=0.3, alpha=0.8)
        ax.plot([0, 1], [0, 1], "r--", lw=0.8)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_title(name, fontsize=8)
        ax.tick_params(labelsize=6)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    _save(fig, path)
    return fig


def plot_variance_scatter(
    predictions: dict[str, Prediction],
    reference: str,
    path: str | os.PathLike | None = None,
    title: str = "",
) -> Figure:
    """Log-log scatter of each method's latent variances against a reference.

    Parameters
    ----------
    predictions : dict of str to Prediction
        Must contain ``reference``; the MAP (zero variance) is skipped.
    reference : str
        Name of the reference method.
    path : path, optional
    title : str

    Raises
    ------
    KeyError
        ``reference`` is not in ``predictions``.
    """
    ref = predictions[reference].variances.double().clamp_min(1e-300)
    others = {
        k: p
        for k, p in predictions.items()
        if k != reference and bool((p.variances != 0).any())
    }
    fig, axes = _grid(len(others))
    lo, hi = float(ref.min()), float(ref.max())
    for ax, (name, p) in zip(axes, others.items()):
        v = p.variances.double().clamp_min(1e-300)
        ax.loglog(ref.numpy(), v.numpy(), ".", ms=2)
        ax.plot([lo, hi], [lo, hi], "r--", lw=0.8)
        ax.set_title(name, fontsize=8)
        ax.tick_params(labelsize=6)
    if axes:
        axes[0].set_ylabel("method variance", fontsize=7)
    fig.supxlabel(f"reference variance ({reference})", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    _save(fig, path)
    return fig
