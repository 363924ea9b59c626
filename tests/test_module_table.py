"""CONTRIBUTING.md's module table is the one ``scripts/module_table.py``
generates from the module docstrings; refresh it with
``python scripts/module_table.py --write``."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "module_table.py"


def _script():
    spec = importlib.util.spec_from_file_location("module_table", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_contributing_module_table_is_current(capsys):
    assert _script().main(["--check"]) == 0, (
        "CONTRIBUTING.md's module table is stale; refresh it with\n"
        "    python scripts/module_table.py --write\n" + capsys.readouterr().err
    )


def test_every_module_has_a_row_and_a_stale_table_is_caught(
    tmp_path, monkeypatch, capsys
):
    """Each module of the package is a row with its docstring's summary; a
    table that misses a row fails ``--check`` with the command to refresh it,
    and ``--write`` brings it back."""
    script = _script()
    table = script.table()
    for path in (ROOT / "laplace_hfl").rglob("*.py"):
        if path.name not in ("__init__.py", "__main__.py"):
            assert f"| `{path.name}` | {script.summary(path)} |" in table, path
    doc = tmp_path / "CONTRIBUTING.md"
    current = (ROOT / "CONTRIBUTING.md").read_text(encoding="utf-8")
    doc.write_text(current.replace("| `refit.py` |", "| `refit_old.py` |"))
    monkeypatch.setattr(script, "DOC", doc)
    assert script.main(["--check"]) == 1
    assert "python scripts/module_table.py --write" in capsys.readouterr().err
    assert script.main(["--write"]) == 0
    assert doc.read_text(encoding="utf-8") == script.updated(current)
    assert script.main(["--check"]) == 0
