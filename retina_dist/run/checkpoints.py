"""Atomic checkpoints: temp file + fsync + rename, its sha256 recorded, then a ``latest`` pointer
written last.

A process killed at any instant leaves the previous checkpoint whole and ``latest`` pointing at it,
so a half-written file is never read. Bytes that rot after the commit (a truncated copy, a flipped
bit) no longer match the recorded sha256: a resume then falls back to the newest checkpoint that does
match, with a warning naming the bad one; eval, predict and export refuse it, naming the file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from retina_dist import atomic

log = logging.getLogger(__name__)
LATEST = "latest"
BEST = "best"  # pointer used when checkpoints are folders (DeepSpeed); files get a best.pt link
CHECKSUMS = "checksums.json"  # checkpoint name -> sha256, written at each commit before ``latest``


class ResumeError(RuntimeError):
    """A checkpoint that cannot be resumed as asked (the message says what to do instead)."""


class CorruptCheckpoint(RuntimeError):
    """A committed checkpoint whose bytes no longer match the sha256 recorded when it was written."""


def digest(path: Path) -> str:
    """sha256 of a checkpoint file, or of a checkpoint folder's files (names and bytes, sorted)."""
    if path.is_file():
        return _file_sha256(path)
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(f"{f.relative_to(path)}\0{_file_sha256(f)}\n".encode())
    return h.hexdigest()


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


class Checkpointer:
    def __init__(self, folder: str | Path, keep_last: int = 2) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.keep_last = keep_last

    def save(self, state: dict[str, Any], step: int, best: bool = False) -> Path:
        path = self.folder / f"step-{step:08d}.pt"
        save_file(state, path)
        self.commit(path, best)
        return path

    def commit(self, path: Path, best: bool = False) -> None:
        """Make a complete checkpoint (a file, or a folder of per-rank shards) the one to resume from."""
        sums = self._checksums()
        sums[path.name] = digest(path)
        # Pruned names leave the record with their files; it is committed before ``latest`` moves.
        present = {p.name for p in self.folder.glob("step-*")}
        atomic.write_json(self.folder / CHECKSUMS, {k: v for k, v in sums.items() if k in present})
        if best and path.is_file():
            tmp = self.folder / ".best.pt.tmp"
            tmp.unlink(missing_ok=True)
            os.link(path, tmp)  # a hard link: no second copy on disk
            os.replace(tmp, self.folder / "best.pt")
        elif best:
            atomic.write_text(self.folder / BEST, path.name + "\n")
        atomic.write_text(self.folder / LATEST, path.name + "\n")
        self._prune(keep={path.name, self._pointer(BEST)})

    def _checksums(self) -> dict[str, str]:
        path = self.folder / CHECKSUMS
        return json.loads(path.read_text()) if path.exists() else {}

    def verify(self, path: Path, sums: dict[str, str] | None = None) -> None:
        """``CorruptCheckpoint`` naming ``path`` when its bytes differ from those committed (``sums``:
        the record, when the caller has read it). A checkpoint committed before checksums were
        recorded is taken as it is."""
        recorded = (self._checksums() if sums is None else sums).get(path.name)
        if recorded is None:
            return
        found = digest(path)
        if found != recorded:
            size = path.stat().st_size if path.is_file() else sum(
                f.stat().st_size for f in path.rglob("*") if f.is_file()
            )
            raise CorruptCheckpoint(
                f"{path} is corrupt: its sha256 is {found[:12]}…, not the {recorded[:12]}… recorded when "
                f"it was committed ({size} bytes now; truncated or altered since)"
            )

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

    def latest(self, verify: bool = False) -> Path | None:
        """The checkpoint ``latest`` names; with ``verify``, only if its bytes are those committed."""
        name = self._pointer(LATEST)
        if not name:
            return None
        path = self.folder / name
        if not path.exists():
            raise FileNotFoundError(f"{self.folder / LATEST} names {name}, which does not exist")
        if verify:
            self.verify(path)
        return path

    def resumable(self) -> Path | None:
        """The newest committed checkpoint whose bytes verify: ``latest``, or, when that one is
        corrupt, the one before it (a warning names each one passed over). None for a fresh run."""
        latest = self.latest()
        if latest is None:
            return None
        sums = self._checksums()
        candidates = [latest] + sorted(
            (p for p in self.folder.glob("step-*") if p.name < latest.name and p.name in sums), reverse=True
        )
        bad: list[str] = []
        for path in candidates:
            try:
                self.verify(path, sums)
            except CorruptCheckpoint as err:
                log.warning("%s", err)
                bad.append(path.name)
                continue
            if bad:
                log.warning("resuming from %s, the newest whole checkpoint (passed over: %s)", path.name, bad)
            return path
        raise CorruptCheckpoint(
            f"{self.folder}: every checkpoint is corrupt ({', '.join(bad)}); nothing to resume from"
        )

    def load_latest(self) -> dict[str, Any] | None:
        path = self.resumable()
        if path is None:
            return None
        log.info("resuming from %s", path)
        return load(path)


def cpu_copy(obj: Any) -> Any:
    """``obj`` with every tensor copied to fresh CPU memory: a snapshot later steps cannot change."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: cpu_copy(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(cpu_copy(v) for v in obj)
    return obj


class BackgroundSaver:
    """Writes checkpoints on one background thread, so a step waits only for the snapshot (a CPU
    copy of the state), not for serialisation, fsync, hashing and commit. The write itself is the
    same ``save_file`` + ``Checkpointer.commit``: a kill at any instant still leaves ``latest``
    naming a whole, verified checkpoint. One save at a time: the next one (and ``wait``) first
    joins the one in flight, and raises its error, if any, there."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.last_write_s = 0.0

    def submit(self, write: Callable[[], None]) -> None:
        self.wait()
        self._thread = threading.Thread(target=self._run, args=(write,), name="checkpoint-writer")
        self._thread.start()

    def _run(self, write: Callable[[], None]) -> None:
        started = time.perf_counter()
        try:
            write()
        except BaseException as err:  # re-raised on the training thread by wait()
            self._error = err
        self.last_write_s = time.perf_counter() - started

    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            err, self._error = self._error, None
            raise err


def save_file(state: dict[str, Any], path: Path) -> Path:
    """``atomic.save_torch``, with a failed write (a full disk) reported as what it means here."""
    try:
        return atomic.save_torch(state, path)
    except (OSError, RuntimeError) as raised:
        # torch.save's zip writer answers a failed write (ENOSPC) with a RuntimeError of its own
        # ("unexpected pos"); the OSError is its context.
        err = raised if isinstance(raised, OSError) else raised.__context__
        if not isinstance(err, OSError):
            raise
        pointer = path.parent / LATEST
        previous = pointer.read_text().strip() if pointer.exists() else ""
        kept = f"{previous} stays latest and loadable" if previous else "no earlier checkpoint exists"
        raise OSError(
            err.errno, f"could not write checkpoint {path} ({err.strerror or err}); the partial file was "
            f"removed and {kept}"
        ) from raised


def load(path: str | Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


def load_deepspeed(path: str | Path, map_location: Any = "cpu") -> Any:
    """One file of a DeepSpeed checkpoint, ``weights_only``: beside tensors and builtins it pickles
    three plain DeepSpeed records (its loss scaler, the ZeRO stage enum, a fragment's address), which
    are allowed by name, and nothing else. (DeepSpeed's own loader unpickles anything.)"""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    with torch.serialization.safe_globals([LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]):
        return torch.load(path, map_location=map_location, weights_only=True)


def weights_of(path: Path) -> dict[str, torch.Tensor]:
    """The model state dict of one checkpoint (a file, or a ZeRO or FSDP folder consolidated)."""
    if not path.is_dir():
        return load(path)["model"]
    from retina_dist.run import sharded

    return sharded.consolidate(path) if sharded.is_sharded(path) else consolidate(path)


def consolidate(path: Path) -> dict[str, torch.Tensor]:
    """A plain state dict from a DeepSpeed checkpoint folder (loadable by timm and ``retina-dist eval``):
    the module as saved (buffers, frozen weights), its trainable weights replaced by the fp32 master
    copy that ZeRO-1/2 partitions across ranks. Each rank's partition of a parameter group is a slice of
    one flat vector holding the group's parameters in ``param_shapes`` order (with the per-parameter
    alignment padding the optimizer records), so the ranks' slices are joined and cut by shape."""
    model = load_deepspeed(path / "mp_rank_00_model_states.pt")
    full: dict[str, torch.Tensor] = dict(model["module"])
    rank_of = lambda p: int(p.name.split("_")[3])  # noqa: E731 - zero_pp_rank_<r>_mp_rank_00_optim_states.pt
    optim = sorted(path.glob("zero_pp_rank_*_mp_rank_00_optim_states.pt"), key=rank_of)
    if not optim:  # ZeRO stage 0: the module is the whole truth
        return full
    states = [load_deepspeed(f)["optimizer_state_dict"] for f in optim]
    paddings = states[0].get("param_alignment_paddings")
    for g, shapes in enumerate(model["param_shapes"]):
        flat = torch.cat([s["single_partition_of_fp32_groups"][g] for s in states])
        offset = 0
        for i, (name, shape) in enumerate(shapes.items()):
            n = math.prod(shape)
            if offset + n > flat.numel():
                raise CorruptCheckpoint(f"{path}: {name} lies past the end of its group's fp32 partitions")
            full[name] = flat[offset : offset + n].view(shape).clone()
            offset += n + (paddings[g][i] if paddings else 0)
    return full
