#!/usr/bin/env bash
# Multi-node GRAM training under SLURM: one torchrun per node, each starting one process per GPU.
# Usage: sbatch scripts/slurm_train.sh experiment=finetune_msrvtt_tvas paths.data_dir=/shared/data
#SBATCH --job-name=gram
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=32
#SBATCH --time=24:00:00
#SBATCH --signal=TERM@120
set -euo pipefail

GPUS_PER_NODE=${GPUS_PER_NODE:-4}
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_PORT=${MASTER_PORT:-29500}
# One output folder on shared storage for every rank; a resubmitted job resumes from its latest checkpoint
# (SLURM sends SIGTERM 120 s before the time limit: gram saves a checkpoint and exits cleanly).
OUTPUT_DIR=${OUTPUT_DIR:-outputs/slurm-${SLURM_JOB_NAME}}

srun torchrun \
  --nnodes "$SLURM_NNODES" --nproc_per_node "$GPUS_PER_NODE" \
  --rdzv_id "$SLURM_JOB_ID" --rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT" \
  run.py output_dir="$OUTPUT_DIR" trainer.resume=true "$@"
