#!/bin/bash
# ODIR-5K dual-eye ConvNeXt-S at 384 px, the reference run: one task per GPU, 4 GPUs per node.
#   sbatch slurm/odir.sh
#   sbatch --nodes=2 --partition=gpu --account=myproj --time=12:00:00 slurm/odir.sh train.epochs=30
# Site settings are sbatch flags: they override the lines below without editing this file.
#SBATCH --job-name=odir
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=4
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=8
#SBATCH --time=08:00:00
#SBATCH --signal=USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=runs/%x-%j.out
PRESET=odir_dual_convnext_s384
source "${RETINA_DIST_ROOT:-$SLURM_SUBMIT_DIR}/slurm/job.sh"
