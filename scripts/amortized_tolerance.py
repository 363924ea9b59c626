"""Effect of the amortised samples' CG tolerance on LeNet / MNIST (N = 500, S = 64).

``python scripts/amortized_tolerance.py`` draws the same 64 samples (same seed, same
right-hand sides) with CG tolerances 1e-6, 1e-3 and 1e-2, and prints per tolerance the
CG iterations, the time of the draw and the median error of the 64 x 10 predictive
variances against the dense float64 dual reference, then the change of the variances
against the 1e-6 draw. Its numbers are quoted in ``laplace_hfl/engine/amortized.py``'s module
doc (basis of :func:`laplace_hfl.engine.amortized.sample_rtol`).
"""

from __future__ import annotations

import time

import torch
from laplace import Laplace

import laplace_hfl  # noqa: F401  (registers hessian_structure="hfl")
from laplace_hfl.bench.benchmark.amortized import dual_variances
from laplace_hfl.bench.evaluation.networks import mnist_split, train_lenet
from laplace_hfl.engine.amortized import amortized_covariance, posterior_samples
from laplace_hfl.engine.batches import eval_mode
from laplace_hfl.engine.example_noise import batch_noise


def main() -> None:
    torch.manual_seed(0)
    n = 500
    split = mnist_split(n_train=n)
    model, _ = train_lenet(split, epochs=8)
    prior, Xq = 2 * 5e-4 * n, split.X_test[:64]
    ref = dual_variances(model, split.X_train, Xq, prior)
    la = Laplace(
        model, "classification", "all", "hfl", prior_precision=prior, amortize=64,
        chunk_size=64, precondition_rank=256,
    )  # fmt: skip
    train = split.loader("train", 64)
    la.fit(train)
    est = {}
    with eval_mode(la.model):
        obj = la.objective()
        _, precond = la.refit_preconditioner()
        # the estimator's noise: keyed by row position in its refit batches
        # (a single-process fit of an unshuffled loader)
        noise = batch_noise(None, list(obj.batches()))
        Xq_in = la.query_inputs(Xq)
        for rtol in (1e-6, 1e-3, 1e-2):
            t = time.perf_counter()
            st = posterior_samples(
                obj, 64, rtol=rtol, chunk_size=64, precond=precond, noise=noise
            )
            dt = time.perf_counter() - t
            # the amortised predictive of these samples, as the estimator forms it
            _, v = amortized_covariance(
                obj.forward, obj.theta_map, Xq_in, st.samples, chunk_size=64
            )
            est[rtol] = torch.diagonal(v, 0, 1, 2).double()
            err = ((est[rtol] - ref).abs() / ref).median()
            print(f"rtol {rtol:g}: {int(st.iterations.max())} iterations, "
                  f"{dt:.0f} s, median error vs dual {float(err):.4f}")  # fmt: skip
    for rtol in (1e-3, 1e-2):
        d = ((est[rtol] - est[1e-6]).abs() / est[1e-6]).flatten()
        print(f"rtol {rtol:g} vs 1e-6: variance change median {float(d.median()):.2e}, "
              f"max {float(d.max()):.2e}")  # fmt: skip


if __name__ == "__main__":
    main()
