#!/bin/bash
# Score a corpus on 4 nodes x 8 GPUs with SLURM and torchrun (one torchrun per node).
#   sbatch sample_configs/slurm-score.sh
# Artifacts (runs/...) must be on a filesystem every node sees; the factors and queries are built
# beforehand (fit-factors and build-query run the same way with their own section of run.yaml).
#SBATCH --job-name=infl-score
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=12:00:00
set -euo pipefail

# exit 75 (retry later) if another run holds the artifact: torchrun itself can only exit 0 or 1
flock -n runs/scores.zarr.lock true || exit 75

head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
srun torchrun \
  --nnodes "$SLURM_NNODES" --nproc_per_node 8 \
  --rdzv-backend c10d --rdzv-endpoint "$head_node:29500" --rdzv-id "$SLURM_JOB_ID" \
  -m infl score --config run.yaml --device cuda
