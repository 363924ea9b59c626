"""Generate the laplace-torch 0.3 pull-request series in ``upstream/patches/``.

Two chains, each patch one pull request, applied in order with ``git apply``
to the laplace-torch 0.3 sdist from PyPI:

* ``1-curvlinops-full-device``, ``2-structure-entry-points``,
  ``3-hfl-third-party``: the CUDA fix of ``full()`` on the curvlinops
  backends, discovery of Hessian structures of installed packages by entry
  point (group ``laplace.structures``), and HFL documented as such a
  third-party structure with the extra ``laplace-torch[hfl]``;
* ``in-tree/01-...`` to ``in-tree/NN-...`` (one per part of ``intree.PARTS``) (after patch 2, instead of 3): HFL
  vendored as ``laplace/hfl/``, one file per ``laplace_hfl`` module, grouped
  by topic (``upstream/intree.py``), each part at most ``MAX_PART_LINES`` lines.

Patches are *generated*, never edited: new files come from ``laplace_hfl/``
(rewritten by ``intree.py``) and ``upstream/templates/``, edits of existing
files from ``upstream/edits.py``; new and edited Python files go through
``ruff check --fix`` and ``ruff format`` with upstream's configuration. Each PR
is one commit in a throwaway git repository of the pristine sdist; ``git diff``
of each commit, after a header with its subject and diffstat, is the patch.

Usage::

    python upstream/make_patch.py             # (re)write upstream/patches/
    python upstream/make_patch.py --check     # exit 1 if the committed patches are stale
    python upstream/make_patch.py --sdist laplace_torch-0.3.tar.gz  # no download
"""

from __future__ import annotations

import argparse
import ast
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # intree, edits: siblings, also when loaded by path

import edits  # noqa: E402
import intree  # noqa: E402
from intree import MAX_PART_LINES, GeneratorError  # noqa: E402

REPO = HERE.parent
PACKAGE = REPO / "laplace_hfl"
TEMPLATES = HERE / "templates"
PATCHES = HERE / "patches"
IN_TREE = "in-tree"
_SOURCE = {"package": PACKAGE}  # --package overrides

SDIST_SPEC = "laplace-torch==0.3"
SDIST_DIRNAME = "laplace_torch-0.3"

PACKAGE_DOCSTRING = '''"""Hessian-free Laplace (HFL): ``hessian_structure="hfl"``.

Linearised-Laplace predictive covariances ``J P^{-1} J^T`` without forming,
storing or inverting a Hessian: every column ``P^{-1} J^T`` is read off two
re-optimisations of the Laplace objective perturbed by ``-/+ eps f(x*)``,
warm-started at the MAP (J. McInerney and N. Kallus, *Hessian-Free Laplace in
Bayesian Deep Learning*, arXiv:2403.10671). Only Jacobian-vector,
vector-Jacobian and Hessian-vector products are used; memory is that of
training.
"""
'''


@dataclass(frozen=True)
class PullRequest:
    """One patch of the main chain."""

    slug: str
    subject: str
    body: str
    apply: Callable[[Path], list[str]]  # edits the tree, returns Python files touched


def _copy_template(name: str, src: Path, rel: str) -> str:
    dest = src / rel
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(TEMPLATES / name, dest)
    return rel


def _pr1(src: Path) -> list[str]:
    edits.curvlinops_full_device(src)
    return [
        "laplace/curvature/curvlinops.py",
        _copy_template(
            "test_curvlinops_full_device.py",
            src,
            "tests/test_curvlinops_full_device.py",
        ),
    ]


def _pr2(src: Path) -> list[str]:
    edits.structure_entry_points(src)
    _copy_template("docs_structure_plugins.md", src, "docs/structure_plugins.md")
    return [
        "laplace/laplace.py",
        _copy_template(
            "test_structure_plugins.py", src, "tests/test_structure_plugins.py"
        ),
    ]


def _pr3(src: Path) -> list[str]:
    edits.hfl_extra(src)
    _copy_template("docs_hfl_plugin.md", src, "docs/hfl.md")
    return [_copy_template("test_hfl_plugin.py", src, "tests/test_hfl_plugin.py")]


MAIN_CHAIN = (
    PullRequest(
        "1-curvlinops-full-device",
        "Curvlinops backends: build full()'s identity on the parameters' device and dtype",
        "FullLaplace / FullLLLaplace with the default backend (CurvlinopsGGN)\n"
        "could not fit on CUDA: full() multiplied by torch.eye() made on the CPU.",
        _pr1,
    ),
    PullRequest(
        "2-structure-entry-points",
        "Laplace(): find Hessian structures of installed packages (entry points)",
        'Packages declare [project.entry-points."laplace.structures"] name =\n'
        '"module"; Laplace() loads it when no imported class has the key, so\n'
        "third-party structures work without an import. Built-ins never load one.",
        _pr2,
    ),
    PullRequest(
        "3-hfl-third-party",
        "Docs: Hessian-free Laplace as a third-party structure, extra [hfl]",
        "docs/hfl.md, a README pointer and the optional dependency\n"
        "laplace-torch[hfl] = laplace-hfl, which declares the entry point.",
        _pr3,
    ),
)
IN_TREE_BASE = 2  # the in-tree parts apply after this many main-chain PRs


def _package_exports() -> list[tuple[str, str]]:
    """(module, name) of every name in ``laplace_hfl.__all__``."""
    tree = ast.parse((_SOURCE["package"] / "__init__.py").read_text())
    exported, where = None, {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets
        ):
            exported = ast.literal_eval(node.value)
        elif isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                where[alias.asname or alias.name] = node.module
    if exported is None:
        raise GeneratorError(f"{_SOURCE['package'] / '__init__.py'} has no __all__.")
    missing = [n for n in exported if not where.get(n, "").startswith("laplace_hfl.")]
    if missing:
        raise GeneratorError(
            f"laplace_hfl.__all__ names {missing} not imported from a submodule."
        )
    return [(where[n].removeprefix("laplace_hfl."), n) for n in exported]


def _hfl_init(exports: list[tuple[str, str]]) -> str:
    lines = [PACKAGE_DOCSTRING]
    if exports:
        lines.append("")
        lines += [f"from laplace.hfl.{m} import {n}" for m, n in exports]
        lines.append("")
        lines.append("__all__ = [" + ", ".join(f'"{n}"' for _, n in exports) + "]")
    return "\n".join(lines) + "\n"


def _apply_part(src: Path, part: intree.Part, available: set[str]) -> list[str]:
    """Write one in-tree part into ``src``; return the Python files touched."""
    touched = []
    for name in part.modules:
        rel = "laplace/hfl/" + name.replace(".", "/") + ".py"
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_text(
            intree.rewrite_module(intree.read(_SOURCE["package"], name))
        )
        touched.append(rel)
    for key in part.extra:
        if key == "package_init":
            (src / "laplace/hfl").mkdir(parents=True, exist_ok=True)
            (src / "laplace/hfl/__init__.py").write_text(_hfl_init([]))
            touched.append("laplace/hfl/__init__.py")
            (src / "laplace/hfl/engine").mkdir(parents=True, exist_ok=True)
            engine_init = _SOURCE["package"] / "engine" / "__init__.py"
            (src / "laplace/hfl/engine/__init__.py").write_text(
                intree.rewrite_module(engine_init.read_text())
            )
            touched.append("laplace/hfl/engine/__init__.py")
        elif key == "module_import_test":
            touched.append(
                _copy_template("test_hfl_modules.py", src, "tests/test_hfl_modules.py")
            )
        elif key == "package_exports":
            exports = _package_exports()
            late = sorted({m for m, _ in exports} - available)
            if late:
                raise GeneratorError(
                    f"laplace_hfl exports names of {late}, which are in no part "
                    "up to the estimator part of upstream/intree.py PARTS."
                )
            (src / "laplace/hfl/__init__.py").write_text(_hfl_init(exports))
            touched.append("laplace/hfl/__init__.py")
        elif key == "enum_docstring_exports":
            edits.hfl_enum_docstring_exports(src)
            touched += [
                "laplace/__init__.py",
                "laplace/laplace.py",
                "laplace/utils/enums.py",
            ]
        elif key == "tests_example_docs":
            touched.append(_copy_template("test_hfl.py", src, "tests/test_hfl.py"))
            touched.append(
                _copy_template("hfl_example.py", src, "examples/hfl_example.py")
            )
            _copy_template("docs_hfl.md", src, "docs/hfl.md")
            _copy_template(
                "docs_api_reference_hfl.md", src, "docs/api_reference/hfl.md"
            )
        else:  # pragma: no cover - PARTS and this switch are edited together
            raise GeneratorError(f"unknown extra {key!r} of part {part.slug}")
    return touched


# --------------------------------------------------------------------------
# driver
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
    if not files:  # ruff without files would format the whole sdist
        return
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


def _patch_text(src: Path, subject: str, body: str, after: str) -> str:
    diff_args = ["--binary", "--no-color", "--no-ext-diff", "HEAD~1", "HEAD"]
    stat = _run(["git", "diff", "--stat=78", *diff_args[3:]], cwd=src, git=True)
    diff = _run(["git", "diff", *diff_args], cwd=src, git=True)
    header = (
        f"Subject: [PATCH] {subject}\n\n{body}\n\n"
        f"Applies with `git apply` to the {SDIST_SPEC} sdist after: {after}.\n"
        "Generated by laplace-hfl's upstream/make_patch.py; do not edit.\n"
        f"---\n{stat}\n"
    )
    return header + diff


def _diff_lines(patch: str) -> int:
    """Lines of the diff proper (after the header's ``---`` line)."""
    return len(patch.split("\n---\n", 1)[1].splitlines())


def generate(sdist: Path, out: Path) -> list[Path]:
    """Write the series for ``sdist`` into ``out``; return the paths."""
    texts: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="hfl-upstream-") as tmp:
        src = unpack(sdist, Path(tmp))
        _run(["git", "init", "-q"], cwd=src, git=True)
        _run(["git", "config", "core.autocrlf", "false"], cwd=src, git=True)
        _commit(src, "laplace-torch 0.3 sdist")
        applied = ["nothing (the sdist)"]
        for i, pr in enumerate(MAIN_CHAIN):
            _ruff(src, pr.apply(src))
            _commit(src, pr.subject)
            texts[f"{pr.slug}.patch"] = _patch_text(
                src, pr.subject, pr.body, ", ".join(applied)
            )
            applied = [p for p in applied if not p.startswith("nothing")]
            applied.append(f"{pr.slug}.patch")
            if i + 1 == IN_TREE_BASE:
                _run(["git", "branch", "in-tree"], cwd=src, git=True)
        _run(["git", "checkout", "-q", "in-tree"], cwd=src, git=True)
        applied = applied[:IN_TREE_BASE]
        available: set[str] = set()
        for i, (part, modules) in enumerate(intree.assign_parts(_SOURCE["package"])):
            available |= set(modules)
            _ruff(src, _apply_part(src, part, available))
            _commit(src, part.subject)
            name = f"{IN_TREE}/{i + 1:02d}-{part.slug}.patch"
            text = _patch_text(src, part.subject, part.body, ", ".join(applied))
            if _diff_lines(text) > MAX_PART_LINES:
                raise GeneratorError(
                    f"{name}: {_diff_lines(text)} lines of diff, more than "
                    f"MAX_PART_LINES = {MAX_PART_LINES}; split part {part.slug!r} "
                    "in upstream/intree.py PARTS (move modules to a new part)."
                )
            texts[name] = text
            applied.append(name)
    written = []
    for name, text in texts.items():
        path = out / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        written.append(path)
    return written


def _patch_names(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*.patch")}


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
            fresh = Path(tmp) / "fresh"
            written = generate(sdist, fresh)  # fails before touching --out
            for old in args.out.rglob("*.patch"):
                old.unlink()
            for path in written:
                dest = args.out / path.relative_to(fresh)
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, dest)
                print(f"wrote {dest} ({_diff_lines(dest.read_text())} diff lines)")
            return 0
        fresh = Path(tmp) / "fresh"
        generate(sdist, fresh)
        stale = []
        for name in sorted(_patch_names(fresh) | _patch_names(args.out)):
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
        print(f"{args.out}: up to date with {intree.PKG}")
        return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except GeneratorError as err:
        print(f"make_patch: {err}", file=sys.stderr)
        sys.exit(2)
