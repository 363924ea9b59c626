"""Property-based test (Hypothesis) of the robustness guarantee: for random
hyperparameters, options and corrupted batches HFL either raises one of its
documented exceptions or returns finite variances equal to a dense reference.

The model is linear (``J = [x, 1]``), so the dense reference
``J (A^T A / (sigma^2 T) + p I)^{-1} J^T`` is exact for every hyperparameter,
including a zero prior (``A`` has full column rank).
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import DT, assert_unchanged, loader, snapshot
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from laplace import Laplace
from torch import nn

N, D = 24, 3

special = st.sampled_from([0.0, -1.0, math.nan, math.inf, -math.inf])
positive = st.floats(1e-2, 1e2)
hyper = st.one_of(positive, special)


def _problem():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(N, D, generator=g, dtype=DT)
    y = X @ torch.randn(D, 1, generator=g, dtype=DT)
    torch.manual_seed(0)
    return nn.Linear(D, 1).to(DT), X, y


def _reference(X, Xq, prior, sigma, temperature):
    A = torch.cat([X, torch.ones(len(X), 1, dtype=DT)], 1)
    Aq = torch.cat([Xq, torch.ones(len(Xq), 1, dtype=DT)], 1)
    P = A.T @ A / (sigma**2 * temperature) + prior * torch.eye(D + 1, dtype=DT)
    return torch.einsum("bp,pq,bq->b", Aq, torch.linalg.inv(P), Aq)


def _valid(value, allow_zero=False):
    return math.isfinite(value) and (value >= 0 if allow_zero else value > 0)


@settings(
    max_examples=30,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    prior=hyper,
    sigma=hyper,
    temperature=hyper,
    eps=st.one_of(st.floats(1e-4, 1.0), st.sampled_from([0.0, 2.0, math.inf])),
    rank=st.sampled_from([None, 0, 2, 4]),
    chunk=st.integers(1, 8),
    corrupt_train=st.sampled_from([None, "X", "y"]),
    corrupt_query=st.booleans(),
    bad=st.sampled_from([math.nan, math.inf, -math.inf]),
)
def test_documented_error_or_exact_finite_variances(
    prior, sigma, temperature, eps, rank, chunk, corrupt_train, corrupt_query, bad
):
    model, X, y = _problem()
    snap = snapshot(model)
    kw = dict(
        sigma_noise=sigma, prior_precision=prior, temperature=temperature,
        eps=eps, precondition_rank=rank, chunk_size=chunk,
    )  # fmt: skip
    valid_options = (
        _valid(prior, allow_zero=True)
        and _valid(sigma)
        and _valid(temperature)
        and 0 < eps <= 1
    )
    if not valid_options:
        with pytest.raises(ValueError, match="must be"):
            Laplace(model, "regression", "all", "hfl", **kw)
        assert_unchanged(model, snap)
        return
    la = Laplace(model, "regression", "all", "hfl", **kw)
    X_train, y_train = X.clone(), y.clone()
    if corrupt_train == "X":
        X_train[5, 1] = bad
    elif corrupt_train == "y":
        y_train[7, 0] = bad
    if corrupt_train is not None:
        with pytest.raises(ValueError, match="not finite"):
            la.fit(loader(X_train, y_train, batch_size=8))
        assert_unchanged(model, snap)
        return
    la.fit(loader(X_train, y_train, batch_size=8))
    Xq = X[:5].clone()
    if corrupt_query:
        Xq[2, 0] = bad
        with pytest.raises(ValueError, match=r"rows \[2\]"):
            la(Xq)
        assert_unchanged(model, snap)
        return
    _, f_var = la(Xq)
    assert torch.isfinite(f_var).all()
    ref = _reference(X, Xq, prior, sigma, temperature)
    torch.testing.assert_close(f_var.flatten(), ref, rtol=1e-5, atol=1e-12)
    assert_unchanged(model, snap)
