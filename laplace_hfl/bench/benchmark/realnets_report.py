"""Figure and markdown table of the real-network benchmark (``realnets.json``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["plot_realnets", "markdown_table"]


def plot_realnets(results: dict[str, Any], path: Path) -> None:
    """Accuracy / NLL / ECE vs rotation (LeNet and BN CNN) and a cost panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    img = [c for c in ("lenet", "bn_cnn") if c in results["cases"]]
    fig, axes = plt.subplots(max(len(img), 1), 4, figsize=(20, 4.5 * max(len(img), 1)),
                             squeeze=False)  # fmt: skip
    for i, cname in enumerate(img):
        case = results["cases"][cname]
        rows = [r for r in case["rows"] if r["status"] == "ok"]
        for j, key in enumerate(("accuracy", "nll", "ece")):
            ax = axes[i, j]
            for r in rows:
                lv = r["levels"]
                ang = [int(a) for a in lv]
                style = "o-" if r["method"].startswith("hfl") else ".-"
                n = min(x["n"] for x in lv.values())
                lab = r["label"] + (f" (n={n}/angle)" if n < 20 else "")
                ax.plot(ang, [lv[a][key] for a in lv], style, label=lab, ms=4)
            ax.set(xlabel="rotation (degrees)", ylabel=key,
                   title=f"{cname}: {key} vs rotation")  # fmt: skip
            if j == 0:
                ax.legend(fontsize=6)
        ax = axes[i, 3]
        names = [r["method"] for r in rows if r["method"] != "map"]
        pq = [r["predict_s_per_query"] for r in rows if r["method"] != "map"]
        fit = [r["fit_s"] for r in rows if r["method"] != "map"]
        y = np.arange(len(names))
        ax.barh(y - 0.2, pq, 0.4, label="predict s / query")
        ax.barh(y + 0.2, fit, 0.4, label="fit s")
        ax.set_xscale("log")
        ax.set_yticks(y, names, fontsize=7)
        ax.set(title=f"{cname}: cost (same run, CPU)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def markdown_table(results: dict[str, Any]) -> str:
    """The README table: one line per case and method (failures included).

    Image cases: accuracy / NLL / ECE at 0 degrees and averaged over all
    angles; text: in-distribution metrics and mean confidence on OOD inputs.
    """
    head = ("| case | method | prior (tuning) | fit s | predict s/query | peak MiB "
            "| acc 0° / ID | NLL 0° / ID | ECE 0° / ID | NLL mean / OOD conf "
            "| ECE mean | n/level |")  # fmt: skip
    lines = [head, "|" + "---|" * 12]
    for cname, case in results["cases"].items():
        for r in case["rows"]:
            if r["status"] != "ok":
                lines.append(f"| {cname} | {r['method']} | failed: {r['error'][:70]} "
                             + "| " * 9 + "|")  # fmt: skip
                continue
            lv = list(r["levels"].values())
            first = lv[0]
            if cname == "text":
                c4, c5 = f"{lv[-1]['mean_conf']:.3f}", "-"
            else:
                c4 = f"{np.mean([x['nll'] for x in lv]):.3f}"
                c5 = f"{np.mean([x['ece'] for x in lv]):.3f}"
            p = r["prior_precision"]
            ptxt = "-" if p is None else f"{p:.3g} ({r['tuning'].split(' ')[0]})"
            lines.append(
                f"| {cname} | {r['method']} | {ptxt} | {r['fit_s']:.2f} | "
                f"{r['predict_s_per_query']:.2g} | {r['peak_mem_mb']:.0f} | "
                f"{first['accuracy']:.3f} | {first['nll']:.3f} | {first['ece']:.3f} | "
                f"{c4} | {c5} | {first['n']} |"
            )  # fmt: skip
    return "\n".join(lines)
