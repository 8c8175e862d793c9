#!/bin/bash
# Multi-node co-distillation under SLURM: one torchrun per node, all GPUs of the node.
#   sbatch launch/slurm.sh --config configs/tiny.yaml output_dir=runs/big
# SIGTERM reaches every training process 2 minutes before the time limit: each rank
# finishes its step, the run saves a checkpoint and exits 0; --requeue plus
# resume=auto continues it in the next allocation.
#SBATCH --job-name=codistill
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=24:00:00
#SBATCH --signal=TERM@120
#SBATCH --requeue
#SBATCH --output=%x-%j.out
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-.}"
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_PORT=${MASTER_PORT:-29500}
GPUS=${SLURM_GPUS_ON_NODE:-8}
export MASTER_ADDR MASTER_PORT GPUS
srun --kill-on-bad-exit=1 bash -c '
  exec torchrun --nnodes "$SLURM_NNODES" --node_rank "$SLURM_NODEID" --nproc_per_node "$GPUS" \
    --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
    launch/train.py "$@" resume=auto' bash "$@"
