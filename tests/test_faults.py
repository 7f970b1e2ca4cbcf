"""Faults a run must survive with nothing lost: real processes, real files, each bounded in time."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from retina_dist.run.checkpoints import Checkpointer, CorruptCheckpoint, load
from tests.conftest import TINY, run_cli


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
