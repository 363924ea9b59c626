#!/usr/bin/env bash
# One-command device benchmark (see laplace_hfl/bench/benchmark/gpu.py): <= 8 minutes
# on one GPU, no network access. Writes ${OUT:-benchmarks/results}/gpu.json.
#   benchmarks/gpu.sh            full sizes (LeNet n=4000, BN CNN 1.15M params)
#   benchmarks/gpu.sh --tiny     CI sizes, a minute or two on a CPU
# On the lent device machine, bring the wheels first (docs/benchmark.md).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD" PYTHONUNBUFFERED=1
exec timeout 480 python3 -m laplace_hfl.bench.benchmark.gpu --out "${OUT:-benchmarks/results}" "$@"
