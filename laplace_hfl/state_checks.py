"""Value-by-value checks of a state dict before it is loaded.

``load_state_dict`` used to check key names only: a NaN mean, NaN amortised
samples, ``n_data=-5``, ``eps=5`` (refused by the constructor), a NaN loss, one
sample where ``amortize=16``, cached data of the wrong shape, or the MAP of
other weights than the model's all loaded and failed (or went silently wrong)
later. Every function here raises ``ValueError`` naming the key and the fix,
and none changes anything.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from laplace_hfl.engine.validation import (
    check_prior_precision,
    check_sigma_noise,
    check_temperature,
)

__all__ = [
    "check_state_numbers",
    "check_state_tensor",
    "check_state_batches",
    "check_state_map",
]

_FIX = "Save the state again with la.state_dict() from a fitted estimator."


def _refuse(key: str, what: str) -> ValueError:
    return ValueError(f"State key {key!r}: {what}. {_FIX}")


def check_state_tensor(
    state: Mapping[str, Any], key: str, shape: tuple[int, ...]
) -> Tensor:
    """``state[key]`` is a finite floating tensor of ``shape``."""
    value = state[key]
    if not torch.is_tensor(value) or not torch.is_floating_point(value):
        raise _refuse(key, f"expected a floating tensor, got {type(value).__name__}")
    if tuple(value.shape) != tuple(shape):
        raise _refuse(
            key, f"shape {tuple(value.shape)}, this estimator needs {tuple(shape)}"
        )
    if not bool(torch.isfinite(value).all()):
        raise _refuse(key, "contains NaN/inf")
    return value


def _count(state: Mapping[str, Any], key: str, minimum: int) -> int:
    value = state[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise _refuse(key, f"must be an integer >= {minimum}, got {value!r}")
    return value


def check_state_numbers(state: Mapping[str, Any]) -> None:
    """Counts, the MAP loss and the hyperparameters, within the constructor's
    rules."""
    _count(state, "n_data", 1)
    _count(state, "n_outputs", 1)
    loss = state["loss"]
    if not isinstance(loss, int | float) or not math.isfinite(loss):
        raise _refuse("loss", f"must be a finite number, got {loss!r}")
    for key, check in (
        ("prior_precision", check_prior_precision),
        ("sigma_noise", check_sigma_noise),
        ("temperature", check_temperature),
    ):
        try:
            check(state[key])
        except ValueError as err:
            raise _refuse(key, str(err)) from None
    prior_mean = state["prior_mean"]
    if not bool(torch.isfinite(torch.as_tensor(prior_mean)).all()):
        raise _refuse("prior_mean", "contains NaN/inf")


def check_state_batches(
    state: Mapping[str, Any], n_outputs: int, likelihood: str
) -> list[tuple[Any, Tensor]] | None:
    """The cached refit batches: as many inputs as targets, finite, with one
    target row per input row (regression: ``n_outputs`` columns)."""
    X, y = state["training_X"], state["training_y"]
    if X is None and y is None:
        return None
    if not isinstance(X, list) or not isinstance(y, list) or len(X) != len(y):
        raise _refuse(
            "training_X", "training_X and training_y must be lists of equal length"
        )
    for i, (Xb, yb) in enumerate(zip(X, y)):
        tensors = list(Xb.values()) if isinstance(Xb, Mapping) else [Xb]
        rows = {int(t.shape[0]) for t in tensors if torch.is_tensor(t) and t.ndim}
        if not torch.is_tensor(yb) or yb.ndim == 0 or rows != {int(yb.shape[0])}:
            raise _refuse(
                "training_X", f"batch {i} has input rows {sorted(rows)} and targets "
                f"{getattr(yb, 'shape', type(yb).__name__)}"
            )  # fmt: skip
        for t in [*tensors, yb]:
            if torch.is_tensor(t) and torch.is_floating_point(t):
                if not bool(torch.isfinite(t).all()):
                    raise _refuse("training_X", f"batch {i} contains NaN/inf")
        if likelihood == "regression" and tuple(yb.shape[1:]) != (n_outputs,):
            raise _refuse(
                "training_y",
                f"batch {i} has targets {tuple(yb.shape)}, the state's model "
                f"has {n_outputs} outputs",
            )
    return list(zip(X, y))


def check_state_map(mean: Tensor, weights: Tensor) -> None:
    """The state's MAP must be the model's weights: predictions evaluate the
    model's modules at the MAP, so other weights would mix two networks."""
    if not torch.equal(mean.to(weights), weights):
        err = float((mean.to(weights) - weights).abs().max())
        raise ValueError(
            "The state's MAP ('mean') differs from the model's current weights "
            f"(max abs difference {err:.3g}): it was fitted on other weights. "
            "Load it into the model it was saved from (load the model's own "
            "state_dict first), or fit this estimator on this model."
        )
