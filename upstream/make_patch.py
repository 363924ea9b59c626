"""Generate the laplace-torch 0.3 patch series that adds ``hessian_structure="hfl"``.

The estimator module of the patch is *generated* from the source of the
``laplace_hfl`` package, so the plugin and the upstream patch cannot drift:

1. the modules that ``laplace_hfl.hessian_free`` and ``laplace_hfl.last_layer``
   import (transitively) are put in dependency order and concatenated into one
   module ``laplace/hfl.py``; imports of ``laplace_hfl`` are removed (top-level
   and function-local), the remaining imports merged, the per-module
   ``__all__`` replaced by one, module docstrings kept as section comments;
2. ``HessianStructure.HFL`` is added to ``laplace/utils/enums.py``, the
   ``Laplace`` docstring of ``laplace/laplace.py`` mentions ``'hfl'`` and
   ``laplace/__init__.py`` exports the two classes;
3. ``docs/``, ``examples/hfl_example.py`` and ``tests/test_hfl.py`` come from
   ``upstream/templates``;
4. new Python files are run through ``ruff check --fix`` and ``ruff format``
   with upstream's configuration (the sdist's ``pyproject.toml``).

Each step is one commit in a throwaway git repository holding the pristine
sdist; ``git diff`` of each commit is written to ``upstream/patches``.

Usage::

    python upstream/make_patch.py             # (re)write upstream/patches/
    python upstream/make_patch.py --check     # exit 1 if the committed patches are stale
    python upstream/make_patch.py --sdist laplace_torch-0.3.tar.gz  # no download
"""

from __future__ import annotations

import argparse
import ast
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PACKAGE = REPO / "laplace_hfl"
TEMPLATES = HERE / "templates"
_SOURCE = {"package": PACKAGE}  # --package overrides
PATCHES = HERE / "patches"

PKG = "laplace_hfl"
SDIST_SPEC = "laplace-torch==0.3"
SDIST_DIRNAME = "laplace_torch-0.3"
MODULE_PATH = "laplace/hfl.py"  # the new upstream module
ROOTS = ("hessian_free", "last_layer")  # modules defining the public classes
READING_ORDER = (
    "errors", "functional", "solvers", "refit", "predictive", "_docs", "options",
    "weight_space", "tuning", "prediction", "state", "base",
    "hessian_free", "last_layer",
)  # fmt: skip
EXPORTS = ("HessianFreeLaplace", "HessianFreeLLLaplace")


def _package_all() -> tuple[str, ...]:
    """The package's own ``__all__`` (one source of truth for the exports)."""
    tree = ast.parse((PACKAGE / "__init__.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets
        ):
            return tuple(ast.literal_eval(node.value))
    raise SystemExit(f"{PACKAGE / '__init__.py'} defines no __all__")


MODULE_ALL = _package_all()

MODULE_DOCSTRING = '''"""Hessian-free Laplace (HFL): ``hessian_structure="hfl"``.

Linearised-Laplace predictive covariances ``J P^{-1} J^T`` without forming,
storing or inverting a Hessian: every column ``P^{-1} J^T`` is read off two
re-optimisations of the Laplace objective perturbed by ``-/+ eps f(x*)``,
warm-started at the MAP (J. McInerney and N. Kallus, *Hessian-Free Laplace in
Bayesian Deep Learning*, arXiv:2403.10671). Only Jacobian-vector,
vector-Jacobian and Hessian-vector products are used; memory is that of
training.

``HessianFreeLaplace`` (``subset_of_weights="all"``) and
``HessianFreeLLLaplace`` (``"last_layer"``) converge to ``FullLaplace`` /
``FullLLLaplace`` with a GGN backend (``target="ggn"``, the default) or, for
all weights, to exact-Hessian Laplace (``target="hessian"``).
"""
'''

PATCH_SERIES = (
    (
        "0001-hfl-estimator.patch",
        "Add Hessian-free Laplace estimator module laplace/hfl.py",
        "Generated from the laplace_hfl package by upstream/make_patch.py.",
    ),
    (
        "0002-hfl-enum-exports-docs.patch",
        "Register hessian_structure='hfl': enum member, docstrings, exports, docs",
        "Existing files change only in the HessianStructure enum, the Laplace\n"
        "docstring and the exports of laplace/__init__.py.",
    ),
    (
        "0003-hfl-tests-example.patch",
        "Add tests/test_hfl.py and examples/hfl_example.py",
        "Dense float64 references: FullLaplace (GGN / exact Hessian), FullLLLaplace.",
    ),
)


class GeneratorError(RuntimeError):
    """The package source has a shape the generator cannot translate."""


# --------------------------------------------------------------------------
# 1. one module from the package source
# --------------------------------------------------------------------------
def _pkg_module(node: ast.ImportFrom | ast.Import, current: str) -> str | None:
    """Name of the ``laplace_hfl`` submodule an import refers to, else None."""
    if isinstance(node, ast.Import):
        for alias in node.names:
            if alias.name == PKG or alias.name.startswith(PKG + "."):
                raise GeneratorError(
                    f"{current}.py: 'import {alias.name}' is not supported; use "
                    f"'from {PKG}.<module> import <name>'."
                )
        return None
    if node.level:
        if node.level != 1 or not node.module:
            raise GeneratorError(f"{current}.py: unsupported relative import.")
        return node.module
    if node.module == PKG:
        raise GeneratorError(
            f"{current}.py: 'from {PKG} import ...' is not supported; import "
            "from the defining submodule."
        )
    if node.module and node.module.startswith(PKG + "."):
        return node.module[len(PKG) + 1 :]
    return None


def _parse(name: str) -> tuple[str, ast.Module]:
    path = _SOURCE["package"] / f"{name}.py"
    if not path.is_file():
        raise GeneratorError(f"{PKG}.{name} is imported but {path} does not exist.")
    text = path.read_text()
    return text, ast.parse(text)


def _dependency_order() -> list[str]:
    """Modules reachable from ROOTS, dependencies first.

    Ties are broken by ``READING_ORDER`` (modules not listed there come after,
    by name), so the generated module reads bottom-up: errors, numerics, shell.
    """
    deps: dict[str, set[str]] = {}
    todo = list(ROOTS)
    while todo:
        name = todo.pop()
        if name in deps:
            continue
        _, tree = _parse(name)
        deps[name] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                dep = _pkg_module(node, name)
                if dep is not None and dep != name:
                    deps[name].add(dep)
                    todo.append(dep)

    def rank(name: str) -> tuple[int, str]:
        known = name in READING_ORDER
        return (READING_ORDER.index(name) if known else len(READING_ORDER), name)

    order: list[str] = []
    while len(order) < len(deps):
        ready = [n for n in deps if n not in order and deps[n] <= set(order)]
        if not ready:
            cycle = sorted(set(deps) - set(order))
            raise GeneratorError(f"Import cycle among {PKG} modules {cycle}.")
        order.append(min(ready, key=rank))
    return order


def _import_key(node: ast.stmt) -> str:
    return ast.unparse(node)


def _rewrite_references(text: str, modules: list[str]) -> str:
    """Point docstring/comment references to the package at the new module."""
    # Doctest lines that import the plugin make no sense upstream.
    text = re.sub(rf"^[ \t]*>>> import {PKG}\b.*\n", "", text, flags=re.M)

    def qualified(m: re.Match[str]) -> str:
        last = m.group(2)
        return "laplace.hfl" if last in modules else last

    text = re.sub(rf"~?{PKG}((?:\.\w+)*)\.(\w+)", qualified, text)
    text = text.replace(PKG, "laplace.hfl")
    return text.replace("laplace-hfl", "HFL")


def build_module() -> str:
    """The text of ``laplace/hfl.py`` before ruff."""
    modules = _dependency_order()
    imports: dict[str, None] = {}  # ordered set of unparsed import statements
    bodies: list[str] = []
    defined: dict[str, str] = {}
    for name in modules:
        text, tree = _parse(name)
        lines = text.splitlines(keepends=True)
        drop: set[int] = set()  # 0-based line numbers
        docstring = ast.get_docstring(tree, clean=True)

        def drop_node(node: ast.stmt) -> None:
            drop.update(range(node.lineno - 1, node.end_lineno))

        for i, node in enumerate(tree.body):
            if (
                i == 0
                and isinstance(node, ast.Expr)
                and isinstance(node.value, ast.Constant)
            ):
                drop_node(node)  # module docstring: kept as a comment below
            elif isinstance(node, ast.Import | ast.ImportFrom):
                drop_node(node)
                if isinstance(node, ast.ImportFrom) and node.module == "__future__":
                    continue
                if _pkg_module(node, name) is None:
                    imports[_import_key(node)] = None
            elif isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets
            ):
                drop_node(node)
            else:
                for target in _defined_names(node):
                    if target in defined:
                        raise GeneratorError(
                            f"{target!r} is defined in both {defined[target]}.py "
                            f"and {name}.py; rename one (they share one module "
                            "upstream)."
                        )
                    defined[target] = name
        # Function-local imports of the package: the names are module-level now.
        for node in ast.walk(tree):
            for field in ("body", "orelse", "finalbody"):
                stmts = getattr(node, field, None)
                if not isinstance(stmts, list) or node is tree:
                    continue
                for stmt in stmts:
                    if isinstance(stmt, ast.Import | ast.ImportFrom):
                        if _pkg_module(stmt, name) is None:
                            continue
                        if len(stmts) == 1:
                            raise GeneratorError(
                                f"{name}.py:{stmt.lineno}: a block holding only a "
                                f"{PKG} import cannot be removed."
                            )
                        drop_node(stmt)
        kept = "".join(line for i, line in enumerate(lines) if i not in drop)
        kept = re.sub(r"\n{3,}", "\n\n\n", kept).strip("\n")
        header = ""
        if docstring:
            header = "".join(
                f"# {line}".rstrip() + "\n" for line in docstring.splitlines()
            )
            header = f"# {'-' * 76}\n{header}# {'-' * 76}\n\n"
        bodies.append(header + kept + "\n")
    missing = [n for n in MODULE_ALL if n not in defined]
    if missing:
        raise GeneratorError(f"Names of __all__ not defined by the package: {missing}")
    all_block = "__all__ = [\n" + "".join(f'    "{n}",\n' for n in MODULE_ALL) + "]\n"
    text = (
        MODULE_DOCSTRING
        + "\nfrom __future__ import annotations\n\n"
        + "\n".join(imports)
        + "\n\n"
        + all_block
        + "\n\n"
        + "\n\n".join(bodies)
    )
    text = _rewrite_references(text, modules)
    leftover = [ln for ln in text.splitlines() if "laplace_hfl" in ln]
    if leftover:
        raise GeneratorError(f"References to {PKG} survived: {leftover}")
    ast.parse(text)
    return text


def _defined_names(node: ast.stmt) -> list[str]:
    if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
        return [node.name]
    if isinstance(node, ast.Assign):
        return [t.id for t in node.targets if isinstance(t, ast.Name)]
    if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
        return [node.target.id]
    return []


# --------------------------------------------------------------------------
# 2. edits of existing upstream files (enum, docstring, exports)
# --------------------------------------------------------------------------
def _replace_once(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    if text.count(old) != 1:
        raise GeneratorError(f"{path}: expected exactly one {old!r}.")
    path.write_text(text.replace(old, new))


def edit_existing(src: Path) -> None:
    _replace_once(
        src / "laplace/utils/enums.py",
        '    GP = "gp"\n    """Functional Laplace."""\n',
        '    GP = "gp"\n    """Functional Laplace."""\n\n'
        '    HFL = "hfl"\n'
        '    """Hessian-free Laplace: GLM predictive from perturbed refits, no Hessian."""\n',
    )
    _replace_once(
        src / "laplace/laplace.py",
        "    hessian_structure : HessianStructure or str in "
        "{'diag', 'kron', 'full', 'lowrank', 'gp'}, "
        "default=HessianStructure.KRON\n"
        "        structure of the Hessian approximation (note that in case of 'gp',\n"
        "        we are not actually doing any Hessian approximation, the inference "
        "is instead done in the functional space)\n",
        "    hessian_structure : HessianStructure or str in "
        "{'diag', 'kron', 'full', 'lowrank', 'gp', 'hfl'}, "
        "default=HessianStructure.KRON\n"
        "        structure of the Hessian approximation (note that in case of 'gp',\n"
        "        we are not actually doing any Hessian approximation, the inference "
        "is instead done in the functional space)\n"
        "        'hfl' (Hessian-free Laplace, `subset_of_weights` 'all' or "
        "'last_layer') forms\n"
        "        no Hessian: GLM predictive covariances are estimated by "
        "perturbed refits of\n"
        "        the MAP and converge to 'full' with a GGN backend; no marginal "
        "likelihood.\n",
    )
    init = src / "laplace/__init__.py"
    _replace_once(
        init,
        "from laplace.laplace import Laplace\n",
        f"from laplace.hfl import {', '.join(EXPORTS)}\n"
        "from laplace.laplace import Laplace\n",
    )
    _replace_once(
        init,
        '    "DiagSubnetLaplace",  # subnetwork\n',
        '    "DiagSubnetLaplace",  # subnetwork\n'
        + "".join(f'    "{n}",\n' for n in EXPORTS[:-1])
        + f'    "{EXPORTS[-1]}",  # Hessian-free\n',
    )


# --------------------------------------------------------------------------
# 3. driver
# --------------------------------------------------------------------------
def _run(cmd: list[str], cwd: Path, git: bool = False) -> str:
    env = dict(os.environ)
    if git:  # reproducible commits, no user or system git config
        env |= {
            "GIT_AUTHOR_NAME": "laplace-hfl",
            "GIT_AUTHOR_EMAIL": "laplace-hfl@users.noreply.github.com",
            "GIT_COMMITTER_NAME": "laplace-hfl",
            "GIT_COMMITTER_EMAIL": "laplace-hfl@users.noreply.github.com",
            "GIT_CONFIG_NOSYSTEM": "1",
            "GIT_CONFIG_GLOBAL": os.devnull,
        }
    res = subprocess.run(
        cmd, cwd=cwd, env=env, capture_output=True, text=True, check=False
    )
    if res.returncode:
        raise GeneratorError(
            f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stdout}{res.stderr}"
        )
    return res.stdout


def download_sdist(dest: Path) -> Path:
    _run(
        [
            sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary",
            "laplace-torch", SDIST_SPEC, "-d", str(dest), "--quiet",
        ],
        cwd=dest,
    )  # fmt: skip
    found = sorted(dest.glob("laplace_torch-0.3.tar.gz"))
    if not found:
        raise GeneratorError(f"pip download left no sdist in {dest}.")
    return found[0]


def unpack(sdist: Path, dest: Path) -> Path:
    with tarfile.open(sdist) as tar:
        tar.extractall(dest, filter="data")
    src = dest / SDIST_DIRNAME
    if not (src / "laplace" / "__init__.py").is_file():
        raise GeneratorError(f"{sdist} does not unpack to {SDIST_DIRNAME}/laplace.")
    return src


def _ruff(src: Path, files: list[str]) -> None:
    ruff = shutil.which("ruff")
    cmd = [ruff] if ruff else [sys.executable, "-m", "ruff"]
    # cwd=src: ruff uses the sdist's pyproject.toml and sees `laplace` as first party.
    _run([*cmd, "check", "--fix", "--quiet", *files], cwd=src)
    _run([*cmd, "format", "--quiet", *files], cwd=src)
    _run([*cmd, "check", "--quiet", *files], cwd=src)


def ruff_version() -> str:
    ruff = shutil.which("ruff")
    cmd = [ruff] if ruff else [sys.executable, "-m", "ruff"]
    return _run([*cmd, "--version"], cwd=HERE).strip()


def _commit(src: Path, message: str) -> None:
    _run(["git", "add", "-A"], cwd=src, git=True)
    _run(["git", "commit", "-q", "--no-verify", "-m", message], cwd=src, git=True)


def _copy_template(name: str, src: Path, rel: str) -> None:
    dest = src / rel
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(TEMPLATES / name, dest)


def generate(sdist: Path, out: Path) -> list[Path]:
    """Write the patch series for ``sdist`` into ``out``; return the paths."""
    with tempfile.TemporaryDirectory(prefix="hfl-upstream-") as tmp:
        src = unpack(sdist, Path(tmp))
        _run(["git", "init", "-q"], cwd=src, git=True)
        _run(["git", "config", "core.autocrlf", "false"], cwd=src, git=True)
        _commit(src, "laplace-torch 0.3 sdist")

        (src / MODULE_PATH).write_text(build_module())
        _ruff(src, [MODULE_PATH])
        _commit(src, PATCH_SERIES[0][1])

        edit_existing(src)
        _copy_template("docs_hfl.md", src, "docs/hfl.md")
        _copy_template("docs_api_reference_hfl.md", src, "docs/api_reference/hfl.md")
        _ruff(src, ["laplace/__init__.py", "laplace/laplace.py", "laplace/utils/enums.py"])  # fmt: skip
        _commit(src, PATCH_SERIES[1][1])

        _copy_template("test_hfl.py", src, "tests/test_hfl.py")
        _copy_template("hfl_example.py", src, "examples/hfl_example.py")
        _ruff(src, ["tests/test_hfl.py", "examples/hfl_example.py"])
        _commit(src, PATCH_SERIES[2][1])

        out.mkdir(parents=True, exist_ok=True)
        written = []
        for i, (fname, subject, body) in enumerate(PATCH_SERIES):
            diff = _run(
                ["git", "diff", "--binary", "--no-color", "--no-ext-diff",
                 f"HEAD~{3 - i}", f"HEAD~{2 - i}"],
                cwd=src,
                git=True,
            )  # fmt: skip
            header = (
                f"Subject: [PATCH {i + 1}/{len(PATCH_SERIES)}] {subject}\n\n"
                f"{body}\n"
                f"Apply to the {SDIST_SPEC} sdist with `git apply`.\n"
                "Generated by laplace-hfl's upstream/make_patch.py; do not edit.\n"
                "---\n"
            )
            path = out / fname
            path.write_text(header + diff)
            written.append(path)
        return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sdist", type=Path, help="laplace-torch 0.3 sdist tarball")
    parser.add_argument("--out", type=Path, default=PATCHES)
    parser.add_argument(
        "--package",
        type=Path,
        default=PACKAGE,
        help="laplace_hfl source folder (default: this checkout's)",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="regenerate into a temporary folder and compare with --out",
    )
    args = parser.parse_args(argv)
    _SOURCE["package"] = args.package.resolve()
    with tempfile.TemporaryDirectory(prefix="hfl-sdist-") as tmp:
        sdist = args.sdist or download_sdist(Path(tmp))
        if not args.check:
            for old in args.out.glob("*.patch"):
                old.unlink()
            for path in generate(sdist, args.out):
                print(f"wrote {path}")
            return 0
        fresh = Path(tmp) / "fresh"
        generate(sdist, fresh)
        stale = []
        names = {p.name for p in fresh.glob("*.patch")} | {
            p.name for p in args.out.glob("*.patch")
        }
        for name in sorted(names):
            a, b = fresh / name, args.out / name
            if not (a.is_file() and b.is_file() and a.read_bytes() == b.read_bytes()):
                stale.append(name)
        if stale:
            print(
                f"Stale patches in {args.out}: {stale} ({ruff_version()}). "
                "Run `python upstream/make_patch.py` and commit the result.",
                file=sys.stderr,
            )
            return 1
        print(f"{args.out}: up to date with {PKG}")
        return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except GeneratorError as err:
        print(f"make_patch: {err}", file=sys.stderr)
        sys.exit(2)
