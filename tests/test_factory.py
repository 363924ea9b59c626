"""``Laplace(...)`` dispatch after ``import laplace_hfl``."""

from __future__ import annotations

import pytest
from conftest import make_regression
from laplace import Laplace
from laplace.baselaplace import DiagLaplace, FullLaplace, KronLaplace
from laplace.lllaplace import DiagLLLaplace, FullLLLaplace, KronLLLaplace
from laplace.utils.enums import HessianStructure, SubsetOfWeights

from laplace_hfl import HessianFreeLaplace, HessianFreeLLLaplace


@pytest.mark.parametrize(
    "subset, cls",
    [("all", HessianFreeLaplace), ("last_layer", HessianFreeLLLaplace)],
)
def test_hfl_keys_dispatch(subset, cls):
    model, _, _ = make_regression()
    la = Laplace(model, "regression", subset, "hfl")
    assert type(la) is cls
    la = Laplace(model, "regression", SubsetOfWeights(subset), "hfl", target="hessian")
    assert type(la) is cls and la.hfl_settings.target == "hessian"


@pytest.mark.parametrize(
    "subset, structure, cls",
    [
        ("all", HessianStructure.FULL, FullLaplace),
        ("all", HessianStructure.KRON, KronLaplace),
        ("all", HessianStructure.DIAG, DiagLaplace),
        ("last_layer", HessianStructure.FULL, FullLLLaplace),
        ("last_layer", HessianStructure.KRON, KronLLLaplace),
        ("last_layer", HessianStructure.DIAG, DiagLLLaplace),
    ],
)
def test_library_keys_unaffected(subset, structure, cls):
    model, _, _ = make_regression()
    assert type(Laplace(model, "regression", subset, structure)) is cls


def test_each_class_has_its_own_key():
    assert HessianFreeLaplace._key == ("all", "hfl")
    assert HessianFreeLLLaplace._key == ("last_layer", "hfl")
    assert "_key" in HessianFreeLaplace.__dict__
    assert "_key" in HessianFreeLLLaplace.__dict__


def test_options_are_keyword_only():
    model, _, _ = make_regression()
    # Positional arguments after the likelihood keep laplace-torch's meaning.
    la = Laplace(model, "regression", "all", "hfl", 0.5, 2.0)
    assert float(la.sigma_noise) == 0.5
    assert float(la.prior_precision) == 2.0
