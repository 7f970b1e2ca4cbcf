"""The one way this package writes a file that someone may read concurrently or after a crash:
temp file in the same folder -> fsync -> ``os.replace`` -> fsync the folder.

A reader (or a resume after SIGKILL) sees the old file or the new one, never half of one; a write
that fails (a full disk, an exception) removes its temp file and leaves the old file in place.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any


def write_with(path: str | Path, fill: Callable[[IO[bytes]], None], mode: int = 0o644) -> Path:
    """Call ``fill(fh)`` on a temp file beside ``path`` and commit it atomically to ``path``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fill(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def fsync_dir(folder: str | Path) -> None:
    """Make a rename in ``folder`` survive a crash."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes(path: str | Path, data: bytes) -> Path:
    def fill(fh: IO[bytes]) -> None:
        fh.write(data)

    return write_with(path, fill)


def write_text(path: str | Path, text: str) -> Path:
    return write_bytes(path, text.encode())


def write_json(path: str | Path, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=1))


def save_torch(obj: Any, path: str | Path) -> Path:
    import torch

    return write_with(path, lambda fh: torch.save(obj, fh))
