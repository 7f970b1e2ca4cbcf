"""manifest.json: the truth about a packed dataset (shards, counts, hashes, histograms, skips)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

from retina_dist.data import remote
from retina_dist.data.errors import DataError

MANIFEST = "manifest.json"
INFO = "_info.json"  # timm's WebDataset reader's split table, written beside the manifest
OURS = "json:label"  # the label inside the sidecar JSON `pack` writes

__all__ = ["INFO", "MANIFEST", "DataError", "Manifest", "ShardInfo", "SplitInfo", "timm_info"]


@dataclass(frozen=True)
class ShardInfo:
    name: str
    count: int
    sha256: str


@dataclass(frozen=True)
class SplitInfo:
    count: int
    patients: int
    histogram: dict[str, int]
    shards: list[ShardInfo]
    skipped: list[dict[str, str]] = field(default_factory=list)


@dataclass(frozen=True)
class Manifest:
    """manifest.json as typed data; ``to_dict`` gives back the file's JSON exactly."""

    dataset: str
    task: dict[str, Any]
    splits: dict[str, SplitInfo]
    views: tuple[str, ...] = ("img",)
    options: dict[str, Any] = field(default_factory=dict)
    source_report: dict[str, Any] = field(default_factory=dict)
    patient_overlap: dict[str, int] = field(default_factory=dict)
    # Where a sample's label and patient are: ``json:FIELD`` (a field of the sidecar JSON) or an
    # extension such as ``cls``. Shards `pack` wrote use the defaults; `index` records a foreign set's.
    label_key: str = OURS
    patient_key: str = "json:patient"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Manifest:
        splits = {
            name: SplitInfo(
                count=int(s["count"]),
                patients=int(s.get("patients", 0)),
                histogram=dict(s.get("histogram", {})),
                shards=[ShardInfo(sh["name"], int(sh["count"]), sh.get("sha256", "")) for sh in s["shards"]],
                skipped=list(s.get("skipped", [])),
            )
            for name, s in d.get("splits", {}).items()
        }
        return cls(
            dataset=d.get("dataset", ""),
            task=d["task"],
            splits=splits,
            views=tuple(d.get("views", ["img"])),
            options=dict(d.get("options", {})),
            source_report=dict(d.get("source_report", {})),
            patient_overlap=dict(d.get("patient_overlap", {})),
            label_key=str(d.get("label_key", OURS)),
            patient_key=str(d.get("patient_key", "json:patient")),
        )

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["views"] = list(self.views)
        return out

    @property
    def max_side(self) -> int:
        """The longest side images were shrunk to at pack time (0: kept as they were)."""
        return int(self.options.get("max_side", 0) or 0)


def timm_info(manifest: Manifest) -> dict[str, Any]:
    """``_info.json`` in timm's schema (``timm/data/readers/reader_wds.py``): ``--dataset wds/NAME
    --data-dir FOLDER`` then reads each split with its sample count."""
    return {
        "name": manifest.dataset,
        "splits": {
            split: {
                "name": split,
                "num_samples": info.count,
                "filenames": [sh.name for sh in info.shards],
                "shard_lengths": [sh.count for sh in info.shards],
            }
            for split, info in manifest.splits.items()
        },
    }


def load_manifest(shards_dir: str | Path) -> Manifest:
    """The manifest of a local folder or of a URL base (fetched once, here)."""
    if remote.is_remote(shards_dir):
        return parse_manifest(remote.fetch(remote.join(shards_dir, MANIFEST)).decode("utf-8"), shards_dir)
    return read_manifest(Path(shards_dir) / MANIFEST)


def read_manifest(path: str | Path) -> Manifest:
    path = Path(path)
    if not path.exists():
        raise DataError(
            f"{path}: no manifest; pack the dataset first (retina-dist pack …), or index shards "
            "another tool wrote (retina-dist index …)"
        )
    return parse_manifest(path.read_text(), path)


def parse_manifest(text: str, path: str | Path) -> Manifest:
    try:
        return Manifest.from_dict(json.loads(text))
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not valid JSON ({err})") from err
    except (KeyError, TypeError, ValueError) as err:
        raise DataError(f"{path}: not a retina-dist manifest ({type(err).__name__}: {err})") from err


def split_shards(shards_dir: str | Path, manifest: Manifest, split: str) -> list[tuple[str, int]]:
    """(path, sample count) of every shard of ``split``; errors name the missing or empty thing."""
    if split not in manifest.splits:
        raise DataError(
            f"{Path(shards_dir) / MANIFEST}: no split {split!r} (has: {', '.join(sorted(manifest.splits))})"
        )
    info = manifest.splits[split]
    if info.count == 0:
        raise DataError(f"{Path(shards_dir) / MANIFEST}: split {split!r} is empty (0 samples)")
    out = []
    for sh in info.shards:
        path = remote.join(shards_dir, sh.name)
        if not remote.is_remote(path) and not Path(path).exists():
            raise DataError(f"{path}: shard listed in the manifest is missing")
        out.append((path, sh.count))
    return out


def _sha256(fh: IO[bytes]) -> str:
    h = hashlib.sha256()
    while chunk := fh.read(1 << 20):
        h.update(chunk)
    return h.hexdigest()


def verify(shards_dir: str | Path) -> dict[str, Any]:
    """Re-read every shard: sample count and sha256 against the manifest. Raises DataError on
    mismatch. Says when the shards predate the layout other tools read (and how to repack)."""
    from retina_dist.data.stream.shard_reader import read_samples

    manifest = load_manifest(shards_dir)
    report: dict[str, Any] = {}
    problems = []
    legacy = 0
    for split, info in manifest.splits.items():
        total = 0
        for sh in info.shards:
            path = remote.join(shards_dir, sh.name)
            try:
                with remote.open_shard(path) as fh:
                    digest = _sha256(fh)
            except DataError as err:
                problems.append(str(err))
                continue
            if sh.sha256 and digest != sh.sha256:
                problems.append(f"{path}: sha256 {digest[:12]}… != manifest {sh.sha256[:12]}…")
            try:
                samples = list(read_samples([path]))
            except DataError as err:
                problems.append(str(err))
                continue
            if len(samples) != sh.count:
                problems.append(f"{path}: {len(samples)} samples != manifest {sh.count}")
            legacy += sum(1 for s in samples if any(k.startswith("img.") for k in s))
            total += len(samples)
        report[split] = {"count": total, "shards": len(info.shards)}
    if problems:
        raise DataError("verify failed:\n  " + "\n  ".join(problems))
    if legacy:
        report["note"] = (
            f"{legacy} samples store their image as img.<ext> (packed by an earlier retina-dist): "
            "this stream reads them, timm and webdataset pipelines look for <key>.jpg/.png and "
            "<key>.cls. To make them readable there, pack again into a new folder "
            "(retina-dist pack … --out NEW)."
        )
    elif not remote.is_remote(shards_dir) and not (Path(shards_dir) / INFO).exists():
        report["note"] = f"no {INFO}: timm's wds reader needs it (pack writes it; index writes it too)"
    return report
