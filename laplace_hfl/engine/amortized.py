"""Amortised HFL: posterior samples by sample-then-optimise on the GGN target.

A one-time set of ``S`` perturbed refits of the Gauss-Newton model at the MAP
gives ``S`` exact samples of the linearised-Laplace posterior; the predictive
covariance of any new input is then the sample covariance of ``S`` Jacobian-
vector products, with no further pass over the training data.

Each sample solves ``A delta_s = b_s`` with ``A = GGN + diag(p_0)`` (the
posterior precision of ``FullLaplace`` with a GGN backend) and the random
right-hand side::

    b_s = sqrt(H_factor) * sum_n J_n^T Lambda_n^{1/2} xi_{s,n} + sqrt(p_0) * zeta_s

with ``xi``, ``zeta`` standard normal and ``Lambda_n`` the output Hessian of
``factor * loss`` at example ``n`` (identity for regression, ``diag(p) - p p^T``
for the softmax, whose square root is ``diag(sqrt p) - p sqrt(p)^T``). Then
``Cov[b_s] = A`` and ``delta_s = A^{-1} b_s`` has ``Cov[delta_s] = A^{-1}``
exactly: ``delta_s`` is the minimiser of the Gauss-Newton objective with
randomly perturbed targets and prior mean (sample-then-optimise; Papandreou &
Yuille 2010, Matthews et al. 2017, Antoran et al. 2023). All ``S`` solves share
one :func:`~laplace_hfl.engine.solvers.batched_cg` call, i.e. one pass over the data per
CG iteration (:func:`posterior_samples`, exact to ``rtol``).

At training cost (:func:`sgd_posterior_samples`): the same objectives
``1/2 d^T A d - b_s^T d`` minimised by averaged minibatch SGD
(:func:`laplace_hfl.engine.stochastic.averaged_sgd`), started at the prior sample
``d_0 = p_0^{-1/2} zeta_s`` (exact where the data say nothing), each step an
unbiased estimate from one minibatch. The right-hand sides ``b_s`` are drawn in
one pass (one VJP per batch for the chunk) and kept, so the per-example noise
``xi_{s,n}`` is the same in every epoch without storing ``S x N x C`` numbers
and the minibatch gradients carry no noise from it (only from the curvature:
``(N/n_b) G_b d - G d``). Samples are processed ``chunk_size`` at a time, so
memory is ``~6 chunk_size P`` whatever ``S``. The full-batch relative residual of
each sample is measured at the end (one extra pass) and warned about.

Solve tolerance (:func:`sample_rtol`): a sample solved to relative residual
``r`` changes the variances by about ``r`` relative, far below their Monte
Carlo error ``sqrt(2 / S)``; the full-batch solves therefore stop at
``max(rtol, 0.01 sqrt(2 / S))`` (1.8e-3 for ``S = 64``), which takes about half
the CG iterations of ``rtol = 1e-6``. Measured on LeNet / MNIST (N = 500, S = 64,
64 test images x 10 outputs, the same right-hand sides): 32 -> 18 iterations for
1e-6 -> 1e-3, variances changed by 0.03% (median) / 0.13% (max) against a Monte
Carlo standard error of 18%; 1e-2: 11 iterations, 0.11% / 0.72%
(``python scripts/amortized_tolerance.py``).

What it converges to: ``Sigma_S(x) = 1/S sum_s J(x) delta_s delta_s^T J(x)^T``
is an unbiased estimate of ``J(x) (GGN + diag(p_0))^{-1} J(x)^T`` (the mean of
``delta_s`` is known to be 0), with relative standard error ``sqrt(2 / S)`` for
a variance (Wishart), i.e. ``O(1/sqrt(S))``. Only the ``"ggn"`` target: the
exact Hessian of a network has no such square-root factorisation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.func import jvp, vjp, vmap

from laplace_hfl.engine.functional import (
    Forward,
    LaplaceObjective,
    ggn_matvec,
    reduce_data,
)
from laplace_hfl.engine.solvers import batched_cg
from laplace_hfl.engine.stochastic import MINIBATCH_RTOL, averaged_sgd, warn_unconverged
from laplace_hfl.engine.validation import as_int
from laplace_hfl.errors import RefitConvergenceWarning, warn_user

#: ``noise(key, k, shape)``: standard normals of training batch ``k``.
ExampleNoise = Callable[[int, int, tuple[int, ...]], Tensor]

__all__ = [
    "AmortizedState",
    "loss_hessian_sqrt_apply",
    "perturbed_rhs",
    "posterior_samples",
    "sample_rtol",
    "sgd_posterior_samples",
    "sample_jvps",
    "amortized_covariance",
    "amortized_solve",
]


@dataclass
class AmortizedState:
    """Posterior samples and their diagnostics.

    Attributes
    ----------
    samples : Tensor
        ``(S, P)`` samples ``delta_s ~ N(0, (GGN + diag(p_0))^{-1})``.
    residual : Tensor
        Relative CG residual ``||b_s - A delta_s|| / ||b_s||`` per sample ``(S,)``.
    iterations : Tensor
        CG iterations per sample ``(S,)``.
    """

    samples: Tensor
    residual: Tensor
    iterations: Tensor

    @property
    def n_samples(self) -> int:
        return int(self.samples.shape[0])


def loss_hessian_sqrt_apply(likelihood: str, f: Tensor, xi: Tensor) -> Tensor:
    """Apply ``Lambda^{1/2}`` (output Hessian of ``factor * loss``) to ``xi``.

    Parameters
    ----------
    likelihood : {"regression", "classification"}
    f : Tensor
        Outputs ``(B, C)`` at the MAP.
    xi : Tensor
        ``(S, B, C)``.

    Returns
    -------
    Tensor
        ``L_n xi_{s,n}`` with ``L_n L_n^T = Lambda_n``, ``(S, B, C)``.
    """
    if likelihood == "regression":
        return xi
    p = torch.softmax(f, dim=-1)
    s = p.sqrt()
    return s * xi - p * (s * xi).sum(-1, keepdim=True)


def perturbed_rhs(
    obj: LaplaceObjective,
    n_samples: int,
    generator: torch.Generator | None = None,
    noise: ExampleNoise | None = None,
    *,
    prior_noise: Tensor | None = None,
) -> Tensor:
    """Random right-hand sides ``b_s`` with ``Cov[b_s] = GGN + diag(p_0)``.

    One VJP per training batch, vectorised over the ``S`` samples.

    Parameters
    ----------
    obj : LaplaceObjective
    n_samples : int
    generator : torch.Generator, optional
    noise : callable, optional
        ``noise(key, k, shape)`` returns the standard normals ``xi`` of batch
        ``k`` (shape ``(S, B, C)``) from an integer ``key`` drawn from
        ``generator``; keyed by example (not by batch or process) it makes the
        result independent of how the data is batched or sharded (see
        :func:`laplace_hfl.engine.example_noise.example_noise`). None draws ``xi`` from
        ``generator`` batch after batch.
    prior_noise : Tensor, optional
        The standard normal ``zeta`` ``(S, P)`` of the prior term (drawn from
        ``generator`` when None).

    Returns
    -------
    Tensor
        ``(S, P)``.
    """
    theta = obj.theta_map
    dtype, device = theta.dtype, theta.device
    if prior_noise is not None:
        zeta = prior_noise
    else:
        zeta = torch.randn(
            n_samples, theta.numel(), dtype=dtype, device=device, generator=generator
        )
    key = None
    if noise is not None:
        key = int(torch.randint(2**62, (), generator=generator, device=device))
    total = torch.zeros_like(zeta)
    scale = float(obj.h_factor) ** 0.5
    for k, (X, _) in enumerate(obj.batches()):

        def f(th: Tensor, X: Any = X) -> Tensor:
            return obj.forward(th, X)

        out, vjp_fn = vjp(f, theta)
        shape = (n_samples, *out.shape)
        if noise is None:
            xi = torch.randn(shape, dtype=dtype, device=device, generator=generator)
        else:
            xi = noise(key, k, shape).to(dtype=dtype, device=device)
        Z = scale * loss_hessian_sqrt_apply(obj.likelihood, out.detach(), xi)
        total = total + vmap(vjp_fn)(Z)[0].detach()
    return obj.prior_precision.sqrt() * zeta + reduce_data(obj, total)


def sample_rtol(n_samples: int, rtol: float) -> float:
    """The CG tolerance of ``S`` amortised samples: ``max(rtol, 0.01 sqrt(2/S))``.

    One hundredth of a variance's relative Monte Carlo standard error
    ``sqrt(2 / S)``: tighter solves do not make the estimate more accurate,
    only slower (see the module doc for the measurement).
    """
    return max(float(rtol), 0.01 * (2.0 / n_samples) ** 0.5)


def posterior_samples(
    obj: LaplaceObjective,
    n_samples: int,
    rtol: float = 1e-6,
    max_iter: int = 1000,
    chunk_size: int | None = None,
    seed: int = 0,
    precond: Callable[[Tensor], Tensor] | None = None,
    noise: ExampleNoise | None = None,
) -> AmortizedState:
    """Draw ``S`` exact linearised-Laplace posterior samples by perturbed refits.

    Parameters
    ----------
    obj : LaplaceObjective
    n_samples : int
        ``S``.
    rtol : float, default=1e-6
        CG stops at ``||b_s - A delta_s|| <= rtol * ||b_s||``.
    max_iter : int, default=1000
    chunk_size : int or None
        Samples solved together (memory ``~5 * chunk_size * P``); all at once
        when None.
    seed : int, default=0
        Seed of the private generator (results are reproducible).
    precond : callable, optional
        Preconditioner of the CG solves.
    noise : callable, optional
        Per-example noise of the right-hand sides (see :func:`perturbed_rhs`).

    Returns
    -------
    AmortizedState

    Raises
    ------
    ValueError
        ``n_samples`` is not an integer >= 2.

    Warns
    -----
    RefitConvergenceWarning
        Some sample's relative CG residual exceeds ``rtol`` after ``max_iter``.
    """
    n_samples = as_int("n_samples", n_samples, 2)
    device = obj.theta_map.device
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    step = chunk_size or n_samples
    parts, res_parts, it_parts = [], [], []
    for start in range(0, n_samples, step):
        m = min(step, n_samples - start)
        B = perturbed_rhs(obj, m, gen, noise)
        b_norm = B.norm(dim=1)
        res = batched_cg(
            lambda idx, V: ggn_matvec(obj, V), B, rtol * b_norm, max_iter, precond
        )
        parts.append(res.x)
        res_parts.append(res.residual_norm / b_norm)
        it_parts.append(res.iterations)
    state = AmortizedState(torch.cat(parts), torch.cat(res_parts), torch.cat(it_parts))
    bad = state.residual > rtol
    if bool(bad.any()):
        warn_user(
            f"{int(bad.sum())} of {n_samples} amortised posterior samples did not "
            f"converge: relative CG residual max {float(state.residual.max()):.3g}, "
            f"median {float(state.residual.median()):.3g} > rtol={rtol:.3g} after "
            f"max_iter={max_iter} iterations. Their variances are biased low; "
            "increase max_iter (or precondition_rank).",
            RefitConvergenceWarning,
        )
    return state


def sgd_posterior_samples(
    obj: LaplaceObjective,
    n_samples: int,
    epochs: int,
    batch_rows: int | None = None,
    chunk_size: int | None = None,
    seed: int = 0,
    precond: Callable[[Tensor], Tensor] | None = None,
    rtol: float = MINIBATCH_RTOL,
    step_scale: float = 0.1,
    noise: ExampleNoise | None = None,
) -> AmortizedState:
    """``S`` posterior samples by sample-then-optimise over minibatches.

    Per chunk of samples: one pass draws ``b_s`` (:func:`perturbed_rhs`, the
    same draw as :func:`posterior_samples` for the same seed and chunks), then
    :func:`~laplace_hfl.engine.stochastic.averaged_sgd` minimises
    ``1/2 d^T A d - b_s^T d`` from the prior sample ``p_0^{-1/2} zeta_s``.

    Parameters
    ----------
    obj : LaplaceObjective
    n_samples : int
        ``S``.
    epochs : int
        Passes over the minibatches (iterates averaged over the second half).
    batch_rows : int, optional
        Rows per minibatch (the loader's batch size).
    chunk_size : int or None
        Samples optimised together (memory ``~6 * chunk_size * P``).
    seed : int, default=0
    precond : callable, optional
        Preconditioner ``M^{-1}`` of the SGD steps.
    rtol : float, default=MINIBATCH_RTOL
        Warn above this full-batch relative residual.
    step_scale : float, default=0.1
        ``eta = step_scale / lambda_max(M^{-1} A_b)``.
    noise : callable, optional
        Per-example noise of the right-hand sides (see :func:`perturbed_rhs`).

    Returns
    -------
    AmortizedState
        ``residual`` is the full-batch relative residual ``||b_s - A d_s|| /
        ||b_s||``; ``iterations`` the SGD steps per sample.

    Raises
    ------
    ValueError
        As :func:`posterior_samples`.

    Warns
    -----
    RefitConvergenceWarning
        Some sample's full-batch relative residual exceeds ``rtol``.
    """
    n_samples = as_int("n_samples", n_samples, 2)
    theta = obj.theta_map
    dtype, device = theta.dtype, theta.device
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    step = chunk_size or n_samples
    parts, res_parts, steps = [], [], 0
    for chunk, start in enumerate(range(0, n_samples, step)):
        m = min(step, n_samples - start)
        zeta = torch.randn(m, theta.numel(), dtype=dtype, device=device, generator=gen)
        B = perturbed_rhs(obj, m, gen, noise, prior_noise=zeta)
        # Start at the prior sample: exact where the data say nothing.
        U0 = zeta / obj.prior_precision.sqrt()
        res = averaged_sgd(
            obj, B, epochs, precond, batch_rows, U0,
            step_scale=step_scale, seed=seed + chunk,
        )  # fmt: skip
        parts.append(res.U)
        res_parts.append(res.residual)
        steps = res.steps
    residual = torch.cat(res_parts)
    warn_unconverged(residual, rtol, "Amortised posterior samples", steps, epochs)
    iterations = torch.full((n_samples,), steps, dtype=torch.long, device=device)
    return AmortizedState(torch.cat(parts), residual, iterations)


def sample_jvps(forward: Forward, theta: Tensor, X: Any, samples: Tensor) -> Tensor:
    """``J(X) delta_s`` for every sample (one vmapped JVP): ``(S, B, C)``."""
    return vmap(lambda u: jvp(lambda th: forward(th, X), (theta,), (u,))[1])(
        samples
    ).detach()


def amortized_covariance(
    forward: Forward,
    theta: Tensor,
    X: Any,
    samples: Tensor,
    joint: bool = False,
    chunk_size: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Predictive mean and covariance at new inputs from stored samples.

    Parameters
    ----------
    forward : callable
        ``forward(theta, X) -> (B, C)``.
    theta : Tensor
        MAP ``(P,)``.
    X : Tensor or dict
        Query inputs (batch ``B``).
    samples : Tensor
        ``(S, P)`` from :func:`posterior_samples`.
    joint : bool, default=False
        Return the ``(B*C, B*C)`` joint covariance (input-major) instead of
        ``(B, C, C)``.
    chunk_size : int or None
        Samples pushed through one vmapped JVP (memory ``chunk_size * B * C``
        plus activations); all at once when None.

    Returns
    -------
    f_mu : Tensor
        ``(B, C)``.
    f_cov : Tensor
        ``(B, C, C)`` or ``(B*C, B*C)``.
    """
    with torch.no_grad():
        f_mu = forward(theta, X).detach()
    S = samples.shape[0]
    step = chunk_size or S
    B, C = f_mu.shape
    if joint:
        cov = f_mu.new_zeros(B * C, B * C)
    else:
        cov = f_mu.new_zeros(B, C, C)
    for start in range(0, S, step):
        F = sample_jvps(forward, theta, X, samples[start : start + step])
        if joint:
            Fl = F.reshape(F.shape[0], -1)
            cov += Fl.T @ Fl
        else:
            cov += torch.einsum("sbc,sbk->bck", F, F)
    return f_mu, cov / S


def amortized_solve(samples: Tensor, V: Tensor) -> Tensor:
    """``(1/S) sum_s delta_s delta_s^T v`` for the rows of ``V``: ``(m, P)``.

    An unbiased estimate of ``(GGN + diag(p_0))^{-1} v`` used where Jacobians
    are given explicitly (``functional_variance(Js)``).
    """
    return ((V @ samples.T) @ samples) / samples.shape[0]
