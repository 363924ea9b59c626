"""Stochastic Lanczos quadrature (SLQ) over batched matrix-vector products.

(:mod:`laplace_hfl.engine.lanczos` holds the other Lanczos use: ``A^{-1/2} z`` for
weight samples.)

For a symmetric matrix ``A`` available only through products, ``z^T f(A) z`` is
approximated by the Gauss quadrature that ``k`` Lanczos steps from ``z`` define
(Golub & Meurant; Ubaru, Chen & Saad, *Fast estimation of tr(f(A)) via
stochastic Lanczos quadrature*, SIAM J. Matrix Anal. Appl. 2017)::

    z^T f(A) z  ~=  sum_j  w_j f(theta_j),   theta_j = eig(T_k),
                                            w_j = ||z||^2 (first entry of eigvec j)^2

and ``tr f(A) = E[z^T f(A) z]`` over Rademacher probes. All probes run in *one*
vectorised Lanczos: every step is one call of ``matvec`` on the stacked
still-active probes (one shared pass over the training data).

**Exact mode.** With the ``P`` basis vectors as probes and Lanczos run until the
Krylov space of each is exhausted (with full reorthogonalisation), the
quadrature is exact for every ``f``: ``sum_i e_i^T f(A) e_i = tr f(A)``.
:func:`make_probes` switches to it automatically when ``P <= n_probes``, so
small models get deterministic, exact results.

**Why not linear_operator.** ``linear_operator`` (installed with laplace-torch)
has ``inv_quad_logdet`` and ``utils.lanczos.lanczos_tridiag``. Its logdet uses a
dense Cholesky below ``max_cholesky_size`` (800: every small model would be
densified through ``P`` products), 20 Lanczos steps and 10 Gaussian probes by
global setting, no cache across hyperparameters, and gradients by autograd
through the operator's matmul; ``lanczos_tridiag`` always stores and
reorthogonalises against all Lanczos vectors (``m k P`` memory), stops only when
*every* probe breaks down (absolute tolerance 1e-6, dividing the others by
their tiny norms), and ``lanczos_tridiag_to_diag`` silently drops negative Ritz
values, which would hide an indefinite Hessian. The recurrence below is short,
handles breakdown per probe, reorthogonalises only within a memory budget and
returns the raw Ritz values.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "Probes",
    "Quadrature",
    "make_probes",
    "lanczos_quadrature",
    "quadrature_estimate",
]

#: Largest number of entries the stored Lanczos vectors may hold for full
#: reorthogonalisation (float64: 256 MiB). Above it the plain three-term
#: recurrence runs (standard SLQ; loss of orthogonality only duplicates Ritz
#: values, which the quadrature tolerates).
REORTH_BUDGET = 2**25


@dataclass(frozen=True)
class Probes:
    """Probe vectors ``Z`` ``(m, P)`` with ``scale * sum_j z_j z_j^T ~= I``.

    ``exact`` probes are the ``P`` basis vectors (``scale=1``, equality holds);
    otherwise Rademacher vectors with ``scale = 1/m`` (equality in expectation).
    """

    Z: Tensor
    scale: float
    exact: bool


@dataclass(frozen=True)
class Quadrature:
    """Gauss quadrature rules of a matrix, one per probe.

    Attributes
    ----------
    nodes : Tensor
        Ritz values ``(m, k)``.
    weights : Tensor
        Quadrature weights ``(m, k)``; each row sums to ``||z||^2``.
    steps : Tensor
        Lanczos steps taken per probe ``(m,)`` (fewer than ``k`` after breakdown).
    scale : float
        Probe scale of :class:`Probes`.
    exact : bool
        Basis probes with every Krylov space exhausted: the rule is exact.
    """

    nodes: Tensor
    weights: Tensor
    steps: Tensor
    scale: float
    exact: bool


def make_probes(
    n_params: int,
    n_probes: int,
    seed: int,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
) -> Probes:
    """Basis probes when ``n_params <= n_probes`` (exact), else Rademacher.

    Parameters
    ----------
    n_params : int
        Dimension ``P``.
    n_probes : int
        Number of random probes ``m`` (and the threshold of the exact mode).
    seed : int
        Seed of the probes (fixed probes: smooth objectives across
        hyperparameters, reproducible results).
    dtype, device
        Of the returned probes.

    Returns
    -------
    Probes
    """
    if n_params <= n_probes:
        Z = torch.eye(n_params, dtype=dtype, device=device)
        return Probes(Z, 1.0, True)
    g = torch.Generator(device="cpu").manual_seed(seed)
    Z = torch.randint(0, 2, (n_probes, n_params), generator=g).to(dtype) * 2 - 1
    return Probes(Z.to(device), 1.0 / n_probes, False)


def lanczos_quadrature(
    matvec: Callable[[Tensor], Tensor],
    probes: Probes,
    max_steps: int,
    *,
    reorth_budget: int = REORTH_BUDGET,
    breakdown_rtol: float = 1e-10,
) -> Quadrature:
    """Run Lanczos from every probe at once and return its quadrature rules.

    Parameters
    ----------
    matvec : callable
        Maps rows ``(r, P)`` to ``A`` applied to each row (symmetric ``A``).
        Called once per step on the probes whose recursion is still running.
    probes : Probes
    max_steps : int
        Largest number of Lanczos steps ``k`` (``P`` for exact probes).
    reorth_budget : int, default=REORTH_BUDGET
        Full reorthogonalisation (twice, classical Gram-Schmidt) when the
        stored vectors ``m k P`` fit in this many entries.
    breakdown_rtol : float, default=1e-10
        A probe's recursion stops when its next ``beta`` falls below this
        fraction of the largest ``|alpha|, beta`` it has seen (its Krylov
        space is exhausted: the rule is exact for that probe).

    Returns
    -------
    Quadrature
    """
    Z = probes.Z
    m, P = Z.shape
    k = max(1, min(int(max_steps), P))
    reorth = m * k * P <= reorth_budget
    norms = Z.norm(dim=-1)
    q = Z / norms[:, None]
    q_prev = torch.zeros_like(q)
    b_prev = torch.zeros(m, dtype=Z.dtype, device=Z.device)
    alpha = torch.zeros(m, k, dtype=Z.dtype, device=Z.device)
    beta = torch.zeros(m, k, dtype=Z.dtype, device=Z.device)
    scale = torch.zeros(m, dtype=Z.dtype, device=Z.device)
    steps = torch.zeros(m, dtype=torch.long, device=Z.device)
    active = torch.ones(m, dtype=torch.bool, device=Z.device)
    basis = [q] if reorth else None
    for j in range(k):
        idx = torch.nonzero(active).flatten()
        if idx.numel() == 0:
            break
        w = torch.zeros_like(q)
        w[idx] = matvec(q[idx])
        a = (q * w).sum(-1)
        w = w - a[:, None] * q - b_prev[:, None] * q_prev
        if reorth:
            Q = torch.stack(basis, dim=1)  # (m, j+1, P)
            for _ in range(2):
                w = w - torch.einsum("mjp,mj->mp", Q, torch.einsum("mjp,mp->mj", Q, w))
        b = w.norm(dim=-1)
        alpha[:, j] = torch.where(active, a, alpha[:, j])
        steps += active.long()
        scale = torch.maximum(scale, torch.where(active, a.abs(), scale))
        scale = torch.maximum(scale, torch.where(active, b, scale))
        if j == k - 1:
            break
        active = active & (b > breakdown_rtol * scale)
        beta[:, j] = torch.where(active, b, torch.zeros_like(b))
        q_prev, b_prev = q, beta[:, j]
        q = torch.where(active[:, None], w / b.clamp_min(1e-300)[:, None], 0.0)
        if reorth:
            basis.append(q)
    # Pad each probe's matrix beyond its own steps with a value above every
    # Ritz value (Gershgorin bound): decoupled by beta = 0, weight zero.
    pad = (alpha.abs().amax(-1) + 2 * beta.abs().amax(-1) + 1.0)[:, None]
    used = torch.arange(k, device=Z.device)[None, :] < steps[:, None]
    diag = torch.where(used, alpha, pad.expand(-1, k))
    T = torch.diag_embed(diag) + torch.diag_embed(beta[:, :-1], 1)
    T = T + torch.diag_embed(beta[:, :-1], -1)
    nodes, vecs = torch.linalg.eigh(T)
    weights = norms[:, None].square() * vecs[:, 0, :].square()
    exact = probes.exact and reorth
    return Quadrature(nodes, weights, steps, probes.scale, exact)


def quadrature_estimate(quad: Quadrature, values: Tensor) -> tuple[Tensor, float]:
    """``tr f(A)`` from the rules, given ``values = f(nodes)`` ``(m, k)``.

    Returns
    -------
    estimate : Tensor
        Scalar (differentiable through ``values``).
    stderr : float
        Standard error over the probes (0 for exact rules).
    """
    per_probe = (quad.weights * values).sum(-1)
    estimate = quad.scale * per_probe.sum()
    m = per_probe.numel()
    if quad.exact or m < 2:
        return estimate, 0.0
    return estimate, float(per_probe.detach().std() / m**0.5)
