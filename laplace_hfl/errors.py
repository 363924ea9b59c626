"""Exceptions and warnings raised by laplace-hfl.

Every message says what went wrong *and* what to do about it.
"""

from __future__ import annotations

__all__ = [
    "HFLNotFittedError",
    "IndefiniteHessianError",
    "RefitConvergenceWarning",
    "PSDClippingWarning",
    "NonStationaryMAPWarning",
]


class HFLNotFittedError(RuntimeError):
    """Raised when a prediction needs refit data that has not been provided.

    Call ``la.fit(train_loader)`` first (again after ``load_state_dict`` for
    all-weights HFL, whose state holds no training data).
    """


class IndefiniteHessianError(RuntimeError):
    """Raised when ``target="hessian"`` finds negative curvature at the MAP.

    The exact Hessian of the Laplace objective is indefinite, so the network
    refit runs away instead of converging to a nearby minimum. Use
    ``target="ggn"`` (positive definite by construction) or train the MAP to a
    minimum of the Laplace objective.
    """


class RefitConvergenceWarning(UserWarning):
    """A refit stopped before its residual gradient met the tolerance.

    Unconverged refits bias the variance towards zero.
    """


class PSDClippingWarning(UserWarning):
    """Negative eigenvalues of a predictive covariance were clipped to zero."""


class NonStationaryMAPWarning(UserWarning):
    """The network refit moved far from the MAP before any perturbation."""
