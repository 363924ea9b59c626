"""``Laplace(model, lik, subset, "hfl")`` in a fresh interpreter, no ``import laplace_hfl``.

``python check_plugin.py found``: laplace-torch finds the installed laplace-hfl
through its ``laplace.structures`` entry point (laplace-torch with structure
discovery); ``python check_plugin.py missing``: it raises laplace-torch's
"Unsupported Laplace combination" error (laplace-torch without it).
"""

from __future__ import annotations

import sys
from importlib.metadata import entry_points

from torch import nn


def main(mode: str) -> None:
    from laplace import Laplace

    assert not [m for m in sys.modules if m.split(".")[0] == "laplace_hfl"]
    declared = [
        f"{ep.name} = {ep.value}"
        for ep in entry_points(group="laplace.structures", name="hfl")
    ]
    model = nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 1))
    if mode == "missing":
        try:
            Laplace(model, "regression", "all", "hfl")
        except ValueError as err:
            print(f"without discovery: ValueError: {err} (entry point {declared})")
            return
        raise AssertionError("Laplace(..., 'hfl') worked without discovery")
    built = [
        type(Laplace(model, "regression", subset, "hfl"))
        for subset in ("all", "last_layer")
    ]
    hfl = sys.modules["laplace_hfl"]
    print(
        f"entry point {declared}: Laplace(..., 'all'/'last_layer', 'hfl') -> "
        f"{[f'{c.__module__}.{c.__name__}' for c in built]}; laplace_hfl loaded "
        f"by Laplace() from {hfl.__file__}"
    )


if __name__ == "__main__":
    main(sys.argv[1])
