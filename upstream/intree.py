"""The vendored (in-tree) HFL: ``laplace_hfl`` modules as a ``laplace/hfl/`` subpackage.

For maintainers who prefer HFL inside laplace-torch rather than as a plugin:
every ``laplace_hfl`` module that the estimator classes import (transitively,
from ``ROOTS``) becomes ``laplace/hfl/<module>.py`` with its ``laplace_hfl``
imports and references rewritten to ``laplace.hfl``; nothing else changes, so
each upstream file reads as its source does.

The modules are grouped into ``PARTS``, one pull request each, applied in
order. The assignment is explicit (a reviewer sees topics, not an arbitrary
cut) and checked: :func:`assign_parts` raises :class:`GeneratorError` with what
to do if a module the estimator imports is in no part, a listed module is no
longer imported, a module imports one of a later part, or a part's diff
exceeds ``MAX_PART_LINES`` (the make_patch driver checks that one).
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field
from pathlib import Path

PKG = "laplace_hfl"
ROOTS = ("hessian_free", "last_layer")  # modules defining the public classes
MAX_PART_LINES = 1500  # lines of diff a reviewer is asked to read per PR


class GeneratorError(RuntimeError):
    """The package source has a shape the generator cannot translate."""


@dataclass(frozen=True)
class Part:
    """One pull request of the in-tree series."""

    slug: str
    subject: str
    body: str
    modules: tuple[str, ...]
    extra: tuple[str, ...] = field(default=())  # non-module content, by key


# Dependency order: a module may import only modules of its own or an earlier
# part. ``extra`` keys are filled in by make_patch.py.
PARTS = (
    Part(
        "hfl-engine",
        "hfl (1/13): objective, validation and batched CG",
        "The numerical base: the Laplace objective over flat parameters and its\n"
        "JVP/VJP curvature products, argument validation, errors and warnings,\n"
        "free memory of the device, progress bars, and batched CG with certified\n"
        "variance brackets.\n"
        "Not reachable from Laplace() until the estimator part.",
        (
            "errors",
            "engine.device_memory",
            "engine.keys",
            "engine.validation",
            "engine.functional",
            "engine.progress",
            "engine.solvers",
        ),  # fmt: skip
        ("package_init", "module_import_test"),
    ),
    Part(
        "hfl-refits",
        "hfl (2/13): data batches, dense curvature, preconditioners",
        "Batches of (X, y) and dict data, the dense data GGN / Hessian and their\n"
        "Cholesky factor for small models, and the Nystrom (extendable sketch\n"
        "columns) and KFAC preconditioners of the CG solves as objects (build\n"
        "once per fit, apply per prior).",
        (
            "engine.batches",
            "engine.dense",
            "engine.preconditioner",
            "engine.kfac",
            "engine.precond_objects",
        ),  # fmt: skip
    ),
    Part(
        "hfl-solvers",
        "hfl (3/13): Krylov reuse, curvature objects, perturbed refits",
        "The opt-in reuse of earlier solves across query chunks, the GGN and\n"
        "exact-Hessian curvature objects, and the estimator's core: perturbed\n"
        "re-optimisation of the Laplace objective (implicit-function-theorem\n"
        "columns P^-1 J^T).",
        ("engine.krylov_reuse", "engine.curvature", "engine.refit"),  # fmt: skip
    ),
    Part(
        "hfl-auto-choice",
        "hfl (4/13): measured choice of solver, preconditioner and sketch rank",
        'solver="auto" and preconditioner="auto": a probe of the user\'s own\n'
        "refit system picks the preconditioner, grows the Nystrom sketch while\n"
        "the iterations it saves repay it, and chooses dense or CG from the\n"
        "measured product time and flop rate.",
        ("engine.auto_choice",),
    ),
    Part(
        "hfl-sampling",
        "hfl (5/13): sample-then-optimise posterior samples (amortised mode)",
        "Lanczos, stochastic (minibatch) refits, amortised predictions from S\n"
        "posterior samples and the weight-space posterior's samplers.",
        (
            "engine.lanczos",
            "engine.stochastic",
            "engine.amortized",
            "engine.deflated_samples",
            "engine.weight_posterior",
        ),  # fmt: skip
    ),
    Part(
        "hfl-logdet",
        "hfl (6/13): log-determinant and matrix-free posterior operators",
        "Stochastic Lanczos quadrature, the log-determinant of the posterior\n"
        "precision and the matrix-free operators behind la.H / posterior_precision.",
        (
            "engine.slq",
            "engine.logdet",
            "engine.sketch_logdet",
            "engine.operators",
        ),  # fmt: skip
    ),
    Part(
        "hfl-solver-objects",
        "hfl (7/13): solver objects and the estimator's options",
        "The solver objects (dense Cholesky, CG refits, minibatch refits, amortised\n"
        "samples; each owns its cache keyed on the hyperparameters, one registry\n"
        "entry each), what one vectorised product holds, and the estimator's\n"
        "keyword options, validated against the solver and preconditioner registries.",
        (
            "engine.chunks",
            "engine.solver_objects",
            "options",
            "engine.example_noise",
            "solver_choice",
        ),  # fmt: skip
    ),
    Part(
        "hfl-prediction",
        "hfl (8/13): weight space and the GLM predictive",
        "The weight-space mixin (posterior precision, samples, density),\n"
        "covariances from refit columns, and the GLM predictive mixin (link\n"
        "approximations).",
        ("weight_space", "engine.predictive", "prediction"),  # fmt: skip
    ),
    Part(
        "hfl-state",
        "hfl (9/13): data sharding, hyperparameters, state",
        "Distributed data and shards, hyperparameters,\n"
        "example noise, serialised calls and state_dict with value checks.",
        (
            "distributed",
            "shards",
            "hyperparameters",
            "state_checks",
            "state",
            "serial",
        ),  # fmt: skip
    ),
    Part(
        "hfl-tuning",
        "hfl (10/13): prior tuning (marglik, MacKay, grid search)",
        "Marginal likelihood and its tuning, MacKay's fixed point and grid search.",
        ("engine.gridsearch", "engine.mackay", "tuning"),  # fmt: skip
    ),
    Part(
        "hfl-auto-options",
        "hfl (11/13): compute_dtype='auto' and chunk_size='auto'",
        "The rules behind the automatic options: precision by device and tolerance\n"
        "(float32 products with float64 recurrences on a GPU, float64 on the CPU),\n"
        "and directions per product from a measured memory model.",
        ("engine.precision", "engine.chunk_memory"),  # fmt: skip
    ),
    Part(
        "hfl-estimator",
        "hfl (12/13): HessianFreeLaplace / HessianFreeLLLaplace, hessian_structure='hfl'",
        "The laplace-torch classes (all weights, last layer), HessianStructure.HFL,\n"
        "the Laplace docstring and the exports.",
        ("_docs", "base", "hessian_free", "last_layer"),  # fmt: skip
        ("package_exports", "enum_docstring_exports"),
    ),
    Part(
        "hfl-tests-docs",
        "hfl (13/13): tests against dense float64 references, example, docs",
        "tests/test_hfl.py compares HFL with FullLaplace / FullLLLaplace (GGN and\n"
        "exact Hessian) on tiny float64 models; examples/hfl_example.py;\n"
        "docs/hfl.md and its API reference.",
        (),  # fmt: skip
        ("tests_example_docs",),
    ),
)


# --------------------------------------------------------------------------
# the module graph
# --------------------------------------------------------------------------
def pkg_module(node: ast.Import | ast.ImportFrom, current: str) -> str | None:
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


def read(package: Path, name: str) -> str:
    path = package.joinpath(*name.split(".")).with_suffix(".py")
    if not path.is_file():
        raise GeneratorError(f"{PKG}.{name} is imported but {path} does not exist.")
    return path.read_text()


def imports_of(package: Path, name: str) -> set[str]:
    """``laplace_hfl`` modules that module ``name`` imports (anywhere in it)."""
    deps = set()
    for node in ast.walk(ast.parse(read(package, name))):
        if isinstance(node, ast.Import | ast.ImportFrom):
            dep = pkg_module(node, name)
            if dep is not None and dep != name:
                deps.add(dep)
    return deps


def module_graph(package: Path) -> dict[str, set[str]]:
    """Modules reachable from ``ROOTS`` and what each imports."""
    deps: dict[str, set[str]] = {}
    todo = list(ROOTS)
    while todo:
        name = todo.pop()
        if name not in deps:
            deps[name] = imports_of(package, name)
            todo.extend(deps[name])
    return deps


def assign_parts(package: Path) -> list[tuple[Part, list[str]]]:
    """``PARTS`` with their modules, checked against the package's imports."""
    graph = module_graph(package)
    part_of: dict[str, int] = {}
    for i, part in enumerate(PARTS):
        for name in part.modules:
            if name in part_of:
                raise GeneratorError(
                    f"{PKG}.{name} is listed in two parts of upstream/intree.py "
                    f"PARTS ({PARTS[part_of[name]].slug}, {part.slug})."
                )
            part_of[name] = i
    unassigned = sorted(set(graph) - set(part_of))
    if unassigned:
        hints = [
            f"{n} (imports {sorted(graph[n]) or 'nothing of ' + PKG})"
            for n in unassigned
        ]
        raise GeneratorError(
            "The estimator imports modules that are in no part of upstream/"
            f"intree.py PARTS: {'; '.join(hints)}. Add each to a part at or "
            "after the parts of the modules it imports."
        )
    stale = sorted(set(part_of) - set(graph))
    if stale:
        raise GeneratorError(
            f"upstream/intree.py PARTS lists {stale}, which the estimator no "
            "longer imports (or which no longer exist); remove them."
        )
    for name, deps in sorted(graph.items()):
        late = sorted(d for d in deps if part_of[d] > part_of[name])
        if late:
            raise GeneratorError(
                f"{PKG}.{name} (part {PARTS[part_of[name]].slug}) imports {late} "
                f"of a later part ({PARTS[part_of[late[0]]].slug}); move "
                f"{name} later or its imports earlier in upstream/intree.py PARTS."
            )
    return [(part, list(part.modules)) for part in PARTS]


# --------------------------------------------------------------------------
# one module, rewritten
# --------------------------------------------------------------------------
def rewrite_module(text: str) -> str:
    """``laplace_hfl`` module source -> ``laplace/hfl/`` module source."""
    # Doctest lines that import the plugin make no sense upstream.
    text = re.sub(rf"^[ \t]*>>> import {PKG}\b.*\n", "", text, flags=re.M)
    text = re.sub(rf"\b{PKG}\b", "laplace.hfl", text)
    text = text.replace("laplace-hfl", "HFL")
    if PKG in text:  # pragma: no cover - the substitutions above are total
        raise GeneratorError(f"References to {PKG} survived the rewrite.")
    ast.parse(text)
    return text
