"""Reuse of earlier solves: the Galerkin start from kept solutions, brackets
from a nonzero start, and predictions chunk after chunk through the shell."""

from __future__ import annotations

import pytest
import torch
from conftest import DT, dense_reference, fit_hfl

from laplace_hfl.engine.krylov_reuse import (
    RECYCLE_VECTORS,
    RecycledSpace,
    projected_solve,
    recycle_capacity,
)
from laplace_hfl.engine.solver_objects import CGRefits
from laplace_hfl.engine.solvers import batched_cg


def _system(n=50, cond=1e4, seed=0):
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=DT))
    A = Q * torch.logspace(0, 4 * (cond > 1), n, dtype=DT) @ Q.T
    W = torch.randn(n, n, generator=g, dtype=DT)
    Minv = torch.linalg.inv(A + W @ W.T)
    L = torch.linalg.cholesky(Minv)
    floor = float(torch.linalg.eigvalsh(L.T @ A @ L).min())
    return A, Minv, floor, g


def test_brackets_from_a_nonzero_start_contain_truth():
    """CG from any x0 with its exact residual: every iterate's bracket holds
    b^T A^-1 b (condition 1e4, preconditioned), and it closes on the truth."""
    A, Minv, floor, g = _system()
    m = 30
    B = torch.randn(m, 50, generator=g, dtype=DT)
    truth = (B * torch.linalg.solve(A, B.T).T).sum(1)
    X0 = torch.randn(m, 50, generator=g, dtype=DT)  # arbitrary, not Galerkin
    start = (X0, B - X0 @ A)
    for k in (0, 1, 3, 10, 60):
        res = batched_cg(
            lambda idx, V: V @ A, B, torch.zeros(m, dtype=DT), k,
            precond=lambda R: R @ Minv, spectrum_floor=floor, start=start,
        )  # fmt: skip
        assert (res.lower <= truth * (1 + 1e-10)).all(), k
        assert (res.upper >= truth * (1 - 1e-10)).all(), k
    assert ((res.upper - res.lower) <= 1e-8 * truth).all()
    assert torch.allclose(res.x, torch.linalg.solve(A, B.T).T, rtol=1e-6, atol=1e-8)


def test_galerkin_start_is_the_best_answer_in_the_kept_span():
    """The start is the A-orthogonal projection of A^-1 b onto span(W); an
    answer inside the span comes back exact, with a closed bracket and no
    iteration."""
    A, Minv, floor, g = _system(n=40)
    W = torch.randn(12, 40, generator=g, dtype=DT)
    space = RecycledSpace(capacity=100)
    space.add(W, W @ A)
    B = torch.randn(5, 40, generator=g, dtype=DT)
    X0, R0 = space.start(B)
    exact = torch.linalg.solve(A, B.T).T
    # Galerkin conditions: W (b - A x0) = 0 and x0 in span(W)
    assert torch.allclose(W @ R0.T, torch.zeros(12, 5, dtype=DT), atol=1e-9)
    coef = torch.linalg.lstsq(W.T, X0.T).solution
    assert torch.allclose(W.T @ coef, X0.T, atol=1e-10)
    assert torch.allclose(R0, B - X0 @ A, atol=1e-10)
    # best in the A-norm: no other combination of W is closer
    E0 = ((exact - X0) @ A * (exact - X0)).sum(1)
    X1 = X0 + 1e-3 * torch.randn(5, 12, generator=g, dtype=DT) @ W
    assert (((exact - X1) @ A * (exact - X1)).sum(1) > E0).all()
    inside = torch.randn(3, 12, generator=g, dtype=DT) @ W  # A^-1 b in span(W)
    Bin = inside @ A
    res = batched_cg(
        lambda idx, V: V @ A, Bin, 1e-8 * Bin.norm(dim=1), 50,
        precond=lambda R: R @ Minv, spectrum_floor=floor, var_rtol=1e-6,
        start=space.start(Bin),
    )  # fmt: skip
    assert int(res.iterations.max()) == 0
    assert torch.allclose(res.x, inside, rtol=1e-8, atol=1e-9)


def test_capacity_keeps_the_newest_vectors_within_the_budget():
    space = RecycledSpace(capacity=4)
    assert space.start(torch.ones(2, 3, dtype=DT)) is None
    g = torch.Generator().manual_seed(2)
    for k in range(3):
        U = float(k) + torch.rand(2, 3, generator=g, dtype=DT)
        space.add(U, 2 * U)
    assert space.size == 4
    assert space.W[:, 0].floor().tolist() == [1.0, 1.0, 2.0, 2.0]
    assert torch.equal(space.AW, 2 * space.W)
    assert torch.allclose(space.gram, space.W @ space.AW.T)
    A = torch.tensor([[2.0, 0.5, 0.0], [0.5, 1.0, 0.2], [0.0, 0.2, 3.0]], dtype=DT)
    U = torch.randn(7, 3, generator=g, dtype=DT)
    space.add(U, U @ A)  # more than the capacity: the last 4 rows
    assert space.size == 4 and torch.equal(space.W, U[-4:])
    assert torch.allclose(space.gram, space.W @ space.AW.T)
    off = RecycledSpace(capacity=0)
    off.add(torch.ones(2, 3), torch.ones(2, 3))
    assert off.size == 0
    assert recycle_capacity(10, 10**6) == 256
    assert recycle_capacity(10, 100) == 25  # N / 4: the start < 1/4 iteration
    assert recycle_capacity(10**6, 10**6) == 16  # 2 k P <= 2**25
    assert recycle_capacity(10**9, 10**6) == 0


def test_projected_solve_drops_dependent_directions():
    """A rank-deficient Gram matrix (repeated vectors) is solved on its range."""
    g = torch.Generator().manual_seed(1)
    W = torch.randn(3, 8, generator=g, dtype=DT)
    W = torch.cat([W, W[:1]])  # dependent
    S = W @ W.T
    F = W @ torch.randn(8, 2, generator=g, dtype=DT)
    C = projected_solve(S, F)
    assert torch.isfinite(C).all()
    assert torch.allclose(S @ C, F, atol=1e-10)


def _chunked_predictions(la, Xq, step):
    """Variances and diagnostics of predictions ``step`` points at a time."""
    out = []
    for i in range(0, len(Xq), step):
        _, var = la.glm_predictive(Xq[i : i + step])
        out.append((var, la.last_diagnostics))
    return out


@pytest.mark.parametrize(
    "precond",
    [{"preconditioner": "none"}, {"preconditioner": "nystrom", "precondition_rank": 8}],
)
def test_later_chunks_reuse_earlier_solves(classification, monkeypatch, precond):
    """Classification 2-8-3, no preconditioner and Nyström, 20 chunks of 4
    query points (12 directions; 15 kept vectors at N = 60, so the oldest are
    dropped from the second chunk on; a start that kept nearly dependent
    directions failed the Nyström case's brackets): with reuse the later chunks spend fewer products
    than without; every variance stays within 1e-3 of the dense float64 truth
    and inside its certified bracket."""
    model, X, y = classification
    g = torch.Generator().manual_seed(0)
    Xq = X[torch.randint(len(X), (80,), generator=g)]
    Xq = Xq + 0.3 * torch.randn(Xq.shape, generator=g, dtype=DT)
    truth, _ = dense_reference(model, X, y, Xq, "classification", "ggn")
    truth = truth.diagonal(0, 1, 2)
    runs = {}
    for reuse in (True, False):
        with monkeypatch.context() as m:
            m.setattr(CGRefits, "recycle_vectors", RECYCLE_VECTORS if reuse else 0)
            la = fit_hfl(model, X, y, "classification", solver="cg", **precond)
            runs[reuse] = _chunked_predictions(la, Xq, 4)
    for reuse, chunks in runs.items():
        for i, (var, d) in enumerate(chunks):
            t = truth[4 * i : 4 * i + 4].flatten()
            v = var.diagonal(0, 1, 2).flatten()
            assert ((v - t).abs() <= 1e-3 * t).all(), (reuse, i)
            assert (d.variance_lower <= t * (1 + 1e-9)).all(), (reuse, i)
            assert (d.variance_upper >= t * (1 - 1e-9)).all(), (reuse, i)
    with_reuse = [d.products for _, d in runs[True]]
    without = [d.products for _, d in runs[False]]
    assert with_reuse[0] == without[0]  # nothing kept yet
    assert sum(with_reuse[1:]) < 0.8 * sum(without[1:])


def test_reuse_is_dropped_when_the_prior_changes(classification, monkeypatch):
    """The kept solutions belong to one system: the same points again cost
    fewer products, and a new prior precision starts from zero again (same
    products as a fresh estimator)."""
    monkeypatch.setattr(CGRefits, "recycle_vectors", RECYCLE_VECTORS)
    model, X, y = classification
    la = fit_hfl(model, X, y, "classification", solver="cg", preconditioner="none")
    la.glm_predictive(X[:6])
    first = la.last_diagnostics.products
    la.glm_predictive(X[:6])
    assert la.last_diagnostics.products < first  # started from the kept span
    la.prior_precision = 2.0
    la.glm_predictive(X[6:12])
    fresh = fit_hfl(model, X, y, "classification", solver="cg", preconditioner="none")
    fresh.prior_precision = 2.0
    fresh.glm_predictive(X[6:12])
    assert la.last_diagnostics.products == fresh.last_diagnostics.products


def test_reuse_is_off_by_default(classification):
    """By default a query's answer does not depend on earlier queries: the
    same points give bit-identical variances after other predictions."""
    model, X, y = classification
    la = fit_hfl(model, X, y, "classification", solver="cg", preconditioner="none")
    _, first = la.glm_predictive(X[:6])
    la.glm_predictive(X[6:12] + 0.1)
    _, again = la.glm_predictive(X[:6])
    assert CGRefits.recycle_vectors == 0
    assert torch.equal(first, again)
