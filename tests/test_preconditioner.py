"""The Nyström preconditioner: a faithful low-rank sketch that speeds CG only."""

from __future__ import annotations

import torch
from conftest import DT, PRIOR, SIGMA, dense_reference, loader, rel_err
from laplace import Laplace
from torch.func import jacrev

from laplace_hfl.preconditioner import default_rank, nystrom_apply, nystrom_sketch


def test_full_rank_sketch_reproduces_ggn(regression_multi):
    """With k = P the sketch is the data GGN itself (dense torch.func check)."""
    model, X, y = regression_multi
    la = Laplace(model, "regression", "all", "hfl", sigma_noise=SIGMA)
    la.fit(loader(X, y))
    obj = la._objective()
    P = obj.theta_map.numel()
    sk = nystrom_sketch(obj, P)
    J = jacrev(obj.forward)(obj.theta_map, X)  # (N, C, P)
    G = torch.einsum("ncp,ncq->pq", J, J)  # regression: Lambda = I
    approx = sk.U @ torch.diag(sk.lam) @ sk.U.T
    assert torch.allclose(approx, G, atol=1e-8 * G.abs().max())
    # and M^{-1} is then the exact inverse of A = h G + p0 I
    A = obj.h_factor * G + PRIOR * torch.eye(P, dtype=DT)
    apply = nystrom_apply(sk, obj.h_factor, torch.full((P,), PRIOR, dtype=DT))
    R = torch.randn(3, P, dtype=DT)
    lam_k = obj.h_factor * sk.lam[-1] + PRIOR
    assert torch.allclose(apply(R) @ A / lam_k, R, atol=1e-8)


def test_preconditioning_keeps_answer_and_cuts_iterations(classification):
    model, X, y = classification
    Xq = X[:4] * 1.3
    ref, _ = dense_reference(model, X, y, Xq, "classification", "ggn")
    iters, covs = [], []
    for rank in (0, 16):
        la = Laplace(
            model, "classification", "all", "hfl", prior_precision=PRIOR,
            precondition_rank=rank, solver="cg",
        )  # fmt: skip
        la.fit(loader(X, y))
        _, f_var = la._glm_predictive_distribution(Xq)
        covs.append(f_var)
        iters.append(la.last_diagnostics.iterations.float().mean())
    for f_var in covs:
        assert rel_err(f_var.diagonal(0, 1, 2), ref.diagonal(0, 1, 2)).max() <= 1e-3
    assert iters[1] < 0.7 * iters[0]


def test_default_rank():
    assert default_rank(10) == 5
    assert default_rank(10_000) == 256
    assert default_rank(100_000) == 256
    assert default_rank(1_000_000) == 0  # sketch would not fit in 256 MiB
