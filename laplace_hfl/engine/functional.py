"""Pure functions for the Laplace objective that laplace-torch encodes.

Everything here works on flat parameter vectors ``theta`` of shape ``(P,)`` (or
a batch ``(m, P)`` of them) and never touches a module's own parameters:
forward passes go through :func:`torch.func.functional_call` on tensors derived
from ``theta``, so autograd flows and the user's model stays as it was.

The objective is exactly the one behind laplace-torch's posterior precision::

    L(theta) = H_factor * sum_n factor * loss(f(x_n; theta), y_n)
               + 1/2 (theta - mu_0)^T diag(p_0) (theta - mu_0)

with ``H_factor = 1 / (sigma^2 T)``, ``factor = 1/2`` and a summed squared
error for regression, ``factor = 1`` and a summed cross-entropy for
classification.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jacrev, jvp, vjp, vmap

__all__ = [
    "ParamLayout",
    "LaplaceObjective",
    "reduce_data",
    "make_forward",
    "private_modules",
    "tensor_slots",
    "call_at",
    "to_compute",
    "batch_loss",
    "data_only_objective",
    "objective_value",
    "objective_grad",
    "loss_hessian_out",
    "ggn_matvec",
    "hessian_matvec",
    "output_jacobians",
    "jacobian_vector_products",
]

Forward = Callable[[Tensor, Any], Tensor]


@dataclass(frozen=True)
class ParamLayout:
    """Names and shapes that map a flat vector to a parameter dict.

    Parameters
    ----------
    names : tuple of str
        Parameter names in ``module.named_parameters()`` order.
    shapes : tuple of torch.Size
        Shape of each named parameter.
    """

    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]

    @property
    def numels(self) -> tuple[int, ...]:
        return tuple(int(torch.Size(s).numel()) for s in self.shapes)

    def unflatten(self, theta: Tensor) -> dict[str, Tensor]:
        """Split a flat vector into a ``{name: tensor}`` dict (differentiable)."""
        chunks = torch.split(theta, self.numels)
        return {n: c.reshape(s) for n, c, s in zip(self.names, chunks, self.shapes)}


def to_compute(x: Any, device: torch.device, dtype: torch.dtype) -> Any:
    """Move a batch to ``device``; cast floating tensors to ``dtype``.

    Integer tensors (labels, token ids) keep their dtype. Dict-like batches
    (Hugging Face style) are converted value by value.
    """
    if isinstance(x, Tensor):
        if torch.is_floating_point(x):
            return x.to(device=device, dtype=dtype)
        return x.to(device=device)
    if isinstance(x, Mapping):
        return type(x)({k: to_compute(v, device, dtype) for k, v in x.items()})
    return x


def private_modules(module: nn.Module) -> nn.Module:
    """A structural copy of ``module`` that shares its tensors and hooks.

    Every submodule is a new object (shallow ``copy.copy``) with its own
    ``_parameters`` / ``_buffers`` / ``_modules`` dicts, holding the very
    same tensors, and in eval mode. Swapping tensors into the copy (as
    :func:`torch.func.functional_call` does) therefore never writes into the
    user's modules, and its train/eval flags are its own: another thread may
    use (or ``.train()``) the user's model while the refits run. A module
    registered at two places stays one module in the copy.
    """
    memo: dict[int, nn.Module] = {}

    def clone(m: nn.Module) -> nn.Module:
        if id(m) not in memo:
            c = copy.copy(m)
            memo[id(m)] = c
            c._parameters = dict(m._parameters)
            c._buffers = dict(m._buffers)
            c._modules = {
                k: None if v is None else clone(v) for k, v in m._modules.items()
            }
            c.training = False
        return memo[id(m)]

    return clone(module)


def tensor_slots(module: nn.Module) -> tuple[tuple[str, str], ...]:
    """``(slot, name)`` for every distinct ``(submodule, attribute)`` holding a
    parameter or buffer: ``slot`` is one path to it, ``name`` the name
    ``named_parameters()`` / ``named_buffers()`` give its tensor.

    A module registered at two places (``lin`` twice in a ``Sequential``) is
    one slot; tied weights (one tensor in two modules) are two slots with one
    name. Swapping each slot exactly once, by path, is what keeps
    :func:`torch.func.functional_call` restoring the very tensors it found
    (with ``tie_weights=True`` it swaps a shared module twice and restores
    the first swapped-in tensor, leaving it in the user's model).
    """
    slots, seen, names = [], set(), {}
    for kind in ("named_parameters", "named_buffers"):
        for path, t in getattr(module, kind)(remove_duplicate=False):
            prefix, _, attr = path.rpartition(".")
            key = (id(module.get_submodule(prefix)), attr)
            if key in seen:
                continue
            seen.add(key)
            slots.append((path, names.setdefault(id(t), path)))
    return tuple(slots)


def call_at(
    module: nn.Module,
    slots: tuple[tuple[str, str], ...],
    tensors: dict[str, Tensor],
    X: Any,
) -> Tensor:
    """``module(X)`` with ``tensors`` (by name) in place of its own; every slot
    swapped once and restored to the very tensor it held."""
    by_slot = {path: tensors[name] for path, name in slots if name in tensors}
    return functional_call(module, by_slot, (X,), tie_weights=False)


def make_forward(
    module: nn.Module, layout: ParamLayout, fixed: dict[str, Tensor]
) -> Forward:
    """Build ``forward(theta, X)`` evaluating ``module`` at flat parameters.

    Parameters
    ----------
    module : torch.nn.Module
        The network (or its last layer). Its own tensors are never read for
        the parameters in ``layout``, and never written: the forward runs on
        :func:`private_modules` of it, in eval mode.
    layout : ParamLayout
        The parameters that ``theta`` holds.
    fixed : dict of str to Tensor
        Every other parameter and buffer (frozen weights, BatchNorm
        statistics), already in the compute dtype.
    """

    module = private_modules(module)  # the user's modules are never swapped
    slots = tensor_slots(module)

    def forward(theta: Tensor, X: Any) -> Tensor:
        return call_at(module, slots, {**fixed, **layout.unflatten(theta)}, X)

    return forward


@dataclass(frozen=True)
class LaplaceObjective:
    """The Laplace objective ``L(theta)`` of a fitted model.

    Parameters
    ----------
    forward : callable
        ``forward(theta, X) -> (B, C)`` outputs.
    batches : callable
        Returns a fresh iterable of ``(X, y)`` batches in the compute dtype.
    likelihood : {"regression", "classification"}
    h_factor : float
        ``1 / (sigma_noise^2 * temperature)``.
    prior_precision : Tensor
        Diagonal prior precision ``p_0`` of shape ``(P,)``.
    prior_mean : Tensor
        Prior mean ``mu_0``, scalar or ``(P,)``.
    theta_map : Tensor
        The MAP ``theta_hat`` of shape ``(P,)``.
    reduce : callable or None, default=None
        Combines the data terms summed over ``batches()`` across processes,
        applied once per data pass to the whole summed term (one collective
        per pass, e.g. :class:`laplace_hfl.distributed.AllReduce`); None on
        one process. The prior terms are added after it, once.
    """

    forward: Forward
    batches: Callable[[], Iterable[tuple[Any, Tensor]]]
    likelihood: str
    h_factor: float
    prior_precision: Tensor
    prior_mean: Tensor
    theta_map: Tensor
    reduce: Callable[[Tensor], Tensor] | None = None


def reduce_data(obj: LaplaceObjective, total: Tensor) -> Tensor:
    """The data term ``total`` summed over the local batches, combined across
    processes by ``obj.reduce`` (unchanged on one process)."""
    return total if obj.reduce is None else obj.reduce(total)


def data_only_objective(obj: LaplaceObjective) -> LaplaceObjective:
    """The data term alone: ``H_factor = 1`` and no prior, so its curvature is the
    bare data GGN / Hessian (what laplace-torch calls ``H``)."""
    return dataclasses.replace(
        obj, h_factor=1.0, prior_precision=torch.zeros_like(obj.prior_precision)
    )


def batch_loss(likelihood: str, f: Tensor, y: Tensor) -> Tensor:
    """``factor * loss(f, y)`` summed over the batch, as laplace-torch defines it."""
    if likelihood == "regression":
        return 0.5 * (f - y).square().sum()
    return torch.nn.functional.cross_entropy(f, y, reduction="sum")


def _data_term(obj: LaplaceObjective, theta: Tensor, X: Any, y: Tensor) -> Tensor:
    return obj.h_factor * batch_loss(obj.likelihood, obj.forward(theta, X), y)


def _prior_grad(obj: LaplaceObjective, thetas: Tensor) -> Tensor:
    return obj.prior_precision * (thetas - obj.prior_mean)


def objective_value(obj: LaplaceObjective, theta: Tensor) -> Tensor:
    """``L(theta)`` for one flat vector."""
    prior = 0.5 * (obj.prior_precision * (theta - obj.prior_mean).square()).sum()
    total = torch.zeros_like(prior)
    for X, y in obj.batches():
        total = total + _data_term(obj, theta, X, y).detach()
    return prior + reduce_data(obj, total)


def objective_grad(obj: LaplaceObjective, thetas: Tensor) -> Tensor:
    """Gradients ``grad L(theta_j)`` for a batch ``thetas`` of shape ``(m, P)``."""
    total = torch.zeros_like(thetas)
    for X, y in obj.batches():
        g = vmap(grad(_data_term, argnums=1), in_dims=(None, 0, None, None))
        total = total + g(obj, thetas, X, y).detach()
    return _prior_grad(obj, thetas) + reduce_data(obj, total)


def loss_hessian_out(likelihood: str, f: Tensor, Jv: Tensor) -> Tensor:
    """Multiply ``Jv`` (``(m, B, C)``) by the Hessian of ``factor * loss`` in ``f``."""
    if likelihood == "regression":
        return Jv
    p = torch.softmax(f, dim=-1)
    pJv = p * Jv
    return pJv - p * pJv.sum(-1, keepdim=True)


def ggn_matvec(obj: LaplaceObjective, V: Tensor) -> Tensor:
    """``(GGN + diag(p_0)) v`` at the MAP for each row ``v`` of ``V`` (``(m, P)``).

    Uses one JVP and one VJP per batch, vectorised over the rows of ``V``:
    no Jacobian matrix and no Hessian is formed.
    """
    total = torch.zeros_like(V)
    theta = obj.theta_map
    for X, _ in obj.batches():

        def f(th: Tensor, X: Any = X) -> Tensor:
            return obj.forward(th, X)

        out, vjp_fn = vjp(f, theta)
        Jv = vmap(lambda v: jvp(f, (theta,), (v,))[1])(V)
        HJv = obj.h_factor * loss_hessian_out(obj.likelihood, out.detach(), Jv)
        total = total + vmap(vjp_fn)(HJv)[0].detach()
    return obj.prior_precision * V + reduce_data(obj, total)


def hessian_matvec(obj: LaplaceObjective, thetas: Tensor, V: Tensor) -> Tensor:
    """Exact Hessian-vector products ``H(theta_j) v_j`` (forward-over-reverse).

    ``thetas`` and ``V`` are both ``(m, P)``; row ``j`` of the result is the
    Hessian of ``L`` at ``thetas[j]`` applied to ``V[j]``.
    """
    total = torch.zeros_like(V)
    for X, y in obj.batches():

        def hvp(th: Tensor, v: Tensor, X: Any = X, y: Tensor = y) -> Tensor:
            g = grad(_data_term, argnums=1)
            return jvp(lambda t: g(obj, t, X, y), (th,), (v,))[1]

        total = total + vmap(hvp)(thetas, V).detach()
    return obj.prior_precision * V + reduce_data(obj, total)


def _add_batch_dim(x: Any) -> Any:
    if isinstance(x, Tensor):
        return x.unsqueeze(0)
    if isinstance(x, Mapping):
        return type(x)({k: _add_batch_dim(v) for k, v in x.items()})
    return x


def output_jacobians(forward: Forward, theta: Tensor, X: Any) -> tuple[Tensor, Tensor]:
    """Per-input Jacobians ``J(x_b)`` of shape ``(B, C, P)`` and outputs ``(B, C)``.

    Used only for a chunk of query points at a time, never for training data.
    Differentiable in ``X`` (for ``enable_backprop``); callers detach otherwise.
    """

    rebuild = _identity
    if isinstance(X, Mapping):
        # vmap maps over plain dicts only (not UserDict / BatchEncoding) and
        # over tensors only: map the tensor values, rebuild the batch inside.
        X, rebuild = _vmappable(X)

    def f_single(th: Tensor, x: Any) -> Tensor:
        out = forward(th, rebuild(_add_batch_dim(x)))[0]
        return out, out

    return vmap(jacrev(f_single, has_aux=True), in_dims=(None, 0))(theta, X)


def _identity(x: Any) -> Any:
    return x


def _vmappable(X: Mapping) -> tuple[dict[str, Tensor], Callable[[Any], Any]]:
    """The tensor values of a mapping batch, and how to rebuild the batch."""
    kind, tensors = type(X), {k: v for k, v in X.items() if isinstance(v, Tensor)}

    def rebuild(t: dict[str, Tensor]) -> Any:
        return kind({k: t[k] if k in t else v for k, v in X.items()})

    return tensors, rebuild


def jacobian_vector_products(
    forward: Forward, theta: Tensor, X: Any, U: Tensor
) -> Tensor:
    """``J(X) u`` for each row ``u`` of ``U`` (``(m, P)``) -> ``(m, B, C)``."""
    return vmap(lambda u: jvp(lambda th: forward(th, X), (theta,), (u,))[1])(U).detach()
