"""The upstream pull-request series (upstream/) is generated from this package,
each PR touches only what it says, and the in-tree parts stay reviewable.

The full check (every PR applied in order to the sdist, its tests, laplace-
torch's own suite, ruff) is ``bash upstream/verify.sh``; these are its fast
parts, plus the generator's refusals.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
UPSTREAM = REPO / "upstream"
PATCHES = UPSTREAM / "patches"


def _load_make_patch():
    spec = importlib.util.spec_from_file_location(
        "make_patch", UPSTREAM / "make_patch.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
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


def test_series_layout(make_patch):
    names = sorted(str(p.relative_to(PATCHES)) for p in PATCHES.rglob("*.patch"))
    main = [f"{pr.slug}.patch" for pr in make_patch.MAIN_CHAIN]
    parts = [
        f"in-tree/{i + 1:02d}-{part.slug}.patch"
        for i, part in enumerate(make_patch.intree.PARTS)
    ]
    assert names == sorted(main + parts)


@pytest.mark.parametrize(
    ("name", "existing", "added"),
    [
        (
            "1-curvlinops-full-device.patch",
            {"laplace/curvature/curvlinops.py"},
            {"tests/test_curvlinops_full_device.py"},
        ),
        (
            "2-structure-entry-points.patch",
            {"laplace/laplace.py"},
            {"tests/test_structure_plugins.py", "docs/structure_plugins.md"},
        ),
        (
            "3-hfl-third-party.patch",
            {"pyproject.toml", "README.md"},
            {"tests/test_hfl_plugin.py", "docs/hfl.md"},
        ),
    ],
)
def test_pull_request_touches_only_its_files(name, existing, added):
    assert _diff_files(PATCHES / name) == (existing, added)


def test_in_tree_parts_add_the_estimators_modules_and_stay_small(make_patch):
    existing, added, sizes = set(), set(), {}
    for patch in sorted(PATCHES.glob("in-tree/*.patch")):
        e, a = _diff_files(patch)
        existing |= e
        added |= a
        sizes[patch.name] = make_patch._diff_lines(patch.read_text())
    # Existing upstream files change only for the enum, docstring and exports.
    assert existing - added == {
        "laplace/__init__.py",
        "laplace/laplace.py",
        "laplace/utils/enums.py",
    }
    graph = make_patch.intree.module_graph(make_patch.PACKAGE)
    modules = {p for p in added if p.startswith("laplace/hfl/")}
    assert modules == {"laplace/hfl/" + m.replace(".", "/") + ".py" for m in graph} | {
        "laplace/hfl/__init__.py",
        "laplace/hfl/engine/__init__.py",
    }
    assert max(sizes.values()) <= make_patch.MAX_PART_LINES, sizes


def test_entry_point_group_matches_pyproject():
    """The group laplace-torch reads (PR 2) is the one this package declares."""
    text = (PATCHES / "2-structure-entry-points.patch").read_text()
    (group,) = re.findall(r'^\+STRUCTURE_ENTRY_POINTS = "([^"]+)"$', text, flags=re.M)
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert declared["entry-points"][group] == {"hfl": "laplace_hfl"}


@pytest.mark.parametrize(
    ("parts", "modules", "match"),
    [
        (  # a new module the estimator imports, in no part
            [("a", ("hessian_free", "last_layer"))],
            {"hessian_free": "from laplace_hfl.new import x\n", "new": "x = 1\n"},
            "in no part.*new",
        ),
        (  # a module importing one of a later part
            [("early", ("hessian_free",)), ("late", ("last_layer", "new"))],
            {"hessian_free": "from laplace_hfl.new import x\n", "new": "x = 1\n"},
            "hessian_free.*later part",
        ),
        (  # a listed module the estimator no longer imports
            [("a", ("hessian_free", "last_layer", "gone"))],
            {"hessian_free": ""},
            "gone.*no longer imports",
        ),
    ],
)
def test_generator_refuses_bad_part_assignment(
    make_patch, tmp_path, monkeypatch, parts, modules, match
):
    intree = make_patch.intree
    parts = tuple(intree.Part(slug, slug, slug, names) for slug, names in parts)
    monkeypatch.setattr(intree, "PARTS", parts)
    pkg = tmp_path / "laplace_hfl"
    pkg.mkdir()
    for name, text in {"last_layer": "", **modules}.items():
        (pkg / f"{name}.py").write_text(text)
    with pytest.raises(intree.GeneratorError, match=match):
        intree.assign_parts(pkg)


def test_generator_refuses_part_over_size_limit(make_patch, sdist, monkeypatch):
    monkeypatch.setattr(make_patch, "MAX_PART_LINES", 100)
    with pytest.raises(make_patch.GeneratorError, match="more than MAX_PART_LINES"):
        make_patch.generate(sdist, UPSTREAM / "never-written")
    assert not (UPSTREAM / "never-written").exists()


def test_rewritten_module_refers_to_laplace_hfl_subpackage(make_patch):
    text = make_patch.intree.rewrite_module(
        '"""See :mod:`laplace_hfl.engine.refit` (laplace-hfl)."""\n'
        "from laplace_hfl.errors import HFLError\n"
    )
    assert text == (
        '"""See :mod:`laplace.hfl.engine.refit` (HFL)."""\n'
        "from laplace.hfl.errors import HFLError\n"
    )


@pytest.mark.skipif(
    shutil.which("ruff") is None and importlib.util.find_spec("ruff") is None,
    reason="ruff is needed to regenerate the patches",
)
def test_committed_patches_match_package_source(make_patch, sdist, capsys):
    """Drift check: regenerating from laplace_hfl gives the committed patches."""
    rc = make_patch.main(["--check", "--sdist", str(sdist)])
    assert rc == 0, capsys.readouterr().err
