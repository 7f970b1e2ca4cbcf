"""manifest.json: the truth about a packed dataset (shards, counts, hashes, histograms, skips)."""

from __future__ import annotations

import json
import tarfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"


class DataError(RuntimeError):
    """A packed dataset that does not match its manifest, or a split that cannot be read."""


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
        )

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["views"] = list(self.views)
        return out

    @property
    def max_side(self) -> int:
        """The longest side images were shrunk to at pack time (0: kept as they were)."""
        return int(self.options.get("max_side", 0) or 0)


def load_manifest(shards_dir: str | Path) -> Manifest:
    return read_manifest(Path(shards_dir) / MANIFEST)


def read_manifest(path: str | Path) -> Manifest:
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no manifest; pack the dataset first (retina-dist pack …)")
    try:
        return Manifest.from_dict(json.loads(path.read_text()))
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
        path = Path(shards_dir) / sh.name
        if not path.exists():
            raise DataError(f"{path}: shard listed in the manifest is missing")
        out.append((str(path), sh.count))
    return out


def verify(shards_dir: str | Path) -> dict[str, Any]:
    """Re-read every shard: sample count and sha256 against the manifest. Raises DataError on mismatch."""
    from retina_dist.data.pack import sha256_file

    manifest = load_manifest(shards_dir)
    report: dict[str, Any] = {}
    problems = []
    for split, info in manifest.splits.items():
        total = 0
        for sh in info.shards:
            path = Path(shards_dir) / sh.name
            if not path.exists():
                problems.append(f"{path}: missing")
                continue
            digest = sha256_file(path)
            if digest != sh.sha256:
                problems.append(f"{path}: sha256 {digest[:12]}… != manifest {sh.sha256[:12]}…")
            try:
                with tarfile.open(path) as tar:
                    keys = {m.name.split(".", 1)[0] for m in tar.getmembers() if m.isfile()}
            except tarfile.TarError as err:
                problems.append(f"{path}: not a readable tar ({str(err).splitlines()[0]})")
                continue
            if len(keys) != sh.count:
                problems.append(f"{path}: {len(keys)} samples != manifest {sh.count}")
            total += len(keys)
        report[split] = {"count": total, "shards": len(info.shards)}
    if problems:
        raise DataError("verify failed:\n  " + "\n  ".join(problems))
    return report
