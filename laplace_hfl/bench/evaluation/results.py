"""What a comparison returns: per-method predictions and per-task results.

Kept apart from the harness (:mod:`~laplace_hfl.bench.evaluation.runner`) so that
figures and reports can use them without importing the harness.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from laplace_hfl.bench.evaluation.tasks import Task

__all__ = ["Prediction", "ComparisonResult"]


@dataclass
class Prediction:
    """Predictions of one method on one task (kept for figures).

    Attributes
    ----------
    f_mu, f_var : Tensor
        Test means ``(N, C)`` and functional covariances ``(N, C, C)``.
    probs, probs_ood : Tensor or None
        Probit class probabilities on test / OOD inputs (classification).
    f_var_ood : Tensor or None
        Latent covariances ``(N_ood, C, C)`` on the OOD inputs.
    """

    f_mu: Tensor
    f_var: Tensor
    probs: Tensor | None = None
    probs_ood: Tensor | None = None
    f_var_ood: Tensor | None = None

    @property
    def variances(self) -> Tensor:
        """Per-point (per-class) latent variances, flattened ``(N*C,)``."""
        return self.f_var.diagonal(dim1=-2, dim2=-1).reshape(-1)


@dataclass
class ComparisonResult:
    """Rows and predictions of :func:`run_comparison` for one task.

    Attributes
    ----------
    task : Task
    rows : list of dict
        One tidy row per method (see ``docs/evaluation.md`` for the columns).
    predictions : dict of str to Prediction
        Successful methods only.
    meta : dict
        Hyperparameters, MAP protocol and gradient norm, seed, settings.
    """

    task: Task
    rows: list[dict[str, Any]]
    predictions: dict[str, Prediction]
    meta: dict[str, Any] = field(default_factory=dict)
