#!/bin/bash
# Preset fusion_late: one task per GPU. Site settings are sbatch flags, e.g.
#   sbatch --partition=gpu --account=proj --time=04:00:00 slurm/fusion.sh [KEY=VALUE ...]
#SBATCH --job-name=fusion
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=1
#SBATCH --cpus-per-task=8
#SBATCH --time=04:00:00
#SBATCH --signal=USR1@180
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=runs/%x-%j.out
PRESET=fusion_late
source "${RETINA_DIST_ROOT:-$SLURM_SUBMIT_DIR}/slurm/job.sh"
