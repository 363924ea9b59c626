"""``fit`` forms the dense solver's data GGN (and runs the ``"auto"`` probe),
as FullLaplace does, so that samples and predictions only factorise.

The reference for "no behaviour change" is the same estimator with that
fit-time work switched off (everything formed at the first call, as before):
float64 samples and predictions must be bitwise equal for the same generator.
Reuse is counted on the engine function that forms the GGN, not timed.
"""

from __future__ import annotations

import pytest
import torch
from conftest import PRIOR, assert_unchanged, fit_hfl, loader, snapshot
from laplace import Laplace

import laplace_hfl.engine.auto_choice as auto_choice
import laplace_hfl.engine.curvature as curvature
import laplace_hfl.engine.dense as dense
import laplace_hfl.solver_choice as sc
from laplace_hfl.solver_choice import SolverMixin

# laplace-torch warns on every classification prior tuning
pytestmark = pytest.mark.filterwarnings("ignore:By default `link_approx`")


@pytest.fixture
def ggn_calls(monkeypatch):
    """Counts the data GGNs formed (each is one pass over the training data)
    and the auto choices made, as the solver choice calls them."""
    calls = {"ggn": 0, "choose": 0}
    for key, module, name in (("ggn", curvature, "data_ggn"), ("choose", sc, "choose")):

        def spy(*a, _real=getattr(module, name), _key=key, **k):
            calls[_key] += 1
            return _real(*a, **k)

        monkeypatch.setattr(module, name, spy)
    return calls


def _fitted(model, X, y, likelihood="classification", subset="all", **kw):
    return fit_hfl(model, X, y, likelihood, subset, **kw)


def _results(la, Xq) -> dict[str, torch.Tensor]:
    """Everything a user reads from the dense path, seeded alike."""

    def g():
        return torch.Generator().manual_seed(7)

    out = {
        "sample": la.sample(20, generator=g()),
        "nn": la(Xq, pred_type="nn", link_approx="mc", n_samples=20, generator=g()),
        "f_nn": la.functional_samples(Xq, pred_type="nn", n_samples=5, generator=g()),
        "glm": la(Xq),
        "f_var": la.glm_predictive(Xq)[1],
        "logml": la.log_marginal_likelihood().detach(),
    }
    la.optimize_prior_precision(
        method="marglik", n_steps=5, pred_type="glm", link_approx="probit"
    )
    out["prior_tuned"] = la.prior_precision.detach().clone()
    out["sample_tuned"] = la.sample(20, generator=g())
    out["nn_tuned"] = la(
        Xq, pred_type="nn", link_approx="mc", n_samples=20, generator=g()
    )
    return out


@pytest.mark.parametrize(
    "subset, kw",
    [
        ("all", {"solver": "dense"}),
        ("all", {"solver": "auto"}),
        ("all", {"solver": "auto", "probe": True}),
        ("last_layer", {"solver": "auto"}),
    ],
)
def test_fit_time_ggn_changes_no_result(
    classification, monkeypatch, ggn_calls, subset, kw
):
    """Float64 samples, nn / GLM predictions, marginal likelihood and prior
    tuning are bitwise those of the lazy path (GGN formed at the first call)."""
    model, X, y = classification
    kw = dict(kw)
    if kw.pop("probe", False):  # the probe itself runs at fit, not skipped
        monkeypatch.setattr(auto_choice, "SMALL_DENSE_FLOPS", 0.0)
    Xq = X[:5] + 0.3
    snap = snapshot(model)
    with monkeypatch.context() as m:  # the behaviour before: all work lazy
        m.setattr(SolverMixin, "_fit_curvature", lambda self: None)
        lazy = _fitted(model, X, y, subset=subset, **kw)
        assert ggn_calls["ggn"] == 0
        before = _results(lazy, Xq)
    formed = ggn_calls["ggn"]
    eager = _fitted(model, X, y, subset=subset, **kw)
    assert ggn_calls["ggn"] == formed + 1  # formed by fit
    assert_unchanged(model, snap)
    after = _results(eager, Xq)
    for key, value in before.items():
        assert value.dtype == torch.float64
        assert torch.equal(after[key], value), key
    assert eager.last_diagnostics.solver == "dense"
    assert_unchanged(model, snap)


def test_fit_forms_the_ggn_once_and_every_call_reuses_it(classification, ggn_calls):
    model, X, y = classification
    Xq = X[:4]
    la = _fitted(model, X, y, solver="dense")
    assert ggn_calls["ggn"] == 1  # at fit, as FullLaplace
    la.sample(10)
    la(Xq, pred_type="nn", link_approx="mc", n_samples=10)
    la.functional_samples(Xq, pred_type="nn", n_samples=3)
    la(Xq)
    la.log_marginal_likelihood()
    la.optimize_prior_precision(
        method="marglik", n_steps=3, pred_type="glm", link_approx="probit"
    )
    la.prior_precision = 3 * PRIOR
    la.sample(10)
    la(Xq)
    assert ggn_calls["ggn"] == 1  # reused across priors, samples and queries
    la.fit(loader(X, y))  # a new fit forms it again, once
    assert ggn_calls["ggn"] == 2
    la.sample(10)
    assert ggn_calls["ggn"] == 2


def test_auto_probes_once_at_fit(classification, ggn_calls, monkeypatch):
    monkeypatch.setattr(auto_choice, "SMALL_DENSE_FLOPS", 0.0)
    model, X, y = classification
    la = _fitted(model, X, y)
    assert ggn_calls == {"ggn": 1, "choose": 1}
    la.sample(5)
    la(X[:3], pred_type="nn", link_approx="mc", n_samples=5)
    assert ggn_calls == {"ggn": 1, "choose": 1}


@pytest.mark.parametrize(
    "kw",
    [
        {"solver": "cg"},
        {"target": "hessian", "solver": "dense"},
        {"amortize": 4},
        {"minibatch_epochs": 2},
        {"budget": 10},  # auto, and the dense solver cannot fit: CG for sure
    ],
)
def test_fit_leaves_curvature_where_it_could_be_wasted(
    regression_1d, ggn_calls, monkeypatch, kw
):
    model, X, y = regression_1d
    kw = dict(kw)
    if "budget" in kw:
        monkeypatch.setattr(dense, "DENSE_BUDGET", kw.pop("budget"))
    _fitted(model, X, y, "regression", **kw)
    assert ggn_calls == {"ggn": 0, "choose": 0}


def test_fit_progress_bar_shows_the_curvature(classification, capsys):
    model, X, y = classification
    la = Laplace(model, "classification", "all", "hfl", solver="dense")
    la.fit(loader(X, y), progress_bar=True)
    assert "[HFL dense curvature]" in capsys.readouterr().err
    la = Laplace(model, "classification", "all", "hfl", solver="dense")
    la.fit(loader(X, y))  # tiny: no bar unless asked
    assert capsys.readouterr().err == ""
