"""Command-line interface: ``laplace-hfl <subcommand>``.

The console script is :func:`laplace_hfl_cli.main`, which answers ``--help``
without importing this package (torch, laplace-torch) and hands a command's
arguments to :func:`main` here.

Subcommands register themselves through an ``add_*_parser(subparsers)``
function that adds a parser and sets ``func`` (called with the parsed
namespace, returning an exit code). To add one (e.g. ``benchmark``), write
``add_benchmark_parser`` and append it to :data:`SUBCOMMANDS`.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from laplace_hfl_cli import COMMANDS, top_parser

__all__ = [
    "main",
    "build_parser",
    "add_compare_parser",
    "add_benchmark_parser",
    "run_compare",
    "format_listing",
    "SUBCOMMANDS",
]

DEFAULT_TASKS = ("inbetween", "moons")
DEFAULT_OUT = "results/compare"


def add_compare_parser(
    subparsers: argparse._SubParsersAction,
) -> argparse.ArgumentParser:
    """Add the ``compare`` subcommand to ``subparsers``.

    Parameters
    ----------
    subparsers : argparse._SubParsersAction
        From ``parser.add_subparsers()``.

    Returns
    -------
    argparse.ArgumentParser
        The ``compare`` parser (its ``func`` default is :func:`run_compare`).
    """
    p = subparsers.add_parser(
        "compare",
        help=COMMANDS["compare"],
        description=(
            "Fit HFL and laplace-torch's full / kron / diag / last-layer Laplace "
            "approximations (BackPACK, ASDL, curvlinops backends) on offline "
            "tasks with shared hyperparameters; print a table and write CSV, "
            "JSON and PNG figures. Default: tasks inbetween and moons, all "
            "methods, fixed hyperparameters (59-113 s measured on 2 shared CPU cores)."
        ),
    )
    p.add_argument(
        "--task", nargs="+", default=None, metavar="NAME",
        help=f"task(s) to run (default: {' '.join(DEFAULT_TASKS)}); see --list",
    )  # fmt: skip
    p.add_argument(
        "--methods", nargs="+", default=None, metavar="NAME",
        help="method(s) to run (default: all registered); see --list",
    )  # fmt: skip
    p.add_argument(
        "--out", default=DEFAULT_OUT,
        help=f"output directory (default: {DEFAULT_OUT})",
    )  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument(
        "--tune", nargs="?", const="gridsearch", default=None,
        choices=["gridsearch", "marglik"],
        help="tune each method's prior precision instead of the fixed shared "
        "value: 'gridsearch' (default when given alone) on the validation NLL (slow: "
        "HFL predicts the validation set once per grid value), or 'marglik' by "
        "laplace-torch's marginal-likelihood loop",
    )  # fmt: skip
    p.add_argument(
        "--prior-precision", type=float, default=None,
        help="override every task's fixed prior precision",
    )  # fmt: skip
    p.add_argument(
        "--no-figures", action="store_true",
        help="skip the PNG figures (default: written to OUT/figures/)",
    )  # fmt: skip
    p.add_argument(
        "--no-progress", action="store_true",
        help="no progress bars (default: a bar over methods, and HFL's own bar "
        "when a prediction is expected to take over 10 s)",
    )  # fmt: skip
    p.add_argument("--list", action="store_true", help="list tasks and methods")
    p.set_defaults(func=run_compare)
    return p


def run_compare(args: argparse.Namespace) -> int:
    """Run ``laplace-hfl compare`` for parsed ``args``; returns the exit code."""
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    from laplace_hfl.bench.evaluation import METHODS, TASKS, run_comparison
    from laplace_hfl.bench.evaluation.report import (
        format_header,
        format_table,
        write_results,
    )

    if args.list:
        print(format_listing(TASKS, METHODS))
        return 0
    if args.no_progress:  # HFL's automatic bars on long predictions too
        import laplace_hfl.engine.progress

        laplace_hfl.engine.progress.AUTO_PROGRESS_AFTER_S = float("inf")
    tasks = args.task or list(DEFAULT_TASKS)
    unknown = [t for t in tasks if t not in TASKS]
    bad = [m for m in (args.methods or []) if m not in METHODS]
    if unknown or bad:
        print(
            f"error: unknown task(s) {unknown} / method(s) {bad}; "
            "run `laplace-hfl compare --list`",
            file=sys.stderr,
        )
        return 2
    if args.tune == "gridsearch":
        print("note: --tune grid-searches the prior precision per method (slow).")
    t0 = time.perf_counter()
    results = []
    for name in tasks:
        res = run_comparison(
            name, args.methods, seed=args.seed, out=None, tune=args.tune,
            prior_precision=args.prior_precision, progress=not args.no_progress,
        )  # fmt: skip
        results.append(res)
        print()
        print(format_header(res.meta))
        print(format_table(res.rows, res.task.likelihood))
    files = write_results(results, args.out, figures=not args.no_figures)
    out = Path(args.out)
    print(
        f"\nDone in {time.perf_counter() - t0:.0f} s. Table: {files['csv']} "
        f"and {files['json']} (settings: {files['meta']})."
    )
    if files["figures"]:
        print(f"Figures in {out / 'figures'}:")
        for p in files["figures"]:
            print(f"  {p}")
    return 0


def format_listing(tasks: dict[str, Any], methods: dict[str, Any]) -> str:
    """``compare --list``: tasks and methods as tables with column headers.

    Parameters
    ----------
    tasks : dict
        Task name to builder (:data:`laplace_hfl.bench.evaluation.TASKS`); the first
        docstring line describes it.
    methods : dict
        Method name to :class:`~laplace_hfl.bench.evaluation.MethodSpec`.

    Returns
    -------
    str
    """

    def table(head: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
        widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
        fmt = lambda r: "  " + "  ".join(c.ljust(w) for c, w in zip(r, widths))  # noqa: E731
        lines = [fmt(head), fmt(tuple("-" * w for w in widths))]
        return [ln.rstrip() for ln in lines + [fmt(r) for r in rows]]

    task_rows = [
        (name, ((fn.__doc__ or "").strip().splitlines() or [""])[0])
        for name, fn in tasks.items()
    ]
    method_rows = [(s.name, s.family, s.backend, s.structure) for s in methods.values()]
    lines = [f"tasks ({len(task_rows)}; default: {' '.join(DEFAULT_TASKS)}):"]
    lines += table(("task", "description"), task_rows)
    lines += ["", f"methods ({len(method_rows)}; default: all):"]
    lines += table(("method", "family", "backend", "structure"), method_rows)
    return "\n".join(lines)


def add_benchmark_parser(
    subparsers: argparse._SubParsersAction,
) -> argparse.ArgumentParser:
    """Add the ``benchmark`` subcommand (see :mod:`laplace_hfl.bench.benchmark`)."""
    from laplace_hfl.bench.benchmark.run import register

    return register(subparsers)


#: Functions adding a subcommand parser; ``main`` calls each in order.
SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], argparse.ArgumentParser]] = [
    add_compare_parser,
    add_benchmark_parser,
]


def build_parser() -> argparse.ArgumentParser:
    """The ``laplace-hfl`` parser with every subcommand in :data:`SUBCOMMANDS`."""
    parser, sub = top_parser()
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``) with every subcommand's
    parser and run the command; returns its exit code. The console script
    (:func:`laplace_hfl_cli.main`) calls this for commands."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
