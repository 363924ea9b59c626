"""Run laplace-torch's own test-suite with the HFL classes added to its flavour lists.

Nothing is fetched at run time: point ``--tests`` at the ``tests/`` folder of a
laplace-torch checkout or sdist you have (for example ``git clone
https://github.com/aleximmer/Laplace`` at the installed version)::

    python scripts/upstream_suite.py --tests /path/to/Laplace/tests
    python scripts/upstream_suite.py --tests ... -k overriding   # extra pytest args

The folder is copied to a temporary directory (laplace-torch's code is not
copied into this repository). In the copy, every module-level list whose name
contains ``flavors`` gets :class:`~laplace_hfl.HessianFreeLaplace` appended when
it holds all-weights classes and :class:`~laplace_hfl.HessianFreeLLLaplace`
when it holds last-layer classes, and only the tests parametrised with an HFL
class are run. Prints and writes (``--out``, default
``benchmarks/results/upstream_suite.json``) the counts of passed, failed,
errored, skipped and expected-failure HFL tests, and each failure's first line.
"""

from __future__ import annotations

import argparse
import ast
import json
import shutil
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CONFTEST = """
import inspect

import laplace_hfl


def _is_hfl(value):
    value = getattr(value, "values", [value])[0] if hasattr(value, "marks") else value
    return inspect.isclass(value) and issubclass(
        value, (laplace_hfl.HessianFreeLaplace, laplace_hfl.HessianFreeLLLaplace)
    )


def pytest_collection_modifyitems(config, items):
    keep, drop = [], []
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        (keep if any(_is_hfl(v) for v in params.values()) else drop).append(item)
    items[:] = keep
    config.hook.pytest_deselected(items=drop)
"""


def _patch(source: str) -> tuple[str, int]:
    """Append the HFL classes after every module-level ``*flavors*`` list."""
    tree = ast.parse(source)
    lines = source.splitlines()
    inserts: list[tuple[int, str]] = []
    for node in tree.body:
        if not (isinstance(node, ast.Assign) and isinstance(node.value, ast.List)):
            continue
        names = [t.id for t in node.targets if isinstance(t, ast.Name)]
        if not names or "flavors" not in names[0]:
            continue
        elts = {e.id for e in node.value.elts if isinstance(e, ast.Name)}
        add = []  # only beside laplace-torch's parametric all-weights / LL classes
        if elts & {"FullLaplace", "KronLaplace", "DiagLaplace"}:
            add.append("HessianFreeLaplace")
        if elts & {"FullLLLaplace", "KronLLLaplace", "DiagLLLaplace"}:
            add.append("HessianFreeLLLaplace")
        if add:
            inserts.append(
                (node.end_lineno, f"{names[0]} = {names[0]} + [{', '.join(add)}]")
            )
    if inserts:  # the import goes after the docstring and __future__ imports
        first = next(
            n.lineno - 1
            for n in tree.body
            if isinstance(n, ast.Import | ast.ImportFrom)
            and getattr(n, "module", None) != "__future__"
        )
        inserts.append(
            (first, "from laplace_hfl import HessianFreeLaplace, HessianFreeLLLaplace")
        )
    for line, text in sorted(inserts, reverse=True):
        lines.insert(line, text)
    return "\n".join(lines) + "\n", len(inserts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tests", type=Path, required=True)
    parser.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks/results/upstream_suite.json"
    )
    args, pytest_args = parser.parse_known_args()
    with tempfile.TemporaryDirectory() as tmp:
        dest = Path(tmp) / "tests"
        shutil.copytree(args.tests, dest)
        patched = {}
        for path in sorted(dest.glob("test_*.py")):
            text, n = _patch(path.read_text())
            if n:
                path.write_text(text)
                patched[path.name] = n
        (dest / "conftest.py").write_text(CONFTEST)
        report = Path(tmp) / "report.xml"
        cmd = [
            sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
            f"--junitxml={report}", "-o", "addopts=", *[str(dest / p) for p in patched],
            *pytest_args,
        ]  # fmt: skip
        subprocess.run(cmd, cwd=tmp, check=False)
        counts = {"passed": 0, "failed": 0, "error": 0, "skipped": 0, "xfailed": 0}
        failures = []
        for case in ET.parse(report).getroot().iter("testcase"):
            name = f"{case.get('classname')}::{case.get('name')}"
            kinds = [child.tag for child in case]
            if "failure" in kinds or "error" in kinds:
                kind = "failed" if "failure" in kinds else "error"
                node = case.find(kind if kind == "error" else "failure")
                message = (node.get("message") or "").splitlines()
                failures.append(
                    {"test": name, "message": message[0] if message else ""}
                )
            elif "skipped" in kinds:
                node = case.find("skipped")
                kind = "xfailed" if node.get("type") == "pytest.xfail" else "skipped"
            else:
                kind = "passed"
            counts[kind] += 1
    total = sum(counts.values())
    out = {"tests": str(args.tests), "patched": patched, "total": total, **counts}
    out["failures"] = failures
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps({k: v for k, v in out.items() if k != "failures"}, indent=1))
    for f in failures:
        print(f"FAILED {f['test']}: {f['message'][:160]}")


if __name__ == "__main__":
    main()
