"""Deflated against plain amortised samples on the test-suite networks.

``python scripts/deflated_amortized.py`` draws ``S = 64`` sample-then-optimise
samples (:func:`laplace_hfl.engine.amortized.posterior_samples`, seeds 0..15)
on the 2-8-3 regression and classification networks of the test suite (51
parameters), and reads the variances of ``J(x) A^{-1} J(x)^T`` at the 40 / 60
training inputs from them plainly and deflated
(:func:`laplace_hfl.engine.deflated_samples.deflated_factor`, the top ``k``
eigenvectors of the rank-``k`` Nyström sketch handled exactly). Writes
``benchmarks/results/deflated_amortized.json``: per network and ``k``, the
median relative error against the dense float64 truth (averaged over the
seeds) of both, and the median share of a variance that the exact term holds.
"""

from __future__ import annotations

import json
import sys
import warnings

import torch


def main():
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    sys.path.insert(0, "tests")
    from conftest import DT, engine_objective, suite_networks

    from laplace_hfl.engine.amortized import amortized_covariance, posterior_samples
    from laplace_hfl.engine.deflated_samples import deflated_factor
    from laplace_hfl.engine.functional import ggn_matvec
    from laplace_hfl.engine.preconditioner import nystrom_sketch

    out = {"what": "S = 64, seeds 0..15, variances at the training inputs, float64"}
    nets = suite_networks(("regression 2-8-3", "classification 2-8-3"))
    for name, (model, X, y, lik) in nets.items():
        obj = engine_objective(model, X, y, lik)
        P = obj.theta_map.numel()
        A = ggn_matvec(obj, torch.eye(P, dtype=DT))
        A = 0.5 * (A + A.T)
        root = torch.linalg.cholesky(torch.linalg.inv(A)).T * P**0.5

        def variances(rows, obj=obj, X=X):
            cov = amortized_covariance(obj.forward, obj.theta_map, X, rows)[1]
            return cov.diagonal(0, 1, 2).flatten()

        truth = variances(root)
        draws = [posterior_samples(obj, 64, seed=s).samples for s in range(16)]
        plain = [float(((variances(d) - truth).abs() / truth).median()) for d in draws]
        for k in (8, 24):
            W = nystrom_sketch(obj, k).U.T.contiguous()
            AW = W @ A
            zero = torch.zeros(1, P, dtype=DT)  # exact term alone: no samples
            exact = variances(deflated_factor(zero, W, AW))
            defl = [
                float(
                    (
                        (variances(deflated_factor(d, W, AW)) - truth).abs() / truth
                    ).median()
                )
                for d in draws
            ]
            row = {
                "parameters": P,
                "k": int(W.shape[0]),
                "plain_median_rel_error": sum(plain) / len(plain),
                "deflated_median_rel_error": sum(defl) / len(defl),
                "median_share_of_variance_exact": float((exact / truth).median()),
            }
            row["ratio"] = (
                row["deflated_median_rel_error"] / row["plain_median_rel_error"]
            )
            out[f"{name} / k={k}"] = row
            print(name, json.dumps(row), flush=True)
    with open("benchmarks/results/deflated_amortized.json", "w") as fh:
        json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()
