"""Validated hyperparameters: laplace-torch's setters, checked at assignment.

``prior_precision``, ``sigma_noise`` and ``temperature`` are checked when they
are assigned (constructor, ``la.prior_precision = ...``, grid search) and again
when a refit uses them (:meth:`HyperparameterMixin._check_hyperparameters`),
which also catches in-place edits of the stored tensors.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from laplace_hfl.engine.validation import (
    check_prior_precision,
    check_sigma_noise,
    check_temperature,
)

__all__ = ["HyperparameterMixin"]


def _parent_property(cls: type, obj: object, name: str) -> property:
    """The property ``name`` that ``cls`` overrides in ``type(obj)``'s MRO."""
    return getattr(super(cls, type(obj)), name)


class HyperparameterMixin:
    """Checks laplace-torch's hyperparameter setters before delegating to them."""

    @property
    def prior_precision(self) -> Tensor:
        return _parent_property(HyperparameterMixin, self, "prior_precision").fget(self)

    @prior_precision.setter
    def prior_precision(self, value: float | Tensor) -> None:
        check_prior_precision(value)
        _parent_property(HyperparameterMixin, self, "prior_precision").fset(self, value)

    @property
    def sigma_noise(self) -> Tensor:
        return _parent_property(HyperparameterMixin, self, "sigma_noise").fget(self)

    @sigma_noise.setter
    def sigma_noise(self, value: float | Tensor) -> None:
        check_sigma_noise(value)
        _parent_property(HyperparameterMixin, self, "sigma_noise").fset(self, value)

    @property
    def temperature(self) -> float:
        return self._temperature

    @temperature.setter
    def temperature(self, value: Any) -> None:
        check_temperature(value)
        self._temperature = value

    def _check_hyperparameters(self) -> None:
        """Check the hyperparameters again where a refit is about to use them.

        Raises
        ------
        ValueError
            A value made invalid after assignment (e.g. edited in place).
        """
        check_prior_precision(self.prior_precision)
        check_sigma_noise(self.sigma_noise)
        check_temperature(self.temperature)
