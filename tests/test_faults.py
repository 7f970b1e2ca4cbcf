"""Faults a run must survive with nothing lost: real processes, real files, each bounded in time."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import psutil
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from retina_dist.data.manifest import load_manifest
from retina_dist.run.checkpoints import Checkpointer, CorruptCheckpoint, load
from tests.conftest import REPO, TINY, run_cli


@pytest.fixture(scope="module")
def two_checkpoints(shards, tmp_path_factory) -> Path:
    """A finished 2-epoch run with one checkpoint per epoch (both kept)."""
    run_dir = tmp_path_factory.mktemp("faults") / "r"
    run_cli("train", "--run-dir", str(run_dir), f"data.shards={shards}", *TINY, "train.epochs=2")
    return run_dir


def _checkpoints(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "checkpoints").glob("step-*.pt"))


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10  # one bit, inside a tensor's bytes: torch.load would not notice
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [_truncate, _flip], ids=["truncated", "bit-flipped"])
def test_a_corrupt_latest_checkpoint_is_named_and_resume_falls_back(two_checkpoints, tmp_path, damage):
    run_dir = tmp_path / "r"
    shutil.copytree(two_checkpoints, run_dir)
    first, last = _checkpoints(run_dir)
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == last.name
    damage(last)

    # Read-only commands refuse it, naming the file, with no traceback.
    for command in (["eval", "--run-dir", str(run_dir)], ["consolidate", "--run-dir", str(run_dir)]):
        proc = run_cli(*command, check=False)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert f"{last} is corrupt" in proc.stderr and "Traceback" not in proc.stderr

    # A resume passes over it to the previous whole checkpoint and trains on to the end.
    proc = run_cli(
        "train", "--run-dir", str(run_dir), "train.epochs=3", "--preset", str(run_dir / "config.yaml")
    )
    assert f"{last} is corrupt" in proc.stderr
    assert f"resuming from {first.name}, the newest whole checkpoint" in proc.stderr
    assert "resumed from " + first.name in proc.stderr
    ck = Checkpointer(run_dir / "checkpoints")
    final = ck.latest(verify=True)  # the new latest is whole and recorded
    assert final is not None and final.name > last.name
    assert load(final)["state"]["epoch"] == 3


def test_resume_with_every_checkpoint_corrupt_is_a_clear_error(two_checkpoints, tmp_path):
    run_dir = tmp_path / "r"
    shutil.copytree(two_checkpoints, run_dir)
    for path in _checkpoints(run_dir):
        _flip(path)
    with pytest.raises(CorruptCheckpoint, match="every checkpoint is corrupt"):
        Checkpointer(run_dir / "checkpoints").resumable()


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 1 MiB tmpfs: a disk that fills up. Needs root (CI's runner is root)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root; this user is not")
    where = tmp_path / "disk"
    where.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(where)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=True)


def test_a_full_disk_fails_the_save_cleanly_and_keeps_the_previous_checkpoint(small_tmpfs):
    ck = Checkpointer(small_tmpfs / "checkpoints")
    small = {"model": {"w": torch.arange(1000.0)}}
    ck.save(small, step=1)
    with pytest.raises(
        OSError, match=r"could not write checkpoint .*step-00000002\.pt .*No space left"
    ) as err:
        ck.save({"model": {"w": torch.zeros(1_000_000)}}, step=2)  # 4 MB into 1 MiB
    assert "step-00000001.pt stays latest and loadable" in str(err.value)
    left = sorted(p.name for p in ck.folder.iterdir())
    assert left == ["checksums.json", "latest", "step-00000001.pt"], left  # no temp file left behind
    latest = ck.latest(verify=True)
    assert latest is not None and torch.equal(load(latest)["model"]["w"], small["model"]["w"])


@pytest.mark.parametrize(
    "override, named",
    [
        ("train.batch_size=0", "train.batch_size"),
        ("train.batch_size=many", "train.batch_size"),
        ("optim.lr=fast", "optim.lr"),
        ("data.shuffle_bufer=64", "data.shuffle_bufer"),
        ("model.head.dropout=0.1", "model.head"),
        ("data.reprob=1.5", "data.reprob"),
        ("data.shards=/nonexistent/shards", "/nonexistent/shards"),
    ],
)
def test_config_faults_fail_before_any_process_starts(override, named, tmp_path):
    run_dir = tmp_path / "r"
    proc = run_cli(
        "train", "--nproc", "2", "--run-dir", str(run_dir), *TINY, override, check=False, timeout=120
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert named in proc.stderr and "Traceback" not in proc.stderr
    assert "torch.distributed" not in proc.stderr  # no rank was started
    assert not run_dir.exists()


def _shard_copy(shards: Path, tmp_path: Path) -> tuple[Path, dict[str, list[str]]]:
    out = tmp_path / "shards"
    shutil.copytree(shards, out)
    manifest = load_manifest(out)
    return out, {split: [s.name for s in info.shards] for split, info in manifest.splits.items()}


def _break_images(shard: Path, limit: int) -> int:
    """Zero the first bytes (the JPEG SOI marker) of up to ``limit`` image members, in place: the tar
    stays whole, the images become undecodable. Returns how many were broken."""
    with tarfile.open(shard) as tar:
        offsets = [m.offset_data for m in tar.getmembers() if m.name.endswith(".jpg")][:limit]
    with shard.open("r+b") as fh:
        for offset in offsets:
            fh.seek(offset)
            fh.write(b"\0" * 16)
    return len(offsets)


def test_verify_names_each_damaged_shard(shards, tmp_path):
    out, names = _shard_copy(shards, tmp_path)
    flipped, truncated, deleted = names["train"][:3]
    _break_images(out / flipped, 1)
    _truncate(out / truncated)
    (out / deleted).unlink()
    proc = run_cli("verify", str(out), check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"{out / flipped}: sha256" in proc.stderr
    assert f"{out / truncated}: sha256" in proc.stderr and f"{out / truncated}: truncated" in proc.stderr
    assert str(out / deleted) in proc.stderr and "Traceback" not in proc.stderr


def test_training_skips_and_counts_undecodable_images_then_fails_past_the_bound(shards, tmp_path):
    out, names = _shard_copy(shards, tmp_path)
    broken = _break_images(out / names["train"][0], 3)
    run_dir = tmp_path / "r"
    proc = run_cli("train", "--run-dir", str(run_dir), f"data.shards={out}", *TINY, "train.epochs=1")
    read = re.search(rf"epoch 0: {broken} of (\d+) training samples could not be decoded", proc.stderr)
    assert read, proc.stderr[-3000:]
    assert int(read.group(1)) >= load_manifest(out).splits["train"].count  # every sample was read
    acc = EventAccumulator(str(run_dir / "tb"))
    acc.Reload()
    assert [e.value for e in acc.Scalars("data/skipped")] == [broken]

    # A whole shard of undecodable images is past data.max_skipped_frac: a clear failure, early.
    _break_images(out / names["train"][1], 10_000)
    proc = run_cli(
        "train", "--run-dir", str(tmp_path / "r2"), f"data.shards={out}", *TINY, "train.epochs=1", check=False
    )
    assert proc.returncode != 0
    assert "could not be decoded, more than data.max_skipped_frac=0.05" in proc.stderr
    assert not list((tmp_path / "r2" / "checkpoints").glob("step-*"))


def test_a_truncated_shard_stops_training_naming_it_and_the_byte(shards, tmp_path):
    out, names = _shard_copy(shards, tmp_path)
    _truncate(out / names["train"][0])
    proc = run_cli(
        "train", "--run-dir", str(tmp_path / "r"), f"data.shards={out}", *TINY, "train.epochs=1", check=False
    )
    assert proc.returncode != 0
    assert re.search(rf"{re.escape(str(out / names['train'][0]))}: truncated .*byte \d+", proc.stderr)


# -- ranks that die or hang ------------------------------------------------------------------------
RANKED = [*TINY, "train.epochs=3", "train.deterministic=true", "optim.lr=3e-3", "eval.splits=[]"]


def _start(run_dir: Path, shards: Path, log: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "retina_dist", "train", "--nproc", "2", "--run-dir", str(run_dir)]
    with log.open("w") as fh:
        return subprocess.Popen(
            [*cmd, f"data.shards={shards}", *RANKED, *extra], cwd=REPO, env=env, stdout=fh, stderr=fh
        )


def _rank(launcher: subprocess.Popen, local_rank: int) -> psutil.Process:
    """The rank process itself: a direct child of the launcher (loader workers are its children)."""
    deadline = time.time() + 60
    while time.time() < deadline:
        for child in psutil.Process(launcher.pid).children():
            try:
                if child.environ().get("LOCAL_RANK") == str(local_rank):
                    return child
            except psutil.Error:
                continue
        time.sleep(0.05)
    raise AssertionError(f"local rank {local_rank} never started")


def _wait_for_checkpoint(run_dir: Path, launcher: subprocess.Popen) -> str:
    latest, deadline = run_dir / "checkpoints" / "latest", time.time() + 300
    while not latest.exists():
        assert launcher.poll() is None and time.time() < deadline, "no checkpoint was committed"
        time.sleep(0.01)
    return latest.read_text().strip()


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    path = Checkpointer(run_dir / "checkpoints").latest(verify=True)
    assert path is not None
    return load(path)["model"]


@pytest.fixture(scope="module")
def uninterrupted(shards, tmp_path_factory) -> dict[str, torch.Tensor]:
    run_dir = tmp_path_factory.mktemp("whole") / "r"
    run_cli("train", "--nproc", "2", "--run-dir", str(run_dir), f"data.shards={shards}", *RANKED)
    return _weights(run_dir)


def _assert_same_weights(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6, msg=k)


def test_a_rank_killed_mid_epoch_ends_the_job_and_the_same_command_resumes(shards, tmp_path, uninterrupted):
    run_dir, log = tmp_path / "r", tmp_path / "launcher.log"
    launcher = _start(run_dir, shards, log)
    committed = _wait_for_checkpoint(run_dir, launcher)
    victim = _rank(launcher, 1)
    victim.kill()
    killed_at = time.time()
    rc = launcher.wait(timeout=120)
    took = time.time() - killed_at
    text = log.read_text()
    assert rc == 1 and took <= 60, (rc, took, text[-3000:])
    print(f"the job ended {took:.1f} s after rank 1's SIGKILL")
    assert f"rank 1 (local 1, pid {victim.pid}) was killed by SIGKILL" in text
    assert "run the same command again to resume" in text
    # Nothing partial became latest: it is whole, and at or after the one seen committed.
    latest = Checkpointer(run_dir / "checkpoints").latest(verify=True)
    assert latest is not None and latest.name >= committed
    assert not list((run_dir / "checkpoints").glob(".*.tmp"))

    proc = run_cli("train", "--nproc", "2", "--run-dir", str(run_dir), f"data.shards={shards}", *RANKED)
    assert f"resumed from {latest.name}" in proc.stderr
    _assert_same_weights(_weights(run_dir), uninterrupted)


def test_max_restarts_resumes_in_job_after_a_rank_is_killed(shards, tmp_path, uninterrupted):
    run_dir, log = tmp_path / "r", tmp_path / "launcher.log"
    launcher = _start(run_dir, shards, log, "train.max_restarts=1")
    _wait_for_checkpoint(run_dir, launcher)
    _rank(launcher, 1).kill()
    rc = launcher.wait(timeout=300)
    text = log.read_text()
    assert rc == 0, text[-3000:]
    assert "was killed by SIGKILL; starting all 2 ranks again (restart 1 of 1)" in text
    assert re.search(r"resumed from step-\d+\.pt", text)  # the restarted ranks resumed
    _assert_same_weights(_weights(run_dir), uninterrupted)


def test_a_hung_rank_times_the_others_out_and_leaves_the_run_resumable(shards, tmp_path):
    run_dir, log = tmp_path / "r", tmp_path / "launcher.log"
    timeout_s = 10
    launcher = _start(run_dir, shards, log, f"dist.timeout_s={timeout_s}")
    _wait_for_checkpoint(run_dir, launcher)
    hung = _rank(launcher, 1)
    hung.suspend()  # SIGSTOP: alive, silent, holding its sockets open
    stopped_at = time.time()
    try:
        deadline = stopped_at + 4 * timeout_s
        while "did not complete within dist.timeout_s" not in log.read_text():
            assert time.time() < deadline, log.read_text()[-3000:]
            time.sleep(0.1)
        took = time.time() - stopped_at
        assert took <= 2 * timeout_s + 5, took
        print(f"rank 0 reported the timeout {took:.1f} s after rank 1 stopped (dist.timeout_s={timeout_s})")
        assert launcher.wait(timeout=120) == 1
    finally:
        if hung.is_running():
            hung.kill()
        if launcher.poll() is None:
            launcher.kill()
    text = log.read_text()
    assert "rank 0: a collective did not complete within dist.timeout_s=10 s" in text
    assert "another rank is hung or gone" in text
    assert Checkpointer(run_dir / "checkpoints").latest(verify=True) is not None
