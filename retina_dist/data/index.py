"""A manifest for WebDataset shards another tool wrote (webdataset's ``ShardWriter``, img2dataset, a
colleague's script), so training and the exact-once evaluation run on them unchanged.

Each shard is read once, whole: its sha256, its samples, and per sample the label (``label_key``:
``cls`` or ``json:FIELD``), the patient when ``patient_key`` names one, and whether an image member
is there. A sample without a readable label or image is left out of the counts and listed under the
split's ``skipped`` (the stream skips it too, so the evaluation still sees every counted sample
once). The split of a shard comes from its file name (``train-*``, ``val-*``/``valid-*``,
``test-*``) unless ``split`` gives one for all."""

from __future__ import annotations

import hashlib
import io
import logging
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import braceexpand
from tqdm import tqdm

from retina_dist.data import remote
from retina_dist.data.errors import DataError
from retina_dist.data.manifest import Manifest, ShardInfo, SplitInfo
from retina_dist.data.sample_format import check_key, image_member, label
from retina_dist.data.sample_format import field as sample_field
from retina_dist.data.stream.shard_reader import read_file

log = logging.getLogger(__name__)

_SPLIT_NAMES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
_SPLIT_RE = re.compile(r"^(train|validation|valid|val|test)(?=[-_.\d])", re.IGNORECASE)


@dataclass(frozen=True)
class IndexOptions:
    label_key: str = "cls"
    classes: tuple[str, ...] = ()  # empty: inferred (indices 0..max, or the names seen, sorted)
    task: str = "multiclass"  # multiclass | multilabel
    patient_key: str = ""  # empty: each sample is its own patient
    split: str = ""  # empty: from each shard's file name
    name: str = ""


@dataclass
class _Shard:
    location: str
    split: str
    sha256: str = ""
    labels: list[Any] = field(default_factory=list)
    patients: list[str] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)


def shard_locations(source: str) -> list[str]:
    """A folder's ``*.tar`` files, or the shards a brace pattern (``{000..009}``) names, in order."""
    if not remote.is_remote(source) and Path(source).is_dir():
        found = sorted(str(p) for p in Path(source).glob("*.tar"))
        if not found:
            raise DataError(f"{source}: no .tar shards in this folder")
        return found
    names = list(braceexpand.braceexpand(source))
    if not remote.is_remote(source):
        missing = [n for n in names if not Path(n).is_file()]
        if missing:
            raise DataError(f"{missing[0]}: no such shard ({len(missing)} of {len(names)} missing)")
    return names


def split_of(location: str, given: str) -> str:
    if given:
        return given
    stem = location.rstrip("/").rsplit("/", 1)[-1]
    m = _SPLIT_RE.match(stem)
    if not m:
        raise DataError(
            f"{location}: its file name does not say its split (train-*, val-*, test-*); "
            "pass --split NAME to put every shard in one split"
        )
    return _SPLIT_NAMES[m.group(1).lower()]


def index_shards(source: str, out: Path, opts: IndexOptions, progress: bool = True) -> Manifest:
    """Read every shard ``source`` names and describe them as a manifest for the folder ``out``
    (written by the caller): shards inside ``out`` by file name, others by absolute path or URL."""
    check_key(opts.label_key)
    if opts.patient_key:
        check_key(opts.patient_key)
    if opts.task not in ("multiclass", "multilabel"):
        raise DataError(f"task {opts.task!r}: multiclass or multilabel")
    locations = shard_locations(source)
    shards = [
        _read(loc, split_of(loc, opts.split), opts)
        for loc in tqdm(locations, desc="index", unit="shard", disable=not progress)
    ]
    classes = opts.classes or _infer_classes([v for sh in shards for v in sh.labels], opts.task)
    return _manifest(source, out, shards, classes, opts)


def _read(location: str, split: str, opts: IndexOptions) -> _Shard:
    data = remote.fetch(location) if remote.is_remote(location) else _read_local(location)
    shard = _Shard(location, split, hashlib.sha256(data).hexdigest())
    for raw in read_file(io.BytesIO(data), location):
        key = raw["__key__"]
        try:
            image_member(raw, "img", True)
            value = sample_field(raw, opts.label_key)
            patient = str(sample_field(raw, opts.patient_key)) if opts.patient_key else key
        except (KeyError, ValueError, TypeError) as err:
            shard.skipped.append({"key": key, "reason": f"{type(err).__name__}: {err}"})
            continue
        shard.labels.append(value)
        shard.patients.append(patient)
    return shard


def _read_local(location: str) -> bytes:
    try:
        return Path(location).read_bytes()
    except OSError as err:
        raise DataError(f"{location}: cannot be read: {err.strerror}") from err


def _infer_classes(values: Iterable[Any], task: str) -> tuple[str, ...]:
    flat: list[Any] = []
    for v in values:
        flat.extend(v if isinstance(v, list) else [v])
    if task == "multilabel" and flat and all(isinstance(v, (int, float)) and v in (0, 1) for v in flat):
        width = max(len(v) for v in values if isinstance(v, list))
        return tuple(str(i) for i in range(width))
    names = {str(v).strip() for v in flat}
    if names and all(n.lstrip("-").isdigit() for n in names):
        return tuple(str(i) for i in range(max(int(n) for n in names) + 1))
    return tuple(sorted(names))


def _name(location: str, out: Path) -> str:
    if remote.is_remote(location):
        return location
    path = Path(location).resolve()
    return path.name if path.parent == out.resolve() else str(path)


def _manifest(
    source: str, out: Path, shards: list[_Shard], classes: tuple[str, ...], opts: IndexOptions
) -> Manifest:
    multilabel = opts.task == "multilabel"
    splits: dict[str, SplitInfo] = {}
    patients: dict[str, set[str]] = {}
    for split in sorted({sh.split for sh in shards}):
        mine = [sh for sh in shards if sh.split == split]
        hist: Counter[str] = Counter({c: 0 for c in classes})
        for sh in mine:
            for value in sh.labels:
                try:
                    target = label(value, classes, multilabel)
                except (ValueError, TypeError) as err:
                    raise DataError(
                        f"{sh.location}: label {value!r}: {err} (classes {list(classes)})"
                    ) from None
                if isinstance(target, list):
                    hist.update(c for c, on in zip(classes, target, strict=True) if on)
                else:
                    hist[classes[target]] += 1
        patients[split] = {p for sh in mine for p in sh.patients}
        splits[split] = SplitInfo(
            count=sum(len(sh.labels) for sh in mine),
            patients=len(patients[split]),
            histogram=dict(hist),
            shards=[ShardInfo(_name(sh.location, out), len(sh.labels), sh.sha256) for sh in mine],
            skipped=[{**s, "shard": sh.location} for sh in mine for s in sh.skipped],
        )
    names = sorted(patients)
    return Manifest(
        dataset=opts.name or Path(source.rstrip("/")).name.split("{")[0].rstrip("-_") or "indexed",
        task={"type": opts.task, "classes": list(classes)},
        splits=splits,
        options={"indexed_from": source},
        patient_overlap={
            f"{a}&{b}": len(patients[a] & patients[b]) for i, a in enumerate(names) for b in names[i + 1 :]
        },
        label_key=opts.label_key,
        patient_key=opts.patient_key,
    )
