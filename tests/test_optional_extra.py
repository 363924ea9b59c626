"""The estimator stands apart from the bench: ``import laplace_hfl`` imports
none of the ``bench`` extra (matplotlib, scikit-learn, mlxtend), works where
they cannot be imported, and ``laplace_hfl.bench`` then names the extra."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

BENCH_ONLY = ("matplotlib", "sklearn", "mlxtend")

# Installed before any import: an environment without the bench extra. The
# path finder finds neither the packages nor their distribution metadata:
# torchmetrics (imported by laplace-torch) decides whether matplotlib is there
# by ``importlib.metadata.version("matplotlib")`` and imports it if so, and
# torch asks ``find_spec`` about scikit-learn, expecting ``None`` when absent.
BLOCKER = f"""
import sys
from importlib.machinery import PathFinder
from importlib.metadata import DistributionFinder

BLOCKED = {BENCH_ONLY!r}
BLOCKED_DISTS = ("matplotlib", "scikit-learn", "mlxtend")

class WithoutBenchExtra(PathFinder):
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            return None
        return PathFinder.find_spec(name, path, target)

    @classmethod
    def find_distributions(cls, context=DistributionFinder.Context()):
        for dist in PathFinder.find_distributions(context):
            if (dist.metadata["Name"] or "").lower() not in BLOCKED_DISTS:
                yield dist

sys.meta_path[sys.meta_path.index(PathFinder)] = WithoutBenchExtra
"""


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True, text=True, check=False, timeout=300,
    )  # fmt: skip


def test_import_laplace_hfl_imports_no_bench_dependency():
    """(A fresh interpreter: ~6 s, most of it importing torch.) laplace-torch's torchmetrics imports matplotlib whenever it is
    installed, so what counts is what ``import laplace_hfl`` adds."""
    res = _run(f"""
        import sys
        import laplace
        before = set(sys.modules)
        import laplace_hfl
        new = sorted(set(sys.modules) - before)
        bad = [m for m in new if m.split(".")[0] in {BENCH_ONLY!r}
               or m.startswith("laplace_hfl.bench")]
        print("BAD", bad)
        print("NEW", len(new))
    """)  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "BAD []" in res.stdout, res.stdout
    assert "NEW 0" not in res.stdout  # laplace_hfl itself was imported here


@pytest.mark.slow  # a fresh interpreter importing torch and laplace-torch: ~6 s
def test_estimator_works_without_the_bench_extra():
    res = _run(
        BLOCKER
        + """
import torch
from laplace import Laplace
from torch.utils.data import DataLoader, TensorDataset

import laplace_hfl

torch.manual_seed(0)
X, y = torch.randn(32, 2, dtype=torch.float64), torch.randn(32, 1, dtype=torch.float64)
model = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Tanh(),
                            torch.nn.Linear(8, 1)).double()
la = Laplace(model, "regression", "all", "hfl", sigma_noise=0.3)
la.fit(DataLoader(TensorDataset(X, y), batch_size=16))
f_mu, f_var = la(X[:3])
assert f_var.shape == (3, 1, 1) and bool((f_var > 0).all())
assert not any(m.split(".")[0] in BLOCKED for m in sys.modules)
for name in BLOCKED:
    try:
        __import__(name)
    except ModuleNotFoundError:
        pass
    else:
        raise AssertionError(f"{name} importable: the blocker does not work")
try:
    import laplace_hfl.bench
except ImportError as err:
    print("BENCH", err)
"""
    )
    assert res.returncode == 0, res.stderr
    assert "BENCH" in res.stdout, res.stdout
    msg = res.stdout.split("BENCH", 1)[1]
    assert "laplace-hfl[bench]" in msg
    assert "matplotlib" in msg and "scikit-learn" in msg and "mlxtend" in msg
