"""Fit time of amortised HFL (S = 64) on the n = 4,000 LeNet, against the MAP's training.

``python scripts/amortized_fit_time.py`` writes
``benchmarks/results/amortized_fit_lenet_n4000.json``: the 8-epoch MAP training time,
the amortised fit time with the default (Monte Carlo-matched) sample tolerance, the CG
iterations and residuals. Accuracy against exact HFL is
``python -m laplace_hfl.bench.benchmark.amortized --n-train 4000 --epochs 0``.
"""

from __future__ import annotations

import json
import platform
from pathlib import Path

import torch
from laplace import Laplace

import laplace_hfl  # noqa: F401  (registers hessian_structure="hfl")
from laplace_hfl.bench.benchmark.measure import describe_device, pick_device, timed
from laplace_hfl.bench.evaluation.networks import mnist_split, train_lenet
from laplace_hfl.engine.amortized import sample_rtol

OUT = Path("benchmarks/results/amortized_fit_lenet_n4000.json")


def main() -> None:
    device = pick_device("auto")
    split = mnist_split(n_train=4000).to(device)
    (model, _), t_train = timed(lambda: train_lenet(split, epochs=8))
    prior, S = 2 * 5e-4 * 4000, 64
    la = Laplace(
        model, "classification", "all", "hfl", prior_precision=prior, amortize=S,
        chunk_size=S, compute_dtype=torch.float32, precondition_rank=256,
    )  # fmt: skip
    _, t_fit = timed(lambda: la.fit(split.loader("train", 64)))
    state = la.amortized_samples()
    result = {
        "device": describe_device(device),
        "machine": platform.platform(),
        "samples": S,
        "sample_rtol": sample_rtol(S, la.hfl_settings.rtol),
        "map_train_8_epochs_s": t_train,
        "fit_s": t_fit,
        "fit_over_map_training": t_fit / t_train,
        "cg_iterations_max": int(state.iterations.max()),
        "residual_max": float(state.residual.max()),
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
