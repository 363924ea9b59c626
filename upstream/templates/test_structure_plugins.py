"""``Laplace()`` finds Hessian structures of installed packages by entry point."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from importlib.metadata import EntryPoint, EntryPoints

import pytest
from torch import nn

import laplace.laplace
from laplace import FullLaplace, FullLLLaplace, Laplace
from laplace.laplace import STRUCTURE_ENTRY_POINTS

PLUGIN = """
from laplace import FullLaplace, FullLLLaplace


class ToyLaplace(FullLaplace):
    _key = ("all", "{name}")


class ToyLLLaplace(FullLLLaplace):
    _key = ("last_layer", "{name}")
"""


@pytest.fixture
def model():
    return nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 1))


def _install(monkeypatch, tmp_path, name: str, source: str) -> str:
    """A module on sys.path and an entry point ``name`` pointing to it."""
    module = f"toy_structure_{name}"
    (tmp_path / f"{module}.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    found = EntryPoints([EntryPoint(name, module, STRUCTURE_ENTRY_POINTS)])

    def entry_points(*, group, name):
        return found.select(group=group, name=name)

    monkeypatch.setattr(laplace.laplace, "entry_points", entry_points)
    return module


def test_structure_of_entry_point_is_found(monkeypatch, tmp_path, model):
    module = _install(monkeypatch, tmp_path, "toyfound", PLUGIN.format(name="toyfound"))
    assert module not in sys.modules
    la = Laplace(model, "regression", "all", "toyfound")
    assert type(la).__name__ == "ToyLaplace" and isinstance(la, FullLaplace)
    assert module in sys.modules
    la = Laplace(model, "regression", "last_layer", "toyfound")
    assert type(la).__name__ == "ToyLLLaplace" and isinstance(la, FullLLLaplace)


def test_builtin_structures_load_no_plugin(monkeypatch, model):
    def entry_points(**kwargs):
        raise AssertionError("a built-in structure loaded entry points")

    monkeypatch.setattr(laplace.laplace, "entry_points", entry_points)
    assert type(Laplace(model, "regression", "all", "full")) is FullLaplace
    assert type(Laplace(model, "regression", "last_layer", "full")) is FullLLLaplace


def test_unknown_structure_is_still_a_value_error(monkeypatch, tmp_path, model):
    _install(monkeypatch, tmp_path, "toyother", PLUGIN.format(name="toyother"))
    with pytest.raises(ValueError, match="Unsupported Laplace combination"):
        Laplace(model, "regression", "all", "nosuchstructure")


def test_plugin_failing_to_load_raises_import_error(monkeypatch, tmp_path, model):
    _install(monkeypatch, tmp_path, "toybroken", "raise RuntimeError('broken')\n")
    with pytest.raises(ImportError, match="toybroken = toy_structure_toybroken"):
        Laplace(model, "regression", "all", "toybroken")


def test_installed_plugin_found_in_fresh_interpreter(tmp_path):
    """A distribution on sys.path (dist-info with entry_points.txt), no import."""
    module = "toy_structure_fresh"
    (tmp_path / f"{module}.py").write_text(PLUGIN.format(name="toyfresh"))
    info = tmp_path / "toy_structure_fresh-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: toy-structure-fresh\nVersion: 0.1\n"
    )
    (info / "entry_points.txt").write_text(
        f"[{STRUCTURE_ENTRY_POINTS}]\ntoyfresh = {module}\n"
    )
    code = textwrap.dedent(
        f"""
        import sys
        from torch import nn
        from laplace import Laplace

        model = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 1))
        assert {module!r} not in sys.modules
        la = Laplace(model, "regression", "all", "toyfresh")
        print(type(la).__module__, type(la).__name__)
        """
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), *sys.path]))
    res = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == [module, "ToyLaplace"]
