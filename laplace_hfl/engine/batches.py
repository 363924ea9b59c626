"""Training and query batches: splitting, checking, caching, slicing.

Small helpers shared by the HFL classes; none of them keeps state.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from laplace_hfl.engine.validation import flagged
from laplace_hfl.errors import MissingDictKeyError

__all__ = [
    "eval_mode",
    "buffers_kept",
    "split_batch",
    "check_output",
    "batch_size",
    "batch_rows",
    "check_targets",
    "merge_batches",
    "slice_batch",
]


#: Modules inside :func:`eval_mode` in this thread (nested calls are free).
_EVAL_ACTIVE = threading.local()


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """Put every submodule in eval mode, restoring each flag afterwards.

    Freezes BatchNorm statistics and dropout during refits and predictions
    without leaving the user's model changed. Nested calls on the same module
    in the same thread, and modules already in eval mode, cost nothing.
    """
    active = getattr(_EVAL_ACTIVE, "ids", None)
    if active is None:
        active = _EVAL_ACTIVE.ids = set()
    if id(module) in active:  # nested (this thread): already in eval mode
        yield
        return
    flags = [(m, m.training) for m in module.modules()]
    training = any(flag for _, flag in flags)
    if training:
        module.eval()
    active.add(id(module))
    try:
        yield
    finally:
        active.discard(id(module))
        if training:
            for m, flag in flags:
                m.training = flag


def _same(a: Tensor, b: Tensor) -> bool:
    if torch.equal(a, b):
        return True
    return (
        a.shape == b.shape
        and torch.is_floating_point(a)
        and bool(((a == b) | (a.isnan() & b.isnan())).all())
    )


@contextlib.contextmanager
def buffers_kept(module: nn.Module) -> Iterator[None]:
    """Refuse a forward that writes the module's buffers (restoring them).

    The refits evaluate the model many times under ``torch.func`` transforms
    with its buffers fixed; a forward that updates a buffer (a call counter,
    running statistics outside ``BatchNorm``'s eval mode) would change the
    user's model and then fail inside a transform.

    Raises
    ------
    ValueError
        A buffer was modified or replaced while the block ran (the original
        tensor and value are put back first).
    """
    before = [(n, b, b.clone()) for n, b in module.named_buffers()]
    yield
    now = dict(module.named_buffers())
    changed = []
    for name, obj, value in before:
        if now.get(name) is not obj or not _same(obj, value):
            changed.append(name)
            prefix, _, attr = name.rpartition(".")
            with torch.no_grad():
                obj.copy_(value)
            module.get_submodule(prefix)._buffers[attr] = obj
    if changed:
        raise ValueError(
            f"The model's forward changes its buffer {changed[0]!r}"
            + (f" (and {changed[1:]})" if len(changed) > 1 else "")
            + ". HFL evaluates the model many times and needs a forward that "
            "only reads its buffers in eval mode; the buffer was restored. "
            "Move the update out of forward or guard it with `if self.training`."
        )


def split_batch(
    data: Any, dict_key_y: str, dict_key_x: str | None = None
) -> tuple[Any, Tensor]:
    """``(X, y)`` from a tensor pair or a Hugging Face-style dict batch.

    Parameters
    ----------
    data : tuple or Mapping
    dict_key_y : str
        Key of the targets in a dict batch.
    dict_key_x : str, optional
        Key of the inputs a dict batch must also hold (not checked when None).

    Raises
    ------
    MissingDictKeyError
        A mapping without ``dict_key_y`` (or ``dict_key_x``); both a
        ``KeyError``, as in laplace-torch, and a ``ValueError``.
    ValueError
        A sequence that is not a pair.
    """
    if isinstance(data, Mapping):
        for what, key in (("targets", dict_key_y), ("inputs", dict_key_x)):
            if key is not None and key not in data:
                name = "dict_key_y" if what == "targets" else "dict_key_x"
                raise MissingDictKeyError(
                    f"Dict batches need the {what} under {name}={key!r}; "
                    f"this batch has keys {sorted(map(str, data))}. Pass "
                    f"{name}=... to the constructor."
                )
        return data, data[dict_key_y]
    if not isinstance(data, list | tuple) or len(data) != 2:
        n = len(data) if isinstance(data, list | tuple) else type(data).__name__
        raise ValueError(
            f"Training batches must be (X, y) pairs or dict-like batches; got "
            f"{n} {'elements' if isinstance(n, int) else ''}. Wrap the dataset "
            "so that it yields (inputs, targets)."
        )
    X, y = data
    return X, y


def check_output(out: Any) -> Tensor:
    """The model's output must be a ``(batch, outputs)`` tensor.

    Raises
    ------
    ValueError
        A tuple/dict output (e.g. a Hugging Face ``ModelOutput``) or another shape.
    """
    if not isinstance(out, Tensor):
        raise ValueError(
            f"HFL needs a model that returns a tensor of shape (batch, outputs); "
            f"it returned a {type(out).__name__}. Wrap the model so that forward "
            "returns the logits/predictions only (e.g. output.logits)."
        )
    if out.ndim != 2:
        raise ValueError(
            f"HFL needs model outputs of shape (batch, outputs); got "
            f"{tuple(out.shape)}."
        )
    return out


def batch_rows(data: Any) -> int:
    """Rows of a batch: a tensor's first dimension; for a mapping (a dict
    batch) that of its first tensor value; for a sequence (an ``(X, y)``
    pair) that of its first item."""
    if isinstance(data, Tensor):
        return int(data.shape[0])
    if isinstance(data, Mapping):
        return int(next(v for v in data.values() if isinstance(v, Tensor)).shape[0])
    return batch_rows(data[0])


def batch_size(X: Any, dict_key_x: str) -> int:
    """Rows of a query batch (``X[dict_key_x]`` for a dict batch).

    Raises
    ------
    MissingDictKeyError
        A dict batch without ``dict_key_x``.
    """
    if isinstance(X, Mapping):
        if dict_key_x not in X:
            raise MissingDictKeyError(
                f"Dict inputs need the inputs under dict_key_x={dict_key_x!r}; "
                f"this batch has keys {sorted(map(str, X))}. Pass "
                "dict_key_x=... to the constructor."
            )
        return int(X[dict_key_x].shape[0])
    return int(X.shape[0])


def check_targets(likelihood: str, out: Tensor, y: Tensor) -> None:
    if likelihood == "regression":
        if y.shape != out.shape:
            raise ValueError(
                f"Regression targets have shape {tuple(y.shape)} but the model "
                f"outputs {tuple(out.shape)}; reshape the targets to match "
                "(e.g. y.unsqueeze(-1) for a single output)."
            )
    elif y.ndim == 1:
        if y.shape[0] != out.shape[0] or torch.is_floating_point(y):
            raise ValueError(
                "Classification targets must be class indices of shape "
                f"({out.shape[0]},) (integer dtype) or class probabilities of "
                f"shape {tuple(out.shape)}; got {tuple(y.shape)}, {y.dtype}."
            )
        if y.dtype != torch.long:
            raise ValueError(
                f"Class indices must be torch.long (int64), as cross-entropy "
                f"needs; got {y.dtype}. Pass y.long()."
            )
        outside = (y < 0) | (y >= out.shape[-1])
        if bool(outside.any()):
            rows = outside.nonzero().flatten()[:10].tolist()
            ignored = bool((y == -100).any())
            raise ValueError(
                f"Class targets must lie in [0, {out.shape[-1]}); rows {rows} "
                f"have {y[outside][:10].tolist()}."
                + (
                    " -100 is cross-entropy's ignore_index: the loss would drop "
                    "those rows but the curvature would keep them, so HFL refuses "
                    "them. Remove the ignored rows from the training data."
                    if ignored
                    else ""
                )
            )
    elif y.shape != out.shape:
        raise ValueError(
            f"Classification targets have shape {tuple(y.shape)} but the model "
            f"outputs {tuple(out.shape)}."
        )
    else:
        _check_class_probabilities(y)


def _check_class_probabilities(y: Tensor) -> None:
    """Soft targets: floating rows of non-negative numbers summing to 1."""
    if not torch.is_floating_point(y):
        raise ValueError(
            f"Class-probability targets must be floating point, got {y.dtype}; "
            "pass class indices as a 1-D integer tensor instead."
        )
    sums = y.sum(-1)
    rows = flagged((y < 0).any(-1) | ((sums - 1).abs() > 1e-6 * y.shape[-1]), 10)
    if rows:
        raise ValueError(
            f"Class-probability targets must be non-negative rows summing to 1; "
            f"rows {rows} sum to {sums[rows].tolist()}. Cross-entropy with "
            "other rows is not a likelihood, and the Laplace curvature would "
            "not match it: normalise the targets (y / y.sum(-1, keepdim=True))."
        )


def merge_batches(
    batches: list[tuple[Any, Tensor]] | None, max_rows: int
) -> list[tuple[Any, Tensor]] | None:
    """Concatenate consecutive tensor batches into batches of <= ``max_rows``."""
    if not batches or not all(isinstance(X, Tensor) for X, _ in batches):
        return batches
    merged, X_acc, y_acc, rows = [], [], [], 0
    for X, y in batches:
        if rows and rows + X.shape[0] > max_rows:
            merged.append((torch.cat(X_acc), torch.cat(y_acc)))
            X_acc, y_acc, rows = [], [], 0
        X_acc.append(X)
        y_acc.append(y)
        rows += X.shape[0]
    merged.append((torch.cat(X_acc), torch.cat(y_acc)))
    return merged


def slice_batch(X: Any, start: int, stop: int) -> Any:
    if isinstance(X, Mapping):
        return type(X)(
            {k: v[start:stop] if isinstance(v, Tensor) else v for k, v in X.items()}
        )
    return X[start:stop]
