"""The package declares the ``laplace.structures`` entry point ``hfl``.

laplace-torch with structure discovery (upstream/patches/2-structure-entry-
points.patch) loads it to find ``hessian_structure="hfl"`` without an
``import laplace_hfl``. The metadata is built from this checkout's
``pyproject.toml`` the way ``pip install`` builds it (setuptools' PEP 517
hook), so the test reads what an install of this checkout declares.
"""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import Distribution
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
GROUP = "laplace.structures"


@pytest.fixture(scope="module")
def built_metadata(tmp_path_factory) -> Distribution:
    pytest.importorskip("setuptools")
    out = tmp_path_factory.mktemp("metadata")
    res = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from setuptools import build_meta; "
            "print(build_meta.prepare_metadata_for_build_wheel(sys.argv[1]))",
            str(out),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    assert res.returncode == 0, res.stderr
    return Distribution.at(out / res.stdout.split()[-1])


def test_metadata_declares_hfl_structure(built_metadata):
    found = built_metadata.entry_points.select(group=GROUP)
    assert [(ep.name, ep.value) for ep in found] == [("hfl", "laplace_hfl")]


def test_entry_point_loads_and_registers_both_classes(built_metadata):
    from laplace import BaseLaplace
    from laplace.laplace import _all_subclasses

    (entry_point,) = built_metadata.entry_points.select(group=GROUP, name="hfl")
    module = entry_point.load()
    registry = {
        cls._key: cls for cls in _all_subclasses(BaseLaplace) if hasattr(cls, "_key")
    }
    assert registry[("all", "hfl")] is module.HessianFreeLaplace
    assert registry[("last_layer", "hfl")] is module.HessianFreeLLLaplace
