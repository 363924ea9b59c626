"""``solver="auto"``: the dense solver where its measured cost beats CG's,
CG where it does not, and always the same answer."""

from __future__ import annotations

import pytest
import torch
from conftest import PRIOR, dense_reference, loader, rel_err
from laplace import Laplace

from laplace_hfl.engine import auto_choice
from laplace_hfl.engine.preconditioner import (
    default_rank,
    nystrom_apply,
    nystrom_sketch,
)


@pytest.mark.parametrize("flops", [1e3, 1e15])
def test_auto_solver_follows_the_measured_costs(classification, monkeypatch, flops):
    """A machine whose matrix products are slow (1e3 flop/s) must refit by CG,
    a fast one (1e15) factorise densely; the reason (with the probe's
    iteration counts and both estimates for CG) is recorded, and both answers
    are the dense reference's."""
    model, X, y = classification
    monkeypatch.setattr(auto_choice, "SMALL_DENSE_FLOPS", 0.0)  # always probe
    monkeypatch.setattr(auto_choice, "WHOLE_SKETCH_ITERATIONS", 0)
    monkeypatch.setattr(auto_choice, "_flops_per_second", lambda n, like: flops)
    la = Laplace(model, "classification", "all", "hfl", prior_precision=PRIOR)
    la.fit(loader(X, y))
    Xq = X[:3] + 0.3
    f_var = la.glm_predictive(Xq)[1]
    d = la.last_diagnostics
    assert d.solver == ("cg" if flops < 1e9 else "dense")
    assert d.choice.startswith(d.solver)  # what was chosen, then why
    if d.solver == "cg":
        assert "CG iterations" in d.choice and "dense ~" in d.choice
    ref, _ = dense_reference(model, X, y, Xq, "classification", "ggn")
    assert rel_err(f_var, ref).max() <= 1e-4


def test_probe_counts_match_full_cg_runs(classification):
    """The probe's count for the winner is the iterations CG needs to the
    tolerance on its right-hand sides (it stops once one candidate has
    converged; slower ones get a lower bound above it)."""
    from laplace_hfl.engine.functional import ggn_matvec
    from laplace_hfl.engine.solvers import batched_cg

    model, X, y = classification
    la = Laplace(model, "classification", "all", "hfl", prior_precision=PRIOR,
                 solver="cg")  # fmt: skip
    la.fit(loader(X, y))
    obj = la.objective()
    B, _ = auto_choice.probe_rhs(obj, 2)
    nys = nystrom_apply(  # the estimator's automatic rank
        nystrom_sketch(obj, default_rank(la.n_params)),
        obj.h_factor,
        obj.prior_precision,
    )
    counts = auto_choice.probe_iterations(obj, B, 1e-6, 50, [nys, None])
    full = [
        batched_cg(lambda i, V: ggn_matvec(obj, V), B, 1e-6 * B.norm(dim=1), 500, M)
        for M in (nys, None)
    ]
    its = [int(r.iterations.max()) for r in full]
    winner = min(range(2), key=lambda i: its[i])
    assert counts[winner] == (float(its[winner]), True)
    loser = 1 - winner
    assert not counts[loser][1] and its[loser] >= counts[loser][0] > its[winner]
    assert torch.isfinite(torch.tensor(counts[loser][0]))


@pytest.mark.parametrize(
    "dense_products, preconditioner, built",
    [(10, "auto", False), (30, "auto", True), (10, "nystrom", False)],
)
def test_sketch_dearer_than_dense_is_not_built(
    classification, monkeypatch, dense_products, preconditioner, built
):
    """The rank-25 sketch costs 25 products: against a dense estimate of 10
    products (above one CG iteration of the 8-direction chunk, so the probe
    runs) it is neither built nor probed and the dense solver is chosen;
    against 30 products it is probed as before."""
    import laplace_hfl.engine.precond_objects as po

    model, X, y = classification
    monkeypatch.setattr(auto_choice, "SMALL_DENSE_FLOPS", 0.0)
    monkeypatch.setattr(auto_choice, "WHOLE_SKETCH_ITERATIONS", 0)
    monkeypatch.setattr(
        auto_choice, "_dense_seconds", lambda P, C, N, s, f: dense_products * s
    )
    sketches = []
    for name in ("nystrom_sketch", "nystrom_columns"):  # fixed / grown rank
        real = getattr(po, name)
        monkeypatch.setattr(
            po, name, lambda *a, real=real, **k: sketches.append(1) or real(*a, **k)
        )
    la = Laplace(
        model, "classification", "all", "hfl", prior_precision=PRIOR,
        chunk_size=8, precondition_rank=None, preconditioner=preconditioner,
    )  # fmt: skip
    la.fit(loader(X, y))
    assert default_rank(la.n_params) == 25  # precondition_rank=None
    Xq = X[:3] - 0.2
    f_var = la.glm_predictive(Xq)[1]
    d = la.last_diagnostics
    assert bool(sketches) == built
    if not built:
        assert d.solver == "dense"
        assert d.choice.startswith("dense") and "nystrom" in d.choice
    ref, _ = dense_reference(model, X, y, Xq, "classification", "ggn")
    assert rel_err(f_var, ref).max() <= 1e-4
