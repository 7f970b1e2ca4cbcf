"""Against a real slurmctld + slurmd on this machine (.ci/slurm-up.sh brings them up).

Skipped only where `sbatch` is absent (a developer laptop); CI sets RETINA_DIST_REQUIRE_SLURM=1,
which turns that skip into a failure.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from retina_dist.data.manifest import load_manifest
from retina_dist.run.checkpoints import Checkpointer, load
from tests.conftest import REPO, TINY

TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL"}
# 4 epochs of 8 steps: long enough that a signal sent at step 4 lands mid-training.
SMOKE = [*TINY, "train.epochs=4", "optim.lr=3e-3"]


@pytest.fixture(scope="module")
def slurm():
    if shutil.which("sbatch") is None:
        if os.environ.get("RETINA_DIST_REQUIRE_SLURM"):
            pytest.fail("RETINA_DIST_REQUIRE_SLURM is set but sbatch is not on PATH (run .ci/slurm-up.sh)")
        pytest.skip("no SLURM here (sbatch not on PATH); `sudo bash .ci/slurm-up.sh` starts one")
    state = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], capture_output=True, text=True, timeout=30)
    assert state.returncode == 0 and "idle" in state.stdout, (
        f"SLURM node not idle: {state.stdout}{state.stderr}"
    )


def sbatch(*args: str, env: dict | None = None) -> str:
    full = {**os.environ, "RETINA_DIST_PYTHON": sys.executable, **(env or {})}
    out = subprocess.run(
        ["sbatch", "--parsable", *args], cwd=REPO, env=full, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().split(";")[0]


def job_state(job: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True, timeout=30).stdout
    m = re.search(r"JobState=(\S+)", out)
    return m.group(1) if m else "GONE"


def wait_done(job: str, log: Path, timeout: float = 300) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = job_state(job)
        if state in TERMINAL or state == "GONE":
            return state
        time.sleep(1)
    subprocess.run(["scancel", job])
    raise AssertionError(f"job {job} still {state} after {timeout} s\n{_tail(log)}")


def wait_for(path: Path, pattern: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and re.search(pattern, path.read_text()):
            return
        time.sleep(0.2)
    raise AssertionError(f"{pattern!r} never appeared in {path}\n{_tail(path)}")


def _tail(path: Path) -> str:
    return path.read_text()[-4000:] if path.exists() else f"({path} missing)"


def _weights(run_dir: Path) -> dict:
    return load(Checkpointer(run_dir / "checkpoints").latest())["model"]


@pytest.fixture(scope="module")
def uninterrupted(slurm, shards, tmp_path_factory):
    root = tmp_path_factory.mktemp("slurm")
    job = sbatch(
        f"--output={root}/%x-%j.out",
        "slurm/synthetic.sh",
        f"data.shards={shards}",
        *SMOKE,
        env={"RUN_ROOT": str(root)},
    )
    log = root / f"synthetic-{job}.out"
    assert wait_done(job, log) == "COMPLETED", _tail(log)
    return root / f"synthetic-{job}", log


def test_sbatch_script_trains_two_tasks_and_writes_the_run_folder(uninterrupted, shards):
    run_dir, log = uninterrupted
    text = log.read_text()
    assert "2 tasks, preset synthetic" in text and "finished with exit code 0" in text
    train_log = (run_dir / "train.log").read_text()
    assert "2 ranks (slurm)" in train_log
    metrics = json.loads((run_dir / "metrics.json").read_text())["val"]
    assert metrics["n"] == load_manifest(shards).splits["val"].count
    assert metrics["step"] == 32
    assert (run_dir / "figures" / "val_confusion.png").exists()
    assert not (run_dir / "PREEMPTED").exists()


def test_preempted_job_checkpoints_requeues_and_ends_like_an_uninterrupted_one(
    uninterrupted, shards, tmp_path
):
    ref_dir, _ = uninterrupted
    job = sbatch(
        f"--output={tmp_path}/%x-%j.out",
        "slurm/synthetic.sh",
        f"data.shards={shards}",
        *SMOKE,
        "train.log_every=1",
        env={"RUN_ROOT": str(tmp_path)},
    )
    run_dir, log = tmp_path / f"synthetic-{job}", tmp_path / f"synthetic-{job}.out"
    wait_for(run_dir / "train.log", r"step 3/32")
    signalled = time.monotonic()
    # What SLURM's time-limit warning does (--signal=USR1@T): USR1 to every process of the job steps.
    subprocess.run(["scancel", "--signal=USR1", job], check=True)
    wait_for(log, r"restart 1 on", timeout=120)
    wait_for(run_dir / "train.log", r"SLURM restart 1", timeout=120)
    resumed = time.monotonic() - signalled
    assert wait_done(job, log) == "COMPLETED", _tail(log)

    text, train_log = log.read_text(), (run_dir / "train.log").read_text()
    m = re.search(r"checkpoint written \(step (\d+)\); requeueing", text)
    assert m and 3 <= int(m.group(1)) < 32, text  # stopped mid-training, at a step boundary
    assert f"resumed from step-{int(m.group(1)):08d}.pt" in train_log
    print(f"signal -> requeued job training again: {resumed:.1f} s")

    # Same final weights and metrics as the run that was never interrupted (CPU, deterministic).
    ref, got = _weights(ref_dir), _weights(run_dir)
    assert all(torch.allclose(ref[k].float(), got[k].float(), atol=1e-6) for k in ref)
    ref_m = json.loads((ref_dir / "metrics.json").read_text())["val"]
    got_m = json.loads((run_dir / "metrics.json").read_text())["val"]
    for key in ("n", "step", "accuracy", "macro_auroc", "qwk"):
        assert got_m[key] == pytest.approx(ref_m[key], abs=1e-6), key

    # One TensorBoard run, every step once on the x-axis.
    acc = EventAccumulator(str(run_dir / "tb"))
    acc.Reload()
    steps = [e.step for e in acc.Scalars("train/loss")]
    assert steps == sorted(set(steps)) and steps[-1] == 32


def test_array_job_maps_each_index_to_its_sweep_line(slurm, shards, tmp_path):
    sweep = tmp_path / "sweep.txt"
    sweep.write_text("# lr sweep\noptim.lr=1e-3\n\noptim.lr=5e-3 train.batch_size=8\n")
    job = sbatch(
        "--array=0-1",
        "--ntasks-per-node=1",
        f"--output={tmp_path}/%x-%A_%a.out",
        "slurm/synthetic.sh",
        f"data.shards={shards}",
        *TINY,
        "train.epochs=1",
        "train.max_steps=2",
        env={"RUN_ROOT": str(tmp_path), "SWEEP": str(sweep)},
    )
    for i in (0, 1):
        log = tmp_path / f"synthetic-{job}_{i}.out"
        assert wait_done(f"{job}_{i}", log) == "COMPLETED", _tail(log)
    cfgs = [(tmp_path / f"synthetic-{job}_{i}" / "config.yaml").read_text() for i in (0, 1)]
    assert "lr: 0.001" in cfgs[0] and "batch_size: 16" in cfgs[0]
    assert "lr: 0.005" in cfgs[1] and "batch_size: 8" in cfgs[1]


def test_submitit_launcher_runs_the_smoke_job_and_returns_its_metrics(slurm, shards, tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [
            sys.executable,
            "launch/submit.py",
            "--preset",
            "synthetic",
            "--tasks-per-node",
            "2",
            "--time",
            "5",
            "--folder",
            str(tmp_path / "submitit"),
            "--run-dir",
            str(run_dir),
            "--wait",
            f"data.shards={shards}",
            *TINY,
            "train.epochs=1",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    metrics = json.loads(proc.stdout.strip().splitlines()[-1])["val"]
    assert metrics["n"] == load_manifest(shards).splits["val"].count
    assert metrics == json.loads((run_dir / "metrics.json").read_text())["val"]
    assert "2 ranks (slurm)" in (run_dir / "train.log").read_text()
