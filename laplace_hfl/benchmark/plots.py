"""Figures of the benchmark results (matplotlib, Agg backend)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["plot_all"]


def plot_all(results: dict[str, Any], out_dir: str | Path) -> list[str]:
    """Write ``benchmark.png`` (2x2 summary); returns the file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 9))
    ax = axes[0, 0]
    rows = results["accuracy_exact"]
    for pre in sorted({r.get("preconditioned", False) for r in rows}):
        for eps in sorted({r["eps"] for r in rows}):
            rr = [r for r in rows if r["eps"] == eps
                  and r.get("preconditioned", False) == pre]  # fmt: skip
            ax.loglog([r["max_iter"] for r in rr],
                      [max(r["median_rel_err"], 1e-16) for r in rr],
                      "o-" if pre else "s--",
                      label=f"eps={eps:g}" + (", Nystrom" if pre else ", plain CG"))  # fmt: skip
    ax.set(xlabel="CG iterations per solve (max_iter; one Newton correction)",
           ylabel="median rel. error of variance",
           title="Exact HFL (batched) vs FullLaplace GGN, in-between")  # fmt: skip
    ax.legend()

    ax = axes[0, 1]
    rows = results["accuracy_amortized"]
    for case in sorted({r["case"] for r in rows}):
        rr = [r for r in rows if r["case"] == case]
        ax.loglog([r["samples"] for r in rr], [r["median_rel_err"] for r in rr], "o-",
                  label=case)  # fmt: skip
    S = sorted({r["samples"] for r in rows})
    ax.loglog(S, [0.674 * (2 / s) ** 0.5 for s in S], "k--", label="0.67 sqrt(2/S)")
    ax.axhline(0.15, color="r", lw=0.8)
    ax.set(xlabel="posterior samples S", ylabel="median rel. error of variance",
           title="Amortised HFL vs FullLaplace GGN")  # fmt: skip
    ax.legend()

    ax = axes[1, 0]
    rows = [r for r in results["timing"] if "error" not in r]
    case0 = rows[0]["case"] if rows else ""
    for method in dict.fromkeys(r["method"] for r in rows):
        rr = [r for r in rows if r["method"] == method and r["case"] == case0]
        if rr:
            ax.loglog([r["M"] for r in rr], [r["total_s_per_query"] for r in rr], "o-",
                      label=rr[0]["label"])  # fmt: skip
    ax.set(xlabel="query points M", ylabel="s per query (fit + predict) / M",
           title=f"Wall time per query, {case0} (CPU)")  # fmt: skip
    ax.legend(fontsize=7)

    ax = axes[1, 1]
    rows = results["memory"]
    for method in dict.fromkeys(r["method"] for r in rows):
        rr = [r for r in rows if r["method"] == method and r.get("peak_rss_mb")]
        if rr:
            ax.loglog([r["n_params"] for r in rr], [r["peak_rss_mb"] / 1024 for r in rr],
                      "o-", label=method)  # fmt: skip
        bad = [r for r in rows if r["method"] == method and not r.get("peak_rss_mb")]
        for r in bad:
            ax.plot([r.get("n_params", r["target_params"])], [24], "rx")
    ax.axhline(24, color="r", lw=0.8, label="24 GiB (x: cannot allocate)")
    ax.set(xlabel="parameters P", ylabel="peak RSS (GiB)",
           title="Peak memory per process (CPU)")  # fmt: skip
    ax.legend(fontsize=7)
    fig.tight_layout()
    name = "benchmark.png"
    fig.savefig(Path(out_dir) / name, dpi=110)
    plt.close(fig)
    return [name]
