#!/bin/bash
# The built-in synthetic set on CPU slots (no GPU, no download): the smoke test of a cluster.
#   sbatch slurm/synthetic.sh [--smoke] [KEY=VALUE ...]
#SBATCH --job-name=synthetic
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=2
#SBATCH --cpus-per-task=1
#SBATCH --time=00:30:00
#SBATCH --signal=USR1@60
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=runs/%x-%j.out
PRESET=synthetic
source "${RETINA_DIST_ROOT:-$SLURM_SUBMIT_DIR}/slurm/job.sh"
