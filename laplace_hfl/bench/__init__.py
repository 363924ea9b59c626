"""Evaluation, benchmarks and the ``laplace-hfl`` command line.

Built on the public API of :mod:`laplace_hfl` and of laplace-torch only.
Needs the optional dependencies of ``pip install "laplace-hfl[bench]"``
(:data:`EXTRA`: matplotlib, scikit-learn, mlxtend, scipy); importing this
package without them raises an :class:`ImportError` that names the extra.
``import laplace_hfl`` never imports this package.
"""

from __future__ import annotations

from importlib.util import find_spec

__all__ = ["EXTRA", "missing_extra"]

#: Import name -> distribution of the ``bench`` extra.
EXTRA = {
    "matplotlib": "matplotlib",
    "sklearn": "scikit-learn",
    "mlxtend": "mlxtend",
    "scipy": "scipy",
}


def _installed(module: str) -> bool:
    try:
        return find_spec(module) is not None
    except ImportError:  # a finder that refuses the module
        return False


def missing_extra() -> list[str]:
    """Distributions of the ``bench`` extra that are not installed."""
    return [dist for module, dist in EXTRA.items() if not _installed(module)]


if missing_extra():
    raise ImportError(
        f"laplace_hfl.bench (evaluation, benchmarks, the laplace-hfl command) "
        f"needs {', '.join(missing_extra())}: install the bench extra with "
        'pip install "laplace-hfl[bench]" (or pip install -e ".[bench]" in a '
        "checkout). The estimator itself (import laplace_hfl) does not need it."
    )
