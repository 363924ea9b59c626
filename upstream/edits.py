"""Edits of existing laplace-torch 0.3 files, one function per pull request.

Each edit replaces one exact snippet of the sdist (or of the tree after the
earlier PRs) and fails loudly if that snippet is not there exactly once, so a
changed upstream file cannot be patched silently wrong.
"""

from __future__ import annotations

from pathlib import Path

from intree import GeneratorError

ENTRY_POINT_GROUP = "laplace.structures"
EXPORTS = ("HessianFreeLaplace", "HessianFreeLLLaplace")


def replace_once(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    if text.count(old) != 1:
        raise GeneratorError(f"{path}: expected exactly one {old!r}.")
    path.write_text(text.replace(old, new))


# --------------------------------------------------------------------------
# PR 1: full() of the curvlinops backends on the parameters' device and dtype
# --------------------------------------------------------------------------
def curvlinops_full_device(src: Path) -> None:
    replace_once(
        src / "laplace/curvature/curvlinops.py",
        "        p = next(self.model.parameters())\n"
        "        H = torch.as_tensor(\n"
        "            linop @ torch.eye(linop.shape[0]), device=p.device, dtype=p.dtype\n"
        "        )\n",
        "        # The identity must live where the parameters do: one on the CPU\n"
        "        # cannot multiply an operator on CUDA, nor keep float64 in float64.\n"
        "        p = next(self.model.parameters())\n"
        "        H = linop @ torch.eye(linop.shape[0], device=p.device, dtype=p.dtype)\n",
    )


# --------------------------------------------------------------------------
# PR 2: Laplace() finds structures of installed packages (entry points)
# --------------------------------------------------------------------------
_HESSIAN_DOC = (
    "        structure of the Hessian approximation (note that in case of 'gp',\n"
    "        we are not actually doing any Hessian approximation, the inference "
    "is instead done in the functional space)\n"
)


def structure_entry_points(src: Path) -> None:
    path = src / "laplace/laplace.py"
    replace_once(
        path,
        "from __future__ import annotations\n\nimport torch\n",
        "from __future__ import annotations\n\n"
        "from importlib.metadata import entry_points\n\nimport torch\n",
    )
    replace_once(
        path,
        "    HessianStructure,\n    Likelihood,\n    SubsetOfWeights,\n)\n",
        "    HessianStructure,\n    Likelihood,\n    SubsetOfWeights,\n)\n\n"
        "STRUCTURE_ENTRY_POINTS = "
        f'"{ENTRY_POINT_GROUP}"\n'
        '"""Entry-point group of installed packages that provide Hessian structures."""\n',
    )
    replace_once(
        path,
        _HESSIAN_DOC,
        _HESSIAN_DOC
        + "        Structures provided by installed packages (entry points of the "
        "group\n"
        f"        ``{ENTRY_POINT_GROUP}``, see `docs/structure_plugins.md`) are "
        "found too,\n"
        "        without importing those packages first.\n",
    )
    replace_once(
        path,
        "    ValueError\n"
        "        If an approximation name or combination of weight subset, Hessian\n"
        "        structure, and function-space method is unsupported.\n",
        "    ValueError\n"
        "        If an approximation name or combination of weight subset, Hessian\n"
        "        structure, and function-space method is unsupported.\n"
        "    ImportError\n"
        "        If the installed package providing `hessian_structure` fails to "
        "load.\n",
    )
    replace_once(
        path,
        "    laplace_map = {\n"
        "        subclass._key: subclass\n"
        "        for subclass in _all_subclasses(BaseLaplace)\n"
        '        if hasattr(subclass, "_key")\n'
        "    }\n"
        "    try:\n"
        "        laplace_class = laplace_map[(subset_of_weights, hessian_structure)]\n",
        "    key = (subset_of_weights, hessian_structure)\n"
        "    laplace_map = _laplace_map()\n"
        "    if key not in laplace_map and _load_structure_plugins(hessian_structure):\n"
        "        laplace_map = _laplace_map()\n"
        "    try:\n"
        "        laplace_class = laplace_map[key]\n",
    )
    replace_once(
        path,
        "def _all_subclasses(cls) -> set:\n",
        '''def _laplace_map() -> dict:
    return {
        subclass._key: subclass
        for subclass in _all_subclasses(BaseLaplace)
        if hasattr(subclass, "_key")
    }


def _load_structure_plugins(hessian_structure: HessianStructure | str) -> bool:
    """Load the installed packages that provide `hessian_structure`.

    A package provides a structure with an entry point of the group
    `STRUCTURE_ENTRY_POINTS` named after the structure; its value is the module
    (or an object of the module) that defines the `BaseLaplace` subclasses with
    ``_key = (subset_of_weights, name)``. Loading it imports that module, which
    registers the classes. Only called for keys no imported class provides, so
    built-in structures never load a plugin.

    Parameters
    ----------
    hessian_structure : HessianStructure or str
        The requested structure.

    Returns
    -------
    loaded : bool
        Whether an entry point of that name was found (and loaded).

    Raises
    ------
    ImportError
        If loading the entry point fails.
    """
    name = str(getattr(hessian_structure, "value", hessian_structure))
    found = entry_points(group=STRUCTURE_ENTRY_POINTS, name=name)
    for entry_point in found:
        try:
            entry_point.load()
        except Exception as exc:
            raise ImportError(
                f"hessian_structure={name!r} is provided by the entry point "
                f"'{entry_point.name} = {entry_point.value}' of the group "
                f"{STRUCTURE_ENTRY_POINTS!r}, which failed to load: {exc!r}. "
                "Reinstall or uninstall the package that declares it."
            ) from exc
    return len(found) > 0


def _all_subclasses(cls) -> set:
''',
    )


# --------------------------------------------------------------------------
# PR 3: HFL as a documented third-party structure, extra laplace-torch[hfl]
# --------------------------------------------------------------------------
def hfl_extra(src: Path) -> None:
    replace_once(
        src / "pyproject.toml",
        '    "ruff",\n    "scipy",\n]\n',
        '    "ruff",\n    "scipy",\n]\n'
        "# Third-party Hessian structures (docs/structure_plugins.md):\n"
        'hfl = ["laplace-hfl >= 0.1"]\n',
    )
    replace_once(
        src / "README.md",
        '`functional_approximation="variational"`.\n',
        '`functional_approximation="variational"`.\n'
        'Hessian-free Laplace ([HFL](docs/hfl.md), `hessian_structure="hfl"`) is a\n'
        "third-party structure: `pip install laplace-torch[hfl]`.\n",
    )


# --------------------------------------------------------------------------
# in-tree part 6: enum member, Laplace docstring, exports
# --------------------------------------------------------------------------
def hfl_enum_docstring_exports(src: Path) -> None:
    replace_once(
        src / "laplace/utils/enums.py",
        '    GP = "gp"\n    """Functional Laplace."""\n',
        '    GP = "gp"\n    """Functional Laplace."""\n\n'
        '    HFL = "hfl"\n'
        '    """Hessian-free Laplace: GLM predictive from perturbed refits, no Hessian."""\n',
    )
    replace_once(
        src / "laplace/laplace.py",
        "{'diag', 'kron', 'full', 'lowrank', 'gp'}",
        "{'diag', 'kron', 'full', 'lowrank', 'gp', 'hfl'}",
    )
    replace_once(
        src / "laplace/laplace.py",
        _HESSIAN_DOC,
        _HESSIAN_DOC
        + "        'hfl' (Hessian-free Laplace, `subset_of_weights` 'all' or "
        "'last_layer') forms\n"
        "        no Hessian: GLM predictive covariances are estimated by "
        "perturbed refits of\n"
        "        the MAP and converge to 'full' with a GGN backend.\n",
    )
    init = src / "laplace/__init__.py"
    replace_once(
        init,
        "from laplace.laplace import Laplace\n",
        f"from laplace.hfl import {', '.join(EXPORTS)}\n"
        "from laplace.laplace import Laplace\n",
    )
    replace_once(
        init,
        '    "DiagSubnetLaplace",  # subnetwork\n',
        '    "DiagSubnetLaplace",  # subnetwork\n'
        + "".join(f'    "{n}",\n' for n in EXPORTS[:-1])
        + f'    "{EXPORTS[-1]}",  # Hessian-free\n',
    )
