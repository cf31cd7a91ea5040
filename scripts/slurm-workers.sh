#!/usr/bin/env bash
# Example Slurm array job: N machines, each running tlopt workers on all its GPUs, against one
# PostgreSQL server. The study holds everything else, so every task runs the same command.
#
#   tlopt study create --config studies/flowers.toml --stage freeze1 \
#       --storage "$TLOPT_STORAGE"                       # once, from any machine
#   sbatch --array=0-1 scripts/slurm-workers.sh flowers/freeze1
#
# Set TLOPT_STORAGE (postgresql://user:password@db-host/tlopt) in the environment Slurm passes
# on, point [storage] artifacts at a path every node mounts, and keep the data at the same path
# on every node (the study checks the data fingerprint).
#SBATCH --job-name=tlopt-worker
#SBATCH --nodes=1
#SBATCH --gres=gpu:4
#SBATCH --cpus-per-task=16
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --output=tlopt-worker-%A_%a.log
set -euo pipefail
usage="usage: sbatch --array=0-N scripts/slurm-workers.sh STUDY [PER_GPU]"
if [[ $# -lt 1 || $# -gt 2 ]]; then
    echo "slurm-workers.sh: error: $usage" >&2
    exit 2
fi
study="$1"
per_gpu="${2:-2}"
if [[ -z "${TLOPT_STORAGE:-}" ]]; then
    echo "slurm-workers.sh: error: set TLOPT_STORAGE to the PostgreSQL URL" >&2
    exit 2
fi
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
source scripts/setup >/dev/null
# Slurm sets CUDA_VISIBLE_DEVICES to the GPUs it granted; --gpus all uses exactly those.
# A requeued or preempted task is safe: its running trials are failed after the heartbeat's
# grace period and retried, from their last checkpointed epoch, by any worker.
exec tlopt worker --study "$study" --gpus all --per-gpu "$per_gpu"
