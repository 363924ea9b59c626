"""Unit tests of ``laplace_hfl.engine.solvers``: batched conjugate gradients on
small SPD matrices against ``torch.linalg`` in float64, the certified variance
brackets, negative curvature, the cost counters and mixed precision.

The brackets on real refit curvatures (GGN + prior, with the Nyström and KFAC
preconditioners) are tested through the estimator in ``tests/test_bounds.py``.
"""

from __future__ import annotations

import pytest
import torch
from conftest import DT

from laplace_hfl.engine.solvers import (
    RECURRENCE_DTYPE,
    NegativeCurvature,
    batched_cg,
    mixed_precision,
)


def _spd(n, cond, seed=0):
    """A random SPD matrix with eigenvalues log-spaced in ``[1, cond]``."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=DT))
    return (Q * torch.logspace(0, torch.log10(torch.tensor(cond)), n, dtype=DT)) @ Q.T


def _rhs(m, n, seed=1):
    return torch.randn(m, n, generator=torch.Generator().manual_seed(seed), dtype=DT)


def _times(A):
    return lambda idx, V: V @ A


def test_solutions_residuals_and_counters_match_dense():
    """x_j = A^-1 b_j to 1e-9; the reported residual norms and residuals are
    those of the returned x; products and passes count the work done."""
    A, B = _spd(30, 1e3), _rhs(5, 30)
    res = batched_cg(_times(A), B, 1e-12 * B.norm(dim=1), 300)
    truth = torch.linalg.solve(A, B.T).T
    assert res.converged.all()
    torch.testing.assert_close(res.x, truth, rtol=1e-9, atol=0)
    R = B - res.x @ A
    torch.testing.assert_close(res.r, R, rtol=0, atol=1e-10 * float(B.norm()))
    assert (res.residual_norm <= 1e-12 * B.norm(dim=1)).all()
    assert res.products == int(res.iterations.sum())
    assert res.passes == int(res.iterations.max())
    assert res.lower is None and res.upper is None  # no spectrum floor given


def test_columns_have_their_own_matrix_and_tolerance():
    """``matvec(idx, V)`` may apply a different matrix per column; a column
    with a loose tolerance stops earlier and is no longer multiplied."""
    A, B = _spd(20, 1e2), _rhs(3, 20)
    shifts = torch.tensor([0.0, 1.0, 10.0], dtype=DT)
    seen = []

    def matvec(idx, V):
        seen.append(idx.tolist())
        return V @ A + shifts[idx, None] * V

    tol = B.norm(dim=1) * torch.tensor([1e-12, 1e-12, 1e-2], dtype=DT)
    res = batched_cg(matvec, B, tol, 200)
    for j in range(3):
        truth = torch.linalg.solve(A + shifts[j] * torch.eye(20, dtype=DT), B[j])
        rel = float((res.x[j] - truth).norm() / truth.norm())
        assert rel <= (1e-9 if j < 2 else 1e-1)
    assert res.iterations[2] < res.iterations[0]
    stopped = int(res.iterations[2])  # column 2 is multiplied no more after that
    assert all(2 in idx for idx in seen[:stopped])
    assert not any(2 in idx for idx in seen[stopped:])


def test_exact_after_n_iterations():
    """CG on an ``n x n`` SPD system is exact after at most ``n`` steps."""
    n = 8
    A, B = _spd(n, 10.0), _rhs(4, n)
    res = batched_cg(_times(A), B, 1e-11 * B.norm(dim=1), n)
    assert res.converged.all() and int(res.iterations.max()) <= n
    torch.testing.assert_close(res.x, torch.linalg.solve(A, B.T).T, rtol=1e-9, atol=0)


def test_zero_right_hand_side_costs_nothing():
    A = _spd(10, 10.0)
    B = torch.zeros(2, 10, dtype=DT)
    B[1] = _rhs(1, 10)[0]
    res = batched_cg(_times(A), B, torch.zeros(2, dtype=DT), 50)
    assert int(res.iterations[0]) == 0 and torch.equal(
        res.x[0], torch.zeros(10, dtype=DT)
    )
    assert res.products == int(res.iterations[1])


def test_exact_preconditioner_converges_in_one_step():
    """``precond = A^-1`` changes the iteration count (to one), not the answer."""
    A, B = _spd(25, 1e4), _rhs(3, 25)
    Ainv = torch.linalg.inv(A)
    tol = 1e-8 * B.norm(dim=1)
    res = batched_cg(_times(A), B, tol, 50, precond=lambda R: R @ Ainv)
    assert res.iterations.tolist() == [1, 1, 1]
    torch.testing.assert_close(res.x, B @ Ainv, rtol=1e-9, atol=0)


def test_max_iter_reached_is_reported_unconverged():
    A, B = _spd(40, 1e4), _rhs(2, 40)
    res = batched_cg(_times(A), B, 1e-12 * B.norm(dim=1), 3)
    assert not res.converged.any()
    assert res.iterations.tolist() == [3, 3]


def test_negative_curvature_names_the_column():
    """Column 1's matrix has eigenvalue -1 along its right-hand side: the first
    direction's Rayleigh quotient is -1, raised with the column index."""
    A = _spd(6, 10.0)
    D = torch.diag(torch.tensor([-1.0, 1, 2, 3, 4, 5], dtype=DT))
    B = torch.zeros(2, 6, dtype=DT)
    B[0, 2] = B[1, 0] = 1.0

    def matvec(idx, V):
        return torch.stack([v @ (A if int(j) == 0 else D) for j, v in zip(idx, V)])

    with pytest.raises(NegativeCurvature) as info:
        batched_cg(matvec, B, torch.zeros(2, dtype=DT), 10)
    assert info.value.column == 1
    assert info.value.curvature == pytest.approx(-1.0, rel=1e-12)
    assert isinstance(info.value, ArithmeticError)


@pytest.mark.parametrize("floor_factor", [1.0, 1e-2])
def test_brackets_hold_the_truth_and_tighten(floor_factor):
    """Without a preconditioner, any ``0 < mu <= lambda_min(A)``: at every
    iteration count the bracket holds ``b^T A^-1 b`` (1e-10 rounding slack),
    the lower end rises and the upper end falls with k, and the bracket closes.
    The Gauss lower end equals ``b^T x_k`` (1e-10) while CG's directions are
    still conjugate to rounding (here the first 10 steps; later the two drift
    apart by up to 1e-5, and the lower end stays the bound)."""
    A, B = _spd(20, 1e2), _rhs(6, 20)
    truth = (B * torch.linalg.solve(A, B.T).T).sum(1)
    mu = floor_factor * float(torch.linalg.eigvalsh(A).min())
    tol = 1e-13 * B.norm(dim=1)
    prev = None
    for k in range(1, 41):
        res = batched_cg(_times(A), B, tol, k, spectrum_floor=mu)
        assert res.lower.dtype == res.upper.dtype == torch.float64
        if k <= 10:
            gauss = (B * res.x).sum(1)
            torch.testing.assert_close(res.lower, gauss, rtol=1e-10, atol=0)
        assert (res.lower <= truth * (1 + 1e-10)).all()
        assert (res.upper >= truth * (1 - 1e-10)).all()
        if prev is not None:
            assert (res.lower >= prev[0] * (1 - 1e-12)).all()
            assert (res.upper <= prev[1] * (1 + 1e-12)).all()
        prev = res.lower, res.upper
    assert ((res.upper - res.lower) <= 1e-10 * truth).all()


def test_variance_stop_ends_each_column_at_its_bracket():
    """``var_rtol``: a column stops once its bracket is within 1e-3 relative,
    long before the residual rule would; the lower end is then within 1e-3
    of the truth."""
    A, B = _spd(60, 1e4), _rhs(8, 60)
    truth = (B * torch.linalg.solve(A, B.T).T).sum(1)
    mu = float(torch.linalg.eigvalsh(A).min())
    tight = 1e-14 * B.norm(dim=1)
    full = batched_cg(_times(A), B, tight, 500, spectrum_floor=mu)
    stop = batched_cg(_times(A), B, tight, 500, spectrum_floor=mu, var_rtol=1e-3)
    assert stop.converged.all()
    assert ((stop.upper - stop.lower) <= 1e-3 * stop.lower).all()
    assert (((truth - stop.lower) / truth) <= 1e-3).all()
    assert stop.products < full.products


@pytest.mark.parametrize("floor", [0.0, -1.0])
def test_spectrum_floor_must_be_positive(floor):
    A, B = _spd(5, 10.0), _rhs(1, 5)
    with pytest.raises(ValueError, match="spectrum_floor must be positive"):
        batched_cg(_times(A), B, torch.zeros(1, dtype=DT), 5, spectrum_floor=floor)


def test_mixed_precision_products_in_float32_recurrences_in_float64():
    """The wrapped products see float32 vectors and return float64; the solve
    is that of ``A + E`` with ``|E| ~ 1e-7 |A|``: 1e-5 relative here."""
    A, B = _spd(30, 1e2), _rhs(3, 30)
    A32 = A.float()
    dtypes = []

    def matvec(idx, V):
        dtypes.append(V.dtype)
        return V @ A32

    mv, pc = mixed_precision(matvec, None, torch.float32)
    assert pc is None
    assert mv(torch.arange(3), B).dtype == RECURRENCE_DTYPE
    res = batched_cg(mv, B, 1e-10 * B.norm(dim=1), 200)
    assert set(dtypes) == {torch.float32}
    assert res.x.dtype == torch.float64
    truth = torch.linalg.solve(A, B.T).T
    assert float((res.x - truth).norm() / truth.norm()) <= 1e-5
    _, pc = mixed_precision(matvec, lambda R: 2 * R, torch.float32)
    assert pc(B).dtype == RECURRENCE_DTYPE
    torch.testing.assert_close(pc(B), 2 * B, rtol=1e-6, atol=0)
