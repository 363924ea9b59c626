"""The upstream patch series (upstream/) is generated from this package and
changes existing laplace-torch files only in the enum, docstrings and exports.

The full check (fresh venv, upstream-style tests, example, ruff) is
``bash upstream/verify.sh``; these tests are the fast part of it.
"""

from __future__ import annotations

import ast
import importlib.util
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

UPSTREAM = Path(__file__).resolve().parents[1] / "upstream"
PATCHES = sorted((UPSTREAM / "patches").glob("*.patch"))
EXISTING_ALLOWED = {
    "laplace/__init__.py",
    "laplace/laplace.py",
    "laplace/utils/enums.py",
}
NEW_EXPECTED = {
    "laplace/hfl.py",
    "docs/hfl.md",
    "docs/api_reference/hfl.md",
    "examples/hfl_example.py",
    "tests/test_hfl.py",
}


def _load_make_patch():
    spec = importlib.util.spec_from_file_location(
        "make_patch", UPSTREAM / "make_patch.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def make_patch():
    return _load_make_patch()


@pytest.fixture(scope="module")
def sdist(tmp_path_factory):
    dest = tmp_path_factory.mktemp("sdist")
    res = subprocess.run(
        [
            sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary",
            "laplace-torch", "laplace-torch==0.3", "-d", str(dest), "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )  # fmt: skip
    path = dest / "laplace_torch-0.3.tar.gz"
    if res.returncode or not path.is_file():
        pytest.skip(f"cannot download the laplace-torch 0.3 sdist: {res.stderr[-300:]}")
    return path


def _diff_files(patch: Path) -> tuple[set[str], set[str]]:
    """(existing files changed, files added) by a git patch."""
    text = patch.read_text()
    existing, added = set(), set()
    for old, new in re.findall(r"^--- (\S+)\n\+\+\+ (\S+)$", text, flags=re.M):
        if old == "/dev/null":
            added.add(new.removeprefix("b/"))
        else:
            existing.add(old.removeprefix("a/"))
    return existing, added


def test_patch_series_present():
    assert [p.name[:4] for p in PATCHES] == ["0001", "0002", "0003"]


def test_patch_touches_only_allowed_files():
    existing, added = set(), set()
    for patch in PATCHES:
        e, a = _diff_files(patch)
        existing |= e
        added |= a
    assert existing == EXISTING_ALLOWED
    assert added == NEW_EXPECTED


def test_generated_module_is_self_contained(make_patch):
    text = make_patch.build_module()
    tree = ast.parse(text)
    assert "laplace_hfl" not in text
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            top = node.module.split(".")[0]
            assert top in {"__future__", "laplace", "torch", "tqdm"} or (
                top in sys.stdlib_module_names
            ), node.module
    names = {n.name for n in tree.body if isinstance(n, ast.ClassDef | ast.FunctionDef)}
    assert {"HessianFreeLaplace", "HessianFreeLLLaplace"} <= names


def _strip_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if not isinstance(body, list):
            continue
        node.body = [
            s
            for s in body
            if not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant))
        ] or [ast.Pass()]
    return tree


def _apply(sdist: Path, dest: Path) -> tuple[Path, Path]:
    with tarfile.open(sdist) as tar:
        tar.extractall(dest / "old", filter="data")
        tar.extractall(dest / "new", filter="data")
    old, new = dest / "old" / "laplace_torch-0.3", dest / "new" / "laplace_torch-0.3"
    for patch in PATCHES:
        subprocess.run(["git", "apply", "--check", str(patch)], cwd=new, check=True)
        subprocess.run(["git", "apply", str(patch)], cwd=new, check=True)
    return old, new


def test_existing_files_change_only_enum_docstrings_exports(sdist, tmp_path):
    old, new = _apply(sdist, tmp_path)

    def tree(root: Path, rel: str) -> ast.Module:
        return _strip_docstrings(ast.parse((root / rel).read_text()))

    # laplace.py: docstrings only.
    assert ast.dump(tree(old, "laplace/laplace.py")) == ast.dump(
        tree(new, "laplace/laplace.py")
    )
    # enums.py: one member HFL = "hfl" added to HessianStructure.
    t_old, t_new = (
        tree(old, "laplace/utils/enums.py"),
        tree(new, "laplace/utils/enums.py"),
    )
    for c_old, c_new in zip(t_old.body, t_new.body, strict=True):
        if getattr(c_new, "name", None) == "HessianStructure":
            added = [ast.unparse(s) for s in c_new.body[len(c_old.body) :]]
            assert added == ["HFL = 'hfl'"]
            c_new.body = c_new.body[: len(c_old.body)]
        assert ast.dump(c_old) == ast.dump(c_new)
    # __init__.py: one import from laplace.hfl and two __all__ entries.
    t_old, t_new = tree(old, "laplace/__init__.py"), tree(new, "laplace/__init__.py")
    extra = [
        s
        for s in t_new.body
        if isinstance(s, ast.ImportFrom) and s.module == "laplace.hfl"
    ]
    assert [a.name for a in extra[0].names] == [
        "HessianFreeLaplace",
        "HessianFreeLLLaplace",
    ]
    t_new.body.remove(extra[0])
    exports_new = ast.literal_eval(t_new.body[-1].value)
    exports_old = ast.literal_eval(t_old.body[-1].value)
    hfl = ["HessianFreeLaplace", "HessianFreeLLLaplace"]
    assert [n for n in exports_new if n in hfl] == hfl
    assert [n for n in exports_new if n not in hfl] == exports_old
    t_new.body[-1] = t_old.body[-1]
    assert ast.dump(t_old) == ast.dump(t_new)


@pytest.mark.skipif(
    shutil.which("ruff") is None and importlib.util.find_spec("ruff") is None,
    reason="ruff is needed to regenerate the patch",
)
def test_committed_patches_match_package_source(make_patch, sdist, capsys):
    """Drift check: regenerating from laplace_hfl gives the committed patches."""
    rc = make_patch.main(["--check", "--sdist", str(sdist)])
    assert rc == 0, capsys.readouterr().err
