"""Progress of long HFL loops, shown without being asked for.

A prediction on a CNN can run for an hour; a user who never heard of
``progress_bar=True`` should still see that something is happening and how
long it will take, while the many short calls of ordinary use stay quiet.
:func:`progress` times the first step of a loop and, when the steps left are
expected to take longer than :data:`AUTO_PROGRESS_AFTER_S`, opens a tqdm bar
whose description states the expected total time.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from typing import TypeVar

import tqdm

__all__ = ["AUTO_PROGRESS_AFTER_S", "progress", "format_seconds", "is_long"]

#: A loop whose first step predicts more than this many seconds in total
#: shows a progress bar (``float("inf")``: never unless asked for).
AUTO_PROGRESS_AFTER_S = 10.0

T = TypeVar("T")


def is_long(seconds: float) -> bool:
    """Whether an expected duration deserves a bar or a notice
    (``seconds > AUTO_PROGRESS_AFTER_S``, read at call time)."""
    return seconds > AUTO_PROGRESS_AFTER_S


def format_seconds(seconds: float) -> str:
    """``"42 s"``, ``"3.5 min"`` or ``"1.2 h"``."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def progress(items: Sequence[T], *, desc: str, always: bool = False) -> Iterator[T]:
    """Iterate over ``items``, with a tqdm bar when the loop is long.

    Parameters
    ----------
    items : sequence
        The loop's steps (``len`` must be known).
    desc : str
        Bar label, e.g. ``"[HFL predict]"``.
    always : bool, default=False
        Show the bar from the start (the estimator's ``progress_bar=True``;
        loops of one step too). Otherwise the first step is timed and the bar
        appears, labelled with the expected total time, only when
        ``len(items)`` times that exceeds :data:`AUTO_PROGRESS_AFTER_S`;
        loops of one step then show no bar. Callers do one-time setup before
        the loop, so that the first step predicts the others.

    Yields
    ------
    The items of ``items``, in order.
    """
    n = len(items)
    if always:
        yield from tqdm.tqdm(items, desc=desc)
        return
    if n <= 1:
        yield from items
        return
    bar = None
    t0, wall0 = time.perf_counter(), time.time()  # tqdm's clock is time.time
    try:
        for i, item in enumerate(items):
            yield item  # the caller's loop body runs here
            if i == 0:
                first = time.perf_counter() - t0
                if is_long(first * n):
                    bar = tqdm.tqdm(
                        total=n,
                        leave=False,
                        delay=1e-9,  # no "0/n" line before the start is set
                        desc=f"{desc} ~{format_seconds(first * n)} expected "
                        f"({n} steps of ~{format_seconds(first)})",
                    )
                    # the first step counts in the elapsed time and the rate
                    # (tqdm would otherwise show "1/n [00:00<?, ?it/s]")
                    bar.start_t = bar.last_print_t = wall0
                    bar.update(1)
                    if bar.last_print_n < 1:  # update() did not print
                        bar.refresh()
            elif bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
