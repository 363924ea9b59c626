"""Data-parallel HFL in a torchrun job: train with DDP, then fit HFL on the same shards.

One machine, 2 CPU processes (gloo)::

    torchrun --nproc-per-node 2 examples/distributed.py

Several machines (run on every node; NCCL when CUDA is available)::

    torchrun --nnodes 2 --node-rank $NODE_RANK --nproc-per-node 8 \\
        --rdzv-backend c10d --rdzv-endpoint $MASTER_HOST:29500 examples/distributed.py

Every rank trains on its ``DistributedSampler`` shard, fits HFL on the same
shard (each training example counted once: the sampler's padding is dropped)
and gets the same predictive as one process on the full data. Rank 0 saves the
amortised state, which any single process can load.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from laplace import Laplace
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import laplace_hfl  # noqa: F401  (registers hessian_structure="hfl")
from laplace_hfl.distributed import STATS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-data", type=int, default=1001)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--out", default="results/distributed/amortized_state.pt")
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    if cuda:  # NCCL needs one GPU per process, set before any collective
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if not cuda:
        torch.set_num_threads(1)  # one core per process
    device = torch.device("cuda" if cuda else "cpu")

    # The same data set on every rank (a real job reads it from disk).
    g = torch.Generator().manual_seed(0)
    X = torch.rand(args.n_data, 1, generator=g) * 8 - 4
    X = X[(X.abs() > 1).flatten()]  # a gap in the middle
    y = torch.sin(X) + 0.1 * torch.randn(X.shape, generator=g)
    data = TensorDataset(X.to(device), y.to(device))
    torch.manual_seed(0)  # identical initial weights on every rank
    model = nn.Sequential(nn.Linear(1, 50), nn.Tanh(), nn.Linear(50, 1)).to(device)

    # 1. DDP training on this rank's shard.
    ddp = nn.parallel.DistributedDataParallel(model)
    sampler = DistributedSampler(data, shuffle=True, seed=0)
    train = DataLoader(data, batch_size=64, sampler=sampler)
    opt = torch.optim.Adam(ddp.parameters(), lr=1e-2)
    step = 0
    while step < args.steps:
        sampler.set_epoch(step)
        for xb, yb in train:
            opt.zero_grad()
            nn.functional.mse_loss(ddp(xb), yb).backward()
            opt.step()
            step += 1

    # 2. HFL on the same shards: pass the DDP model; the loader's padding is dropped.
    fit_loader = DataLoader(data, batch_size=256, sampler=DistributedSampler(data))
    Xq = torch.linspace(-6, 6, 25, device=device)[:, None]  # same on every rank
    STATS.reset()
    start = time.perf_counter()
    la = Laplace(ddp, "regression", "all", "hfl", sigma_noise=0.1, prior_precision=1.0)
    la.fit(fit_loader)
    f_mu, f_var = la(Xq)  # collective: every rank calls it with the same Xq
    exact_s = time.perf_counter() - start

    # 3. Amortised mode: samples drawn once, across ranks; predictions are local.
    la_am = Laplace(
        ddp, "regression", "all", "hfl", sigma_noise=0.1, prior_precision=1.0,
        amortize=64,
    )  # fmt: skip
    la_am.fit(fit_loader)
    _, f_var_am = la_am(Xq)
    if rank == 0:  # save once; it loads on a single process
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        torch.save(la_am.state_dict(), args.out)
    dist.barrier()

    std = f_var.flatten().sqrt()
    # one write per line: ranks share the terminal (print writes the text and
    # the newline separately when unbuffered, so two ranks' lines can merge)
    sys.stdout.write(
        f"rank {rank}/{world}: n_data={la.n_data} (dataset {len(data)}), "
        f"exact HFL fit+predict {exact_s:.2f} s, {STATS.calls} all-reduces "
        f"({STATS.seconds:.2f} s), predictive std at x=0 {float(std[12]):.4f}, "
        f"at x=6 {float(std[-1]):.4f}; amortised std at x=0 "
        f"{float(f_var_am.flatten()[12].sqrt()):.4f}\n"
    )
    sys.stdout.flush()
    if rank == 0:
        print(f"amortised state saved to {args.out}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
