"""``amortize_deflation=k``: amortised predictions with the top-k directions of
the Nyström sketch handled exactly, through the public API, against the dense
float64 truth."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import dense_reference, fit_hfl, loader
from laplace import Laplace

import laplace_hfl
from laplace_hfl.engine.amortized import amortized_covariance
from laplace_hfl.engine.deflated_samples import deflated_factor
from laplace_hfl.engine.functional import ggn_matvec
from laplace_hfl.engine.preconditioner import nystrom_sketch


def _variances(la, X):
    return la.glm_predictive(X)[1].diagonal(0, 1, 2)


def test_zero_deflation_is_the_plain_estimator_bit_for_bit(classification):
    model, X, y = classification
    out = []
    for k in (None, 0):
        torch.manual_seed(3)
        la = fit_hfl(copy.deepcopy(model), X, y, "classification", amortize=16,
                     amortize_deflation=k)  # fmt: skip
        out.append(la.glm_predictive(X))
    assert torch.equal(out[0][0], out[1][0]) and torch.equal(out[0][1], out[1][1])


@pytest.mark.parametrize("net", ["regression_multi", "classification"])
def test_deflation_lowers_the_error_at_equal_samples(net, request):
    """S = 64, 6 fixed seeds, rank-24 sketch of the 51-parameter nets: the
    deflated predictions' median relative variance error against the dense
    truth, averaged over the seeds, is below 0.8 times the plain one (the same
    samples, projected)."""
    model, X, y = request.getfixturevalue(net)
    lik = "classification" if y.dtype == torch.long else "regression"
    truth = dense_reference(model, X, y, X, lik, "ggn")[0].diagonal(0, 1, 2)
    plain, deflated = [], []
    for seed in range(6):
        torch.manual_seed(seed)
        la = fit_hfl(copy.deepcopy(model), X, y, lik, amortize=64,
                     precondition_rank=24)  # fmt: skip
        for k, out in ((None, plain), (24, deflated)):
            la.amortize_deflation = k
            err = (_variances(la, X) - truth).abs() / truth
            out.append(float(err.median()))
    plain, deflated = sum(plain) / 6, sum(deflated) / 6
    assert deflated < 0.8 * plain, (deflated, plain)


def test_deflated_predictions_are_the_engines_deflated_estimate(classification):
    """With deflation the predictive is the engine's covariance of the
    deflated rows (the held samples, the top 8 directions of the rank-8
    Nyström sketch), not the samples'."""
    model, X, y = classification
    la = fit_hfl(model, X, y, "classification", amortize=16, precondition_rank=8,
                 amortize_deflation=8)  # fmt: skip
    obj = la.objective()
    W = nystrom_sketch(obj, 8).U.T.contiguous()
    rows = deflated_factor(la.amortized_samples().samples, W, ggn_matvec(obj, W))
    assert rows.shape[0] == 16 + 8
    expected = amortized_covariance(obj.forward, obj.theta_map, X[:5], rows)[1]
    torch.testing.assert_close(la.glm_predictive(X[:5])[1], expected)


def test_state_dict_stores_the_option_and_needs_data_to_deflate(classification):
    model, X, y = classification
    la = fit_hfl(model, X, y, "classification", amortize=16, precondition_rank=8,
                 amortize_deflation=4)  # fmt: skip
    expected = la.glm_predictive(X[:5])
    state = la.state_dict()
    assert state["hfl_amortize_deflation"] == 4

    def fresh(k):
        return Laplace(copy.deepcopy(model), "classification", "all", "hfl",
                       prior_precision=la.prior_precision, amortize=16,
                       precondition_rank=8, amortize_deflation=k)  # fmt: skip

    with pytest.raises(ValueError, match="amortize_deflation=4"):
        fresh(None).load_state_dict(state)
    loaded = fresh(4)
    loaded.load_state_dict(state)
    with pytest.raises(laplace_hfl.HFLNotFittedError, match="amortize_deflation"):
        loaded.glm_predictive(X[:5])
    loaded.fit(loader(X, y))  # new samples; the option survives
    assert loaded.amortize_deflation == 4
    assert loaded.glm_predictive(X[:5])[1].shape == expected[1].shape


def test_invalid_deflation_is_refused(classification):
    model = classification[0]
    for bad, match in ((-1, "amortize_deflation"), (2.5, "amortize_deflation"),
                       (True, "amortize_deflation")):  # fmt: skip
        with pytest.raises(ValueError, match=match):
            Laplace(model, "classification", "all", "hfl", amortize=16,
                    amortize_deflation=bad)  # fmt: skip
    with pytest.raises(ValueError, match="amortize=None"):
        Laplace(model, "classification", "all", "hfl", amortize_deflation=4)
    with pytest.raises(ValueError, match="precondition_rank=8"):
        Laplace(model, "classification", "all", "hfl", amortize=16,
                precondition_rank=8, amortize_deflation=9)  # fmt: skip
