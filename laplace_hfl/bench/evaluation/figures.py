"""PNG figures of a comparison: predictive bands and standard deviations,
confidence maps, reliability, variance scatter.

Every function takes the ``predictions`` dict of a
:class:`~laplace_hfl.bench.evaluation.ComparisonResult` (method name to
:class:`~laplace_hfl.bench.evaluation.Prediction`), draws one small panel per method
and returns the matplotlib figure (saved when ``path`` is given).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")  # headless: the CLI writes files only
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from matplotlib.ticker import NullFormatter  # noqa: E402
from torch import Tensor  # noqa: E402

from laplace_hfl.bench.evaluation.figure_layout import (  # noqa: E402
    FAMILY_TITLES,
    LINESTYLES,
    colors,
    family_grid,
    finish_figure,
    group_by_family,
    method_family,
    panel_grid,
    save_figure,
    title_panel,
)
from laplace_hfl.bench.evaluation.registry import (  # noqa: E402
    REFERENCE_GGN,
    REFERENCE_HESSIAN,
)

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from laplace_hfl.bench.evaluation.results import Prediction

__all__ = [
    "FAMILY_TITLES",
    "method_family",
    "group_by_family",
    "plot_predictive_bands",
    "plot_predictive_std",
    "plot_confidence_map",
    "plot_reliability",
    "plot_variance_scatter",
]


def plot_predictive_bands(
    x: Tensor,
    predictions: dict[str, Prediction],
    sigma_noise: float,
    train_xy: tuple[Tensor, Tensor] | None = None,
    gap: tuple[float, float] | tuple[tuple[float, float], ...] | None = None,
    path: str | os.PathLike | None = None,
    title: str = "",
    families: dict[str, str] | None = None,
) -> Figure:
    """1-D predictive mean and 95% bands of every method, one row per family.

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
    families : dict of str to str, optional
        Method name to family (default: :func:`method_family`).
    """
    xs = x.reshape(-1).double().numpy()
    if gap is not None and isinstance(gap[0], (int, float)):
        gap = (gap,)  # type: ignore[assignment]
    fig, by_name = family_grid(group_by_family(list(predictions), families))
    ys = [p.f_mu.reshape(-1).double() for p in predictions.values()]
    lo = min(float(y.min()) for y in ys) - 1.5 if ys else -2
    hi = max(float(y.max()) for y in ys) + 1.5 if ys else 2
    for name, ax in by_name.items():
        p = predictions[name]
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
        title_panel(ax, name)
    finish_figure(fig, title, path)
    return fig


def plot_reliability(
    predictions: dict[str, Prediction], y: Tensor, n_bins: int = 15,
    path: str | os.PathLike | None = None, title: str = "",
    families: dict[str, str] | None = None,
) -> Figure:  # fmt: skip
    """Reliability diagrams (top-label accuracy vs confidence), one per method,
    one row per family; the number of test points is written on each bin.

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
    families : dict of str to str, optional
        Method name to family (default: :func:`method_family`).
    """
    preds = {k: p for k, p in predictions.items() if p.probs is not None}
    fig, by_name = family_grid(group_by_family(list(preds), families))
    edges = torch.linspace(0, 1, n_bins + 1, dtype=torch.float64)
    centers = (0.5 * (edges[1:] + edges[:-1])).numpy()
    for name, ax in by_name.items():
        p = preds[name]
        conf, lab = p.probs.double().max(-1)
        correct = (lab == y.long()).double()
        idx = torch.bucketize(conf, edges[1:-1], right=True)
        acc, count = torch.zeros(n_bins, dtype=torch.float64), torch.zeros(n_bins)
        acc.index_add_(0, idx, correct)
        count.index_add_(0, idx, torch.ones_like(correct, dtype=torch.float32))
        frac = (acc / count.clamp_min(1)).numpy()
        ax.bar(centers, frac, width=1 / n_bins, edgecolor="k", lw=0.3, alpha=0.8)
        for c, k in zip(centers, count.tolist()):
            if k > 0:  # points per bin: an empty or thin bin says little
                ax.text(c, 0.03, f"{int(k)}", ha="center", va="bottom",
                        fontsize=6, rotation=90, color="w")  # fmt: skip
        ax.plot([0, 1], [0, 1], "r--", lw=0.8)
        # the top-label confidence is at least 1 / classes
        ax.set_xlim(1.0 / p.probs.shape[-1], 1)
        ax.set_ylim(0, 1)
        title_panel(ax, name)
    finish_figure(fig, title, path)
    return fig


def plot_variance_scatter(
    predictions: dict[str, Prediction],
    reference: str,
    path: str | os.PathLike | None = None,
    title: str = "",
    families: dict[str, str] | None = None,
) -> Figure:
    """Log-log scatter of each method's latent variances against a reference,
    one row per family.

    Parameters
    ----------
    predictions : dict of str to Prediction
        Must contain ``reference``; the MAP (zero variance) is skipped.
    reference : str
        Name of the reference method.
    path : path, optional
    title : str
    families : dict of str to str, optional
        Method name to family (default: :func:`method_family`).

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
    fig, by_name = family_grid(group_by_family(list(others), families), share=True)
    lo, hi = float(ref.min()), float(ref.max())
    for name, ax in by_name.items():
        p = others[name]
        v = p.variances.double().clamp_min(1e-300)
        ax.loglog(ref.numpy(), v.numpy(), ".", ms=2)
        ax.plot([lo, hi], [lo, hi], "r--", lw=0.8)
        title_panel(ax, name)
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.yaxis.set_minor_formatter(NullFormatter())
    fig.supylabel("method variance", fontsize=8)
    fig.supxlabel(f"reference variance ({reference})", fontsize=8)
    finish_figure(fig, title, path)
    return fig


def _intervals(gap: tuple | None) -> tuple[tuple[float, float], ...]:
    if gap is None:
        return ()
    if isinstance(gap[0], (int, float)):
        return (tuple(gap),)
    return tuple(tuple(g) for g in gap)


def plot_predictive_std(
    x: Tensor,
    predictions: dict[str, Prediction],
    gap: tuple[float, float] | tuple[tuple[float, float], ...] | None = None,
    ax: Axes | None = None,
    train_x: Tensor | None = None,
    path: str | os.PathLike | None = None,
    title: str = "",
    families: dict[str, str] | None = None,
    references: tuple[str, ...] | None = None,
    max_curves: int = 8,
) -> Figure:
    """Epistemic standard deviation of every method, log-scale y.

    The curve of a method is ``sqrt(f_var[:, 0, 0])`` (regression, output 0)
    against ``x``; methods with zero variance everywhere (the MAP) are skipped.
    Up to ``max_curves`` curves (or with ``ax``) share one axes, one colour
    each and one line style per family. More curves get one panel per family
    (families from the registry, so methods registered later group
    themselves), each with the reference methods drawn in black for
    comparison, on a shared y-axis. Legends sit outside the plotted region.

    Parameters
    ----------
    x : Tensor
        Sorted 1-D test inputs ``(N,)`` or ``(N, 1)`` the predictions were
        made at.
    predictions : dict of str to Prediction
        Legend label to prediction.
    gap : tuple of float or tuple of tuples, optional
        Input interval(s) without data, shaded grey.
    ax : matplotlib Axes, optional
        Draw every curve into this axes.
    train_x : Tensor, optional
        Training inputs, drawn as a rug at the bottom.
    path : path, optional
        Where to save the PNG.
    title : str
    families : dict of str to str, optional
        Label to family (default: :func:`method_family`).
    references : tuple of str, optional
        Methods repeated in black in every family panel (default: the full
        exact-Hessian and GGN references of the registry, when present).
    max_curves : int, default=8
        Most curves on a single axes before switching to family panels.

    Returns
    -------
    Figure
    """
    xs = x.reshape(-1).double().numpy()
    sds = {}
    for name, p in predictions.items():
        var = p.f_var.reshape(p.f_var.shape[0], -1)[:, 0].double().clamp_min(0)
        if bool((var > 0).any()):
            sds[name] = var.sqrt().numpy()
    groups = group_by_family(list(sds), families)

    def decorate(a: Axes) -> None:
        for lo_hi in _intervals(gap):
            a.axvspan(*lo_hi, color="0.92", lw=0, label=None)
        a.set_yscale("log")
        if train_x is not None:
            a.plot(
                train_x.reshape(-1).double().numpy(), [0.0] * train_x.numel(), "|",
                color="k", ms=8, transform=a.get_xaxis_transform(),
            )  # fmt: skip
        a.tick_params(labelsize=7)

    if ax is not None or len(sds) <= max_curves:
        if ax is None:
            fig, ax = plt.subplots(figsize=(7.5, 3.5))
        else:
            fig = ax.figure
        palette = iter(colors(len(sds)))
        for k, (fam, names) in enumerate(groups.items()):
            for name in names:
                ax.plot(xs, sds[name], lw=1.4, color=next(palette),
                        ls=LINESTYLES[k % len(LINESTYLES)], label=name)  # fmt: skip
        decorate(ax)
        ax.set_xlabel("x", fontsize=8)
        ax.set_ylabel("epistemic sd  sqrt(f_var)", fontsize=8)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0),
                  borderaxespad=0)  # fmt: skip
        if title:
            ax.set_title(title, fontsize=9)
        fig.tight_layout()
        save_figure(fig, path)
        return fig

    if references is None:
        references = tuple(r for r in (REFERENCE_HESSIAN, REFERENCE_GGN) if r in sds)
    panels = {f: n for f, n in groups.items() if [m for m in n if m not in references]}
    ncols = min(3, len(panels))
    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(4.6 * ncols, 3.3 * nrows), sharex=True, sharey=True,
        squeeze=False,
    )  # fmt: skip
    ref_styles = dict(zip(references, ("--", ":", "-.")))
    for a, (fam, names) in zip(axes.flat, panels.items()):
        own = [n for n in names if n not in references]
        for i, (name, color) in enumerate(zip(own, colors(len(own)))):
            # thinner each time: identical curves (same method, other backend)
            # stay visible as nested stripes
            a.plot(xs, sds[name], lw=max(3.2 - 0.8 * i, 0.8), color=color, label=name)
        for ref in references:
            a.plot(xs, sds[ref], lw=1.1, color="k", ls=ref_styles[ref],
                   label=f"{ref} (reference)")  # fmt: skip
        decorate(a)
        a.set_title(FAMILY_TITLES.get(fam, fam), fontsize=9)
    for a in axes.flat[len(panels) :]:
        a.axis("off")
    for i, a in enumerate(axes.flat[: len(panels)]):
        # x labels on every panel with no panel below it; the legend below
        # the labels (not over them)
        bottom = i + ncols >= len(panels)
        if bottom:
            a.xaxis.set_tick_params(labelbottom=True)
            a.set_xlabel("x", fontsize=8)
        a.legend(fontsize=6.5, loc="upper center", frameon=False, ncol=1,
                 bbox_to_anchor=(0.5, -0.22 if bottom else -0.04))  # fmt: skip
    for a in axes[:, 0]:
        a.set_ylabel("epistemic sd  sqrt(f_var)", fontsize=8)
    finish_figure(fig, title, path)
    return fig


def plot_confidence_map(
    xx: Tensor,
    yy: Tensor,
    predictions: dict[str, Prediction],
    train_xy: Tensor | None = None,
    train_y: Tensor | None = None,
    path: str | os.PathLike | None = None,
    title: str = "",
) -> Figure:
    """Max-probability confidence ``max_k p_k`` on a 2-D grid, one panel per method.

    All panels share one colour scale (from ``1 / C`` to 1) and one colour bar.

    Parameters
    ----------
    xx, yy : Tensor
        Grid coordinates ``(H, W)`` (``torch.meshgrid(..., indexing="xy")``);
        the predictions were made at ``torch.stack([xx, yy], -1).reshape(-1, 2)``.
    predictions : dict of str to Prediction
        Panel title to prediction; each needs ``probs`` of shape ``(H * W, C)``.
    train_xy : Tensor, optional
        Training inputs ``(n, 2)``, scattered on every panel.
    train_y : Tensor, optional
        Their labels (point colours).
    path : path, optional
    title : str
    """
    preds = {k: p for k, p in predictions.items() if p.probs is not None}
    fig, axes = panel_grid(len(preds), ncols=4, size=3.0)
    n_cls = max((p.probs.shape[-1] for p in preds.values()), default=2)
    X, Y = xx.double().numpy(), yy.double().numpy()
    mesh = None
    for ax, (name, p) in zip(axes, preds.items()):
        conf = p.probs.double().max(-1).values.reshape(xx.shape).numpy()
        mesh = ax.pcolormesh(
            X, Y, conf, vmin=1.0 / n_cls, vmax=1.0, cmap="viridis", shading="auto"
        )
        if train_xy is not None:
            ax.scatter(
                train_xy[:, 0].double().numpy(),
                train_xy[:, 1].double().numpy(),
                c=None if train_y is None else train_y.numpy(),
                cmap="coolwarm",
                s=4,
                edgecolors="w",
                linewidths=0.2,
            )
        title_panel(ax, name)
        ax.set_aspect("equal")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    if mesh is not None:
        bar = fig.colorbar(mesh, ax=axes[: len(preds)], shrink=0.8)
        bar.set_label("max_k p_k", fontsize=7)
        bar.ax.tick_params(labelsize=6)
    save_figure(fig, path)
    return fig
