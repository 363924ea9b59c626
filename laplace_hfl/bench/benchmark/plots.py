"""Figures of the benchmark results (matplotlib, Agg backend).

Re-plot committed results without rerunning the benchmark::

    python -m laplace_hfl.bench.benchmark.plots benchmarks/results/results.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

__all__ = ["plot_all", "method_group"]

#: Line style of each group of methods: this package, laplace-torch, other.
_GROUP_STYLE = {"HFL": ("-", "o"), "laplace-torch": ("--", "s"), "other": (":", "^")}


def method_group(method: str) -> str:
    """``"HFL"``, ``"laplace-torch"`` or ``"other"`` (curvlinops' CG inverse,
    the memory baselines) for a benchmark method key."""
    if method.startswith("hfl"):
        return "HFL"
    if method in ("cg_inverse", "baseline", "map_train_step"):
        return "other"
    return "laplace-torch"


def _legend_right(ax: Any, **kw: Any) -> None:
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0,
              fontsize=7.5, **kw)  # fmt: skip


def _grouped(ax: Any, series: list[tuple[str, str, list, list]]) -> None:
    """Plot ``(method, label, x, y)`` series: one colour each (tab10/tab20),
    line style and marker by :func:`method_group`; legend sorted by group."""
    import matplotlib.pyplot as plt

    order = sorted(series, key=lambda s: list(_GROUP_STYLE).index(method_group(s[0])))
    cmap = plt.get_cmap("tab10" if len(order) <= 10 else "tab20")
    for i, (method, label, x, y) in enumerate(order):
        ls, marker = _GROUP_STYLE[method_group(method)]
        ax.loglog(x, y, ls=ls, marker=marker, color=cmap(i % cmap.N), ms=5,
                  label=f"{label}  [{method_group(method)}]")  # fmt: skip


def plot_all(results: dict[str, Any], out_dir: str | Path) -> list[str]:
    """Write ``benchmark.png`` (2x2 summary); returns the file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(17, 10))
    ax = axes[0, 0]
    rows = results["accuracy_exact"]
    eps_all = sorted({r["eps"] for r in rows})
    colors = dict(zip(eps_all, plt.get_cmap("tab10").colors))
    for pre in sorted({r.get("preconditioned", False) for r in rows}):
        for k, eps in enumerate(eps_all):
            rr = [r for r in rows if r["eps"] == eps
                  and r.get("preconditioned", False) == pre]  # fmt: skip
            ax.loglog([r["max_iter"] for r in rr],
                      [max(r["median_rel_err"], 1e-16) for r in rr],
                      "o-" if pre else "s--", color=colors[eps], ms=9 - 2.5 * k,
                      label=f"eps={eps:g}, " + ("Nystrom-preconditioned CG" if pre
                                                else "plain CG"))  # fmt: skip
    ax.set(xlabel="CG iterations per solve (max_iter; one Newton correction)",
           ylabel="median rel. error of variance",
           title="Exact HFL vs FullLaplace GGN, in-between\n"
                 "(curves of different eps coincide: the GGN target is exact for any eps)")  # fmt: skip
    _legend_right(ax)

    ax = axes[0, 1]
    rows = results["accuracy_amortized"]
    for case in sorted({r["case"] for r in rows}):
        rr = [r for r in rows if r["case"] == case]
        ax.loglog([r["samples"] for r in rr], [r["median_rel_err"] for r in rr], "o-",
                  label=case)  # fmt: skip
    S = sorted({r["samples"] for r in rows})
    ax.loglog(S, [0.674 * (2 / s) ** 0.5 for s in S], "k--",
              label="theory: 0.67 sqrt(2/S)")  # fmt: skip
    ax.axhline(0.15, color="r", lw=0.8, label="15% error")
    ax.set(xlabel="posterior samples S", ylabel="median rel. error of variance",
           title="Amortised HFL vs FullLaplace GGN")  # fmt: skip
    _legend_right(ax)

    ax = axes[1, 0]
    rows = [r for r in results["timing"] if "error" not in r]
    case0 = rows[0]["case"] if rows else ""
    series = []
    for method in dict.fromkeys(r["method"] for r in rows):
        rr = [r for r in rows if r["method"] == method and r["case"] == case0]
        if rr:
            series.append((method, rr[0]["label"], [r["M"] for r in rr],
                           [r["total_s_per_query"] for r in rr]))  # fmt: skip
    _grouped(ax, series)
    ax.set(xlabel="query points M", ylabel="s per query (fit + predict) / M",
           title=f"Wall time per query, {case0} (CPU)")  # fmt: skip
    _legend_right(ax)

    ax = axes[1, 1]
    rows = results["memory"]
    series = []
    for method in dict.fromkeys(r["method"] for r in rows):
        rr = [r for r in rows if r["method"] == method and r.get("peak_rss_mb")]
        if rr:
            series.append((method, method, [r["n_params"] for r in rr],
                           [r["peak_rss_mb"] / 1024 for r in rr]))  # fmt: skip
        bad = [r for r in rows if r["method"] == method and not r.get("peak_rss_mb")]
        for r in bad:
            ax.plot([r.get("n_params", r["target_params"])], [24], "rx", ms=9)
    _grouped(ax, series)
    ax.axhline(24, color="r", lw=0.8, label="24 GiB (x: cannot allocate)")
    ax.set(xlabel="parameters P", ylabel="peak RSS (GiB)",
           title="Peak memory per process (CPU)")  # fmt: skip
    _legend_right(ax)
    fig.tight_layout()
    name = "benchmark.png"
    fig.savefig(Path(out_dir) / name, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return [name]


if __name__ == "__main__":
    for arg in sys.argv[1:] or ["benchmarks/results/results.json"]:
        with open(arg) as fh:
            print(plot_all(json.load(fh), Path(arg).parent))
