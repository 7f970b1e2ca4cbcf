"""Shared fixtures: small real shards, a CLI runner, a scratch TMPDIR (torchrun and DataLoader workers
leave files in it)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def scratch(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("scratch")
    os.environ["TMPDIR"] = str(d)
    return d


@pytest.fixture(scope="session")
def shards(tmp_path_factory, scratch) -> Path:
    """300 synthetic fundus images at 48 px, packed into real tar shards (train and val)."""
    from retina_dist.data.pack import PackOptions, pack
    from retina_dist.data.sources import build_source

    out = tmp_path_factory.mktemp("shards") / "synthetic"
    pack(
        build_source("synthetic", n=300, image_size=48, seed=1),
        out,
        PackOptions(shard_size=64, seed=1),
        workers=2,
        progress=False,
    )
    return out


def run_cli(
    *args: str, env: dict | None = None, timeout: int = 600, check: bool = True
) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.run(
        [sys.executable, "-m", "retina_dist", *args],
        cwd=REPO,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"retina-dist {' '.join(args)} exited {proc.returncode}\n{proc.stderr[-4000:]}")
    return proc


TINY = [
    "model.name=resnet10t",
    "data.image_size=32",
    "data.workers=1",
    "train.batch_size=16",
    "log.progress=lines",
    "train.log_every=2",
]
