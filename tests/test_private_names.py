"""No code reaches into another module's private names (read with ``ast``).

(a) No module imports a private name of a laplace_hfl module
    (``from laplace_hfl.x import _y``, relative imports included) or reads one
    through an imported module (``functional._y``).
(b) Code outside the estimator's package (``laplace_hfl/bench/``, the
    ``laplace_hfl_cli`` launcher, ``scripts/``, ``benchmarks/``, ``examples/``,
    the notebooks' code cells) touches no private attribute of an estimator or
    of an engine object: ``obj._name`` (``obj`` not ``self`` / ``cls``) where
    ``_name`` is a private member of a laplace_hfl class (a method, a class
    attribute or a ``self._name`` assignment in ``laplace_hfl/`` outside the
    bench). The private members of the laplace-torch classes the estimators
    inherit (``BaseLaplace``, ``ParametricLaplace``, ``LLLaplace``:
    ``_glm_predictive_distribution``, ``_H_factor``, ...) are laplace-torch's
    interface, which every Laplace object has, and are not counted. Other libraries' private
    names (``torch._C``, ``argparse._SubParsersAction``) and dunder names are
    not ours and not flagged.

(c) The tests (``tests/``) build estimators through their public API: no
    ``obj._name`` and no ``setattr`` / ``getattr`` / ``hasattr`` /
    ``monkeypatch.setattr(obj, "_name", ...)`` with ``_name`` a private
    member of an estimator, the laplace-torch ones included (the HFL classes
    have the public ``la.glm_predictive``). Engine internals are tested on the
    engine objects (``laplace_hfl.engine`` modules are public), and spies
    patch public module names. ``TESTS_ALLOWED`` lists the few exceptions,
    each with its reason.
"""

from __future__ import annotations

import ast
import functools
import importlib
import inspect
import json
import textwrap
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest
from laplace.baselaplace import BaseLaplace

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "laplace_hfl"
BENCH = PACKAGE / "bench"
#: Code outside the estimator's package, besides the bench.
OUTSIDE = ("laplace_hfl_cli", "scripts", "benchmarks", "examples", "notebooks")


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _files(folder: Path, suffixes=(".py", ".ipynb")) -> list[Path]:
    if not folder.exists():
        return []
    return sorted(p for p in folder.rglob("*") if p.suffix in suffixes)


def _trees(paths: list[Path]) -> Iterator[tuple[str, Path, ast.Module]]:
    """``(label, path, tree)`` of each file; one per code cell of a notebook
    (lines of IPython magics and shell escapes dropped)."""
    for path in paths:
        label = path.relative_to(ROOT).as_posix() if ROOT in path.parents else path.name
        if path.suffix == ".ipynb":
            cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
            for k, cell in enumerate(cells):
                if cell["cell_type"] != "code":
                    continue
                lines = "".join(cell["source"]).splitlines()
                code = "\n".join(
                    line for line in lines if not line.lstrip().startswith(("%", "!"))
                )
                yield f"{label} (cell {k})", path, ast.parse(code)
        else:
            yield label, path, ast.parse(path.read_text(encoding="utf-8"))


def _is_module(dotted: str) -> bool:
    """Whether ``dotted`` names a laplace_hfl module or package."""
    if not dotted.startswith(("laplace_hfl.", "laplace_hfl_cli.")) and dotted not in (
        "laplace_hfl",
        "laplace_hfl_cli",
    ):
        return False
    path = ROOT.joinpath(*dotted.split("."))
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def _absolute(node: ast.ImportFrom, path: Path) -> str:
    """The module an ``ImportFrom`` reads, relative imports resolved."""
    if not node.level:
        return node.module or ""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    base = parts[: len(parts) - node.level]
    return ".".join(base + ([node.module] if node.module else []))


def _dotted(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        head = _dotted(node.value)
        return None if head is None else f"{head}.{node.attr}"
    return None


def private_imports(label: str, path: Path, tree: ast.Module) -> list[str]:
    """Rule (a) in one file: private names of laplace_hfl modules it imports
    or reads through an imported laplace_hfl module."""
    found, modules = [], {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            source = _absolute(node, path)
            if not _is_module(source):
                continue
            for alias in node.names:
                if _private(alias.name) and not _is_module(f"{source}.{alias.name}"):
                    found.append(f"{label}:{node.lineno} imports {source}.{alias.name}")
                elif _is_module(f"{source}.{alias.name}"):
                    modules[alias.asname or alias.name] = f"{source}.{alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if _is_module(alias.name):
                    bound = alias.asname or alias.name.split(".")[0]
                    modules[bound] = alias.name if alias.asname else bound
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr):
            dotted = _dotted(node.value)
            if dotted is None or dotted.split(".")[0] not in modules:
                continue
            head, *rest = dotted.split(".")
            module = ".".join([modules[head], *rest])
            if _is_module(module) and not _is_module(f"{module}.{node.attr}"):
                found.append(f"{label}:{node.lineno} reads {module}.{node.attr}")
    return found


def private_members(trees: Iterable[ast.Module]) -> set[str]:
    """Private names classes define in ``trees``: methods, class attributes and
    ``self._name`` assignments."""
    names = set()
    for tree in trees:
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                for item in node.body:
                    if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef):
                        names.add(item.name)
                    targets = (
                        item.targets
                        if isinstance(item, ast.Assign)
                        else [item.target]
                        if isinstance(item, ast.AnnAssign)
                        else []
                    )
                    names.update(t.id for t in targets if isinstance(t, ast.Name))
            targets = (
                node.targets
                if isinstance(node, ast.Assign)
                else [node.target]
                if isinstance(node, ast.AnnAssign | ast.AugAssign)
                else []
            )
            for t in targets:
                if (
                    isinstance(t, ast.Attribute)
                    and isinstance(t.value, ast.Name)
                    and t.value.id == "self"
                ):
                    names.add(t.attr)
    return {n for n in names if _private(n)}


def _laplace_torch_interface() -> set[str]:
    """Private members of the laplace-torch classes the estimators inherit."""
    estimators = set()
    for path in PACKAGE.glob("*.py"):
        if path.stem.startswith("__"):
            continue
        module = importlib.import_module(f"laplace_hfl.{path.stem}")
        estimators |= {
            c
            for c in vars(module).values()
            if inspect.isclass(c) and issubclass(c, BaseLaplace)
        }
    upstream = {
        k
        for c in estimators
        for k in c.__mro__
        if k.__module__.split(".")[0] == "laplace"
    }
    assert BaseLaplace in upstream
    return private_members(
        ast.parse(textwrap.dedent(inspect.getsource(k))) for k in upstream
    )


@functools.cache
def _estimator_private() -> frozenset[str]:
    ours = [p for p in _files(PACKAGE, (".py",)) if BENCH not in p.parents]
    members = private_members(t for _, _, t in _trees(ours))
    return frozenset(members - _laplace_torch_interface())


def private_attributes(label: str, tree: ast.Module, names: set[str]) -> list[str]:
    """Rule (b) in one file: ``obj._name`` with ``_name`` in ``names`` and
    ``obj`` other than ``self`` / ``cls``."""
    found = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Attribute) and node.attr in names):
            continue
        if isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):
            continue
        found.append(f"{label}:{node.lineno} {ast.unparse(node)}")
    return found


def _violations(paths: list[Path], attributes: bool = True) -> list[str]:
    """Rule (a) in ``paths``; rule (b) too where ``attributes`` (and the file is
    outside the estimator's package)."""
    names = _estimator_private()
    found = []
    for label, path, tree in _trees(paths):
        found += private_imports(label, path, tree)
        if attributes and (PACKAGE not in path.parents or BENCH in path.parents):
            found += private_attributes(label, tree, names)
    return sorted(set(found))


def _outside_bench() -> list[Path]:
    package = [p for p in _files(PACKAGE, (".py",)) if BENCH not in p.parents]
    return package + [p for d in OUTSIDE for p in _files(ROOT / d)]


#: ``(test file, private name)`` -> why the tests use it (rule (c)).
TESTS_ALLOWED = {
    ("tests/conftest.py", "_glm_predictive_distribution"): (
        "reference_glm_predictive: laplace-torch's own classes (FullLaplace, "
        "KronLaplace) used as references have no public GLM covariance"
    ),
    ("tests/test_fit_time_curvature.py", "_fit_curvature"): (
        "switched off to reproduce the lazy path (no GGN at fit) as the "
        "bitwise baseline of the eager one; no option selects it"
    ),
}
#: laplace-torch's registry: its ``Laplace()`` factory finds a class by ``_key``.
LAPLACE_TORCH_REGISTRY = frozenset({"_key"})
_ATTRIBUTE_CALLS = ("setattr", "getattr", "hasattr", "delattr")


def private_strings(label: str, tree: ast.Module, names: set[str]) -> list[str]:
    """``setattr(obj, "_name", ...)`` and the like (``monkeypatch.setattr``
    included) with ``_name`` in ``names``."""
    found = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and len(node.args) >= 2):
            continue
        func = node.func
        called = (
            func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        )
        name = node.args[1]
        if (
            called in _ATTRIBUTE_CALLS
            and isinstance(name, ast.Constant)
            and name.value in names
        ):
            found.append(f"{label}:{node.lineno} {called} {name.value!r}")
    return found


def _test_violations() -> list[str]:
    """Rule (c) in ``tests/``, less ``TESTS_ALLOWED``."""
    names = set(_estimator_private() | _laplace_torch_interface())
    names -= LAPLACE_TORCH_REGISTRY
    found = []
    for label, _, tree in _trees(_files(ROOT / "tests", (".py",))):
        for hit in private_attributes(label, tree, names) + private_strings(
            label, tree, names
        ):
            name = hit.rsplit(None, 1)[-1].strip("'").rsplit(".", 1)[-1]
            if (label, name) not in TESTS_ALLOWED:
                found.append(hit)
    return sorted(found)


def _report(found: list[str]) -> str:
    return (
        f"{len(found)} uses of private names across modules (use or add a public "
        "name instead):\n  " + "\n  ".join(found)
    )


def test_the_rules_catch_what_they_are_for():
    """Each rule flags its pattern and leaves others' private names alone."""
    code = ast.parse(
        "import torch, argparse\n"
        "from laplace_hfl.engine.functional import ggn_matvec, _data_term\n"
        "from laplace_hfl.engine import functional\n"
        "import laplace_hfl.engine.refit as refit\n"
        "functional._prior_grad(obj, th)\n"
        "refit._raise_indefinite\n"
        "torch._C, argparse._SubParsersAction, la.__dict__, self._lock\n"
        "la._objective(); self.la._fitted; hfl._glm_predictive_distribution(x)\n"
    )
    where = PACKAGE / "bench" / "example.py"
    assert sorted(private_imports("x", where, code)) == [
        "x:2 imports laplace_hfl.engine.functional._data_term",
        "x:5 reads laplace_hfl.engine.functional._prior_grad",
        "x:6 reads laplace_hfl.engine.refit._raise_indefinite",
    ]
    relative = ast.parse("from ..engine.functional import _data_term\n")
    assert private_imports("y", where, relative) == [
        "y:1 imports laplace_hfl.engine.functional._data_term"
    ]
    names = _estimator_private()
    assert {"_objective", "_fitted"} <= names
    assert "_glm_predictive_distribution" not in names  # laplace-torch's
    assert sorted(private_attributes("x", code, names)) == [
        "x:8 la._objective",
        "x:8 self.la._fitted",
    ]
    spies = ast.parse(
        'monkeypatch.setattr(SolverMixin, "_fit_curvature", f)\n'
        'getattr(la, "_fitted"); setattr(mod, "_flops", 1); hasattr(la, "fit")\n'
    )
    assert private_strings("t", spies, names) == [
        "t:1 setattr '_fit_curvature'",
        "t:2 getattr '_fitted'",
    ]


def test_no_private_imports_or_estimator_internals_outside_the_bench():
    """Strict: rule (a) in the package outside the bench and in every folder
    outside the package; rule (b) in the launcher, examples and notebooks."""
    found = _violations(_outside_bench(), attributes=False)
    strict_b = [
        p
        for d in ("laplace_hfl_cli", "examples", "notebooks")
        for p in _files(ROOT / d)
    ]
    found += _violations(strict_b)
    assert not found, _report(found)


@pytest.mark.parametrize(
    "folders",
    [("laplace_hfl/bench",), ("scripts", "benchmarks")],
    ids=["bench", "scripts"],
)
def test_no_private_names_in(folders):
    """Strict: the bench, scripts and benchmarks reach the estimator through
    its public seam for tools (``la.objective()``, ``la.query_inputs``,
    ``la.glm_predictive``, ``la.refit_preconditioner``, ...)."""
    found = _violations([p for d in folders for p in _files(ROOT / d)])
    assert not found, _report(found)


def test_tests_use_the_public_api():
    """Strict: the tests reach the estimators through their public API
    (``la.glm_predictive``, ``la.objective()``, ``la.amortized_samples()``,
    ``la.refit_preconditioner()``, ``la.last_diagnostics``, ...) and test
    engine internals on the engine objects; ``TESTS_ALLOWED`` are the
    exceptions, each still in use."""
    found = _test_violations()
    assert not found, _report(found)
    names = _estimator_private() | _laplace_torch_interface()
    used = set()
    for label, _, tree in _trees(_files(ROOT / "tests", (".py",))):
        for hit in private_attributes(label, tree, names) + private_strings(
            label, tree, names
        ):
            used.add((label, hit.rsplit(None, 1)[-1].strip("'").rsplit(".", 1)[-1]))
    assert set(TESTS_ALLOWED) <= used, "stale TESTS_ALLOWED entries"
