"""Shared fixtures: small real shards, a CLI runner, a scratch TMPDIR (torchrun and DataLoader workers
leave files in it)."""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
import zlib
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


# Two ranks of a TINY run under a sharding strategy (append train.strategy=…); [2:] drops the --nproc.
TWO_RANKS = [
    "--nproc", "2", *TINY, "train.epochs=2", "data.workers=2", "optim.lr=3e-3", "train.deterministic=true"
]


def check_consolidated_evaluates_as_trained(run_dir: Path, tmp_path: Path) -> dict:
    """``consolidate`` a sharded run, evaluate those weights, and compare with the run's own
    predictions (1e-5); returns the plain state dict."""
    import csv

    import numpy as np
    import torch

    out = tmp_path / "plain.pt"
    run_cli("consolidate", "--run-dir", str(run_dir), "--out", str(out))
    run_cli("eval", "--run-dir", str(run_dir), "--weights", str(out))

    def probs(results: Path) -> dict:
        with open(results / "predictions" / "val.csv") as fh:
            rows = csv.DictReader(fh)
            return {r["key"]: [float(v) for k, v in r.items() if k.startswith("prob_")] for r in rows}

    evaluated = run_dir / "evals" / "val-plain"  # <split>-<weights file's stem>, apart from the training
    a, b = probs(run_dir), probs(evaluated)
    assert a.keys() == b.keys()
    np.testing.assert_allclose([b[k] for k in a], [a[k] for k in a], atol=1e-5)
    import json

    assert json.loads((evaluated / "metrics.json").read_text())["val"]["n"] == len(a)
    return torch.load(out, weights_only=True)["model"]


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bomb(width: int, height: int) -> bytes:
    """A valid grey PNG of ``width`` x ``height`` zeros: a few hundred KB that decode to w x h bytes."""
    z, row = zlib.compressobj(9), bytes(width + 1)  # filter byte 0 + a row of zeros
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    chunks = png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + chunks


def with_png_chunk(png: bytes, kind: bytes, data: bytes) -> bytes:
    """``png`` with one more chunk right after its IHDR (e.g. an oversized iCCP or eXIf)."""
    end_of_ihdr = 8 + 8 + 13 + 4
    return png[:end_of_ihdr] + png_chunk(kind, data) + png[end_of_ihdr:]
