"""Hashable snapshots of tensor values, for cache and validation keys.

A cache that depends on a hyperparameter tensor (the prior precision: ``P``
numbers) needs a key that compares by value and survives in-place edits of
the tensor. :class:`TensorKey` keeps a copy of the values on the tensor's
device and compares with ``torch.equal``: no transfer to the host and no
Python float per entry, unlike ``tuple(t.tolist())``, and no reliance on
``data_ptr`` or the version counter.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["TensorKey"]


class TensorKey:
    """A hashable, value-comparing snapshot of a tensor.

    Two keys are equal when their tensors have the same shape, dtype, device
    and values (``torch.equal``; a NaN never equals itself, so a key holding
    NaN equals no key). The hash covers shape, dtype and device only, so
    equal keys hash alike; it is cheap and never reads the values.

    Parameters
    ----------
    value : Tensor
        Copied (detached) at construction: later in-place edits of ``value``
        do not change the key.
    """

    __slots__ = ("_values",)

    def __init__(self, value: Tensor) -> None:
        self._values = value.detach().clone()

    @property
    def values(self) -> Tensor:
        """The snapshot (do not edit it)."""
        return self._values

    def _meta(self) -> tuple:
        v = self._values
        return tuple(v.shape), v.dtype, v.device

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TensorKey):
            return NotImplemented
        return self._meta() == other._meta() and torch.equal(
            self._values, other._values
        )

    def __hash__(self) -> int:
        return hash(self._meta())

    def __repr__(self) -> str:
        return f"TensorKey({self._values!r})"
