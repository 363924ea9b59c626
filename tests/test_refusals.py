"""Inputs and options that used to give NaN, an arbitrary result or a raw
internal error: each now raises a sentence naming the value and the fix
(docs/errors.md), before any state changes."""

from __future__ import annotations

import pytest
import torch
from conftest import DT, assert_unchanged, loader, snapshot
from laplace import Laplace
from torch import nn


def _relu_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(1, 5), nn.ReLU(), nn.Linear(5, 1)).to(DT)


@pytest.mark.parametrize("amortize", [None, 8])
def test_overflowing_network_raises_in_every_mode(regression_1d, amortize):
    _, X, y = regression_1d
    model = _relu_net()
    la = Laplace(model, "regression", "all", "hfl", amortize=amortize)
    la.fit(loader(X, y))
    with pytest.raises(FloatingPointError, match="overflows"):
        la(torch.full((2, 1), 1e200, dtype=DT))


def test_soft_targets_must_be_probabilities(classification):
    model, X, y = classification
    snap = snapshot(model)
    soft = nn.functional.one_hot(y, 3).to(DT)
    la = Laplace(model, "classification", "all", "hfl")
    with pytest.raises(ValueError, match="summing to 1"):
        la.fit(loader(X, 0.5 * soft))
    negative = soft.clone()
    negative[0] = torch.tensor([1.5, -0.5, 0.0], dtype=DT)  # sums to 1
    with pytest.raises(ValueError, match=r"rows \[0\]"):
        la.fit(loader(X, negative))
    assert not la._fitted
    la.fit(loader(X, soft))  # proper probabilities are accepted
    assert_unchanged(model, snap)


@pytest.mark.parametrize("dtype", [torch.int32, torch.uint8, torch.bool])
def test_class_indices_must_be_long(classification, dtype):
    model, X, y = classification
    la = Laplace(model, "classification", "all", "hfl")
    labels = (y > 0) if dtype == torch.bool else y.to(dtype)
    with pytest.raises(ValueError, match=r"torch\.long"):
        la.fit(loader(X, labels))
