"""Models and data of the benchmark: small, deterministic, CPU-friendly."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from laplace_hfl.bench.evaluation.tasks import Task
from laplace_hfl.bench.evaluation.training import tensor_loader

__all__ = [
    "Case",
    "in_between",
    "digits",
    "wide_mlp",
    "mlp_for_params",
    "batchnorm_digits",
    "train_adam",
    "SIGMA",
    "PRIOR",
]

#: Fixed hyperparameters shared by every method (no method tunes them).
SIGMA = 0.1
PRIOR = 1.0


@dataclass(kw_only=True)
class Case(Task):
    """A task of the speed and accuracy benchmark: training tensors and query inputs.

    A :class:`~laplace_hfl.bench.evaluation.tasks.Task` whose training data are
    the tensors :attr:`train_xy` (one batch unless ``train_loader`` is set) and
    whose predictions are asked at :attr:`Xq`.

    Attributes
    ----------
    Xq : Tensor
        Query inputs.
    """

    Xq: Tensor

    @property
    def X(self) -> Tensor:
        """Training inputs (``train_xy[0]``)."""
        return self.train_xy[0]

    @property
    def y(self) -> Tensor:
        """Training targets (``train_xy[1]``)."""
        return self.train_xy[1]

    def loader(self, batch_size: int | None = None) -> DataLoader:
        """:attr:`train_loader`, or ``train_xy`` in batches of ``batch_size``
        (default: one batch)."""
        if self.train_loader is not None and batch_size is None:
            return self.train_loader
        return tensor_loader(*self.train_xy, batch_size)


def _case(name: str, model: nn.Module, likelihood: str, X: Tensor, y: Tensor,
          Xq: Tensor) -> Case:  # fmt: skip
    """A :class:`Case` with the shared hyperparameters (``SIGMA`` for regression)."""
    sigma = SIGMA if likelihood == "regression" else 1.0
    return Case(name=name, model=model, likelihood=likelihood, sigma_noise=sigma,
                prior_precision=PRIOR, train_xy=(X, y), Xq=Xq)  # fmt: skip


def train_adam(
    model: nn.Module, X: Tensor, y: Tensor, likelihood: str, steps: int,
    lr: float = 1e-2, wd: float = 0.0,
) -> nn.Module:  # fmt: skip
    """Full-batch Adam on the mean loss (squared error or cross-entropy),
    ``.grad`` cleared and the model left in eval mode."""
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=wd)
    for _ in range(steps):
        opt.zero_grad()
        f = model(X)
        if likelihood == "regression":
            loss = (f - y).square().mean()
        else:
            loss = nn.functional.cross_entropy(f, y)
        loss.backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    model.eval()
    return model


def in_between(n_query: int = 128, steps: int = 2000, seed: int = 0) -> Case:
    """Foong et al. (2019) style 1-D data with a gap; a 1-50-1 tanh MLP."""
    g = torch.Generator().manual_seed(seed)
    X = torch.cat(
        [
            torch.rand(50, 1, generator=g) * 0.5 - 1.0,
            torch.rand(50, 1, generator=g) * 0.5 + 0.5,
        ]
    )
    y = torch.sin(3 * X) + 0.1 * torch.randn(X.shape, generator=g)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(1, 50), nn.Tanh(), nn.Linear(50, 1))
    train_adam(model, X, y, "regression", steps)
    Xq = torch.linspace(-2, 2, n_query)[:, None]
    return _case("in_between_1-50-1", model, "regression", X, y, Xq)


def _digits_data(seed: int = 0):
    from sklearn.datasets import load_digits

    d = load_digits()
    X = torch.tensor(d.data, dtype=torch.float32) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(X), generator=torch.Generator().manual_seed(seed))
    X, y = X[perm], y[perm]
    return X[:1000], y[:1000], X[1000:]


def digits(n_query: int | None = None, steps: int = 300, seed: int = 0) -> Case:
    """sklearn digits (8x8), 1000 training images, a 64-32-10 tanh MLP."""
    X, y, Xq = _digits_data(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))
    train_adam(model, X, y, "classification", steps, wd=1e-4)
    if n_query is not None:
        Xq = Xq[:n_query]
    return _case("digits_64-32-10", model, "classification", X, y, Xq)


def batchnorm_digits(n_query: int = 64, steps: int = 300, seed: int = 0) -> Case:
    """A digits MLP with BatchNorm1d: KFAC backends refuse it."""
    X, y, Xq = _digits_data(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(64, 32), nn.BatchNorm1d(32), nn.Tanh(), nn.Linear(32, 10)
    )
    train_adam(model, X, y, "classification", steps, wd=1e-4)
    return _case(
        "digits_batchnorm_64-32-BN-10", model, "classification", X, y, Xq[:n_query]
    )


def wide_mlp(
    width: int = 300, n: int = 1000, d_in: int = 10, n_query: int = 128,
    steps: int = 300, seed: int = 0,
) -> Case:  # fmt: skip
    """A 10-w-w-1 tanh regression MLP (w=300: ~94k parameters)."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d_in, generator=g)
    y = torch.sin(X.sum(1, keepdim=True)) + 0.1 * torch.randn(n, 1, generator=g)
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(d_in, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(),
        nn.Linear(width, 1),
    )  # fmt: skip
    train_adam(model, X, y, "regression", steps, lr=1e-3)
    Xq = torch.randn(n_query, d_in, generator=g)
    return _case(f"mlp_{d_in}-{width}-{width}-1", model, "regression", X, y, Xq)


def mlp_for_params(n_params: int, d_in: int = 10) -> int:
    """Width ``w`` of a ``d_in-w-w-1`` MLP with about ``n_params`` parameters."""
    # P = w^2 + (d_in + 3) w + 1
    b = d_in + 3
    return max(2, int(round((-b + (b * b + 4 * (n_params - 1)) ** 0.5) / 2)))
