"""Check the registry of ``laplace.Laplace`` in the current interpreter.

``python check_registry.py dump OUT.json`` writes the ``(subset_of_weights,
hessian_structure) -> class`` map of an unpatched laplace-torch.
``python check_registry.py patched BASELINE.json ROOT`` checks the tree with
HFL in-tree: ``HessianStructure.HFL`` exists, ``Laplace(...,
HessianStructure.HFL)`` builds the ``laplace.hfl`` classes, every other key
maps to the class it mapped to before, the imported ``laplace`` is the one
under ``ROOT`` (the patched tree), and ``laplace_hfl`` is never imported.
"""

from __future__ import annotations

import json
import sys

import torch
from torch import nn


def registry() -> dict[str, str]:
    from laplace import BaseLaplace
    from laplace.laplace import _all_subclasses

    return {
        "/".join(cls._key): f"{cls.__module__}.{cls.__qualname__}"
        for cls in _all_subclasses(BaseLaplace)
        if hasattr(cls, "_key")
    }


def main(mode: str, path: str, root: str = "") -> None:
    if mode == "dump":
        with open(path, "w") as f:
            json.dump(registry(), f, indent=1, sort_keys=True)
        print(f"unpatched registry: {len(registry())} keys")
        return
    import laplace
    from laplace import HessianStructure, Laplace

    assert laplace.__file__.startswith(root), (laplace.__file__, root)
    assert HessianStructure.HFL == "hfl"
    model = nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 1))
    la = Laplace(model, "regression", "all", HessianStructure.HFL)
    assert type(la).__name__ == "HessianFreeLaplace", type(la)
    la_ll = Laplace(model, "regression", "last_layer", "hfl")
    assert type(la_ll).__name__ == "HessianFreeLLLaplace", type(la_ll)
    X, y = torch.randn(8, 2), torch.randn(8, 1)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y))
    la.fit(loader)
    f_mu, f_var = la(X[:2])
    assert f_var.shape == (2, 1, 1) and bool((f_var > 0).all())

    with open(path) as f:
        before = json.load(f)
    after = registry()
    new = {k: v for k, v in after.items() if k not in before}
    assert new == {
        "all/hfl": "laplace.hfl.hessian_free.HessianFreeLaplace",
        "last_layer/hfl": "laplace.hfl.last_layer.HessianFreeLLLaplace",
    }, new
    changed = {
        k: (before[k], after.get(k)) for k in before if after.get(k) != before[k]
    }
    assert not changed, changed
    extra = {"gp": {"n_subset": 4}, "subnetwork": {"subnetwork_indices": [0, 1]}}
    built = 0
    for key in before:
        subset, structure = key.split("/")
        kwargs = extra.get(structure, extra.get(subset, {}))
        if "subnetwork_indices" in kwargs:
            kwargs = {"subnetwork_indices": torch.tensor([0, 1])}
        try:
            cls = type(Laplace(model, "regression", subset, structure, **kwargs))
        except ImportError:  # LowRankLaplace needs the old asdfghjkl from git
            continue
        assert f"{cls.__module__}.{cls.__qualname__}" == before[key], key
        built += 1
    leaked = sorted(m for m in sys.modules if m.split(".")[0] == "laplace_hfl")
    assert not leaked, f"laplace_hfl was imported: {leaked}"
    print(f"patched laplace: {laplace.__file__}")
    print(
        f"registry: {len(before)} unchanged keys ({built} built through Laplace) "
        f"+ {sorted(new)}; "
        "Laplace(model, 'regression', 'all', HessianStructure.HFL) -> "
        f"{type(la).__name__}; laplace_hfl never imported"
    )


if __name__ == "__main__":
    main(*sys.argv[1:])
