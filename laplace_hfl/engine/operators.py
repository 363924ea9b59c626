"""Matrix-free symmetric ``(P, P)`` operators: products only, dense on request.

:class:`SymmetricOperator` stands in where laplace-torch hands out a dense
``(P, P)`` tensor (``posterior_precision``, ``posterior_covariance``, ``H``):
it supports ``A @ v`` for vectors ``(P,)`` and matrices ``(P, k)`` (and
``v @ A``, ``A`` being symmetric; ``torch.matmul``/``mm``/``mv``), ``.shape``, ``.dtype``, ``.device`` and
``.T``, and builds the dense matrix only when ``to_dense()`` is called. Like
laplace-torch's dense matrices it also has ``logdet()``/``slogdet()``
(:meth:`SymmetricOperator.logdet`), ``clone()``, ``A + B`` / ``A - B`` of two
operators, ``c * A``, ``A / c`` and ``-A`` (new operators, still matrix-free),
and ``torch.allclose`` (which forms the dense matrices). Every other tensor
operation fails with a message that names what works.

The operator knows nothing about networks: it wraps a function applying ``A``
to the rows of an ``(m, P)`` tensor in its compute dtype.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from laplace_hfl.engine.logdet import LogDetEstimate
from laplace_hfl.engine.slq import lanczos_quadrature, make_probes, quadrature_estimate

__all__ = ["SymmetricOperator", "EXACT_LOGDET_MAX", "SLQ_PROBES", "SLQ_STEPS"]

RowMatvec = Callable[[Tensor], Tensor]
LogDet = Callable[[], "tuple[Tensor, LogDetEstimate] | None"]

#: Largest ``P`` whose ``logdet()`` forms the dense matrix (``P`` products,
#: one ``slogdet``) when the operator has no exact log-determinant of its own;
#: the exact-mode size of the marginal likelihood's estimator
#: (:class:`laplace_hfl.engine.logdet.MarglikSettings`, ``exact_max``).
EXACT_LOGDET_MAX = 256
#: Rademacher probes and Lanczos steps of the stochastic ``logdet()`` above it.
SLQ_PROBES = 64
SLQ_STEPS = 64


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
    logdet : callable, optional
        ``logdet() -> (value, LogDetEstimate)``: the log-determinant the owner
        knows better (the estimator's ``log_det_posterior_precision``), or
        None when it no longer applies; :meth:`logdet` then computes one from
        products.
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
        logdet: LogDet | None = None,
    ) -> None:
        self._matvec = matvec
        self._logdet = logdet
        #: Diagnostics of the last :meth:`logdet` (standard error, exactness).
        self.last_logdet: LogDetEstimate | None = None
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

    # -------------------------------------------------------- log-determinant
    def logdet(self) -> Tensor:
        """``log det A``, as ``torch.logdet`` of the dense matrix would give.

        Exact where the owner has an exact value (the estimator's dense
        factor, see ``log_det_posterior_precision``) or ``P <=``
        :data:`EXACT_LOGDET_MAX` (dense matrix from ``P`` products); otherwise
        stochastic Lanczos quadrature (:data:`SLQ_PROBES` Rademacher probes,
        :data:`SLQ_STEPS` steps, fixed seed), for a positive definite ``A``.
        The standard error (0 when exact) is in :attr:`last_logdet`.

        Returns
        -------
        Tensor
            0-dim, in :attr:`dtype`; ``nan`` for a negative determinant and
            ``-inf`` for a singular ``A`` (exact mode, as ``torch.logdet``).
        """
        sign, value = self.slogdet()
        return torch.where(sign < 0, value.new_tensor(math.nan), value)

    def slogdet(self) -> tuple[Tensor, Tensor]:
        """``(sign, log|det A|)`` as ``torch.linalg.slogdet`` gives them.

        Same paths as :meth:`logdet`; the stochastic path assumes a positive
        definite ``A`` (sign 1).
        """
        known = self._logdet() if self._logdet is not None else None
        if known is not None:
            value, self.last_logdet = known
            value = value.to(self._dtype)
            return value.new_ones(()), value
        P = self._size
        if P <= EXACT_LOGDET_MAX:
            sign, value = torch.linalg.slogdet(self.to_dense().to(self._compute_dtype))
            self.last_logdet = LogDetEstimate(float(value), 0.0, P, 0, True)
            return sign.to(self._dtype), value.to(self._dtype)
        probes = make_probes(P, SLQ_PROBES, 0, self._compute_dtype, self._device)
        quad = lanczos_quadrature(self._apply_rows, probes, SLQ_STEPS)
        if not bool((quad.nodes > 0).all()):
            raise ValueError(
                f"{self._name}.logdet(): the matrix-free estimate needs a positive "
                f"definite matrix, and Lanczos found the Ritz value "
                f"{float(quad.nodes.min()):.3e}. Use .to_dense() and "
                "torch.linalg.slogdet (P^2 memory)."
            )
        value, stderr = quadrature_estimate(quad, quad.nodes.log())
        self.last_logdet = LogDetEstimate(
            float(value), stderr, SLQ_PROBES, int(quad.steps.max()), quad.exact
        )
        return value.new_ones((), dtype=self._dtype), value.to(self._dtype)

    # --------------------------------------------------- algebra of operators
    def _derived(
        self, matvec: RowMatvec, name: str, logdet: LogDet | None = None
    ) -> SymmetricOperator:
        return SymmetricOperator(
            matvec, self._size, self._dtype, self._device, self._compute_dtype,
            name, self._chunk, logdet,
        )  # fmt: skip

    def clone(self) -> SymmetricOperator:
        """A copy: the same products (the operator holds no mutable state:
        the curvature it applies is fixed when it is created)."""
        return self._derived(self._matvec, self._name, self._logdet)

    def _scaled(self, c: Any, what: str) -> SymmetricOperator:
        if isinstance(c, bool) or not isinstance(c, numbers.Real):
            raise self._unsupported(f"{what} by {type(c).__name__}")
        c = float(c)
        if not math.isfinite(c):
            raise ValueError(f"{self._name} can only be scaled by a finite number.")
        inner, logdet = self._logdet, None
        if inner is not None and c > 0:

            def logdet() -> tuple[Tensor, LogDetEstimate] | None:
                known = inner()
                if known is None:
                    return None
                value, info = known
                shift = self._size * math.log(c)
                return value + shift, replace(info, value=info.value + shift)

        return self._derived(
            lambda V: c * self._matvec(V), f"{c:g} * {self._name}", logdet
        )

    def _combined(self, other: Any, sign: float) -> SymmetricOperator:
        if not isinstance(other, SymmetricOperator):
            raise self._unsupported(
                f"{'+' if sign > 0 else '-'} with a {type(other).__name__} "
                "(only another matrix-free operator of the same shape adds)"
            )
        if other.shape != self.shape:
            raise ValueError(
                f"Cannot add {self._name} {tuple(self.shape)} and "
                f"{other._name} {tuple(other.shape)}."
            )
        a, b = self._matvec, other._matvec
        dtype = self._compute_dtype

        def matvec(V: Tensor) -> Tensor:
            return a(V) + sign * b(V.to(other._compute_dtype)).to(dtype)

        op = "+" if sign > 0 else "-"
        return self._derived(matvec, f"({self._name} {op} {other._name})")

    def __mul__(self, other: Any) -> SymmetricOperator:
        return self._scaled(other, "Multiplication")

    __rmul__ = __mul__

    def __truediv__(self, other: Any) -> SymmetricOperator:
        if isinstance(other, numbers.Real) and not isinstance(other, bool):
            if other == 0:
                raise ZeroDivisionError(f"{self._name} / 0")
            return self._scaled(1.0 / float(other), "Division")
        raise self._unsupported(f"Division by {type(other).__name__}")

    def __neg__(self) -> SymmetricOperator:
        return self._scaled(-1.0, "Negation")

    def __add__(self, other: Any) -> SymmetricOperator:
        return self._combined(other, 1.0)

    def __sub__(self, other: Any) -> SymmetricOperator:
        return self._combined(other, -1.0)

    def __radd__(self, other: Any) -> SymmetricOperator:
        if isinstance(other, int) and other == 0:  # sum([...]) starts at 0
            return self
        return self._combined(other, 1.0)

    # ------------------------------------------------- everything else fails
    def _unsupported(self, what: str) -> TypeError:
        return TypeError(
            f"{what} is not supported by the matrix-free {self._name} "
            f"({self._size} x {self._size}, never formed). It supports A @ v, "
            "v @ A, .shape, .dtype, .device, .T, .logdet(), .slogdet(), "
            ".clone(), A + B and A - B of two operators, c * A, A / c, -A and "
            "torch.allclose; call .to_dense() for the dense tensor (P^2 memory, "
            "P products)."
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
        if func in (torch.allclose, torch.Tensor.allclose):
            dense = [
                a.to_dense() if isinstance(a, SymmetricOperator) else a for a in args
            ]
            return torch.allclose(*dense, **(kwargs or {}))
        if func in (torch.logdet, torch.Tensor.logdet) and len(args) == 1:
            return args[0].logdet()
        if func in (torch.linalg.slogdet, torch.slogdet, torch.Tensor.slogdet):
            return args[0].slogdet()
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
        raise self._unsupported(f"Elementwise arithmetic with a {type(other).__name__}")

    __rsub__ = __rtruediv__ = _binary
