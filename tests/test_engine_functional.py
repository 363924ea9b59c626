"""Unit tests of ``laplace_hfl.engine.functional``: the Laplace objective, its
gradient, and the GGN- and Hessian-vector products on flat parameter vectors,
against dense ``torch.func`` computations on the model itself (float64), and the
user's model untouched by them.
"""

from __future__ import annotations

import pytest
import torch
from conftest import (
    DT,
    PRIOR,
    SIGMA,
    assert_unchanged,
    engine_objective,
    laplace_objective,
    snapshot,
)
from torch.func import functional_call, hessian, jacrev

from laplace_hfl.engine.functional import (
    batch_loss,
    data_only_objective,
    ggn_matvec,
    hessian_matvec,
    objective_grad,
    objective_value,
    output_jacobians,
)

CASES = [("regression_multi", "regression"), ("classification", "classification")]


def _dense(model, X, y, likelihood):
    """``L(theta)`` by ``functional_call`` on the model, and the flat MAP."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    sizes = [p.numel() for p in model.parameters()]
    theta = torch.cat([p.detach().flatten() for p in model.parameters()])

    def f(th, inp):
        ps = {n: c.reshape(s) for n, c, s in zip(names, torch.split(th, sizes), shapes)}
        return functional_call(model, ps, (inp,))

    def L(th):
        return laplace_objective(lambda inp: f(th, inp), X, y, likelihood, params=[th])

    return f, L, theta


def _directions(P, m=3):
    return torch.randn(m, P, generator=torch.Generator().manual_seed(0), dtype=DT)


@pytest.mark.parametrize("name, likelihood", CASES)
def test_value_and_gradient_match_autograd(request, name, likelihood):
    """At the MAP and at two points away from it, 1e-12 relative."""
    model, X, y = request.getfixturevalue(name)
    snap = snapshot(model)
    obj = engine_objective(model, X, y, likelihood)
    _, L, theta = _dense(model, X, y, likelihood)
    thetas = theta + 0.1 * torch.cat(
        [torch.zeros(1, theta.numel(), dtype=DT), _directions(theta.numel(), 2)]
    )
    for th in thetas:
        assert float(objective_value(obj, th)) == pytest.approx(float(L(th)), rel=1e-12)
    grads = torch.stack([torch.func.grad(L)(th) for th in thetas])
    torch.testing.assert_close(
        objective_grad(obj, thetas), grads, rtol=1e-10, atol=1e-12
    )
    assert_unchanged(model, snap)


@pytest.mark.parametrize("name, likelihood", CASES)
def test_ggn_products_match_the_dense_ggn(request, name, likelihood):
    """``(J^T H_f J + p I) v`` with ``J`` and the loss Hessian in the outputs
    ``H_f`` formed densely, 1e-10; without the prior and ``h_factor``
    (``data_only_objective``) the bare data GGN."""
    model, X, y = request.getfixturevalue(name)
    obj = engine_objective(model, X, y, likelihood)
    f, _, theta = _dense(model, X, y, likelihood)
    J = jacrev(f)(theta, X).reshape(-1, theta.numel())  # (N C, P)
    out = f(theta, X)
    H_f = hessian(lambda o: batch_loss(likelihood, o, y))(out)
    H_f = H_f.reshape(out.numel(), out.numel())
    h = 1 / SIGMA**2 if likelihood == "regression" else 1.0
    G = J.T @ H_f @ J
    V = _directions(theta.numel())
    expected = V @ (h * G + PRIOR * torch.eye(theta.numel(), dtype=DT))
    torch.testing.assert_close(ggn_matvec(obj, V), expected, rtol=1e-10, atol=1e-12)
    bare = ggn_matvec(data_only_objective(obj), V)
    torch.testing.assert_close(bare, V @ G, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name, likelihood", CASES)
def test_hessian_products_match_the_dense_hessian(request, name, likelihood):
    """Row ``j`` is ``H(theta_j) v_j``, each at its own point, 1e-10."""
    model, X, y = request.getfixturevalue(name)
    obj = engine_objective(model, X, y, likelihood)
    _, L, theta = _dense(model, X, y, likelihood)
    V = _directions(theta.numel())
    thetas = theta + 0.05 * _directions(theta.numel()).flip(0)
    got = hessian_matvec(obj, thetas, V)
    for th, v, row in zip(thetas, V, got):
        torch.testing.assert_close(row, hessian(L)(th) @ v, rtol=1e-10, atol=1e-12)


def test_output_jacobians_match_jacrev(classification):
    model, X, _ = classification
    obj = engine_objective(model, X, X, "classification")
    f, _, theta = _dense(model, X, X, "classification")
    J, out = output_jacobians(obj.forward, theta, X[:5])
    torch.testing.assert_close(J, jacrev(f)(theta, X[:5]), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(out, model(X[:5]), rtol=1e-12, atol=1e-14)
