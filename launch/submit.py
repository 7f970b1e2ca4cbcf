"""Submit a preset to SLURM through submitit. Thin by design: no training logic lives here.

    python launch/submit.py --preset odir_dual_convnext_s384 --nodes 2 --gpus-per-node 4 --partition gpu
    python launch/submit.py --preset synthetic --smoke --tasks-per-node 2 --wait
    python launch/submit.py --preset synthetic --sweep slurm/sweeps/lr.txt   # one job per line (array)

Each job runs ``retina-dist train`` in every task (one per GPU); ranks find each other from SLURM's
variables. On the preemption/time-limit signal the trainer checkpoints on every rank and returns
"preempted"; the job then hands over to submitit, which calls ``checkpoint()`` and requeues it; the
requeued job resumes from the run folder's latest checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

# The trainer checkpoints on USR1 (like slurm/*.sh); submitit reads this when it is imported.
os.environ.setdefault("SUBMITIT_PREEMPT_SIGNAL", "USR1")
import submitit  # noqa: E402

EXIT_PREEMPTED = 75  # retina_dist.engine.train.EXIT_PREEMPTED, without importing torch here


class Train(submitit.helpers.Checkpointable):
    """``retina-dist train`` as a requeueable submitit callable."""

    def __init__(self, argv: list[str], run_dir: str | None) -> None:
        self.argv, self.run_dir = argv, run_dir

    def __call__(self) -> dict:
        requeue = signal.getsignal(signal.SIGUSR1)  # submitit's checkpoint-and-requeue handler
        env = submitit.JobEnvironment()
        run_dir = self.run_dir or f"runs/{env.job_id}"  # stable across requeues: same job id
        from retina_dist.cli import main  # lazily: the submitting host needs no torch import

        code = main(["train", "--run-dir", run_dir, *self.argv])
        if code == EXIT_PREEMPTED and callable(requeue):
            requeue(signal.SIGUSR1, None)  # rank 0: checkpoint() + scontrol requeue + exit
            time.sleep(300)  # other ranks: the requeue ends this task
            raise RuntimeError("preempted, but the job was not requeued")
        if code:
            raise RuntimeError(f"retina-dist train exited with {code}; see {run_dir}/train.log")
        metrics = Path(run_dir) / "metrics.json"
        return json.loads(metrics.read_text()) if metrics.exists() else {}

    def checkpoint(self) -> submitit.helpers.DelayedSubmission:
        # The state that matters is on disk (run_dir/checkpoints); resubmit the same call.
        return submitit.helpers.DelayedSubmission(Train(self.argv, self.run_dir))


def main() -> int:
    from retina_dist.commands.common import add_run_args  # argparse only: no torch on the login node

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_args(p, nproc=False, overrides=False)  # --preset, --run-dir, --smoke as `retina-dist train`
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=0)
    p.add_argument("--tasks-per-node", type=int, help="default: --gpus-per-node, or 1")
    p.add_argument("--cpus-per-task", type=int, default=1)
    p.add_argument("--partition")
    p.add_argument("--account")
    p.add_argument("--time", type=int, default=60, help="minutes")
    p.add_argument("--slurm-signal-delay-s", type=int, default=120, help="USR1 this long before the limit")
    p.add_argument("--folder", default="runs/submitit", help="submitit's logs and pickles")
    p.add_argument("--sweep", help="file of KEY=VALUE lines: one array job per line")
    p.add_argument("--wait", action="store_true", help="block until done and print the metrics")
    args, overrides = p.parse_known_args()
    # Default run folder: runs/<job id> (with --sweep always runs/<array id>_<index>).
    argv = ["--preset", args.preset, *(["--smoke"] if args.smoke else []), *overrides]

    # Pack (synthetic) or check the shards once, here, instead of racing N ranks to do it.
    where = ["--run-dir", args.run_dir] if args.run_dir else []
    prepare = [sys.executable, "-m", "retina_dist", "prepare", *where, *argv]
    subprocess.run(prepare, check=True, stdout=subprocess.DEVNULL)

    executor = submitit.AutoExecutor(folder=args.folder)
    slurm = {"slurm_partition": args.partition, "slurm_account": args.account}
    if args.gpus_per_node:
        slurm["slurm_gpus_per_node"] = args.gpus_per_node
    executor.update_parameters(
        name=f"retina-{args.preset}",
        nodes=args.nodes,
        tasks_per_node=args.tasks_per_node or args.gpus_per_node or 1,
        cpus_per_task=args.cpus_per_task,
        timeout_min=args.time,
        slurm_signal_delay_s=args.slurm_signal_delay_s,
        **{k: v for k, v in slurm.items() if v is not None},
    )
    if args.sweep:
        text = Path(args.sweep).read_text().splitlines()
        lines = [ln.split() for ln in text if ln.strip() and not ln.lstrip().startswith("#")]
        with executor.batch():  # one SLURM job array; each task's run folder is runs/<array>_<index>
            jobs = [executor.submit(Train([*argv, *extra], None)) for extra in lines]
    else:
        jobs = [executor.submit(Train(argv, args.run_dir))]
    for job in jobs:
        print(f"submitted job {job.job_id}: {args.folder}/{job.job_id}_0_log.out", flush=True)
    if args.wait:
        for job in jobs:
            print(json.dumps(job.results()[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
