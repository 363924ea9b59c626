"""Layout shared by the comparison figures: panel grids, one row per method
family, colours and saving (:mod:`laplace_hfl.bench.evaluation.figures` draws)."""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")  # headless: the CLI writes files only
import matplotlib.pyplot as plt  # noqa: E402

from laplace_hfl.bench.evaluation.registry import METHODS  # noqa: E402

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = [
    "FAMILY_TITLES",
    "LINESTYLES",
    "colors",
    "family_grid",
    "finish_figure",
    "group_by_family",
    "method_family",
    "panel_grid",
    "save_figure",
    "title_panel",
]


def panel_grid(n: int, ncols: int = 5, size: float = 2.6) -> tuple[Figure, list]:
    """A figure with ``n`` panels in rows of ``ncols`` (spare panels hidden)."""
    ncols = min(ncols, max(n, 1))
    nrows = math.ceil(max(n, 1) / ncols)
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(size * ncols, size * 0.85 * nrows), squeeze=False
    )
    axes = list(axes.flat)
    for ax in axes[n:]:
        ax.axis("off")
    return fig, axes


def finish_figure(fig: Figure, title: str, path: str | os.PathLike | None) -> None:
    """Title above the panels (room kept for it, so it covers no panel
    title), tight layout, then :func:`save_figure`."""
    if title:
        fig.suptitle(title, fontsize=10)
        fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / fig.get_size_inches()[1]))
    else:
        fig.tight_layout()
    save_figure(fig, path)


def title_panel(ax: Axes, name: str) -> None:
    """A method's panel: its name above, small tick labels (major and minor)."""
    ax.set_title(name, fontsize=8)
    ax.tick_params(which="both", labelsize=6)


def save_figure(fig: Figure, path: str | os.PathLike | None) -> None:
    """Write ``fig`` to ``path`` (folders created) unless ``path`` is None."""
    if path is not None:
        os.makedirs(os.path.dirname(os.fspath(path)) or ".", exist_ok=True)
        fig.savefig(path, dpi=110, bbox_inches="tight")


#: Panel titles of the known method families; any other family (a method
#: registered later) gets its own panel titled by its name.
FAMILY_TITLES = {
    "hfl": "HFL (this package)",
    "full": "full Laplace (P x P)",
    "kron": "KFAC",
    "diag": "diagonal",
    "ll": "last-layer Laplace",
    "map": "MAP",
    "gp": "function space (GP)",
}
LINESTYLES = ("-", "--", "-.", ":", (0, (5, 1)), (0, (3, 1, 1, 1, 1, 1)))


def method_family(name: str, families: dict[str, str] | None = None) -> str:
    """Family of a method: ``families[name]``, else the registry's
    :attr:`MethodSpec.family`, else the name up to its first underscore."""
    if families and name in families:
        return families[name]
    spec = METHODS.get(name)
    return spec.family if spec is not None else name.split("_")[0]


def group_by_family(
    names: list[str], families: dict[str, str] | None = None
) -> dict[str, list[str]]:
    """``{family: [names]}`` in first-seen order of families, ``hfl`` first."""
    groups: dict[str, list[str]] = {}
    for n in names:
        groups.setdefault(method_family(n, families), []).append(n)
    order = sorted(groups, key=lambda f: (f != "hfl", list(groups).index(f)))
    return {f: groups[f] for f in order}


def colors(n: int) -> list:
    """``n`` distinct colours (tab10 up to 10, tab20 beyond)."""
    cmap = plt.get_cmap("tab10" if n <= 10 else "tab20")
    return [cmap(i % cmap.N) for i in range(n)]


def family_grid(
    groups: dict[str, list[str]],
    max_cols: int = 6,
    size: float = 2.6,
    share: bool = False,
) -> tuple[Figure, dict[str, Axes]]:
    """One row per family (wrapped after ``max_cols``), the family named as the
    y label of the row's first panel; ``share``: common x and y axes."""
    rows: list[tuple[str, list[str]]] = []
    for fam, names in groups.items():
        for i in range(0, len(names), max_cols):
            rows.append((fam, names[i : i + max_cols]))
    if len(rows) > 1 and all(len(names) == 1 for _, names in rows):
        return _singleton_grid(rows, max_cols, size, share)
    ncols = max((len(r[1]) for r in rows), default=1)
    fig, axes = plt.subplots(
        max(len(rows), 1), ncols, figsize=(size * ncols, size * 0.85 * max(len(rows), 1)),
        squeeze=False, sharex=share, sharey=share,
    )  # fmt: skip
    out: dict[str, Axes] = {}
    for r, (fam, names) in enumerate(rows):
        for c in range(ncols):
            if c < len(names):
                out[names[c]] = axes[r, c]
            else:
                axes[r, c].axis("off")
        axes[r, 0].set_ylabel(
            FAMILY_TITLES.get(fam, fam), fontsize=9, fontweight="bold"
        )
    return fig, out


def _singleton_grid(
    rows: list[tuple[str, list[str]]], max_cols: int, size: float, share: bool
) -> tuple[Figure, dict[str, Axes]]:
    """One method per family: the panels side by side (rows of ``max_cols``)
    instead of a one-column stack, each labelled with its family (unless the
    family is the method's own name)."""
    ncols = min(max_cols, len(rows))
    nrows = math.ceil(len(rows) / ncols)
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(size * ncols, size * 0.85 * nrows), squeeze=False,
        sharex=share, sharey=share,
    )  # fmt: skip
    flat = list(axes.flat)
    out: dict[str, Axes] = {}
    for ax, (fam, names) in zip(flat, rows):
        out[names[0]] = ax
        label = FAMILY_TITLES.get(fam, fam)
        if label != names[0]:  # a family of its own says nothing new
            ax.set_ylabel(label, fontsize=9, fontweight="bold")
    for ax in flat[len(rows) :]:
        ax.axis("off")
    return fig, out
