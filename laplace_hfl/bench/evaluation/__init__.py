"""Shared evaluation of HFL against laplace-torch's curvature backends.

Public API (used by ``laplace-hfl compare``, notebooks and the benchmark)::

    from laplace_hfl.bench.evaluation import (
        TASKS, METHODS, run_comparison, run_method, predict_inputs,
        regression_metrics, classification_metrics, plot_predictive_bands,
        plot_predictive_std, plot_confidence_map, plot_reliability,
        plot_variance_scatter, format_table, format_header,
    )

See ``docs/evaluation.md``.
"""

from __future__ import annotations

from laplace_hfl.bench.evaluation import metrics
from laplace_hfl.bench.evaluation.figures import (
    plot_confidence_map,
    plot_predictive_bands,
    plot_predictive_std,
    plot_reliability,
    plot_variance_scatter,
)
from laplace_hfl.bench.evaluation.memory import PeakMemory
from laplace_hfl.bench.evaluation.metrics import *  # noqa: F403  (all of metrics.__all__)
from laplace_hfl.bench.evaluation.registry import (
    DEFAULT_METHODS,
    METHODS,
    REFERENCE_GGN,
    REFERENCE_HESSIAN,
    MethodSpec,
    laplace_builder,
    laplace_method,
    register_method,
    resolve_methods,
)
from laplace_hfl.bench.evaluation.report import (
    format_header,
    format_table,
    write_results,
)
from laplace_hfl.bench.evaluation.results import ComparisonResult, Prediction
from laplace_hfl.bench.evaluation.runner import (
    predict_inputs,
    run_comparison,
    run_method,
)
from laplace_hfl.bench.evaluation.tasks import TASKS, Task, register_task

__all__ = [
    "TASKS",
    "Task",
    "register_task",
    "METHODS",
    "DEFAULT_METHODS",
    "REFERENCE_GGN",
    "REFERENCE_HESSIAN",
    "MethodSpec",
    "register_method",
    "resolve_methods",
    "laplace_builder",
    "laplace_method",
    "run_comparison",
    "run_method",
    "predict_inputs",
    "ComparisonResult",
    "Prediction",
    "PeakMemory",
    "plot_predictive_bands",
    "plot_predictive_std",
    "plot_confidence_map",
    "plot_reliability",
    "plot_variance_scatter",
    "format_table",
    "format_header",
    "write_results",
]
__all__ += metrics.__all__
