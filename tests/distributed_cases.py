"""Cases of tests/test_distributed.py, run both in one process on the full data
and in spawned gloo processes on shards (this module is imported by them)."""

from __future__ import annotations

import multiprocessing as mp
import os
import sys
import time
import traceback
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from laplace import Laplace
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, Subset, TensorDataset

import laplace_hfl  # noqa: F401  (registers hessian_structure="hfl")

DT = torch.float64
SIGMA, PRIOR = 0.3, 0.5
BATCH = 5

#: name -> (problem, subset_of_weights, HFL options, shard kind, extras)
CASES = {
    "ggn_reg_uneven": ("reg", "all", {}, "uneven", {}),
    "hessian_reg_sampler": (
        "reg",
        "all",
        {"target": "hessian", "rtol": 1e-10},
        "sampler",
        {},
    ),
    "ggn_cls_shuffled": ("cls", "all", {}, "shuffled", {}),
    "hessian_cls_uneven": (
        "cls",
        "all",
        {"target": "hessian", "rtol": 1e-10},
        "uneven",
        {},
    ),
    "ggn_cls_empty": ("cls", "all", {}, "empty", {}),
    "ggn_reg_uncached": ("reg", "all", {}, "sampler", {"cache_data": False}),
    "ggn_reg_ddp": ("reg", "all", {}, "sampler", {"ddp": True}),
    "ll_cls_uneven": ("cls", "last_layer", {}, "uneven", {}),
    "ll_reg_empty": ("reg", "last_layer", {"target": "hessian"}, "empty", {}),
    "amortized_reg_shuffled": ("reg", "all", {"amortize": 16}, "shuffled", {}),
    "amortized_cls_uneven": ("cls", "all", {"amortize": 16}, "uneven", {}),
    "amortized_reg_uncached": (
        "reg",
        "all",
        {"amortize": 16},
        "shuffled",
        {"cache_data": False},
    ),
    "gridsearch_reg_uneven": ("reg", "all", {}, "uneven", {"grid": True}),
}


def make_problems() -> dict:
    """Tiny float64 networks at a stationary MAP (conftest's trainer)."""
    from conftest import make_classification, make_regression, train_stationary

    out = {}
    model, X, y = make_regression(n=41)
    out["reg"] = (train_stationary(model, X, y, "regression"), X, y)
    model, X, y = make_classification(n=61)
    out["cls"] = (train_stationary(model, X, y, "classification"), X, y)
    g = torch.Generator().manual_seed(5)
    return {
        name: {
            "state": m.state_dict(),
            "X": X,
            "y": y,
            "Xq": 3 * torch.randn(7, X.shape[1], generator=g, dtype=DT),
        }
        for name, (m, X, y) in out.items()
    }


def build_model(problem: str) -> nn.Module:
    if problem == "reg":
        net = nn.Sequential(nn.Linear(1, 10), nn.Tanh(), nn.Linear(10, 1))
    else:
        net = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 3))
    return net.to(DT)


def shard_loader(ds, kind: str, rank: int, world: int) -> DataLoader:
    """This rank's loader; the whole data set in order on one process."""
    n = len(ds)
    if world == 1:
        return DataLoader(ds, batch_size=8)
    if kind in ("sampler", "shuffled"):
        sampler = DistributedSampler(ds, shuffle=kind == "shuffled", seed=3)
        return DataLoader(ds, batch_size=BATCH, sampler=sampler)
    cut = (2 * n) // 3 if kind == "uneven" else n
    idx = range(cut) if rank == 0 else range(cut, n)
    return DataLoader(Subset(ds, list(idx)), batch_size=BATCH)


def make_laplace(problem: str, subset: str, opts: dict, model: nn.Module):
    likelihood = "regression" if problem == "reg" else "classification"
    kwargs = {"sigma_noise": SIGMA} if problem == "reg" else {}
    if subset == "last_layer":
        kwargs["last_layer_name"] = "2"
    return Laplace(
        model,
        likelihood,
        subset_of_weights=subset,
        hessian_structure="hfl",
        prior_precision=PRIOR,
        **kwargs,
        **opts,
    )


def run_case(name: str, problems: dict, rank: int, world: int, tmp: str) -> dict:
    """Fit and predict one case; returns what every rank must agree on."""
    from conftest import assert_unchanged, snapshot

    problem, subset, opts, kind, extra = CASES[name]
    data = problems[problem]
    model = build_model(problem)
    model.load_state_dict(data["state"])
    snap = snapshot(model)
    wrapped = model
    if extra.get("ddp") and world > 1:
        wrapped = nn.parallel.DistributedDataParallel(model)
    la = make_laplace(problem, subset, opts, wrapped)
    ds = TensorDataset(data["X"], data["y"])
    la.fit(
        shard_loader(ds, kind, rank, world), cache_data=extra.get("cache_data", True)
    )
    out = {"n_data": la.n_data, "loss": la.loss}
    if extra.get("grid"):
        val = DataLoader(TensorDataset(data["X"][::3], data["y"][::3]), batch_size=7)
        la.optimize_prior_precision(
            method="gridsearch", val_loader=val, grid_size=4, pred_type="glm"
        )
        out["prior_precision"] = la.prior_precision.detach().clone()
    f_mu, f_var = la.glm_predictive(data["Xq"])
    out["f_mu"], out["f_var"] = f_mu.detach(), f_var.detach()
    out["state_has_data"] = la.state_dict()["training_X"] is not None
    if "amortize" in opts:
        out["samples"] = la.amortized_samples().samples.clone()
        if rank == 0:  # saved once, loaded on one process by the test
            torch.save(la.state_dict(), Path(tmp) / f"{name}.state.pt")
    assert_unchanged(model, snap)
    return out


# ------------------------------------------------------------------- spawning
def spawn(target, world: int, tmp: str, *args, limit: float = 120.0) -> list:
    """Run ``target(rank, world, tmp, *args)`` in ``world`` new processes.

    The processes are fresh interpreters (``spawn``): forking a process in
    which autograd already ran is unsupported by torch ("Unable to handle
    autograd's threading in combination with fork-based multiprocessing"), and
    the test process has run autograd by the time these tests run. The
    children import torch and laplace themselves (~5-20 s on a shared 2-core
    machine) and set one intra-op thread before any torch work.
    """
    ctx = mp.get_context("spawn")
    procs = [
        ctx.Process(target=target, args=(rank, world, tmp, *args))
        for rank in range(world)
    ]
    for p in procs:
        p.start()
    deadline = time.monotonic() + limit
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    return [p.exitcode for p in procs]


def _start_barrier(rank: int, world: int, tmp: str, limit: float = 120.0) -> None:
    """Wait until every rank's interpreter has started (fresh interpreters
    import torch at different speeds on a loaded machine), so that the short
    process-group ``timeout`` of the failure tests measures the collectives,
    not the start-up."""
    (Path(tmp) / f"started{rank}").touch()
    deadline = time.monotonic() + limit
    while not all((Path(tmp) / f"started{r}").exists() for r in range(world)):
        if time.monotonic() > deadline:
            raise TimeoutError(f"rank {rank}: other ranks did not start in {limit} s")
        time.sleep(0.05)


def _exit_after_broken_group() -> None:
    """End a worker whose process group saw a peer fail, its results saved.

    A spawned child finalises the interpreter on exit; gloo's threads of a
    group whose peer died or timed out can then abort the process ("terminate
    called without an active exception", exit code -6) at random. The results
    are on disk, so the worker leaves without finalisation, as a forked child
    does (``os._exit``)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _init(rank: int, world: int, tmp: str, timeout: float) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    _start_barrier(rank, world, tmp)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{tmp}/store",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=timeout),
    )


def equality_worker(rank: int, world: int, tmp: str, names: list[str]) -> None:
    """Every case on this rank's shard; results to ``rank{r}.pt``."""
    _init(rank, world, tmp, timeout=60)
    problems = torch.load(Path(tmp) / "problems.pt", weights_only=False)
    out = {name: run_case(name, problems, rank, world, tmp) for name in names}
    torch.save(out, Path(tmp) / f"rank{rank}.pt")
    dist.destroy_process_group()


def _attempt(fn) -> dict:
    start = time.monotonic()
    try:
        fn()
    except Exception as err:  # recorded for the test
        return {
            "type": type(err).__name__,
            "message": str(err),
            "seconds": time.monotonic() - start,
            "trace": traceback.format_exc(),
        }
    return {"type": None, "seconds": time.monotonic() - start}


def failure_worker(rank: int, world: int, tmp: str, timeout: float) -> None:
    """Failures that leave the process group usable, then a rank that fails
    inside a data pass and stays alive (the others must time out)."""
    _init(rank, world, tmp, timeout=timeout)
    problems = torch.load(Path(tmp) / "problems.pt", weights_only=False)
    data = problems["reg"]
    ds = TensorDataset(data["X"], data["y"])
    res = {}

    def fitted(y=None):
        model = build_model("reg")
        model.load_state_dict(data["state"])
        # CG refits: every prediction passes over the data (the dense solver
        # would answer from its cached factor, with no pass to fail in)
        la = make_laplace("reg", "all", {"solver": "cg"}, model)
        d = TensorDataset(data["X"], data["y"] if y is None else y)
        la.fit(shard_loader(d, "uneven", rank, world))
        return la

    la = fitted()
    # 1. mismatched query inputs: every rank raises at the check
    Xq = data["Xq"] + (1e-12 if rank == 1 else 0.0)
    res["query"] = _attempt(lambda: la(Xq))
    res["query_shape"] = _attempt(lambda: la(data["Xq"][: 7 - rank]))
    # 2. a rank whose fit pass fails (NaN target on rank 1 only)
    y_bad = data["y"].clone()
    y_bad[-1] = float("nan")
    res["fit_nan"] = _attempt(lambda: fitted(y_bad if rank == 1 else data["y"]))
    # 3. different MAPs
    model = build_model("reg")
    model.load_state_dict(data["state"])
    if rank == 1:
        with torch.no_grad():
            model[0].bias += 1e-9

    def fit_other():
        la2 = make_laplace("reg", "all", {}, model)
        la2.fit(shard_loader(ds, "uneven", rank, world))

    res["map"] = _attempt(fit_other)
    # 4. minibatch refits are refused on every rank
    res["minibatch"] = _attempt(
        lambda: make_laplace(
            "reg", "all", {"minibatch_epochs": 2}, build_model("reg")
        ).fit(shard_loader(ds, "uneven", rank, world))
    )
    # 5. the process group still works: a correct prediction
    res["after"] = _attempt(lambda: la(data["Xq"]))
    # 6. rank 1 fails inside the refits' data passes and stays alive
    if rank == 1:

        def boom(module, inputs):
            raise RuntimeError("injected failure on rank 1")

        la.model[0].register_forward_pre_hook(boom)
    res["midpass"] = _attempt(lambda: la(data["Xq"] * 2))
    torch.save(res, Path(tmp) / f"fail{rank}.pt")
    if rank == 1:
        time.sleep(timeout + 2)  # alive, never joining the collective
    _exit_after_broken_group()


def exit_worker(rank: int, world: int, tmp: str, timeout: float) -> None:
    """Rank 1 dies (process exit) after fit; rank 0's prediction must fail."""
    _init(rank, world, tmp, timeout=timeout)
    problems = torch.load(Path(tmp) / "problems.pt", weights_only=False)
    data = problems["cls"]
    model = build_model("cls")
    model.load_state_dict(data["state"])
    la = make_laplace("cls", "all", {}, model)
    la.fit(shard_loader(TensorDataset(data["X"], data["y"]), "uneven", rank, world))
    if rank == 1:
        os._exit(3)
    res = _attempt(lambda: la(data["Xq"]))
    torch.save(res, Path(tmp) / "exit0.pt")
    _exit_after_broken_group()
