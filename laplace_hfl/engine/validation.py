"""Pure checks of hyperparameters, options and data that others can call.

Every check either returns a clean value or raises ``ValueError`` (or
``FloatingPointError`` for a non-finite result) naming the offending value and what to
do. Nothing here keeps or changes state.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

from laplace_hfl.engine.device_memory import total_bytes

__all__ = [
    "check_constructor_values",
    "check_one_dtype",
    "check_fits_in_memory",
    "as_number",
    "as_int",
    "as_bool",
    "check_prior_precision",
    "check_sigma_noise",
    "check_temperature",
    "check_finite_batch",
    "check_query_rows",
    "check_finite_result",
    "nonfinite_rows",
    "flagged",
    "dataset_size",
    "curvature_likelihood",
    "MAX_EPS",
]

#: Largest ``eps`` accepted: the perturbation moves an output by ``eps``
#: posterior standard deviations, which must stay inside the quadratic regime.
MAX_EPS = 1.0


def as_number(name: str, value: Any) -> float:
    """A real number from a Python/NumPy scalar or a one-element tensor.

    Raises
    ------
    ValueError
        Booleans, strings and other non-numbers.
    """
    if isinstance(value, Tensor) and value.numel() == 1 and not value.is_complex():
        if value.dtype == torch.bool:
            raise ValueError(f"{name} must be a number, got the boolean {value!r}.")
        return float(value.detach().cpu().reshape(()))
    if isinstance(value, bool | np.bool_):
        raise ValueError(
            f"{name} must be a number, got the boolean {value!r} "
            "(True/False are not accepted for numeric options)."
        )
    if not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a real number, got {value!r}.")
    return float(value)


def as_int(name: str, value: Any, minimum: int) -> int:
    """An integer ``>= minimum`` from a Python or NumPy integer.

    Raises
    ------
    ValueError
        Booleans, floats, other non-integers and integers below ``minimum``.
    """
    if isinstance(value, bool | np.bool_):
        raise ValueError(
            f"{name} must be an integer >= {minimum}, got the boolean {value!r}."
        )
    if not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")
    if int(value) < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")
    return int(value)


def as_bool(name: str, value: Any) -> bool:
    """A real boolean (``True``/``False``, NumPy booleans); no truthy strings.

    Raises
    ------
    ValueError
        Anything else, e.g. ``"yes"`` or ``1``.
    """
    if isinstance(value, bool | np.bool_):
        return bool(value)
    raise ValueError(f"{name} must be True or False, got {value!r}.")


def flagged(mask: Tensor, limit: int | None = None) -> list[int]:
    """Indices of the ``True`` entries of a 1-D mask (the first ``limit``)."""
    return mask.nonzero().flatten()[:limit].tolist()


def _values(name: str, value: Any) -> Tensor:
    if isinstance(value, Tensor):
        if value.dtype == torch.bool or value.is_complex():
            raise ValueError(f"{name} must be real numbers, got dtype {value.dtype}.")
        return value.detach().to("cpu", torch.float64).reshape(-1)
    return torch.tensor([as_number(name, value)], dtype=torch.float64)


def check_prior_precision(value: Any) -> None:
    """Prior precisions must be finite and non-negative (zero = flat prior).

    Raises
    ------
    ValueError
        NaN, infinite or negative entries, booleans or non-numbers.
    """
    v = _values("prior_precision", value)
    idx = flagged(~torch.isfinite(v) | (v < 0), 5)
    if idx:
        raise ValueError(
            f"prior_precision must be finite and >= 0; entries {idx} are "
            f"{v[idx].tolist()}. Use a positive value (e.g. 1.0), or tune it "
            "with la.optimize_prior_precision(method='gridsearch', val_loader=...)."
        )


def _check_positive_value(name: str, value: Any, fix: str) -> None:
    v = _values(name, value)
    if v.numel() != 1:
        raise ValueError(
            f"{name} must be a single number, got {v.numel()} values "
            f"{v[:5].tolist()}. {fix}"
        )
    bad = ~torch.isfinite(v) | (v <= 0)
    if bool(bad.any()):
        raise ValueError(
            f"{name} must be a finite number > 0, got {v[bad][:5].tolist()}. {fix}"
        )


def _positive_check(name: str, what: str, fix: str) -> Callable[[Any], None]:
    """A check that ``name`` (``what``) is one finite positive number."""

    def check(value: Any) -> None:
        _check_positive_value(name, value, fix)

    check.__name__ = check.__qualname__ = f"check_{name}"
    check.__doc__ = (
        f"{what} must be finite and positive.\n\n    Raises\n    ------\n"
        "    ValueError\n        Zero, negative, NaN or infinite.\n    "
    )
    return check


check_sigma_noise = _positive_check(
    "sigma_noise", "The observation noise standard deviation", "It is the standard "
    "deviation of the regression noise, e.g. the residual RMSE of the MAP on "
    "training data.",
)  # fmt: skip
check_temperature = _positive_check(
    "temperature", "The posterior temperature", "Use 1.0 for the plain Laplace "
    "posterior; values below 1 sharpen it, above 1 widen it.",
)  # fmt: skip


def nonfinite_rows(X: Any) -> list[int]:
    """Indices of the rows of a batch with a NaN or infinite floating entry.

    Mapping batches are checked on every floating tensor value.
    """
    tensors: list[Tensor]
    if isinstance(X, Tensor):
        tensors = [X]
    elif isinstance(X, Mapping):
        tensors = [v for v in X.values() if isinstance(v, Tensor)]
    else:
        return []
    bad: Tensor | None = None
    for t in tensors:
        if not torch.is_floating_point(t) or t.ndim == 0:
            continue
        rows = ~torch.isfinite(t.reshape(t.shape[0], -1)).all(-1)
        bad = rows if bad is None or bad.shape != rows.shape else bad | rows
    return [] if bad is None else flagged(bad)


def check_finite_batch(X: Any, y: Any, batch_index: int) -> None:
    """Training inputs and targets must be finite.

    Raises
    ------
    ValueError
        Naming the batch and its first offending rows.
    """
    for what, t in (("inputs", X), ("targets", y)):
        rows = nonfinite_rows(t)
        if rows:
            raise ValueError(
                f"Training batch {batch_index} has {what} that are not finite "
                f"(NaN/inf) in rows "
                f"{rows[:10]}{' ...' if len(rows) > 10 else ''}. HFL's refits "
                "differentiate through every training input: remove or impute "
                "these rows in the DataLoader."
            )


def check_query_rows(X: Any, what: str = "Query inputs") -> None:
    """Query inputs must be finite (one behaviour for every likelihood/mode).

    Raises
    ------
    ValueError
        Naming the offending rows.
    """
    rows = nonfinite_rows(X)
    if rows:
        raise ValueError(
            f"{what} have NaN/inf entries in rows {rows[:10]}"
            f"{' ...' if len(rows) > 10 else ''}; their predictive would be "
            "undefined. Drop or impute those rows before calling la(x)."
        )


def check_finite_result(value: Tensor, what: str) -> None:
    """A computed product (Jacobians, refit displacements) must be finite.

    Raises
    ------
    FloatingPointError
        Naming the quantity; the usual cause is an overflowing network.
    """
    if not bool(torch.isfinite(value).all()):
        raise FloatingPointError(
            f"The {what} contain NaN/inf although the inputs are finite: the "
            "network overflows at the MAP or at the refit points (check for "
            "exploding activations; a larger prior precision or "
            "compute_dtype=torch.float64 can help)."
        )


def check_one_dtype(model: Any) -> None:
    """The model's floating parameters and buffers share one dtype.

    Raises
    ------
    ValueError
        Mixed dtypes (e.g. one layer left in float32), naming them.
    """
    dtypes: dict[torch.dtype, str] = {}
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if torch.is_floating_point(t):
            dtypes.setdefault(t.dtype, name)
    if len(dtypes) > 1:
        named = ", ".join(f"{d} ({n})" for d, n in dtypes.items())
        raise ValueError(
            f"The model mixes floating dtypes: {named}. HFL evaluates it in one "
            "dtype: cast it first, e.g. model.double() or model.float()."
        )


def check_constructor_values(model: Any, sigma_noise: Any, temperature: Any) -> None:
    """What laplace-torch's constructor reads before any setter checks it.

    Raises
    ------
    ValueError
        A model without parameters; ``sigma_noise`` or ``temperature`` not one
        finite positive number.
    """
    if next(iter(model.parameters()), None) is None:
        raise ValueError(
            "The model has no parameters, so there is no posterior over weights; "
            "pass the trained network."
        )
    check_sigma_noise(sigma_noise)
    check_temperature(temperature)


def check_fits_in_memory(
    n_numbers: int, dtype: torch.dtype, device: torch.device, what: str
) -> None:
    """Refuse a result larger than the device's memory (it would run for
    hours before failing).

    Raises
    ------
    ValueError
        ``n_numbers`` of ``dtype`` exceed the total memory of ``device``.
    """
    need = n_numbers * torch.empty((), dtype=dtype).element_size()
    total = total_bytes(device)
    if need > total:
        raise ValueError(
            f"{what} would need {need / 2**30:.3g} GiB, more than the "
            f"{total / 2**30:.3g} GiB of {device}; ask for fewer."
        )


def dataset_size(loader: Any) -> int:
    """``N = len(loader.dataset)``, checked before any pass over the data.

    Raises
    ------
    ValueError
        Datasets without a length (``IterableDataset``) or no ``dataset``.
    """
    dataset = getattr(loader, "dataset", None)
    try:
        return len(dataset)  # type: ignore[arg-type]
    except TypeError:
        raise ValueError(
            f"HFL needs the number of training points N = len(train_loader.dataset), "
            f"but {type(dataset).__name__} has no length (an IterableDataset?). "
            "Use a map-style Dataset (e.g. TensorDataset) or give the dataset a "
            "__len__."
        ) from None


def curvature_likelihood(likelihood: str) -> str:
    """The likelihood of the curvature: laplace-torch fits ``"reward_modeling"``
    with the classification likelihood (preference pairs) and predicts as
    regression."""
    return "classification" if likelihood == "reward_modeling" else likelihood
