"""Peak memory of exact HFL per refit direction.

Each case runs in a fresh process: the same model and data, ``n`` query
directions refit together (``chunk_size = n``, one output per point). The
slope of the peak resident set size in ``n``, divided by the size of one
float64 parameter vector, is the number of parameter vectors each direction
costs. Writes ``benchmarks/results/memory_per_direction.json``.

    python scripts/memory_per_direction.py [N_PARAMS]
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

CHUNKS = (1, 8, 16)

CHILD = r"""
import json, sys, warnings
warnings.simplefilter("ignore")
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from laplace import Laplace
import laplace_hfl
from laplace_hfl.bench.benchmark.cases import mlp_for_params
from laplace_hfl.bench.evaluation.memory import peak_rss_mb
n, P_target = int(sys.argv[1]), int(sys.argv[2])
torch.manual_seed(0)
w = mlp_for_params(P_target)
model = nn.Sequential(nn.Linear(10, w), nn.Tanh(), nn.Linear(w, w), nn.Tanh(),
                      nn.Linear(w, 1))
P = sum(p.numel() for p in model.parameters())
X, y = torch.randn(64, 10), torch.randn(64, 1)
la = Laplace(model, "regression", "all", "hfl", sigma_noise=0.3,
             prior_precision=1.0, chunk_size=n, max_iter=5, precondition_rank=0)
la.fit(DataLoader(TensorDataset(X, y), batch_size=64))
before = peak_rss_mb()
la.glm_predictive(torch.randn(n, 10))
print(json.dumps({"n": n, "n_params": P, "peak_rss_mb": peak_rss_mb(),
                  "peak_before_predict_mb": before}))
"""


def main() -> None:
    n_params = int(float(sys.argv[1])) if len(sys.argv) > 1 else 100_000
    root = Path(__file__).resolve().parents[1]
    rows = []
    for n in CHUNKS:
        out = subprocess.run(
            [sys.executable, "-c", CHILD, str(n), str(n_params)],
            check=True, capture_output=True, text=True, cwd=root,
        ).stdout  # fmt: skip
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(rows[-1])
    P = rows[0]["n_params"]
    xs = [r["n"] for r in rows]
    ys = [r["peak_rss_mb"] for r in rows]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum(
        (x - mx) ** 2 for x in xs
    )
    vector_mb = P * 8 / 2**20
    result = {
        "n_params": P,
        "rows": rows,
        "mb_per_direction": slope,
        "float64_vector_mb": vector_mb,
        "parameter_vectors_per_direction": slope / vector_mb,
    }
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}))
    path = root / "benchmarks" / "results" / "memory_per_direction.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
