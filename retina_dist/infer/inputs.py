"""What ``predict`` was pointed at, as named samples: image files, folders (recursively), zip files
(members read in memory, never extracted), and for two-view models pairs of ``<id>_<view>`` files or
explicit ``--left/--right`` lists. Anything that is not an image is listed as skipped, with why."""

from __future__ import annotations

import functools
import re
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp")
MAX_MEMBER_BYTES = 256 << 20  # a zip member larger than this is not a retinal image
NOT_IMAGE = "not an image file type (" + ", ".join(IMAGE_EXTS) + ")"


@dataclass(frozen=True)
class InputFile:
    name: str  # shown in the CSV: a path, or archive.zip:member
    read: Callable[[], bytes]


@dataclass(frozen=True)
class Sample:
    name: str
    views: tuple[InputFile, ...]


@dataclass(frozen=True)
class Skipped:
    name: str
    reason: str


def _file(path: Path) -> InputFile:
    return InputFile(str(path), path.read_bytes)


def _zip_members(path: Path, skipped: list[Skipped]) -> list[InputFile]:
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as err:
        skipped.append(Skipped(str(path), f"not a readable zip file ({err})"))
        return []
    out = []
    # Kept open for the samples' lazy reads: reopening per member would re-parse the central
    # directory once per image.
    for info in sorted(zf.infolist(), key=lambda i: i.filename):
        if info.is_dir() or "__MACOSX" in info.filename or Path(info.filename).name.startswith("."):
            continue
        name = f"{path}:{info.filename}"
        if not info.filename.lower().endswith(IMAGE_EXTS):
            skipped.append(Skipped(name, NOT_IMAGE))
        elif info.file_size > MAX_MEMBER_BYTES:
            skipped.append(
                Skipped(name, f"{info.file_size} bytes uncompressed, over the {MAX_MEMBER_BYTES} limit")
            )
        else:
            out.append(InputFile(name, functools.partial(zf.read, info.filename)))
    return out


def expand(paths: list[str], skipped: list[Skipped]) -> list[InputFile]:
    """Every image under ``paths`` in a stable order; the rest goes to ``skipped``."""
    out: list[InputFile] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            for f in sorted(q for q in p.rglob("*") if q.is_file() and not q.name.startswith(".")):
                if f.suffix.lower() == ".zip":
                    out += _zip_members(f, skipped)
                elif f.suffix.lower() in IMAGE_EXTS:
                    out.append(_file(f))
                else:
                    skipped.append(Skipped(str(f), NOT_IMAGE))
        elif p.is_file() and p.suffix.lower() == ".zip":
            out += _zip_members(p, skipped)
        elif p.is_file() and p.suffix.lower() in IMAGE_EXTS:
            out.append(_file(p))
        elif p.exists():
            skipped.append(Skipped(str(p), NOT_IMAGE))
        else:
            skipped.append(Skipped(str(p), "no such file or folder"))
    return out


def _stem(name: str) -> str:
    return re.split(r"[/:\\]", name)[-1].rsplit(".", 1)[0]


def collect(
    paths: list[str], views: tuple[str, ...], pairs: tuple[list[str], list[str]] | None = None
) -> tuple[list[Sample], list[Skipped]]:
    """Samples for a model with ``views`` (``("img",)`` for one image). Two-view samples come from
    explicit ``pairs`` (first view's files, second view's files, matched in order) and from files
    named ``<id>_<view>.<ext>`` under ``paths``."""
    skipped: list[Skipped] = []
    sources = expand(paths, skipped)
    if len(views) == 1:
        return [Sample(s.name, (s,)) for s in sources], skipped
    samples: list[Sample] = []
    if pairs is not None:
        first, second = expand(pairs[0], skipped), expand(pairs[1], skipped)
        if len(first) != len(second):
            raise ValueError(
                f"--{views[0]} gave {len(first)} images and --{views[1]} gave {len(second)}: pairs must match"
            )
        samples += [Sample(f"{a.name}|{b.name}", (a, b)) for a, b in zip(first, second, strict=True)]
    pattern = re.compile(rf"^(?P<id>.+)_(?P<view>{'|'.join(map(re.escape, views))})$", re.IGNORECASE)
    groups: dict[str, dict[str, InputFile]] = {}
    for s in sources:
        m = pattern.match(_stem(s.name))
        if m is None:
            skipped.append(
                Skipped(s.name, f"name is not <id>_{'|'.join(views)}.<ext> for a {len(views)}-view model")
            )
            continue
        prefix = s.name[: len(s.name) - len(Path(s.name).name)] + m["id"]
        groups.setdefault(prefix, {})[m["view"].lower()] = s
    for sid in sorted(groups):
        got = groups[sid]
        missing = [v for v in views if v not in got]
        if missing:
            for s in got.values():
                skipped.append(Skipped(s.name, f"no {' or '.join(missing)} image beside it"))
            continue
        samples.append(Sample(sid, tuple(got[v] for v in views)))
    return samples, skipped
