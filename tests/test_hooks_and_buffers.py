"""Models with forward hooks and with forwards that write buffers: the answer
is the model's own (hooks included) with every solver, or a clear error, and
the model is left as it was."""

from __future__ import annotations

import pytest
import torch
from conftest import (
    SIGMA,
    assert_unchanged,
    dense_reference,
    is_fitted,
    loader,
    snapshot,
)
from laplace import Laplace
from torch import nn


@pytest.mark.parametrize("solver", ["dense", "cg"])
def test_last_layer_forward_hook_is_part_of_the_model(regression_1d, solver):
    model, X, y = regression_1d
    model[-1].register_forward_hook(lambda mod, inp, out: 2 * out)
    snap = snapshot(model)
    la = Laplace(
        model, "regression", "last_layer", "hfl", sigma_noise=SIGMA,
        prior_precision=0.5, solver=solver,
    )  # fmt: skip
    la.fit(loader(X, y))
    mu, var = la(X[:4])
    torch.testing.assert_close(mu, model(X[:4]).detach(), rtol=1e-10, atol=1e-12)
    ref, _ = dense_reference(model, X, y, X[:4], "regression", "ggn", last_layer=True)
    torch.testing.assert_close(var, ref, rtol=1e-5, atol=1e-12)
    assert_unchanged(model, snap)


class Counting(nn.Module):
    """A forward that writes a buffer (a call counter)."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden, self.out = nn.Linear(1, 3), nn.Linear(3, 1)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        self.calls += 1
        return self.out(torch.tanh(self.hidden(x)))


@pytest.mark.parametrize("subset", ["all", "last_layer"])
def test_forward_that_writes_a_buffer_is_refused_and_restored(regression_1d, subset):
    _, X, y = regression_1d
    model = Counting().to(X.dtype)
    snap = snapshot(model)
    la = Laplace(model, "regression", subset, "hfl")
    with pytest.raises(ValueError, match=r"buffer '(model\.)?calls'"):
        la.fit(loader(X, y))
    assert_unchanged(model, snap)
    assert not is_fitted(la)
