"""Dense refit solves for small parameter counts: one Cholesky factor per prior.

Where the refit has few parameters (the last layer; any ``P`` up to a few
thousand) its whole curvature fits in memory, and every refit solve
``(h G + diag(p_0)) u = v`` is exactly one triangular solve pair with a
Cholesky factor. This module forms

``target="ggn"``
    the data GGN ``G = sum_n J_n^T Lambda_n J_n`` once per fit, from per-example
    Jacobians of the refit module over the cached refit batches (features for
    the last layer), ``Lambda_n`` the Hessian of the loss in the outputs. ``G``
    does not depend on the prior precision, ``sigma_noise`` or the temperature;
    only the factorisation of ``h G + diag(p_0)`` does.
``target="hessian"``
    the exact data Hessian at the refit's base point, from Hessian-vector
    products (``P / chunk_size`` passes over the data). A failed Cholesky
    factorisation means the Hessian + prior is not positive definite:
    :class:`~laplace_hfl.errors.IndefiniteHessianError`.

No curvature backend is used. The answer is what the iterative refits converge
to, without the solver tolerance (and, for ``"hessian"``, without the
``O(eps^2)`` bias of the central differences).

Memory: ``G`` is kept (for other priors), and ``A``, its inverse and its
Cholesky factor hold ``3 P^2`` numbers; while ``G`` is formed, per-example
Jacobians of a sub-batch add at most ``P^2``: peak ``4 P^2`` numbers on top
of the cached refit batches, at most :func:`dense_budget`
(half the device's free memory, capped by :data:`DENSE_BUDGET` when set;
:func:`dense_fits`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from laplace_hfl.engine.batches import batch_rows, slice_batch
from laplace_hfl.engine.device_memory import available_bytes
from laplace_hfl.engine.functional import (
    LaplaceObjective,
    data_only_objective,
    hessian_matvec,
    output_jacobians,
    reduce_data,
)
from laplace_hfl.engine.progress import progress
from laplace_hfl.errors import IndefiniteHessianError

__all__ = [
    "CHUNK_BUDGET",
    "DENSE_BUDGET",
    "DenseFactor",
    "dense_budget",
    "dense_fits",
    "data_ggn",
    "data_hessian",
    "factorize",
    "query_rows",
    "linear_layer_covariance",
    "linear_layer_order",
]

#: User cap on the entries the dense solver may hold (``None``: no cap beyond
#: :func:`dense_budget`'s share of the device's free memory). Set
#: ``laplace_hfl.engine.dense.DENSE_BUDGET = 2**25`` to keep it under 256 MiB of
#: float64 (``P <= 2896``).
DENSE_BUDGET: int | None = None

#: Share of the device's free memory the dense solver may take.
FREE_MEMORY_SHARE = 0.5

#: Entries held by one chunk of query rows (:func:`query_rows`): 256 MiB of
#: float64; larger chunks do not make the products faster.
CHUNK_BUDGET = 2**25


def dense_budget(like: Tensor | None = None) -> int:
    """Entries the dense solver may hold on ``like``'s device in its dtype:
    :data:`FREE_MEMORY_SHARE` of the free memory
    (:func:`~laplace_hfl.engine.device_memory.available_bytes`), at most
    :data:`DENSE_BUDGET` when set (:data:`CHUNK_BUDGET` when the free memory
    is unknown)."""
    device = torch.device("cpu") if like is None else like.device
    itemsize = 8 if like is None else like.element_size()
    free = available_bytes(device)
    budget = CHUNK_BUDGET if free is None else int(FREE_MEMORY_SHARE * free) // itemsize
    return budget if DENSE_BUDGET is None else min(budget, int(DENSE_BUDGET))


def dense_fits(
    n_params: int, budget: int | None = None, like: Tensor | None = None
) -> bool:
    """Whether forming the curvature and its factor (peak ``4 P^2`` entries:
    ``G`` with ``A``, ``Sigma`` and ``L``, or with a sub-batch of Jacobians
    while ``G`` is formed) fits ``budget`` (default :func:`dense_budget` of
    ``like``)."""
    budget = dense_budget(like) if budget is None else budget
    return 4 * n_params * n_params <= budget


def data_ggn(
    obj: LaplaceObjective, budget: int | None = None, progress_bar: bool = False
) -> Tensor:
    """The data GGN ``sum_n J_n^T Lambda_n J_n`` at the MAP, ``(P, P)``.

    Independent of ``obj.h_factor`` and ``obj.prior_precision``. Jacobians are
    formed for sub-batches of at most ``budget / (2 C P)`` examples, so the
    Jacobians and their weighted copy hold at most ``budget`` numbers.

    Parameters
    ----------
    obj : LaplaceObjective
    budget : int, optional
        Largest number of Jacobian entries held at once (at least one
        example); default ``P^2``, so that forming ``G`` holds no more than the
        solver's own ``2 P^2``.
    progress_bar : bool, default=False
        A bar over the sub-batches from the start (otherwise one appears when
        they are expected to take long: :func:`laplace_hfl.engine.progress.progress`).

    Returns
    -------
    Tensor
        Symmetric positive semi-definite ``(P, P)``.
    """
    theta = obj.theta_map
    P = theta.numel()
    G = torch.zeros(P, P, dtype=theta.dtype, device=theta.device)
    budget = P * P if budget is None else budget
    inputs = [X for X, _ in obj.batches()]
    pieces = []
    if inputs:  # sub-batch size from the number of outputs
        with torch.no_grad():
            C = obj.forward(theta, slice_batch(inputs[0], 0, 1)).shape[-1]
        step = max(1, budget // (2 * C * P))
        pieces = [(X, s) for X in inputs for s in range(0, batch_rows(X), step)]
    for X, start in progress(pieces, desc="[HFL dense curvature]", always=progress_bar):
        J, f = output_jacobians(obj.forward, theta, slice_batch(X, start, start + step))
        J, f = J.detach(), f.detach()
        if obj.likelihood == "regression":
            Jf = J.reshape(-1, P)
            G.addmm_(Jf.T, Jf)
        else:
            p = torch.softmax(f, dim=-1)
            A = (p.sqrt()[:, :, None] * J).reshape(-1, P)
            pJ = torch.einsum("bc,bcp->bp", p, J)
            G.addmm_(A.T, A).addmm_(pJ.T, pJ, alpha=-1.0)
    G = reduce_data(obj, G)  # summed over processes in a distributed fit
    return 0.5 * (G + G.T)


def data_hessian(
    obj: LaplaceObjective,
    theta: Tensor,
    chunk_size: int = 64,
    progress_bar: bool = False,
) -> Tensor:
    """Exact Hessian of the data term ``sum_n factor * loss_n`` at ``theta``.

    Built from ``P`` Hessian-vector products, ``chunk_size`` per pass over the
    data; independent of ``obj.h_factor`` and ``obj.prior_precision``.

    Returns
    -------
    Tensor
        Symmetric ``(P, P)``.
    """
    data_only = data_only_objective(obj)
    P = theta.numel()
    eye = torch.eye(P, dtype=theta.dtype, device=theta.device)
    H = torch.cat(
        [
            hessian_matvec(
                data_only,
                theta.expand(min(chunk_size, P - i), -1).clone(),
                eye[i : i + chunk_size],
            )
            for i in progress(
                range(0, P, chunk_size),
                desc="[HFL dense Hessian]",
                always=progress_bar,
            )  # fmt: skip
        ]
    )
    return 0.5 * (H + H.T)


@dataclass(frozen=True)
class DenseFactor:
    """``A = h C + diag(p_0)``, its inverse ``Sigma`` and its lower Cholesky
    factor ``L`` (which weight samples draw from): ``3 P^2`` numbers, and
    every solve is one matrix product.

    ``residual`` is the largest relative residual ``||A Sigma z - z|| / ||z||``
    over a few random probes ``z``, measured once by :func:`factorize`: the
    accuracy of every solve with this factor, without a second ``P x P``
    product per query.
    """

    A: Tensor
    Sigma: Tensor
    residual: float = 0.0
    L: Tensor | None = None

    def solve(self, V: Tensor) -> Tensor:
        """``A^{-1} v`` for the rows of ``V``: ``(m, P)`` (accuracy: ``residual``)."""
        return V @ self.Sigma


def factorize(
    curvature: Tensor, h_factor: float, prior_precision: Tensor, target: str
) -> DenseFactor:
    """Factor ``h_factor * curvature + diag(prior_precision)`` by Cholesky.

    Parameters
    ----------
    curvature : Tensor
        ``(P, P)`` data GGN or data Hessian.
    h_factor : float
        ``1 / (sigma_noise^2 T)``.
    prior_precision : Tensor
        ``(P,)`` diagonal prior precision.
    target : {"ggn", "hessian"}
        Chooses the error raised when the matrix is not positive definite.

    Returns
    -------
    DenseFactor

    Raises
    ------
    IndefiniteHessianError
        ``target="hessian"`` and the Hessian + prior is not positive definite.
    ValueError
        ``target="ggn"`` and GGN + prior is singular (zero prior precision on
        directions the data does not determine).
    """
    A = h_factor * curvature + torch.diag(prior_precision.to(curvature))
    L, info = torch.linalg.cholesky_ex(A)
    if int(info) != 0:
        if target == "hessian":
            raise IndefiniteHessianError(
                "The exact Hessian of the Laplace objective plus the prior is not "
                f"positive definite (Cholesky failed at pivot {int(info)} of "
                f"{A.shape[0]}), so the network refit (target='hessian') has no "
                "minimum. Use target='ggn' (GGN + prior, positive definite by "
                "construction), or train the MAP to a minimum of the Laplace "
                "objective (summed loss, weight decay equal to the prior precision)."
            )
        p_min = float(prior_precision.min())
        cause = (
            "the prior precision is zero on directions the training data does "
            "not determine. Use a positive prior precision."
            if p_min == 0
            else f"1/(sigma_noise^2 T) = {h_factor:.3g} scales the GGN so far "
            f"above the prior precision (min {p_min:.3g}) that the sum is "
            f"singular in {A.dtype}. Check sigma_noise (a typical value is the "
            "residual RMSE of the MAP) and temperature, or raise the prior "
            "precision."
        )
        raise ValueError(
            "GGN + prior precision is singular (Cholesky failed at pivot "
            f"{int(info)} of {A.shape[0]}): {cause}"
        )
    Sigma = torch.cholesky_inverse(L)
    Sigma = 0.5 * (Sigma + Sigma.T)
    g = torch.Generator(device="cpu").manual_seed(0)
    Z = torch.randn(4, A.shape[0], generator=g, dtype=A.dtype).to(A.device)
    residual = ((Z @ Sigma) @ A - Z).norm(dim=1) / Z.norm(dim=1)
    return DenseFactor(A, Sigma, float(residual.max()), L)


def query_rows(n_params: int, n_outputs: int, budget: int | None = None) -> int:
    """Query points predicted together by the dense solver: their Jacobians
    and solutions (``2 B C P`` numbers) stay within half the budget."""
    budget = CHUNK_BUDGET if budget is None else budget
    return max(1, budget // (4 * n_outputs * n_params))


def linear_layer_covariance(
    blocks: Tensor, features: Tensor, n_out: int, bias: bool
) -> Tensor:
    """``J(x) Sigma J(x)^T`` for a ``Linear`` refit module, from its inputs.

    ``f = W phi + b`` has ``J`` rows ``e_c (x) phi`` (and ``e_c`` for the bias),
    so the product needs ``Sigma`` contracted with ``phi`` twice instead of
    ``C`` rows of length ``P`` multiplied by ``Sigma``: about ``B P^2 / 2``
    multiply-adds instead of ``B C P^2`` (no Jacobian is formed; only the
    ``C (C + 1) / 2`` blocks ``Sigma_cc'``, ``c <= c'``, are read).

    Parameters
    ----------
    blocks : Tensor
        The upper blocks of ``Sigma`` from :func:`linear_layer_order`,
        ``(C (C + 1) / 2, D', D')`` (``D' = D + 1`` with a bias, the bias last).
    features : Tensor
        Inputs of the layer ``(B, D)``.
    n_out : int
        Outputs ``C`` of the layer.
    bias : bool
        Whether the layer has a bias.

    Returns
    -------
    Tensor
        ``(B, C, C)``, symmetric PSD.
    """
    n_pairs, Dp = blocks.shape[0], blocks.shape[1]
    phi = features.to(blocks)
    if bias:
        phi = torch.cat([phi, phi.new_ones(phi.shape[0], 1)], 1)
    T = (blocks.reshape(n_pairs * Dp, Dp) @ phi.T).reshape(n_pairs, Dp, -1)
    vals = torch.einsum("kdb,bd->bk", T, phi)  # (B, pairs)
    i, j = torch.triu_indices(n_out, n_out, device=blocks.device)
    cov = vals.new_zeros(vals.shape[0], n_out, n_out)
    cov[:, i, j] = vals
    cov[:, j, i] = vals
    return cov


def linear_layer_order(Sigma: Tensor, n_out: int, n_in: int, bias: bool) -> Tensor:
    """The blocks ``Sigma_cc'`` (``c <= c'``) of ``Sigma`` over
    ``(weight.flatten(), bias)``, each ``(D', D')`` with the bias last, for
    :func:`linear_layer_covariance`."""
    idx = torch.arange(n_out * n_in, device=Sigma.device).reshape(n_out, n_in)
    if bias:
        b = n_out * n_in + torch.arange(n_out, device=Sigma.device)
        idx = torch.cat([idx, b[:, None]], 1)
    i, j = torch.triu_indices(n_out, n_out, device=Sigma.device)
    return torch.stack(
        [Sigma[idx[a]][:, idx[c]] for a, c in zip(i.tolist(), j.tolist())]
    )
