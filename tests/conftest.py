"""Shared fixtures: tiny float64 networks trained to a stationary point of the
exact Laplace objective laplace-torch encodes, and dense torch.func references."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call, hessian, jacrev
from torch.utils.data import DataLoader, TensorDataset

import laplace_hfl  # noqa: F401  (registers hessian_structure="hfl")
from laplace_hfl.engine.functional import LaplaceObjective, ParamLayout, make_forward
from laplace_hfl.errors import HFLNotFittedError

DT = torch.float64
SIGMA = 0.3
PRIOR = 0.5


def laplace_objective(model, X, y, likelihood, sigma=SIGMA, prior=PRIOR, params=None):
    """Summed-loss Laplace objective, as laplace-torch defines it."""
    params = list(model.parameters()) if params is None else params
    f = model(X)
    if likelihood == "regression":
        data = 0.5 * (f - y).square().sum() / sigma**2
    else:
        data = nn.functional.cross_entropy(f, y, reduction="sum")
    reg = 0.5 * prior * sum(p.square().sum() for p in params)
    return data + reg


def train_stationary(model, X, y, likelihood, sigma=SIGMA, prior=PRIOR):
    """L-BFGS, then dense Newton polish, to a stationary point of the Laplace
    objective (gradient norm ~1e-12 on these tiny float64 networks)."""
    params = list(model.parameters())
    opt = torch.optim.LBFGS(
        params, lr=1, max_iter=500, tolerance_grad=1e-10, tolerance_change=0,
        history_size=50, line_search_fn="strong_wolfe",
    )  # fmt: skip

    def closure():
        opt.zero_grad()
        loss = laplace_objective(model, X, y, likelihood, sigma, prior)
        loss.backward()
        return loss

    opt.step(closure)
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in params]
    sizes = [p.numel() for p in params]

    def L(theta):
        ps = {
            n: c.reshape(s) for n, c, s in zip(names, torch.split(theta, sizes), shapes)
        }
        return laplace_objective(
            lambda inp: functional_call(model, ps, (inp,)), X, y, likelihood,
            sigma, prior, params=[theta],
        )  # fmt: skip

    theta = torch.cat([p.detach().flatten() for p in params])
    for _ in range(5):
        g = torch.func.grad(L)(theta)
        theta = theta - torch.linalg.solve(hessian(L)(theta), g)
    with torch.no_grad():
        for p, c in zip(params, torch.split(theta, sizes)):
            p.copy_(c.reshape(p.shape))
    opt.zero_grad(set_to_none=True)
    return model


def saddle_regression():
    """A 1-16-1 tanh regression net trained by Adam on the mean squared error
    without weight decay: at a tiny prior its MAP is a saddle of the Laplace
    objective (indefinite Hessian + prior). Returns ``(model, X, y)``."""
    torch.manual_seed(0)
    X = torch.linspace(-2, 2, 30, dtype=DT)[:, None]
    y = torch.sin(3 * X)
    model = nn.Sequential(nn.Linear(1, 16), nn.Tanh(), nn.Linear(16, 1)).to(DT)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(200):
        opt.zero_grad()
        nn.functional.mse_loss(model(X), y).backward()
        opt.step()
    for p in model.parameters():
        p.grad = None
    return model, X, y


def make_regression(n=40, d_in=1, d_out=1, hidden=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.rand(n, d_in, generator=g, dtype=DT) * 4 - 2
    W = torch.randn(d_in, d_out, generator=g, dtype=DT)
    y = torch.sin(2 * X @ W) + 0.1 * torch.randn(n, d_out, generator=g, dtype=DT)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, d_out))
    return model.to(DT), X, y


def make_classification(n=60, d_in=2, n_classes=3, hidden=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = 2 * torch.randn(n_classes, d_in, generator=g, dtype=DT)
    y = torch.arange(n) % n_classes
    X = centers[y] + torch.randn(n, d_in, generator=g, dtype=DT)
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, n_classes)
    )
    return model.to(DT), X, y


def loader(X, y, batch_size=16):
    return DataLoader(TensorDataset(X, y), batch_size=batch_size)


def fit_hfl(model, X, y, likelihood, subset="all", **kw):
    """An HFL Laplace at the fixtures' prior (and ``SIGMA`` for regression),
    fitted on ``(X, y)``."""
    from laplace import Laplace

    sigma = SIGMA if likelihood == "regression" else 1.0
    la = Laplace(
        model, likelihood, subset, "hfl", sigma_noise=sigma,
        prior_precision=PRIOR, **kw,
    )  # fmt: skip
    la.fit(loader(X, y))
    return la


def is_fitted(la) -> bool:
    """Whether an HFL estimator is fitted, by its public behaviour: before a
    (successful) ``fit``, ``la.objective()`` raises ``HFLNotFittedError``."""
    try:
        la.objective()
    except HFLNotFittedError:
        return False
    return True


def reference_glm_predictive(la, X, joint=False, diagonal_output=False):
    """``(f_mu, f_var)`` of a laplace-torch reference (``FullLaplace``,
    ``KronLaplace``, ...) at ``X``, before any link function.

    The single place the tests call laplace-torch's private
    ``_glm_predictive_distribution``: its classes have no public way to the
    GLM covariance for classification. The HFL estimators have the public
    ``la.glm_predictive(X, joint, diagonal_output)`` (same return).
    """
    return la._glm_predictive_distribution(X, joint, diagonal_output)


def dense_reference(model, X, y, Xq, likelihood, kind, last_layer=False):
    """Independent torch.func computation of J P^{-1} J^T, ``(B, C, C)`` and joint.

    ``kind`` is ``"hessian"`` (exact Hessian of L) or ``"ggn"`` (GGN + prior).
    """
    names = [n for n, _ in model.named_parameters()]
    if last_layer:
        last = names[-2:]
        names = last
    base = {n: p.detach() for n, p in model.named_parameters()}
    shapes = [base[n].shape for n in names]
    sizes = [base[n].numel() for n in names]
    theta = torch.cat([base[n].flatten() for n in names])

    def f(th, inp):
        params = dict(base)
        for n, c, s in zip(names, torch.split(th, sizes), shapes):
            params[n] = c.reshape(s)
        return functional_call(model, params, (inp,))

    def L(th):
        out = f(th, X)
        if likelihood == "regression":
            data = 0.5 * (out - y).square().sum() / SIGMA**2
        else:
            data = nn.functional.cross_entropy(out, y, reduction="sum")
        return data + 0.5 * PRIOR * th.square().sum()

    if kind == "hessian":
        P = hessian(L)(theta)
    else:
        J = jacrev(f)(theta, X)  # (N, C, P)
        out = f(theta, X)
        if likelihood == "regression":
            Lam = torch.eye(out.shape[1], dtype=DT).expand(len(X), -1, -1) / SIGMA**2
        else:
            p = torch.softmax(out, -1)
            Lam = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
        P = torch.einsum("ncp,ncd,ndq->pq", J, Lam, J) + PRIOR * torch.eye(len(theta))
    Jq = jacrev(f)(theta, Xq)  # (B, C, P)
    Sigma = torch.linalg.inv(P)
    marg = torch.einsum("bcp,pq,bdq->bcd", Jq, Sigma, Jq)
    Jflat = Jq.reshape(-1, Jq.shape[-1])
    return marg, Jflat @ Sigma @ Jflat.T


def param_layout(model):
    """The ``ParamLayout`` of all of ``model``'s parameters: what all-weights
    HFL refits on a model whose parameters all require gradients."""
    named = list(model.named_parameters())
    return ParamLayout(tuple(n for n, _ in named), tuple(p.shape for _, p in named))


def engine_objective(model, X, y, likelihood, sigma=SIGMA, prior=PRIOR):
    """The engine's ``LaplaceObjective`` of ``model`` at its weights (all
    parameters, batches of 16, the objective of ``laplace_objective``), built
    without an estimator: for unit tests of ``laplace_hfl.engine``."""
    layout = param_layout(model)
    theta = torch.cat([p.detach().flatten() for p in model.parameters()])
    batches = [(X[i : i + 16], y[i : i + 16]) for i in range(0, len(X), 16)]
    return LaplaceObjective(
        forward=make_forward(model, layout, {}),
        batches=lambda: batches,
        likelihood=likelihood,
        h_factor=1 / sigma**2 if likelihood == "regression" else 1.0,
        prior_precision=torch.full_like(theta, prior),
        prior_mean=torch.zeros((), dtype=DT),
        theta_map=theta,
    )


def rel_err(est, ref):
    return ((est - ref).abs() / ref.abs()).flatten()


def suite_networks(names: tuple[str, ...] | None = None) -> dict:
    """The test suite's networks trained to a stationary MAP (for scripts):
    ``name -> (model, X, y, likelihood)``, all of them or ``names``."""
    nets = {
        "regression 1-10-1": (make_regression, {}, "regression"),
        "regression 2-8-3": (
            make_regression,
            dict(n=40, d_in=2, d_out=3, hidden=8, seed=1),
            "regression",
        ),
        "classification 2-8-3": (make_classification, {}, "classification"),
    }
    out = {}
    for name in names or tuple(nets):
        make, kw, lik = nets[name]
        model, X, y = make(**kw)
        out[name] = (train_stationary(model, X, y, lik), X, y, lik)
    return out


@pytest.fixture(scope="session")
def _trained():
    """Train each tiny network once per session; tests get deep copies."""
    out = {}
    model, X, y = make_regression()
    out["regression_1d"] = (train_stationary(model, X, y, "regression"), X, y)
    model, X, y = make_regression(n=40, d_in=2, d_out=3, hidden=8, seed=1)
    out["regression_multi"] = (train_stationary(model, X, y, "regression"), X, y)
    model, X, y = make_classification()
    out["classification"] = (train_stationary(model, X, y, "classification"), X, y)
    return out


def _copy(entry):
    model, X, y = entry
    return copy.deepcopy(model), X, y


@pytest.fixture
def regression_1d(_trained):
    return _copy(_trained["regression_1d"])


@pytest.fixture
def regression_multi(_trained):
    return _copy(_trained["regression_multi"])


@pytest.fixture
def classification(_trained):
    return _copy(_trained["classification"])


def snapshot(model):
    """Everything about a model that HFL must leave untouched."""
    return {
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "buffers": {n: b.clone() for n, b in model.named_buffers()},
        "grads": {
            n: None if p.grad is None else p.grad.clone()
            for n, p in model.named_parameters()
        },
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "training": [m.training for m in model.modules()],
        "state": copy.deepcopy(model.state_dict()),
        "objects": [id(t) for t in model.parameters()]
        + [id(b) for b in model.buffers()],
        "hooks": [
            (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
            for m in model.modules()
        ],
    }


def assert_unchanged(model, snap):
    now = snapshot(model)
    for key in ("params", "buffers"):
        for n, t in snap[key].items():
            assert torch.equal(now[key][n], t), f"{key} {n} changed"
            assert now[key][n].dtype == t.dtype
    for n, g in snap["grads"].items():
        if g is None:
            assert now["grads"][n] is None, f"grad of {n} was created"
        else:
            assert torch.equal(now["grads"][n], g), f"grad of {n} changed"
    assert now["requires_grad"] == snap["requires_grad"]
    assert now["training"] == snap["training"]
    # The very same Parameter/buffer objects, still leaves, same hooks.
    assert now["objects"] == snap["objects"], "a parameter or buffer was replaced"
    assert all(p.is_leaf for p in model.parameters()), "a parameter is not a leaf"
    assert now["hooks"] == snap["hooks"], "hooks were added or removed"
