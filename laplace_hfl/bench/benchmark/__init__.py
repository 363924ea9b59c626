"""Benchmark of HFL against laplace-torch's Hessian structures.

``python -m laplace_hfl.bench.benchmark [--quick] [--out DIR]`` or, once wired into the
CLI through :func:`register`, ``laplace-hfl benchmark``.
"""

from __future__ import annotations

from laplace_hfl.bench.benchmark.run import main, register, run

__all__ = ["main", "register", "run"]
