"""Validated hyperparameters: laplace-torch's setters, checked at assignment.

``prior_precision``, ``sigma_noise`` and ``temperature`` are checked when they
are assigned (constructor, ``la.prior_precision = ...``, grid search): that is
the check every later use relies on. Where a refit uses them,
:meth:`HyperparameterMixin._check_hyperparameters` checks again only what may
have changed without an assignment (a stored tensor edited in place): the
prior precision is checked again only when its values differ from those last
checked (:class:`~laplace_hfl.engine.keys.TensorKey`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from laplace_hfl.engine.keys import TensorKey
from laplace_hfl.engine.validation import (
    check_prior_precision,
    check_sigma_noise,
    check_temperature,
)

__all__ = ["HyperparameterMixin"]


def _checked_parent_property(name: str, check: Callable[[Any], None]) -> property:
    """The laplace-torch property ``name`` (the one :class:`HyperparameterMixin`
    overrides in the instance's MRO) with ``check`` run before its setter."""

    def parent(obj: object) -> property:
        return getattr(super(HyperparameterMixin, type(obj)), name)

    def fget(self: object) -> Any:
        return parent(self).fget(self)

    def fset(self: object, value: Any) -> None:
        check(value)
        parent(self).fset(self, value)

    return property(fget, fset, doc=f"laplace-torch's ``{name}``, checked.")


class HyperparameterMixin:
    """Checks laplace-torch's hyperparameter setters before delegating to them."""

    prior_precision = _checked_parent_property("prior_precision", check_prior_precision)
    sigma_noise = _checked_parent_property("sigma_noise", check_sigma_noise)

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
        prior = TensorKey(torch.as_tensor(self.prior_precision))
        if prior != getattr(self, "_checked_prior", None):
            check_prior_precision(prior.values)
            self._checked_prior = prior
        check_sigma_noise(self.sigma_noise)
        check_temperature(self.temperature)
