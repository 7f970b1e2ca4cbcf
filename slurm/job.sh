# The body of every slurm/<preset>.sh (sourced, never submitted itself). It expects PRESET.
#
#  - one srun task per GPU (per CPU slot without GPUs); ranks find each other from SLURM_* alone
#    (retina_dist/dist.py), rendezvous on the first host of $SLURM_JOB_NODELIST;
#  - USR1 (`#SBATCH --signal=USR1@T`, the time-limit warning, or `scancel --signal=USR1`) or TERM:
#    every rank stops at the next step boundary, rank-agreed, writes an atomic checkpoint and exits;
#    this script then requeues the job, which resumes from `latest` in the same run folder;
#  - job arrays: SWEEP=FILE maps array index i to line i (comments and blank lines skipped) of
#    KEY=VALUE overrides, appended to the script's own arguments.
#
# Variables (environment, or `sbatch --export=ALL,VAR=…`): RETINA_DIST_ROOT (checkout, default the
# submit dir), RETINA_DIST_PYTHON (default $ROOT/.venv/bin/python), SWEEP, RUN_DIR (default
# $RUN_ROOT/<job name>-<job id>; RUN_ROOT default runs).
set -euo pipefail
: "${PRESET:?slurm/job.sh is sourced by slurm/<preset>.sh, which sets PRESET}"
ROOT=${RETINA_DIST_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}
cd "$ROOT"
PYTHON=${RETINA_DIST_PYTHON:-$ROOT/.venv/bin/python}
[ -x "$PYTHON" ] || PYTHON=$(command -v python3)

args=("$@")
tag=$SLURM_JOB_ID
if [ -n "${SLURM_ARRAY_TASK_ID:-}" ]; then
    tag=${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}
    if [ -n "${SWEEP:-}" ]; then
        mapfile -t lines < <(grep -v -e '^[[:space:]]*#' -e '^[[:space:]]*$' "$SWEEP")
        if (( SLURM_ARRAY_TASK_ID >= ${#lines[@]} )); then
            echo "array index $SLURM_ARRAY_TASK_ID: $SWEEP has only ${#lines[@]} override lines" >&2
            exit 2
        fi
        read -r -a sweep <<< "${lines[$SLURM_ARRAY_TASK_ID]}"  # words, never evaluated by a shell
        args+=("${sweep[@]}")
    fi
fi
RUN_DIR=${RUN_DIR:-${RUN_ROOT:-runs}/${SLURM_JOB_NAME}-${tag}}
export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}

echo "$(date -Is) job $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-0} on $SLURM_JOB_NODELIST:" \
    "$SLURM_NTASKS tasks, preset $PRESET -> $RUN_DIR ${args[*]}"
# Without a trap, bash dies of USR1 (scancel --full signals the batch shell too) before it can requeue.
trap 'echo "$(date -Is) batch shell: USR1, the ranks checkpoint and exit"' USR1
trap 'echo "$(date -Is) batch shell: TERM"' TERM

# Once, before the ranks: validate the config, check the shards (pack a synthetic set if needed).
"$PYTHON" -m retina_dist prepare --preset "$PRESET" --run-dir "$RUN_DIR" "${args[@]}"

rc=0
srun --kill-on-bad-exit=1 "$PYTHON" -m retina_dist train --preset "$PRESET" --run-dir "$RUN_DIR" "${args[@]}" \
    || rc=$?
if [ -e "$RUN_DIR/PREEMPTED" ]; then
    echo "$(date -Is) checkpoint written ($(cat "$RUN_DIR/PREEMPTED")); requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
fi
echo "$(date -Is) job $SLURM_JOB_ID finished with exit code $rc"
exit "$rc"
