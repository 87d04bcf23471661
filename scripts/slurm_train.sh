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
# One output folder on shared storage for all ranks of a job, named by the experiment, a hash of the overrides
# and the array task: resubmitting the same command resumes from its latest checkpoint (SLURM sends SIGTERM 120 s
# before the time limit; gram saves a checkpoint and exits with status 0), while another experiment, other
# overrides or another array task gets a folder of its own. OUTPUT_DIR=... overrides it.
EXPERIMENT=sample
for arg in "$@"; do
  case "$arg" in experiment=*) EXPERIMENT=${arg#experiment=} ;; esac
done
ARGS_HASH=$(printf '%s\n' "$@" | sha1sum | cut -c1-8)
OUTPUT_DIR=${OUTPUT_DIR:-outputs/slurm/${EXPERIMENT}-${ARGS_HASH}${SLURM_ARRAY_TASK_ID:+_task${SLURM_ARRAY_TASK_ID}}}
echo "gram: output folder $OUTPUT_DIR"

# --shutdown-timeout: torchrun forwards the SIGTERM and gives its workers this long to save before SIGKILL.
srun torchrun \
  --nnodes "$SLURM_NNODES" --nproc_per_node "$GPUS_PER_NODE" --shutdown-timeout 110 \
  --rdzv_id "$SLURM_JOB_ID" --rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT" \
  run.py output_dir="$OUTPUT_DIR" trainer.resume=true "$@"
