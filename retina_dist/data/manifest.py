"""manifest.json: the truth about a packed dataset (shards, counts, hashes, histograms, skips)."""

from __future__ import annotations

import json
import os
import tarfile
import tempfile
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"


class DataError(RuntimeError):
    """A packed dataset that does not match its manifest, or a split that cannot be read."""


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write, fsync, then rename: a reader sees the old file or the new one, never half of one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def write_json_atomic(path: str | Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=1))


def load_manifest(shards_dir: str | Path) -> dict[str, Any]:
    path = Path(shards_dir) / MANIFEST
    if not path.exists():
        raise DataError(f"{path}: no manifest; pack the dataset first (retina-dist pack …)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not valid JSON ({err})") from err


def split_shards(shards_dir: str | Path, manifest: dict[str, Any], split: str) -> list[tuple[str, int]]:
    """(path, sample count) of every shard of ``split``; errors name the missing or empty thing."""
    splits = manifest.get("splits", {})
    if split not in splits:
        raise DataError(
            f"{Path(shards_dir) / MANIFEST}: no split {split!r} (has: {', '.join(sorted(splits))})"
        )
    info = splits[split]
    if info["count"] == 0:
        raise DataError(f"{Path(shards_dir) / MANIFEST}: split {split!r} is empty (0 samples)")
    out = []
    for sh in info["shards"]:
        path = Path(shards_dir) / sh["name"]
        if not path.exists():
            raise DataError(f"{path}: shard listed in the manifest is missing")
        out.append((str(path), sh["count"]))
    return out


def verify(shards_dir: str | Path) -> dict[str, Any]:
    """Re-read every shard: sample count and sha256 against the manifest. Raises DataError on mismatch."""
    from retina_dist.data.pack import sha256_file

    manifest = load_manifest(shards_dir)
    report: dict[str, Any] = {}
    problems = []
    for split, info in manifest["splits"].items():
        total = 0
        for sh in info["shards"]:
            path = Path(shards_dir) / sh["name"]
            if not path.exists():
                problems.append(f"{path}: missing")
                continue
            digest = sha256_file(path)
            if digest != sh["sha256"]:
                problems.append(f"{path}: sha256 {digest[:12]}… != manifest {sh['sha256'][:12]}…")
            try:
                with tarfile.open(path) as tar:
                    keys = {m.name.split(".", 1)[0] for m in tar.getmembers() if m.isfile()}
            except tarfile.TarError as err:
                problems.append(f"{path}: not a readable tar ({str(err).splitlines()[0]})")
                continue
            if len(keys) != sh["count"]:
                problems.append(f"{path}: {len(keys)} samples != manifest {sh['count']}")
            total += len(keys)
        report[split] = {"count": total, "shards": len(info["shards"])}
    if problems:
        raise DataError("verify failed:\n  " + "\n  ".join(problems))
    return report
