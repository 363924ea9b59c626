"""Every module of ``laplace.hfl`` imports and defines the names it exports."""

from __future__ import annotations

import importlib
import pkgutil

import pytest

import laplace.hfl

MODULES = sorted(
    m.name for m in pkgutil.walk_packages(laplace.hfl.__path__, "laplace.hfl.")
)


def test_subpackage_has_modules():
    assert MODULES


@pytest.mark.parametrize("name", MODULES)
def test_module_imports_and_defines_its_exports(name):
    module = importlib.import_module(name)
    missing = [n for n in getattr(module, "__all__", ()) if not hasattr(module, n)]
    assert not missing, f"{name} does not define {missing}"
