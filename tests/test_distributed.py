"""Data-parallel HFL: 2 gloo processes on unequal shards give the answer of one
process on the full data (float64, 1e-10 relative), and failures raise on every
rank in bounded time."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import assert_unchanged, is_fitted, snapshot
from distributed_cases import (
    CASES,
    build_model,
    equality_worker,
    exit_worker,
    failure_worker,
    make_laplace,
    make_problems,
    run_case,
    spawn,
)
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from laplace_hfl.engine.amortized import perturbed_rhs
from laplace_hfl.engine.example_noise import example_noise
from laplace_hfl.engine.functional import (
    LaplaceObjective,
    ParamLayout,
    ggn_matvec,
    hessian_matvec,
    make_forward,
    objective_grad,
    objective_value,
)

TOL = 1e-10
TIMEOUT = 3.0  # process-group timeout of the failure test (seconds)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


@pytest.fixture(scope="module")
def problems(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist_problems")
    probs = make_problems()
    torch.save(probs, tmp / "problems.pt")
    return tmp, probs


@pytest.fixture(scope="module")
def sharded(problems, tmp_path_factory):
    """All cases once in 2 gloo processes (one spawn: interpreter start-up
    dominates)."""
    src, probs = problems
    tmp = tmp_path_factory.mktemp("dist_equal")
    torch.save(probs, tmp / "problems.pt")
    codes = spawn(equality_worker, 2, str(tmp), list(CASES), limit=300)
    assert codes == [0, 0], f"worker exit codes {codes} (tracebacks above)"
    ranks = [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(2)]
    return tmp, ranks


@pytest.mark.parametrize("name", list(CASES))
def test_two_processes_match_one(name, problems, sharded, tmp_path):
    _, probs = problems
    _, ranks = sharded
    ref = run_case(name, probs, 0, 1, str(tmp_path))
    for rank, out in enumerate(ranks):
        got = out[name]
        assert got["n_data"] == ref["n_data"] == len(probs[CASES[name][0]]["X"])
        assert abs(got["loss"] - ref["loss"]) <= TOL * abs(ref["loss"])
        for key in ("f_mu", "f_var", "samples", "prior_precision"):
            if key in ref:
                err = _rel(got[key], ref[key])
                assert err <= TOL, f"rank {rank} {key}: relative error {err:.2e}"
        assert float(ref["f_var"].abs().max()) > 0
        # a shard's cached last-layer features are never saved
        assert ref["state_has_data"] == (CASES[name][1] == "last_layer")
        assert got["state_has_data"] is False


@pytest.mark.parametrize("name", [n for n in CASES if "amortize" in CASES[n][2]])
def test_amortized_state_saved_on_rank0_loads_on_one_process(name, problems, sharded):
    _, probs = problems
    tmp, ranks = sharded
    problem, subset, opts, _, _ = CASES[name]
    state = torch.load(tmp / f"{name}.state.pt", weights_only=False)
    model = build_model(problem)
    model.load_state_dict(probs[problem]["state"])
    la = make_laplace(problem, subset, opts, model)
    la.load_state_dict(state)
    f_mu, f_var = la.glm_predictive(probs[problem]["Xq"])
    assert _rel(f_var, ranks[0][name]["f_var"]) <= TOL
    assert _rel(f_mu, ranks[0][name]["f_mu"]) <= TOL


def test_failures_raise_on_every_rank_in_bounded_time(problems, tmp_path):
    _, probs = problems
    torch.save(probs, tmp_path / "problems.pt")
    codes = spawn(failure_worker, 2, str(tmp_path), TIMEOUT, limit=120)
    assert codes == [0, 0], f"worker exit codes {codes} (tracebacks above)"
    res = [torch.load(tmp_path / f"fail{r}.pt", weights_only=False) for r in range(2)]
    for r in range(2):
        for case in ("query", "query_shape"):
            assert res[r][case]["type"] == "HFLDistributedError", res[r][case]
            assert "different query inputs" in res[r][case]["message"]
            assert res[r][case]["seconds"] < TIMEOUT  # detected, not timed out
        assert res[r]["map"]["type"] == "HFLDistributedError"
        assert "different MAP" in res[r]["map"]["message"]
        assert res[r]["minibatch"]["type"] == "NotImplementedError"
        assert res[r]["after"]["type"] is None, res[r]["after"]
    # the failing rank raises its own error, the other names it
    assert res[1]["fit_nan"]["type"] == "ValueError"
    assert "not finite" in res[1]["fit_nan"]["message"]
    assert res[0]["fit_nan"]["type"] == "HFLDistributedError"
    assert "rank 1: ValueError" in res[0]["fit_nan"]["message"]
    for r in range(2):
        assert res[r]["fit_nan"]["seconds"] < TIMEOUT
    # a rank failing inside a data pass: its own error at once, the other's
    # collective errors at the process group's timeout, not later
    assert res[1]["midpass"]["type"] == "RuntimeError"
    assert "injected" in res[1]["midpass"]["message"]
    assert res[0]["midpass"]["type"] == "HFLDistributedError", res[0]["midpass"]
    assert "another rank" in res[0]["midpass"]["message"]
    assert res[0]["midpass"]["seconds"] < TIMEOUT + 10


def test_rank_that_exits_fails_the_others_fast(problems, tmp_path):
    _, probs = problems
    torch.save(probs, tmp_path / "problems.pt")
    codes = spawn(exit_worker, 2, str(tmp_path), 60.0, limit=120)
    assert codes == [0, 3], f"worker exit codes {codes} (tracebacks above)"
    res = torch.load(tmp_path / "exit0.pt", weights_only=False)
    assert res["type"] == "HFLDistributedError", res
    assert res["seconds"] < 30  # the closed connection, not the 60 s timeout


def test_one_process_without_group_unchanged(problems):
    """No process group: no reduce hook, no collectives, the usual errors."""
    _, probs = problems
    model = build_model("reg")
    model.load_state_dict(probs["reg"]["state"])
    la = make_laplace("reg", "all", {}, model)
    empty = DataLoader(TensorDataset(probs["reg"]["X"][:0], probs["reg"]["y"][:0]))
    with pytest.raises(ValueError, match="yielded no batches"):
        la.fit(empty)
    la.fit(DataLoader(TensorDataset(probs["reg"]["X"], probs["reg"]["y"])))
    assert la.objective().reduce is None


@pytest.mark.slow
def test_example_runs_under_torchrun(tmp_path):
    """examples/distributed.py with torchrun, 2 CPU processes (fresh
    interpreters: ~20-40 s on 2 shared cores)."""
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "state.pt"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(root))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    cmd += [str(root / "examples/distributed.py"), "--steps", "30", "--out", str(out)]
    proc = subprocess.run(
        cmd, check=False, capture_output=True, text=True, env=env, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # one report per rank, found even if the ranks' lines were to merge
    lines = re.findall(r"rank \d/2: .*?amortised std at x=0 [0-9.]+", proc.stdout)
    assert len(lines) == 2, proc.stdout
    # both ranks print the same numbers (after their rank prefix and timings)
    assert lines[0].split("std")[1:] == lines[1].split("std")[1:]
    state = torch.load(out, weights_only=True)  # a flat state: loads with weights_only
    assert state["amortized_samples"].shape[0] == 64
    assert state["n_data"] == 751


def test_example_noise_depends_on_the_example_only():
    """The noise of an example is the same in any batch, at any position."""
    shape = (500, 3, 2)
    a = example_noise(7, torch.tensor([3, 700, 255]), shape)
    b = example_noise(7, torch.tensor([255, 3]), (500, 2, 2))
    assert torch.equal(a[:, 0], b[:, 1]) and torch.equal(a[:, 2], b[:, 0])
    assert not torch.equal(a, example_noise(8, torch.tensor([3, 700, 255]), shape))
    # standard normal and independent across examples (3-4 s.e. bounds)
    assert float(a.mean().abs()) < 4 / (a.numel() ** 0.5)
    assert abs(float(a.var()) - 1) < 4 * (2 / a.numel()) ** 0.5
    assert abs(float(torch.corrcoef(a[:, :, 0].T)[0, 1])) < 4 / 500**0.5
    with pytest.raises(RuntimeError, match="same batches on every pass"):
        example_noise(7, torch.tensor([1, 2]), shape)


def test_shard_loader_refuses_samplers_that_lose_or_overlap_examples(problems):
    _, probs = problems
    ds = TensorDataset(probs["reg"]["X"], probs["reg"]["y"])
    model = build_model("reg")
    model.load_state_dict(probs["reg"]["state"])
    snap = snapshot(model)
    la = make_laplace("reg", "all", {}, model)
    dropping = DistributedSampler(ds, num_replicas=1, rank=0, drop_last=True)
    with pytest.raises(ValueError, match="drop_last=False"):
        la.fit(DataLoader(ds, sampler=dropping))
    other = DistributedSampler(ds, num_replicas=2, rank=0)
    with pytest.raises(ValueError, match="rank 0 of 2"):
        la.fit(DataLoader(ds, sampler=other))
    assert not is_fitted(la)
    assert_unchanged(model, snap)


def test_reduce_hook_applied_once_per_pass_to_the_data_term_only(problems):
    """Two identical 'ranks' (reduce = 2x) equal one process on the data twice;
    every function calls the hook once per pass, whatever the batch count."""
    _, probs = problems
    model = build_model("cls")
    model.load_state_dict(probs["cls"]["state"])
    X, y = probs["cls"]["X"], probs["cls"]["y"]
    named = list(model.named_parameters())
    layout = ParamLayout(tuple(n for n, _ in named), tuple(p.shape for _, p in named))
    theta = torch.cat([p.detach().flatten() for _, p in named])
    calls = []

    def twice(t):
        calls.append(t.shape)
        return 2 * t

    def objective(batches, reduce=None):
        return LaplaceObjective(
            forward=make_forward(model, layout, {}),
            batches=lambda: batches,
            likelihood="classification",
            h_factor=1.0,
            prior_precision=torch.full_like(theta, 0.5),
            prior_mean=torch.zeros((), dtype=theta.dtype),
            theta_map=theta,
            reduce=reduce,
        )

    shard = [(X[:20], y[:20]), (X[20:45], y[20:45]), (X[45:], y[45:])]
    doubled = objective(shard + shard)
    sharded = objective(shard, twice)
    V = torch.randn(4, theta.numel(), dtype=theta.dtype)
    thetas = theta + 0.01 * V
    pairs = [
        (objective_value(sharded, theta), objective_value(doubled, theta)),
        (objective_grad(sharded, thetas), objective_grad(doubled, thetas)),
        (ggn_matvec(sharded, V), ggn_matvec(doubled, V)),
        (hessian_matvec(sharded, thetas, V), hessian_matvec(doubled, thetas, V)),
    ]
    for got, ref in pairs:
        assert torch.allclose(got, ref, rtol=1e-12, atol=1e-12)
    assert calls == [(), (4, theta.numel()), (4, theta.numel()), (4, theta.numel())]
    # amortised right-hand sides: the prior noise is added once, after the reduce
    calls.clear()
    one = objective(shard)
    rhs = [
        perturbed_rhs(o, 3, torch.Generator().manual_seed(0))
        for o in (one, dataclasses.replace(one, reduce=twice))
    ]
    prior = perturbed_rhs(objective([]), 3, torch.Generator().manual_seed(0))
    assert torch.allclose(rhs[1] - prior, 2 * (rhs[0] - prior), rtol=1e-12)
    assert calls == [(3, theta.numel())]
