"""Atomic checkpoints: temp file + fsync + rename, then a ``latest`` pointer written last.

A process killed at any instant leaves the previous checkpoint whole and ``latest`` pointing at it;
resume only ever follows ``latest``, so a half-written file is never read.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from retina_dist import atomic

log = logging.getLogger(__name__)
LATEST = "latest"
BEST = "best"  # pointer used when checkpoints are folders (DeepSpeed); files get a best.pt link


class ResumeError(RuntimeError):
    """A checkpoint that cannot be resumed as asked (the message says what to do instead)."""


class Checkpointer:
    def __init__(self, folder: str | Path, keep_last: int = 2) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.keep_last = keep_last

    def save(self, state: dict[str, Any], step: int, best: bool = False) -> Path:
        path = self.folder / f"step-{step:08d}.pt"
        atomic.save_torch(state, path)
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
            atomic.write_text(self.folder / BEST, path.name + "\n")
        atomic.write_text(self.folder / LATEST, path.name + "\n")
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


def weights_of(path: Path) -> dict[str, torch.Tensor]:
    """The model state dict of one checkpoint (a file, or a ZeRO folder consolidated)."""
    return consolidate(path) if path.is_dir() else load(path)["model"]


def consolidate(path: Path) -> dict[str, torch.Tensor]:
    """A plain fp32 state dict from a ZeRO checkpoint folder (loadable by timm and ``retina-dist eval``)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(path.parent), tag=path.name)
