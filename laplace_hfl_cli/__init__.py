"""The ``laplace-hfl`` console script: a launcher that answers ``--help``
without importing torch.

``laplace-hfl`` and ``laplace-hfl --help`` print the command list from this
module alone (importing :mod:`laplace_hfl` loads torch and laplace-torch,
whose dependencies take seconds, or tens of seconds on a cold disk). A
command (``laplace-hfl compare ...``) prints that it is loading, then hands
its arguments to :func:`laplace_hfl.bench.cli.main`, which owns every subcommand's
options.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

__all__ = ["COMMANDS", "DESCRIPTION", "CommandsHelpFormatter", "main", "top_parser"]

#: Subcommand name to its one-line summary (``laplace_hfl.bench.cli`` registers the
#: full parsers under these names and summaries).
COMMANDS = {
    "compare": "compare HFL with laplace-torch's curvature backends",
    "benchmark": "HFL vs laplace-torch: accuracy, time, memory",
}

DESCRIPTION = (
    "Hessian-free Laplace tools. "
    "Run `laplace-hfl COMMAND --help` for a command's options and defaults."
)


class CommandsHelpFormatter(argparse.HelpFormatter):
    """Keeps each command's summary on the command's line in ``--help``.

    argparse sizes the help column without the extra indent of the command
    names, so the longest name (``benchmark``) had its summary pushed to the
    next line.
    """

    def add_argument(self, action: argparse.Action) -> None:
        super().add_argument(action)
        if isinstance(action, argparse._SubParsersAction):
            for choice in action._choices_actions:
                width = (
                    len(choice.dest) + self._current_indent + 2 * self._indent_increment
                )
                self._action_max_length = max(self._action_max_length, width)


def top_parser() -> tuple[argparse.ArgumentParser, argparse._SubParsersAction]:
    """The ``laplace-hfl`` parser and its (still empty) subparsers action."""
    parser = argparse.ArgumentParser(
        prog="laplace-hfl", description=DESCRIPTION,
        formatter_class=CommandsHelpFormatter,
    )  # fmt: skip
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    return parser, sub


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``laplace-hfl`` console script.

    Parameters
    ----------
    argv : sequence of str, optional
        Arguments (default: ``sys.argv[1:]``).

    Returns
    -------
    int
        Exit code.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:  # help, or an error, from here
        parser, sub = top_parser()
        for name, summary in COMMANDS.items():
            sub.add_parser(name, help=summary, add_help=False)
        parser.parse_args(argv)  # exits on --help and on errors
        parser.print_help()
        return 2
    if not any(a in ("-h", "--help", "--list") for a in argv[1:]):
        print(f"laplace-hfl {argv[0]}: loading torch and laplace-torch ...", flush=True)
    from laplace_hfl.bench.cli import main as command_main

    return command_main(argv)
