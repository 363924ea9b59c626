"""Offline evaluation tasks: data loaders plus a trained MAP network.

Every task is a function ``build(seed) -> Task`` registered in :data:`TASKS`.
Data are generated in code or shipped inside scikit-learn (nothing is
downloaded). Two training protocols are used and recorded in
:attr:`Task.map_protocol`:

``"stationary"``
    float64 network trained (Adam warm-up, then full-batch L-BFGS with a
    strong-Wolfe line search) to a stationary point of *exactly* the Laplace
    objective laplace-torch encodes, ``L = 1/sigma^2 * sum 0.5 (f - y)^2 +
    0.5 * prior * ||theta||^2`` (regression) or ``sum CE + 0.5 * prior *
    ||theta||^2`` (classification). Exact comparisons (HFL vs exact-Hessian LA)
    need this. The final gradient norm is in :attr:`Task.map_grad_norm`.
``"realistic"``
    Adam on the *mean* loss with weight decay in the optimiser, as users train
    networks; the MAP is not a stationary point of the Laplace objective.
    Robustness is the point there.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from laplace_hfl.bench.evaluation.training import (
    laplace_objective,
    map_grad_norm,
    mlp,
    newton_polish,
    tensor_loader,
    train_realistic,
    train_stationary,
)

__all__ = [
    "Task",
    "TASKS",
    "register_task",
    "laplace_objective",
    "train_stationary",
    "newton_polish",
    "train_realistic",
    "make_inbetween",
    "make_sinusoid",
    "make_moons",
    "make_digits",
    "make_diabetes",
    "make_tiny",
]


@dataclass(kw_only=True)
class Task:
    """A trained MAP model with its data: the one case type of the bench.

    The comparison's tasks (:data:`TASKS`) fill the loaders, the MAP protocol
    and the 1-D regions; the real-network benchmark's cases the shift levels;
    the speed benchmark's cases (:class:`~laplace_hfl.bench.benchmark.cases.Case`)
    add query inputs. Unused fields keep their defaults.

    Attributes
    ----------
    name : str
        Registry name.
    model : torch.nn.Module
        The trained MAP network (never modified by the harness; every method
        gets a deep copy).
    likelihood : {"regression", "classification"}
    sigma_noise : float
        Observation noise used by every method (regression; 1.0 otherwise).
    prior_precision : float
        Prior precision used by every method unless tuned.
    train_loader, val_loader, test_loader : DataLoader or None
        Training data (the data the MAP was fitted on), validation split (for
        prior tuning) and test data.
    map_protocol : {"stationary", "realistic", ""}
        How the MAP was trained (see the module docstring).
    map_grad_norm : float
        ``||grad L(theta_MAP)||`` of the Laplace objective with the task's
        ``sigma_noise`` and ``prior_precision`` (NaN when not measured).
    description : str
        One line for reports.
    ood_loader : DataLoader or None
        Out-of-distribution / shifted inputs (classification) for OOD AUROC.
    gap : tuple of float, tuple of such tuples, or None
        ``(lo, hi)`` interval(s) of the 1-D input without training data
        (``coverage95_gap`` is measured there).
    data_intervals : tuple of ``(lo, hi)`` tuples or None
        Intervals of the 1-D input that hold the training inputs
        (``mean_std_data``, ``coverage95_data`` and ``var_ratio_gap_data`` are
        measured on the test points inside them).
    grid : Tensor or None
        Ordered 1-D test inputs for predictive-band figures (1-D regression).
    train_xy : tuple of Tensor or None
        Training inputs and targets (figures; the speed benchmark's data).
    shifts : dict
        Shift level (angle, ``"id"`` / ``"ood"``) to ``(X, y)`` test data;
        ``X`` a tensor or a dict batch.
    train_s : float
        Seconds the MAP training took.
    """

    name: str
    model: nn.Module
    likelihood: str = "classification"
    sigma_noise: float = 1.0
    prior_precision: float = 1.0
    train_loader: DataLoader | None = None
    val_loader: DataLoader | None = None
    test_loader: DataLoader | None = None
    map_protocol: str = ""
    map_grad_norm: float = float("nan")
    description: str = ""
    ood_loader: DataLoader | None = None
    gap: tuple[float, float] | tuple[tuple[float, float], ...] | None = None
    grid: Tensor | None = None
    train_xy: tuple[Tensor, Tensor] | None = None
    data_intervals: tuple[tuple[float, float], ...] | None = None
    shifts: dict[Any, tuple[Any, Tensor]] = field(default_factory=dict)
    train_s: float = 0.0

    @property
    def gap_intervals(self) -> tuple[tuple[float, float], ...]:
        """:attr:`gap` as a tuple of ``(lo, hi)`` intervals (empty if none)."""
        if self.gap is None:
            return ()
        if isinstance(self.gap[0], (int, float)):
            return (tuple(self.gap),)  # type: ignore[return-value]
        return tuple(tuple(g) for g in self.gap)  # type: ignore[misc]

    @staticmethod
    def _in_intervals(x: Tensor, intervals: tuple[tuple[float, float], ...]) -> Tensor:
        mask = torch.zeros(x.shape[0], dtype=torch.bool)
        for lo, hi in intervals:
            mask |= (x[:, 0] > lo) & (x[:, 0] < hi)
        return mask

    def gap_mask(self, X: Tensor) -> Tensor | None:
        """Boolean mask of the 1-D inputs ``X (N, 1)`` strictly inside the gap
        (``None`` without a gap or for multi-dimensional inputs)."""
        if not self.gap_intervals or X.shape[-1] != 1:
            return None
        return self._in_intervals(X, self.gap_intervals)

    def data_mask(self, X: Tensor) -> Tensor | None:
        """Boolean mask of the 1-D inputs ``X (N, 1)`` inside
        :attr:`data_intervals` (closed intervals; ``None`` if not set)."""
        if not self.data_intervals or X.shape[-1] != 1:
            return None
        mask = torch.zeros(X.shape[0], dtype=torch.bool)
        for lo, hi in self.data_intervals:
            mask |= (X[:, 0] >= lo) & (X[:, 0] <= hi)
        return mask

    @property
    def n_params(self) -> int:
        """Number of trainable parameters of the MAP network."""
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)


TASKS: dict[str, Callable[[int], Task]] = {}


def register_task(
    name: str,
) -> Callable[[Callable[[int], Task]], Callable[[int], Task]]:
    """Decorator adding ``build(seed) -> Task`` to :data:`TASKS` under ``name``.

    Parameters
    ----------
    name : str
        Registry key, used by ``laplace-hfl compare --task NAME``.
    """

    def deco(fn: Callable[[int], Task]) -> Callable[[int], Task]:
        TASKS[name] = fn
        return fn

    return deco


# ----------------------------------------------------------------------- tasks
def _inbetween_data(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    x = np.concatenate([rng.uniform(-1, -0.7, n // 2), rng.uniform(0.5, 1, n - n // 2)])
    y = np.cos(4 * x + 0.8) + 0.1 * rng.standard_normal(x.shape)
    return x, y


def _inbetween_task(name: str, description: str, model: nn.Module,
                    train: tuple[Tensor, Tensor], val: tuple[Tensor, Tensor],
                    test: tuple[Tensor, Tensor], sigma: float, prior: float,
                    gn: float) -> Task:  # fmt: skip
    """A 1-D in-between regression task (stationary MAP; gap (-0.7, 0.5))."""
    return Task(
        name=name,
        likelihood="regression",
        model=model,
        train_loader=tensor_loader(*train),
        val_loader=tensor_loader(*val),
        test_loader=tensor_loader(*test),
        sigma_noise=sigma,
        prior_precision=prior,
        map_protocol="stationary",
        map_grad_norm=gn,
        description=description,
        gap=(-0.7, 0.5),
        data_intervals=((-1.0, -0.7), (0.5, 1.0)),
        grid=test[0],
        train_xy=train,
    )


@register_task("inbetween")
def make_inbetween(seed: int = 0) -> Task:
    """Foong et al. (2019) in-between regression, exact-comparison protocol.

    100 points, 50 from U[-1, -0.7] and 50 from U[0.5, 1];
    ``y = cos(4x + 0.8) + N(0, 0.1^2)``. MLP 1-50-1 tanh in float64 trained
    to a stationary point of the Laplace objective with ``sigma_noise=0.1``
    (the true noise) and ``prior_precision=1``. Test: 200 points on a grid
    over [-2, 2] with fresh noisy targets; the gap is (-0.7, 0.5).
    """
    dt = torch.float64
    rng = np.random.default_rng(seed)
    x, y = _inbetween_data(100, rng)
    xv, yv = _inbetween_data(50, rng)
    xt = np.linspace(-2, 2, 200)
    yt = np.cos(4 * xt + 0.8) + 0.1 * rng.standard_normal(xt.shape)
    t = lambda a: torch.as_tensor(a, dtype=dt).reshape(-1, 1)  # noqa: E731
    X, Y, Xv, Yv, Xt, Yt = t(x), t(y), t(xv), t(yv), t(xt), t(yt)
    torch.manual_seed(seed)
    model = mlp([1, 50, 1]).to(dt)
    sigma, prior = 0.1, 1.0
    gn = train_stationary(model, X, Y, "regression", sigma, prior)
    return _inbetween_task(
        "inbetween", "Foong in-between 1-D regression, MLP 1-50-1 tanh, float64",
        model, (X, Y), (Xv, Yv), (Xt, Yt), sigma, prior, gn,
    )  # fmt: skip


@register_task("sinusoid")
def make_sinusoid(seed: int = 0) -> Task:
    """laplace-torch's sinusoid example, realistic protocol.

    x ~ U[0, 8], n = 150, ``y = sin x + N(0, 0.3^2)``; MLP 1-50-1 tanh
    (float32) trained with Adam on the mean MSE with weight decay 5e-4.
    ``sigma_noise=0.3`` (the true noise), ``prior_precision=1``. Test grid
    linspace(-5, 13, 500) with fresh noisy targets; the "gap" is the
    extrapolation region outside [0, 8]. Its MAP is not a
    stationary point of the Laplace objective: ``target="hessian"`` is
    expected to fail there.
    """
    rng = np.random.default_rng(seed)

    def data(n):
        x = rng.uniform(0, 8, n)
        return x, np.sin(x) + 0.3 * rng.standard_normal(n)

    x, y = data(150)
    xv, yv = data(50)
    xt = np.linspace(-5, 13, 500)
    yt = np.sin(xt) + 0.3 * rng.standard_normal(xt.shape)
    t = lambda a: torch.as_tensor(a, dtype=torch.float32).reshape(-1, 1)  # noqa: E731
    X, Y, Xv, Yv, Xt, Yt = t(x), t(y), t(xv), t(yv), t(xt), t(yt)
    torch.manual_seed(seed)
    model = mlp([1, 50, 1])
    train_realistic(model, X, Y, "regression", epochs=1000, seed=seed)
    sigma, prior = 0.3, 1.0
    return Task(
        name="sinusoid",
        likelihood="regression",
        model=model,
        train_loader=tensor_loader(X, Y, 32),
        val_loader=tensor_loader(Xv, Yv),
        test_loader=tensor_loader(Xt, Yt),
        sigma_noise=sigma,
        prior_precision=prior,
        map_protocol="realistic",
        map_grad_norm=map_grad_norm(model, X, Y, "regression", sigma, prior),
        description="laplace-torch sinusoid, MLP 1-50-1 tanh, Adam mean MSE + wd",
        gap=((-5.0, 0.0), (8.0, 13.0)),
        data_intervals=((0.0, 8.0),),
        grid=Xt,
        train_xy=(X, Y),
    )


@register_task("moons")
def make_moons(seed: int = 0) -> Task:
    """Two-moons classification, exact-comparison protocol.

    ``make_moons(noise=0.2)``: 200 train / 100 val / 150 test points; MLP
    2-20-20-2 tanh in float64 trained to a stationary point of the Laplace
    objective with ``prior_precision=1``. OOD set: 100 points just off the
    data, 0.5 to 1.0 from the nearest training input (uniform on the data's
    bounding box enlarged by 1). Far from the data (the earlier set, distance
    > 3 from the mean) tanh units saturate and every method, the MAP included,
    is *more* confident there than on test points near the class boundary,
    so no score separates the methods; just off the data the epistemic
    variance (``ood_auroc_var``) ranks them: full / HFL > KFAC > diagonal >
    last layer > MAP (0.5).
    """
    from sklearn.datasets import make_moons as sk_moons

    dt = torch.float64
    Xa, ya = sk_moons(n_samples=450, noise=0.2, random_state=seed)
    X = torch.as_tensor(Xa, dtype=dt)
    y = torch.as_tensor(ya, dtype=torch.long)
    rng = np.random.default_rng(seed)
    ood: list[np.ndarray] = []
    train = Xa[:200]
    lo, hi = train.min(0) - 1.0, train.max(0) + 1.0
    while len(ood) < 100:
        p = rng.uniform(lo, hi)
        if 0.5 < np.linalg.norm(train - p, axis=1).min() < 1.0:
            ood.append(p)
    Xo = torch.as_tensor(np.array(ood), dtype=dt)
    torch.manual_seed(seed)
    model = mlp([2, 20, 20, 2]).to(dt)
    prior = 1.0
    gn = train_stationary(model, X[:200], y[:200], "classification", 1.0, prior)
    return Task(
        name="moons",
        likelihood="classification",
        model=model,
        train_loader=tensor_loader(X[:200], y[:200]),
        val_loader=tensor_loader(X[200:300], y[200:300]),
        test_loader=tensor_loader(X[300:], y[300:]),
        sigma_noise=1.0,
        prior_precision=prior,
        map_protocol="stationary",
        map_grad_norm=gn,
        description="two moons (noise 0.2), MLP 2-20-20-2 tanh, float64",
        ood_loader=tensor_loader(Xo, torch.zeros(len(Xo), dtype=torch.long)),
        train_xy=(X[:200], y[:200]),
    )


@register_task("digits")
def make_digits(seed: int = 0) -> Task:
    """scikit-learn digits with a shifted / OOD test set, exact protocol.

    8x8 digits scaled to [0, 1]; 60/15% train/val split, 200 test images
    from the rest; MLP 64-32-10 tanh (2410 params) in float64 trained with
    Adam then 2000 L-BFGS iterations on the Laplace objective
    (``prior_precision=1``; too large for the dense Newton polish, so the
    gradient norm is small but not ~1e-10: see ``map_grad_norm``). OOD: 100
    test images inverted (``1 - x``) with Gaussian pixel noise (std 0.3).
    """
    from sklearn.datasets import load_digits

    dt = torch.float64
    Xa, ya = load_digits(return_X_y=True)
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(Xa))
    Xa, ya = Xa[perm] / 16.0, ya[perm]
    n = len(Xa)
    a, b = int(0.6 * n), int(0.75 * n)
    X = torch.as_tensor(Xa, dtype=dt)
    y = torch.as_tensor(ya, dtype=torch.long)
    Xt, yt = X[b : b + 200], y[b : b + 200]
    noise = torch.as_tensor(rng.standard_normal(Xt[:100].shape) * 0.3, dtype=dt)
    Xo = (1.0 - Xt[:100] + noise).clamp(0, 1)
    torch.manual_seed(seed)
    model = mlp([64, 32, 10]).to(dt)
    prior = 1.0
    gn = train_stationary(
        model, X[:a], y[:a], "classification", 1.0, prior, lbfgs_iter=2000
    )
    return Task(
        name="digits",
        likelihood="classification",
        model=model,
        train_loader=tensor_loader(X[:a], y[:a]),
        val_loader=tensor_loader(X[a:b], y[a:b]),
        test_loader=tensor_loader(Xt, yt),
        sigma_noise=1.0,
        prior_precision=prior,
        map_protocol="stationary",
        map_grad_norm=gn,
        description="sklearn digits 8x8, MLP 64-32-10 tanh, float64; OOD inverted+noise",
        ood_loader=tensor_loader(Xo, yt[:100]),
    )


@register_task("diabetes")
def make_diabetes(seed: int = 0) -> Task:
    """scikit-learn diabetes regression, realistic protocol.

    442 x 10, standardised inputs and targets, random 60/15/25% split; MLP
    10-50-1 tanh (float32) trained with Adam (lr 1e-3, batch 32) on the mean
    MSE with weight decay 1e-3 for 50 epochs (test RMSE about 0.70). ``sigma_noise=0.7`` (about the residual std of a
    linear fit on standardised targets), ``prior_precision=1``.
    """
    from sklearn.datasets import load_diabetes

    Xa, ya = load_diabetes(return_X_y=True)
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(Xa))
    Xa, ya = Xa[perm], ya[perm]
    n = len(Xa)
    a, b = int(0.6 * n), int(0.75 * n)
    mu, sd = Xa[:a].mean(0), Xa[:a].std(0)
    ymu, ysd = ya[:a].mean(), ya[:a].std()
    X = torch.as_tensor((Xa - mu) / sd, dtype=torch.float32)
    y = torch.as_tensor((ya - ymu) / ysd, dtype=torch.float32).reshape(-1, 1)
    torch.manual_seed(seed)
    model = mlp([10, 50, 1])
    train_realistic(
        model, X[:a], y[:a], "regression", epochs=50, lr=1e-3, weight_decay=1e-3,
        seed=seed,
    )  # fmt: skip
    sigma, prior = 0.7, 1.0
    return Task(
        name="diabetes",
        likelihood="regression",
        model=model,
        train_loader=tensor_loader(X[:a], y[:a], 64),
        val_loader=tensor_loader(X[a:b], y[a:b]),
        test_loader=tensor_loader(X[b:], y[b:]),
        sigma_noise=sigma,
        prior_precision=prior,
        map_protocol="realistic",
        map_grad_norm=map_grad_norm(model, X[:a], y[:a], "regression", sigma, prior),
        description="sklearn diabetes (standardised), MLP 10-50-1 tanh, Adam + wd",
    )


@register_task("tiny")
def make_tiny(seed: int = 0) -> Task:
    """A seconds-fast regression task for smoke tests.

    40 points of the in-between data, MLP 1-8-1 tanh in float64 trained to a
    stationary point (``sigma_noise=0.1``, ``prior_precision=1``); 20 test
    points on [-2, 2].
    """
    dt = torch.float64
    rng = np.random.default_rng(seed)
    x, y = _inbetween_data(40, rng)
    xt = np.linspace(-2, 2, 20)
    yt = np.cos(4 * xt + 0.8) + 0.1 * rng.standard_normal(xt.shape)
    t = lambda a: torch.as_tensor(a, dtype=dt).reshape(-1, 1)  # noqa: E731
    X, Y, Xt, Yt = t(x), t(y), t(xt), t(yt)
    torch.manual_seed(seed)
    model = mlp([1, 8, 1]).to(dt)
    gn = train_stationary(
        model, X, Y, "regression", 0.1, 1.0, adam_steps=300, lbfgs_iter=100
    )
    return _inbetween_task(
        "tiny", "tiny in-between regression, MLP 1-8-1 tanh (smoke tests)",
        model, (X, Y), (Xt[::2], Yt[::2]), (Xt, Yt), 0.1, 1.0, gn,
    )  # fmt: skip
