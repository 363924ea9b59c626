"""What ``laplace-hfl compare`` prints and measures explains itself: a legend
for every column, a memory column that measures the method, no import cycles
in the package (the layout rules)."""

from __future__ import annotations

import ast
import time
from pathlib import Path

import pytest
import torch

import laplace_hfl
from laplace_hfl.bench.evaluation import PeakMemory, format_table
from laplace_hfl.bench.evaluation.report import LEGEND

ROW = {
    "method": "hfl_ggn",
    "structure": "hfl-ggn",
    "status": "ok",
    "peak_mem_mb": 1.5,
}


@pytest.mark.parametrize("likelihood", ["regression", "classification"])
def test_table_has_a_legend_line_for_every_column(likelihood):
    text = format_table([ROW], likelihood)
    lines = text.splitlines()
    header = lines[0].split()
    legend = lines[lines.index("legend:") + 1 :]
    explained = [ln.split()[0] for ln in legend]
    assert explained == header
    assert all(len(ln.split()) > 3 for ln in legend)  # a sentence, not a name
    assert "legend:" not in format_table([ROW], likelihood, legend=False)


def test_legend_covers_every_possible_column():
    from laplace_hfl.bench.evaluation import report

    names = [c[1] for c in report._COMMON_HEAD + report._COMMON_TAIL]
    names += [c[1] for c in report._REGRESSION + report._CLASSIFICATION]
    assert set(names) | {"status"} <= set(LEGEND)


@pytest.mark.skipif(PeakMemory().mode != "heap", reason="needs glibc mallinfo2")
def test_peak_memory_sees_memory_freed_and_reused_in_the_process():
    """8e6 bytes (7.63 MiB) allocated in the block, twice: the second time the
    pages are reused from the first, which the resident set size cannot see."""
    expected = 1000 * 1000 * 8 / 2**20
    for _ in range(2):
        with PeakMemory() as mem:
            x = torch.ones(1000, 1000, dtype=torch.float64)
            time.sleep(0.02)  # several sampling intervals
            del x
        assert expected * 0.95 <= mem.peak_mb <= expected + 1.0, mem.peak_mb
    with PeakMemory() as mem:
        pass
    assert 0.0 <= mem.peak_mb < 0.5


def _internal_imports() -> dict[str, set[str]]:
    root = Path(laplace_hfl.__file__).parent
    mods = {}
    for f in root.rglob("*.py"):
        parts = f.relative_to(root.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        mods[name] = f
    graph = {}
    for name, f in mods.items():
        deps = set()
        for node in ast.walk(ast.parse(f.read_text())):  # lazy imports included
            if isinstance(node, ast.ImportFrom) and node.module:
                deps.add(node.module)
                deps |= {f"{node.module}.{a.name}" for a in node.names}
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names}
        # a package's __init__ is imported before its modules: not an edge back
        graph[name] = {
            d for d in deps if d in mods and d != name and not name.startswith(d + ".")
        }
    return graph


def test_no_import_cycles_in_the_package():
    graph = _internal_imports()
    state: dict[str, int] = {}
    cycles = []

    def visit(u: str, stack: list[str]) -> None:
        state[u] = 1
        stack.append(u)
        for v in sorted(graph[u]):
            if state.get(v) == 1:
                cycles.append(" -> ".join(stack[stack.index(v) :] + [v]))
            elif v not in state:
                visit(v, stack)
        stack.pop()
        state[u] = 2

    for u in sorted(graph):
        if u not in state:
            visit(u, [])
    assert cycles == []


def test_ood_auroc_variance_hand_computed():
    from laplace_hfl.bench.evaluation import classification_metrics, ood_auroc_variance

    var_in = torch.tensor([[[1.0]], [[2.0]], [[3.0]]])  # (3, 1, 1)
    var_out = torch.tensor([[[2.5]], [[4.0]]])
    # pairs (out > in): 2.5 beats 1, 2; 4 beats all three -> 5 of 6
    assert ood_auroc_variance(var_in, var_out) == pytest.approx(5 / 6)
    zeros = torch.zeros(3, 2, 2)
    assert ood_auroc_variance(zeros, zeros[:2]) == pytest.approx(0.5)  # the MAP
    probs = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
    m = classification_metrics(
        probs, torch.tensor([0, 1, 1]), probs[:2], var=var_in, var_ood=var_out
    )
    assert m["ood_auroc_var"] == pytest.approx(5 / 6)
    assert "ood_auroc_var" not in classification_metrics(probs, torch.tensor([0, 1, 1]))


def _preds(names, n=9):
    from laplace_hfl.bench.evaluation import Prediction

    x = torch.linspace(-2, 2, n, dtype=torch.float64).reshape(-1, 1)
    out = {}
    for i, name in enumerate(names):
        var = (x**2 + 0.1 * (i + 1)).reshape(n, 1, 1)
        out[name] = Prediction(torch.zeros(n, 1), var)
    return x, out


def test_std_figure_groups_any_family_into_panels_with_legends_outside():
    from laplace_hfl.bench.evaluation import plot_predictive_std
    from laplace_hfl.bench.evaluation.registry import REFERENCE_GGN, REFERENCE_HESSIAN

    names = ["hfl_ggn", "hfl_ll", "kron_backpack_ggn", "kron_asdl_ggn",
             "diag_asdl_ggn", "newfam_a", "newfam_b", "newfam_c",
             REFERENCE_GGN, REFERENCE_HESSIAN]  # fmt: skip
    x, preds = _preds(names)
    fig = plot_predictive_std(x, preds, families={"newfam_c": "newfam"})
    fig.canvas.draw()
    panels = [a for a in fig.axes if a.axison]
    titles = sorted(a.get_title() for a in panels)
    # the references alone make no "full" panel; they appear in every panel
    assert titles == sorted(["HFL (this package)", "KFAC", "diagonal", "newfam"])
    r = fig.canvas.get_renderer()
    for a in panels:
        labels = [t.get_text() for t in a.get_legend().get_texts()]
        assert f"{REFERENCE_GGN} (reference)" in labels
        colors = [ln.get_color() for ln in a.get_lines() if ln.get_color() != "k"]
        colors = [c for c in colors if isinstance(c, tuple)]
        assert len(set(colors)) == len(colors)  # distinct within a panel
        assert not a.get_legend().get_window_extent(r).overlaps(a.get_window_extent(r))
        if a.get_xlabel():  # the legend sits below the x label, not over it
            label = a.xaxis.label.get_window_extent(r)
            assert not a.get_legend().get_window_extent(r).overlaps(label)


def test_std_figure_single_axes_legend_right_of_plot():
    from laplace_hfl.bench.evaluation import plot_predictive_std

    x, preds = _preds(["hfl_ggn", "kron_asdl_ggn", "diag_asdl_ggn"])
    fig = plot_predictive_std(x, preds)
    fig.canvas.draw()
    (ax,) = fig.axes
    r = fig.canvas.get_renderer()
    assert ax.get_legend().get_window_extent(r).x0 >= ax.get_window_extent(r).x1
    styles = {ln.get_label(): ln.get_linestyle() for ln in ax.get_lines()}
    assert (
        len({styles["hfl_ggn"], styles["kron_asdl_ggn"], styles["diag_asdl_ggn"]}) == 3
    )


def test_one_method_per_family_panels_side_by_side():
    """Notebook figures (one method per family) use the width, not a
    one-column stack."""
    from laplace_hfl.bench.evaluation import plot_predictive_bands

    x, preds = _preds(["hfl_ggn", "full_curvlinops_ggn", "kron_asdl_ggn"])
    fig = plot_predictive_bands(x, preds, sigma_noise=0.1)
    w, h = fig.get_size_inches()
    assert w > 2 * h
    ylabels = sorted(a.get_ylabel() for a in fig.axes if a.axison)
    assert ylabels == sorted(["HFL (this package)", "full Laplace (P x P)", "KFAC"])


def test_reliability_bins_show_their_counts():
    from laplace_hfl.bench.evaluation import Prediction, plot_reliability

    probs = torch.tensor([[0.95, 0.05]] * 3 + [[0.55, 0.45]] * 2, dtype=torch.float64)
    pred = Prediction(torch.zeros(5, 2), torch.zeros(5, 2, 2), probs=probs)
    fig = plot_reliability({"hfl_ggn": pred}, torch.tensor([0, 0, 1, 0, 0]), n_bins=10)
    texts = sorted(t.get_text() for t in fig.axes[0].texts)
    assert texts == ["2", "3"]
