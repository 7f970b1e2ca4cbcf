"""Atomic checkpoints: temp file + fsync + rename, then a ``latest`` pointer written last.

A process killed at any instant leaves the previous checkpoint whole and ``latest`` pointing at it;
resume only ever follows ``latest``, so a half-written file is never read.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from retina_dist.data.manifest import write_text_atomic

log = logging.getLogger(__name__)
LATEST = "latest"
BEST = "best"  # pointer used when checkpoints are folders (DeepSpeed); files get a best.pt link


def save_atomic(obj: Any, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself survives a crash
    finally:
        os.close(dir_fd)


class ResumeError(RuntimeError):
    """A checkpoint that cannot be resumed as asked (the message says what to do instead)."""


class Checkpointer:
    def __init__(self, folder: str | Path, keep_last: int = 2) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.keep_last = keep_last

    def save(self, state: dict[str, Any], step: int, best: bool = False) -> Path:
        path = self.folder / f"step-{step:08d}.pt"
        save_atomic(state, path)
        self.commit(path, best)
        return path

    def commit(self, path: Path, best: bool = False) -> None:
        """Make a complete checkpoint (a file, or a folder of per-rank shards) the one to resume from."""
        if best and path.is_file():
            tmp = self.folder / ".best.pt.tmp"
            tmp.unlink(missing_ok=True)
            os.link(path, tmp)  # a hard link: no second copy on disk
            os.replace(tmp, self.folder / "best.pt")
        elif best:
            write_text_atomic(self.folder / BEST, path.name + "\n")
        write_text_atomic(self.folder / LATEST, path.name + "\n")
        self._prune(keep={path.name, self._pointer(BEST)})

    def _pointer(self, name: str) -> str:
        pointer = self.folder / name
        return pointer.read_text().strip() if pointer.exists() else ""

    def _prune(self, keep: set[str]) -> None:
        entries = sorted(self.folder.glob("step-*"))
        for old in entries[: max(0, len(entries) - self.keep_last)]:
            if old.name not in keep:
                shutil.rmtree(old) if old.is_dir() else old.unlink(missing_ok=True)
        for tmp in self.folder.glob(".step-*.tmp"):  # debris of a save that was killed
            tmp.unlink(missing_ok=True)

    def latest(self) -> Path | None:
        name = self._pointer(LATEST)
        if not name:
            return None
        path = self.folder / name
        if not path.exists():
            raise FileNotFoundError(f"{self.folder / LATEST} names {name}, which does not exist")
        return path

    def load_latest(self) -> dict[str, Any] | None:
        path = self.latest()
        if path is None:
            return None
        log.info("resuming from %s", path)
        return load(path)


def load(path: str | Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)
