"""Matrix-free symmetric ``(P, P)`` operators: products only, dense on request.

:class:`SymmetricOperator` stands in where laplace-torch hands out a dense
``(P, P)`` tensor (``posterior_precision``, ``posterior_covariance``, ``H``):
it supports ``A @ v`` for vectors ``(P,)`` and matrices ``(P, k)`` (and
``v @ A``, ``A`` being symmetric; ``torch.matmul``/``mm``/``mv``), ``.shape``, ``.dtype``, ``.device`` and
``.T``, and builds the dense matrix only when ``to_dense()`` is called. Every
other tensor operation fails with a message that names what works.

The operator knows nothing about networks: it wraps a function applying ``A``
to the rows of an ``(m, P)`` tensor in its compute dtype.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

__all__ = ["SymmetricOperator"]

RowMatvec = Callable[[Tensor], Tensor]


class SymmetricOperator:
    """A symmetric ``(P, P)`` linear operator known through its products.

    Parameters
    ----------
    matvec : callable
        ``matvec(V)`` returns ``A v`` for every row ``v`` of ``V`` (``(m, P)``,
        in ``compute_dtype``) as an ``(m, P)`` tensor.
    size : int
        ``P``.
    dtype : torch.dtype
        The dtype the operator reports and returns (the model's, like the
        dense matrices of laplace-torch).
    device : torch.device
    compute_dtype : torch.dtype
        The dtype ``matvec`` works in.
    name : str
        What the operator is, for messages (e.g. ``"posterior_precision"``).
    chunk_size : int, default=64
        Columns applied together (memory ``~chunk_size`` parameter vectors
        plus one batch of activations each).
    """

    def __init__(
        self,
        matvec: RowMatvec,
        size: int,
        dtype: torch.dtype,
        device: torch.device,
        compute_dtype: torch.dtype,
        name: str,
        chunk_size: int = 64,
    ) -> None:
        self._matvec = matvec
        self._size = int(size)
        self._dtype = dtype
        self._device = torch.device(device)
        self._compute_dtype = compute_dtype
        self._name = name
        self._chunk = max(1, int(chunk_size))

    # ---------------------------------------------------------- tensor-like
    @property
    def shape(self) -> torch.Size:
        return torch.Size([self._size, self._size])

    def size(self, dim: int | None = None) -> torch.Size | int:
        return self.shape if dim is None else self.shape[dim]

    @property
    def ndim(self) -> int:
        return 2

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def T(self) -> SymmetricOperator:  # noqa: N802 (torch's name)
        """The transpose: the operator itself (it is symmetric)."""
        return self

    mT = T  # noqa: N815 (torch's name)

    def __repr__(self) -> str:
        return (
            f"SymmetricOperator({self._name}, shape=({self._size}, {self._size}), "
            f"dtype={self._dtype}, matrix-free; .to_dense() builds the matrix)"
        )

    # -------------------------------------------------------------- products
    def _apply_rows(self, rows: Tensor) -> Tensor:
        out = [
            self._matvec(rows[i : i + self._chunk])
            for i in range(0, rows.shape[0], self._chunk)
        ]
        if not out:
            return rows.new_zeros(0, self._size)
        return torch.cat(out)

    def _check_operand(self, other: Any, side: str) -> Tensor:
        P = self._size
        expected = f"({P},) or ({P}, k)" if side == "left" else f"({P},) or (k, {P})"
        if not isinstance(other, Tensor):
            raise TypeError(
                f"{self._name} @ ... needs a torch.Tensor of shape {expected}; "
                f"got {type(other).__name__}."
            )
        if not torch.is_floating_point(other):
            raise TypeError(
                f"{self._name} multiplies floating-point tensors; got {other.dtype}."
            )
        ok = other.ndim == 1 and other.shape[0] == P
        if other.ndim == 2:
            ok = other.shape[0 if side == "left" else 1] == P
        if not ok:
            raise ValueError(
                f"{self._name} is ({P}, {P}): the operand must have shape "
                f"{expected}; got {tuple(other.shape)}."
            )
        if not bool(torch.isfinite(other).all()):
            raise ValueError(
                f"The operand of {self._name} @ ... contains NaN or inf; "
                "a matrix-free product needs finite vectors."
            )
        return other

    def matmul(self, other: Tensor) -> Tensor:
        """``A @ other`` for ``other`` of shape ``(P,)`` or ``(P, k)``.

        Parameters
        ----------
        other : Tensor
            ``(P,)`` or ``(P, k)``, finite, floating point.

        Returns
        -------
        Tensor
            Same shape as ``other``, in the promoted dtype of the operator
            and the operand.

        Raises
        ------
        TypeError
            ``other`` is not a floating-point tensor.
        ValueError
            Wrong shape, or NaN/inf entries.
        """
        other = self._check_operand(other, "left")
        out_dtype = torch.promote_types(self._dtype, other.dtype)
        rows = other.detach().to(self._device, self._compute_dtype)
        rows = rows[None] if other.ndim == 1 else rows.T
        res = self._apply_rows(rows)
        res = res[0] if other.ndim == 1 else res.T
        return res.to(out_dtype)

    def __matmul__(self, other: Tensor) -> Tensor:
        return self.matmul(other)

    def __rmatmul__(self, other: Tensor) -> Tensor:
        """``other @ A`` with ``other`` of shape ``(P,)`` or ``(k, P)``."""
        other = self._check_operand(other, "right")
        if other.ndim == 1:
            return self.matmul(other)
        return self.matmul(other.T).T

    def to_dense(self) -> Tensor:
        """The dense ``(P, P)`` matrix (``P`` products; ``P^2`` memory).

        Returns
        -------
        Tensor
            ``(P, P)`` in :attr:`dtype`, symmetrised.
        """
        eye = torch.eye(self._size, dtype=self._compute_dtype, device=self._device)
        dense = self._apply_rows(eye)
        return (0.5 * (dense + dense.T)).to(self._dtype)

    # ------------------------------------------------- everything else fails
    def _unsupported(self, what: str) -> TypeError:
        return TypeError(
            f"{what} is not supported by the matrix-free {self._name} "
            f"({self._size} x {self._size}, never formed). It supports A @ v, "
            "v @ A, .shape, .dtype, .device and .T; call .to_dense() for the "
            "dense tensor (P^2 memory, P products)."
        )

    @classmethod
    def __torch_function__(
        cls,
        func: Any,
        types: Any,
        args: tuple = (),
        kwargs: dict | None = None,
    ) -> Any:
        matmuls = (
            torch.matmul, torch.mm, torch.mv,
            torch.Tensor.matmul, torch.Tensor.mm, torch.Tensor.mv,
            torch.Tensor.__matmul__,
        )  # fmt: skip
        if func in matmuls and len(args) == 2 and not kwargs:
            a, b = args
            if isinstance(a, SymmetricOperator):
                return a.matmul(b)
            return b.__rmatmul__(a)
        if func is torch.Tensor.__rmatmul__ and len(args) == 2 and not kwargs:
            a, b = args  # b @ a
            if isinstance(a, SymmetricOperator):
                return a.__rmatmul__(b)
            return b.matmul(a)
        op = next(a for a in args if isinstance(a, SymmetricOperator))
        name = getattr(func, "__name__", repr(func))
        raise op._unsupported(f"torch.{name}")

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        raise AttributeError(
            str(self._unsupported(f"The tensor attribute/method {name!r}"))
        )

    def __getitem__(self, key: Any) -> Any:
        raise self._unsupported("Indexing")

    def __array__(self, *args: Any, **kwargs: Any) -> Any:
        raise self._unsupported("Conversion to a NumPy array")

    def _binary(self, other: Any) -> Any:
        raise self._unsupported("Elementwise arithmetic (+, -, *, /)")

    __add__ = __radd__ = __sub__ = __rsub__ = _binary
    __mul__ = __rmul__ = __truediv__ = __rtruediv__ = _binary

    def __neg__(self) -> Any:
        raise self._unsupported("Negation")
