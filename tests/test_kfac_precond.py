"""KFAC preconditioning of the CG refits: laplace-torch's Kron, speed only.

References (float64): laplace-torch's KronLaplace with the CurvlinopsGGN backend
(the preconditioner must be exactly the inverse of its posterior precision for
a scalar or layer-wise prior, to 1e-10), and the dense torch.func reference of
``J (GGN + prior)^{-1} J^T`` (variances with and without the preconditioner
agree with it and with each other to the CG tolerance, <= 1e-6 relative).
"""

from __future__ import annotations

import pytest
import torch
from conftest import (
    DT,
    PRIOR,
    SIGMA,
    assert_unchanged,
    dense_reference,
    loader,
    param_layout,
    rel_err,
    snapshot,
)
from laplace import Laplace
from laplace.curvature import CurvlinopsGGN
from torch import nn

from laplace_hfl.engine.kfac import kfac_apply, kfac_factors, kfac_supported
from laplace_hfl.engine.precond_objects import KFACPreconditioner, PrecondSetup


def _hfl(model, X, y, **kw):
    la = Laplace(
        model, "classification", "all", "hfl", prior_precision=kw.pop("prior", PRIOR),
        solver="cg", rtol=1e-9, **kw,
    )  # fmt: skip
    la.fit(loader(X, y))
    return la


@pytest.mark.parametrize("layerwise", [False, True])
def test_kfac_preconditioner_is_kron_laplace_inverse(classification, layerwise):
    model, X, y = classification
    n_tensors = len(list(model.parameters()))
    prior = (
        torch.linspace(0.2, 2.0, n_tensors, dtype=DT)
        if layerwise
        else torch.tensor(PRIOR, dtype=DT)
    )
    kron = Laplace(
        model, "classification", "all", "kron", prior_precision=prior,
        backend=CurvlinopsGGN, temperature=0.5,
    )  # fmt: skip
    kron.fit(loader(X, y))
    M = kron.posterior_precision.to_matrix()
    la = _hfl(model, X, y, prior=prior, temperature=0.5)
    snap = snapshot(model)
    obj = la.objective()
    layout = param_layout(model)  # all-weights HFL refits every parameter
    assert kfac_supported(model, layout)
    apply = kfac_apply(
        kfac_factors(obj, model, layout), obj.h_factor, obj.prior_precision
    )
    eye = torch.eye(M.shape[0], dtype=DT)
    assert torch.allclose(apply(eye) @ M, eye, atol=1e-10)
    assert_unchanged(model, snap)


def test_kfac_keeps_answer_and_auto_takes_fewest_iterations(classification):
    model, X, y = classification
    Xq = X[:4] * 1.3
    ref, _ = dense_reference(model, X, y, Xq, "classification", "ggn")
    snap = snapshot(model)
    out = {}
    for name in ("none", "kfac", "nystrom", "auto"):
        la = _hfl(model, X, y, preconditioner=name)
        f_var = la.glm_predictive(Xq)[1]
        d = la.last_diagnostics
        out[name] = (f_var, d.iterations.float().mean(), d.preconditioner)
        assert d.converged.all()
        assert rel_err(f_var, ref).max() <= 1e-6
    assert rel_err(out["kfac"][0], out["none"][0]).max() <= 1e-6
    assert out["none"][2] == "none" and out["kfac"][2] == "kfac"
    # "auto" probes the three and runs the one needing the fewest iterations
    fewest = min(("none", "kfac", "nystrom"), key=lambda n: out[n][1])
    assert out["auto"][2] == fewest
    assert out["auto"][1] == out[fewest][1]
    d = la.last_diagnostics
    assert "CG iterations" in d.choice
    # one line, whatever the number of refits; the tensors stay attributes
    assert "\n" not in repr(d) and d.summary() in repr(d)
    assert f"{int(d.converged.sum())}/{d.converged.numel()} refits converged" in repr(d)
    assert_unchanged(model, snap)


def test_kfac_exact_for_last_layer_regression(regression_multi):
    """Linear last layer + Gaussian likelihood: the weight block of the GGN is
    (sum a a^T) (x) I, which KFAC holds exactly (only the weight-bias coupling is
    dropped, laplace-torch keeping weight and bias in separate blocks)."""
    model, X, y = regression_multi
    Xq = X[:3] + 0.2
    ref, _ = dense_reference(model, X, y, Xq, "regression", "ggn", last_layer=True)
    snap = snapshot(model)
    iters = {}
    for name in ("none", "kfac"):
        la = Laplace(
            model, "regression", "last_layer", "hfl", sigma_noise=SIGMA,
            prior_precision=PRIOR, solver="cg", preconditioner=name, rtol=1e-9,
        )  # fmt: skip
        la.fit(loader(X, y))
        f_var = la.glm_predictive(Xq)[1]
        assert rel_err(f_var.diagonal(0, 1, 2), ref.diagonal(0, 1, 2)).max() <= 1e-6
        iters[name] = la.last_diagnostics.iterations.max()
        assert la.last_diagnostics.preconditioner == name
    assert iters["kfac"] < iters["none"]
    assert_unchanged(model, snap)


def test_hessian_target_with_kfac_matches_reference(regression_1d):
    model, X, y = regression_1d
    Xq = X[:3] + 0.1
    ref, _ = dense_reference(model, X, y, Xq, "regression", "hessian")
    la = Laplace(
        model, "regression", "all", "hfl", sigma_noise=0.3, prior_precision=PRIOR,
        target="hessian", solver="cg", preconditioner="kfac",
    )  # fmt: skip
    la.fit(loader(X, y))
    f_var = la.glm_predictive(Xq)[1]
    assert la.last_diagnostics.preconditioner == "kfac"
    assert rel_err(f_var, ref).max() <= 1e-4  # O(eps^2) bias of the differences


class _WithNorm(nn.Module):
    def __init__(self, base: nn.Sequential) -> None:
        super().__init__()
        self.first = base[0]
        self.norm = nn.LayerNorm(base[0].out_features).to(DT)
        self.rest = base[1:]

    def forward(self, x):
        return self.rest(self.norm(self.first(x)))


def test_unsupported_layers_fall_back_to_nystrom(classification):
    model, X, y = classification
    net = _WithNorm(model)
    net.train()
    snap = snapshot(net)
    la = Laplace(
        net, "classification", "all", "hfl", prior_precision=PRIOR, solver="cg"
    )
    la.fit(loader(X, y))
    layout = param_layout(net)  # all-weights HFL refits every parameter
    assert not kfac_supported(net, layout)
    setup = PrecondSetup(8, 8, lambda: (net, layout, {}))
    assert not KFACPreconditioner.available(setup)  # not a candidate of "auto"
    assert la.refit_preconditioner()[0] in ("nystrom", "none")  # the fallbacks
    # (a small rank: the sketch of main needs rank <= rank of the data GGN)
    la = Laplace(
        net, "classification", "all", "hfl", prior_precision=PRIOR, solver="cg",
        precondition_rank=8,
    )  # fmt: skip
    la.fit(loader(X, y))
    la.glm_predictive(X[:2])
    assert la.last_diagnostics.preconditioner == "nystrom"
    assert la.last_diagnostics.converged.all()
    la = Laplace(
        net, "classification", "all", "hfl", prior_precision=PRIOR, solver="cg",
        preconditioner="kfac",
    )  # fmt: skip
    la.fit(loader(X, y))
    with pytest.raises(ValueError, match="preconditioner='nystrom'"):
        la.glm_predictive(X[:2])
    assert_unchanged(net, snap)


def test_frozen_layer_still_supported(classification):
    """Frozen (requires_grad=False) layers are outside the refit: KFAC covers the rest."""
    model, X, y = classification
    for p in model[0].parameters():
        p.requires_grad_(False)
    snap = snapshot(model)
    la = _hfl(model, X, y, preconditioner="kfac")
    la.glm_predictive(X[:2])
    assert la.last_diagnostics.preconditioner == "kfac"
    assert la.last_diagnostics.converged.all()
    assert_unchanged(model, snap)


def test_auto_prefers_the_sketch_when_data_cannot_determine_all_weights(
    classification,
):
    """``preconditioner="auto"`` with fewer data than parameters: the GGN is
    zero on P - N C directions, where A is the prior exactly; KFAC is full rank
    there and slows CG down (LeNet: > 1,000 iterations vs ~450 plain). On this
    net (P = 51) 12 points give N C = 36 < P: the probe picks the Nyström
    sketch, and the answer is the same."""
    model, X, y = classification
    X, y = X[:12], y[:12]
    P = sum(p.numel() for p in model.parameters())
    assert 12 * 3 < P
    Xq = X[:3] + 0.4
    ref, _ = dense_reference(model, X, y, Xq, "classification", "ggn")
    la = _hfl(model, X, y)
    f_var = la.glm_predictive(Xq)[1]
    assert la.last_diagnostics.preconditioner == "nystrom"
    assert rel_err(f_var, ref).max() <= 1e-6
