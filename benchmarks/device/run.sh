#!/usr/bin/env bash
# Issue #11's GPU check, in one go on one H100 or H200 (planned for under 8 minutes):
#   bash benchmarks/device/run.sh [bench_gpu.py options]
# prints, for a SmolLM2-135M- and a Pythia-410M-shaped model (random weights, bfloat16), the
# tokens per second of fit-factors and score against a plain forward+backward on the same tokens,
# and each stage's peak GPU memory.
# The device image has torch, transformers, typer, rich and pyyaml; zarr and numcodecs (and their
# dependencies) travel as Python 3.12 wheels in .whl/, installed here when present.
set -euo pipefail
cd "$(dirname "$0")/../.."
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
cd benchmarks
timeout 450 python3 bench_gpu.py --device cuda "$@"
