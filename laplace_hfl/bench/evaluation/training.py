"""MAP training for the evaluation tasks: the Laplace objective laplace-torch
encodes, training to a stationary point of it (``"stationary"`` protocol) or as
users train (``"realistic"`` protocol), and small data / model helpers."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from laplace_hfl.engine.functional import ParamLayout

__all__ = [
    "tensor_loader",
    "batch_loader",
    "mlp",
    "map_grad_norm",
    "laplace_objective",
    "train_stationary",
    "newton_polish",
    "train_realistic",
]


def tensor_loader(X: Tensor, y: Tensor, batch_size: int | None = None) -> DataLoader:
    """``(X, y)`` in order, in batches of ``batch_size`` (default: one batch)."""
    n = X.shape[0]
    return DataLoader(TensorDataset(X, y), batch_size=batch_size or n, shuffle=False)


def batch_loader(X: Any, y: Tensor) -> DataLoader:
    """``(X, y)`` as a loader of that one batch (``X`` a tensor or a dict batch)."""
    return DataLoader([(X, y)], batch_size=None)


def mlp(sizes: list[int], act: type[nn.Module] = nn.Tanh) -> nn.Sequential:
    """``Linear`` layers of ``sizes`` with ``act`` between them."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(act())
    return nn.Sequential(*layers)


def laplace_objective(
    model: nn.Module, X: Tensor, y: Tensor, likelihood: str, sigma_noise: float,
    prior_precision: float,
) -> Tensor:  # fmt: skip
    """The negative log posterior laplace-torch's classes encode.

    Parameters
    ----------
    model : torch.nn.Module
    X, y : Tensor
        All training data.
    likelihood : {"regression", "classification"}
    sigma_noise, prior_precision : float

    Returns
    -------
    Tensor
        Scalar ``1/sigma^2 * sum 0.5 (f - y)^2 + 0.5 prior ||theta||^2``
        (regression) or ``sum CE + 0.5 prior ||theta||^2`` (classification).
    """
    sq = sum((p**2).sum() for p in model.parameters())
    return _data_term(model(X), y, likelihood, sigma_noise) + 0.5 * prior_precision * sq


def _data_term(out: Tensor, y: Tensor, likelihood: str, sigma_noise: float) -> Tensor:
    """Summed negative log likelihood as laplace-torch scales it."""
    if likelihood == "regression":
        return 0.5 * ((out - y) ** 2).sum() / sigma_noise**2
    return nn.functional.cross_entropy(out, y, reduction="sum")


def _grad_norm(model: nn.Module, loss: Tensor) -> float:
    grads = torch.autograd.grad(loss, [p for p in model.parameters()])
    return float(torch.sqrt(sum((g**2).sum() for g in grads)))


def _flat_objective(
    model: nn.Module, X: Tensor, y: Tensor, likelihood: str, sigma_noise: float,
    prior_precision: float,
) -> tuple[Callable[[Tensor], Tensor], Tensor]:  # fmt: skip
    named = list(model.named_parameters())
    layout = ParamLayout(tuple(n for n, _ in named), tuple(p.shape for _, p in named))

    def f(theta: Tensor) -> Tensor:
        out = torch.func.functional_call(model, layout.unflatten(theta), (X,))
        data = _data_term(out, y, likelihood, sigma_noise)
        return data + 0.5 * prior_precision * (theta**2).sum()

    theta0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    return f, theta0


def newton_polish(
    model: nn.Module, X: Tensor, y: Tensor, likelihood: str, sigma_noise: float,
    prior_precision: float,
    steps: int = 100, gtol: float = 1e-9,
) -> float:  # fmt: skip
    """Damped Newton steps with the exact Hessian of the Laplace objective.

    Converges quadratically near a minimum, so the MAP ends at a stationary
    point with a positive-definite Hessian (a Levenberg shift is added while the
    Hessian is indefinite). Only for small networks (dense ``P x P`` Hessian).

    Returns
    -------
    float
        Final gradient norm.
    """
    f, theta = _flat_objective(model, X, y, likelihood, sigma_noise, prior_precision)
    grad_f = torch.func.grad(f)
    hess_f = torch.func.hessian(f)
    eye = torch.eye(theta.numel(), dtype=theta.dtype)
    lam, f0 = None, float(f(theta))
    for _ in range(steps):
        g = grad_f(theta)
        if float(g.norm()) < gtol:
            break
        H = hess_f(theta)
        if lam is None:
            lam = 1e-3 * float(H.diagonal().abs().max())
        while True:  # Levenberg-Marquardt: shift until PD and decreasing
            L, info = torch.linalg.cholesky_ex(H + lam * eye)
            if int(info) == 0:
                step = torch.cholesky_solve(-g.unsqueeze(1), L).squeeze(1)
                f1 = float(f(theta + step))
                if f1 <= f0:
                    theta, f0 = theta + step, f1
                    lam /= 5
                    break
            lam = max(4 * lam, 1e-12)
            if lam > 1e12:
                break
    gn = float(grad_f(theta).norm())
    with torch.no_grad():
        torch.nn.utils.vector_to_parameters(theta, model.parameters())
    return gn


def train_stationary(
    model: nn.Module, X: Tensor, y: Tensor, likelihood: str, sigma_noise: float,
    prior_precision: float,
    adam_steps: int = 1000, lbfgs_iter: int = 300, newton_steps: int = 100,
    dense_max: int = 1000,
) -> float:  # fmt: skip
    """Train ``model`` to a stationary point of the Laplace objective.

    Adam warm-up on the mean-scaled objective, full-batch L-BFGS (strong-Wolfe
    line search, ``tolerance_grad=1e-10``) on the summed one, then damped
    Newton polishing with the exact Hessian (:func:`newton_polish`) when the
    network has at most ``dense_max`` parameters (L-BFGS only otherwise).

    Returns
    -------
    float
        Final gradient norm of the Laplace objective.
    """
    n = X.shape[0]
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(adam_steps):
        opt.zero_grad()
        loss = laplace_objective(model, X, y, likelihood, sigma_noise, prior_precision)
        (loss / n).backward()
        opt.step()
    lbfgs = torch.optim.LBFGS(
        model.parameters(),
        lr=1.0,
        max_iter=lbfgs_iter,
        history_size=50,
        tolerance_grad=1e-10,
        tolerance_change=1e-16,
        line_search_fn="strong_wolfe",
    )

    def closure() -> Tensor:
        lbfgs.zero_grad()
        loss = laplace_objective(model, X, y, likelihood, sigma_noise, prior_precision)
        loss.backward()
        return loss

    lbfgs.step(closure)
    for p in model.parameters():
        p.grad = None
    if sum(p.numel() for p in model.parameters()) > dense_max:
        return map_grad_norm(model, X, y, likelihood, sigma_noise, prior_precision)
    return newton_polish(
        model, X, y, likelihood, sigma_noise, prior_precision, steps=newton_steps
    )


def train_realistic(
    model: nn.Module, X: Tensor, y: Tensor, likelihood: str, epochs: int = 1000,
    lr: float = 1e-2, weight_decay: float = 5e-4, batch_size: int = 32, seed: int = 0,
) -> None:  # fmt: skip
    """Adam on the mean loss with weight decay in the optimiser (no Laplace
    objective): the way networks are usually trained."""
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    lossf = nn.MSELoss() if likelihood == "regression" else nn.CrossEntropyLoss()
    g = torch.Generator().manual_seed(seed)
    n = X.shape[0]
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g)
        for i in range(0, n, batch_size):
            idx = perm[i : i + batch_size]
            opt.zero_grad()
            lossf(model(X[idx]), y[idx]).backward()
            opt.step()
    for p in model.parameters():
        p.grad = None


def map_grad_norm(model, X, y, likelihood, sigma, prior) -> float:
    """``||grad L(theta)||`` of the Laplace objective at the model's weights."""
    loss = laplace_objective(model, X, y, likelihood, sigma, prior)
    gn = _grad_norm(model, loss)
    for p in model.parameters():
        p.grad = None
    return gn
