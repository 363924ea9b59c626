"""Exceptions and warnings raised by laplace-hfl.

Every message says what went wrong *and* what to do about it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys
import warnings
from pathlib import Path

__all__ = [
    "warn_user",
    "HFLNotFittedError",
    "MissingDictKeyError",
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


class MissingDictKeyError(KeyError, ValueError):
    """A dict batch lacks ``dict_key_x`` or ``dict_key_y``.

    laplace-torch raises ``KeyError`` there; HFL's message also says which
    keys the batch has and which constructor argument to set. Deriving from
    both ``KeyError`` and ``ValueError`` keeps code written for either working.
    """

    def __str__(self) -> str:  # KeyError would quote the sentence
        return str(self.args[0]) if self.args else ""


class RefitConvergenceWarning(UserWarning):
    """A refit stopped before its residual gradient met the tolerance.

    Unconverged refits bias the variance towards zero.
    """


class PSDClippingWarning(UserWarning):
    """Negative eigenvalues of a predictive covariance were clipped to zero."""


class NonStationaryMAPWarning(UserWarning):
    """The network refit moved far from the MAP before any perturbation."""


def _library_dirs() -> tuple[str, ...]:
    """Folders whose frames are library internals (this package, laplace, torch)."""
    dirs = [Path(__file__).resolve().parent, Path(contextlib.__file__).resolve()]
    for name in ("laplace", "torch"):
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.origin is not None:
            dirs.append(Path(spec.origin).resolve().parent)
    return tuple(str(d) for d in dirs)


def warn_user(message: str, category: type[Warning]) -> None:
    """Warn with the location of the first caller outside the libraries.

    The refits run deep inside laplace-hfl, laplace-torch and torch; pointing
    the warning at the user's ``la(x)`` line makes it actionable.
    """
    skip = _library_dirs()
    frame, level = sys._getframe(1), 1
    while frame is not None and str(
        Path(frame.f_code.co_filename).resolve()
    ).startswith(skip):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level + 1)
