"""The weight-space posterior of the HFL shell: precision, samples, density."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["WeightSpaceMixin"]

_NO_WEIGHT_SPACE = (
    "HFL gives the linearised (GLM) predictive without a weight-space posterior. "
    "Use la(x, pred_type='glm'), la.functional_samples(x) or "
    "la.predictive_samples(x) (both pred_type='glm')."
)


class WeightSpaceMixin:
    """``posterior_precision``, ``sample``, ``log_prob``, ``square_norm``."""

    @property
    def posterior_precision(self) -> Tensor:
        """Not available: HFL never forms the posterior precision."""
        raise NotImplementedError(
            "HFL never forms the posterior precision (that is the point); "
            "predictive covariances come from la(x) or la.functional_variance(Js)."
        )

    @property
    def posterior_covariance(self) -> Tensor:
        """Not available: HFL never forms the posterior covariance."""
        raise NotImplementedError(
            "HFL never forms the posterior covariance; predictive covariances "
            "come from la(x) or la.functional_variance(Js)."
        )

    @property
    def posterior_variance(self) -> Tensor:
        """Not available: HFL never forms the posterior variance."""
        raise NotImplementedError(
            "HFL never forms the posterior (co)variance in weight space; "
            "predictive variances come from la(x) or la.functional_variance(Js)."
        )

    def square_norm(self, value: Tensor) -> Tensor:
        raise NotImplementedError(_NO_WEIGHT_SPACE)

    def log_prob(self, value: Tensor, normalized: bool = True) -> Tensor:
        """Not available: no weight-space density in HFL."""
        raise NotImplementedError(_NO_WEIGHT_SPACE)

    def sample(
        self, n_samples: int = 100, generator: torch.Generator | None = None
    ) -> Tensor:
        """Not available: no weight-space samples in HFL."""
        raise NotImplementedError(_NO_WEIGHT_SPACE)
