"""Peak memory of one method at one parameter count, in a fresh process.

``python -m laplace_hfl.bench.benchmark.memory METHOD N_PARAMS`` prints one JSON line
with the peak resident set size (``ru_maxrss``) of this process. Run in a
subprocess per case so that peaks do not mix.
"""

from __future__ import annotations

import json
import sys
import time
import warnings

import torch

from laplace_hfl.bench.evaluation.memory import peak_rss_mb
from laplace_hfl.bench.evaluation.predict import glm_predictive
from laplace_hfl.engine.device_memory import available_bytes, total_bytes

__all__ = ["measure", "MEMORY_METHODS"]

MEMORY_METHODS = ("baseline", "map_train_step", "hfl", "hfl_amortized", "full_ggn",
                  "kron", "diag", "cg_inverse")  # fmt: skip
N_DATA = 64


def _available_bytes() -> int:
    free = available_bytes("cpu")
    if free is not None:
        return free
    return total_bytes("cpu")


def measure(method: str, n_params: int) -> dict:
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from laplace_hfl.bench.benchmark.cases import PRIOR, SIGMA, mlp_for_params

    torch.manual_seed(0)
    w = mlp_for_params(n_params)
    model = nn.Sequential(
        nn.Linear(10, w), nn.Tanh(), nn.Linear(w, w), nn.Tanh(), nn.Linear(w, 1)
    )
    P = sum(p.numel() for p in model.parameters())
    X, y = torch.randn(N_DATA, 10), torch.randn(N_DATA, 1)
    Xq = torch.randn(4, 10)
    loader = DataLoader(TensorDataset(X, y), batch_size=N_DATA)
    out = {"method": method, "n_params": P, "width": w, "n_data": N_DATA}
    t0 = time.perf_counter()
    if method == "baseline":
        pass
    elif method == "map_train_step":
        opt = torch.optim.Adam(model.parameters(), 1e-3)
        for _ in range(2):
            opt.zero_grad()
            ((model(X) - y) ** 2).mean().backward()
            opt.step()
    elif method in ("full_ggn", "full_hessian"):
        need = 3 * 4 * P * P  # precision, Cholesky factor, inverse (float32)
        avail = _available_bytes()
        out["required_bytes"] = need
        if need > avail:
            out["status"] = (
                f"cannot allocate: needs ~{need / 2**30:.1f} GiB for P x P matrices, "
                f"{avail / 2**30:.1f} GiB available"
            )
            out["peak_rss_mb"] = None
            return out
        run_laplace(model, loader, Xq, "full", {})
    elif method in ("kron", "diag"):
        run_laplace(model, loader, Xq, method, {})
    elif method == "hfl":
        # memory does not depend on the iteration count: cap it to bound time
        run_laplace(model, loader, Xq[:1], "hfl", {"chunk_size": 1, "max_iter": 5})
    elif method == "hfl_amortized":
        run_laplace(model, loader, Xq, "hfl", {"amortize": 8, "max_iter": 5})
    elif method == "cg_inverse":
        from laplace_hfl.bench.benchmark.cases import Case
        from laplace_hfl.bench.benchmark.methods import cg_inverse_predictor

        case = Case(name="mem", model=model, likelihood="regression", sigma_noise=SIGMA,
                    prior_precision=PRIOR, train_xy=(X, y), Xq=Xq)  # fmt: skip
        cg_inverse_predictor(case, max_iter=5)(Xq)
    else:
        raise ValueError(f"unknown method {method!r}")
    out["seconds"] = time.perf_counter() - t0
    out["status"] = "ok"
    out["peak_rss_mb"] = peak_rss_mb()
    return out


def run_laplace(model, loader, Xq, structure, kwargs):
    from laplace import Laplace

    import laplace_hfl  # noqa: F401
    from laplace_hfl.bench.benchmark.cases import PRIOR, SIGMA

    la = Laplace(model, "regression", "all", structure, sigma_noise=SIGMA,
                 prior_precision=PRIOR, **kwargs)  # fmt: skip
    la.fit(loader)
    glm_predictive(la, Xq)


if __name__ == "__main__":
    warnings.simplefilter("ignore")
    try:
        result = measure(sys.argv[1], int(float(sys.argv[2])))
    except Exception as err:  # reported, not raised: the parent records it
        from laplace_hfl.bench.evaluation.method_row import error_text

        result = {
            "method": sys.argv[1],
            "status": f"failed: {error_text(err, first_line=False)}",
            "peak_rss_mb": peak_rss_mb(),
        }
    print(json.dumps(result))
