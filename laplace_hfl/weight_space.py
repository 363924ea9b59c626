"""The weight-space posterior of the HFL shell: precision, samples, density."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from laplace_hfl.batches import eval_mode
from laplace_hfl.logdet import precision_quadratic

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

    def square_norm(self, value: Tensor) -> Tensor:
        raise NotImplementedError(_NO_WEIGHT_SPACE)

    def log_prob(self, value: Tensor, normalized: bool = True) -> Tensor:
        """Log density of the Laplace posterior ``N(theta_MAP, P^-1)`` at ``value``.

        The quadratic form ``(v - theta)^T P (v - theta)`` takes one batched
        curvature-vector product; the normaliser uses
        :attr:`log_det_posterior_precision` (stochastic Lanczos quadrature,
        exact for small models).

        Parameters
        ----------
        value : Tensor
            Weights ``(P,)`` or a batch ``(n, P)``.
        normalized : bool, default=True
            Include ``-P/2 log(2 pi) + 1/2 log det P``.

        Returns
        -------
        Tensor
            Scalar for ``(P,)``, ``(n,)`` for a batch.

        Raises
        ------
        HFLNotFittedError
            Not fitted (or no training data).
        ValueError
            ``value`` is not of shape ``(P,)`` or ``(n, P)``, or not finite.
        """
        self._check_H_init()
        value = torch.as_tensor(value)
        if value.ndim not in (1, 2) or value.shape[-1] != self.n_params:
            raise ValueError(
                f"log_prob needs weights of shape ({self.n_params},) or "
                f"(n, {self.n_params}); got {tuple(value.shape)}."
            )
        if not bool(torch.isfinite(value).all()):
            raise ValueError("log_prob got non-finite weights (NaN/inf).")
        dtype = self.compute_dtype
        delta = (value.detach().to(self._device, dtype) - self.mean.to(dtype)).reshape(
            -1, self.n_params
        )
        with eval_mode(self.model):
            obj = self._objective()
            quad = precision_quadratic(obj, self.hfl_settings.target, delta)
        quad = quad.to(self._dtype).reshape(value.shape[:-1])
        if not normalized:
            return -quad / 2
        const = -self.n_params / 2 * math.log(2 * math.pi)
        return const + self.log_det_posterior_precision / 2 - quad / 2

    def sample(
        self, n_samples: int = 100, generator: torch.Generator | None = None
    ) -> Tensor:
        """Not available: no weight-space samples in HFL."""
        raise NotImplementedError(_NO_WEIGHT_SPACE)
