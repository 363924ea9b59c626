"""What one vectorised product holds: the ``chunk_size`` option and the
quantities derived from it.

``chunk_size`` has one meaning: parameter-space directions per vectorised
product (refit directions, sketch columns, Hessian rows, posterior samples).
Each place that sizes a batch of work reads one of the named quantities
below, so what a chunk holds is stated once.
"""

from __future__ import annotations

__all__ = ["query_points", "hessian_rows", "sketch_columns", "sample_chunk"]


def query_points(chunk_size: int, n_outputs: int) -> int:
    """Query inputs per prediction chunk of the refits.

    Each input brings ``n_outputs`` Jacobian rows, i.e. refit directions, so
    ``chunk_size // n_outputs`` inputs (at least one) fill one product.
    """
    return max(1, chunk_size // max(n_outputs, 1))


def hessian_rows(chunk_size: int) -> int:
    """Rows of the data Hessian formed per batched Hessian-vector pass (one
    direction each) by the dense solver with ``target="hessian"``."""
    return chunk_size


def sketch_columns(chunk_size: int) -> int:
    """Columns of the Nyström sketch formed per batched curvature pass (one
    direction each)."""
    return chunk_size


def sample_chunk(chunk_size: int) -> int:
    """Posterior samples (amortised mode, ``sample()``) solved together, and
    pushed through one vectorised Jacobian-vector product when predicting:
    one direction each."""
    return chunk_size
