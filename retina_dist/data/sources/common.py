"""What every real-dataset source needs: tables read with the file and column named on error, layout
detection that says where it looked, and a tally of label rows without images (and the reverse)."""

from __future__ import annotations

import csv
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from retina_dist.data.manifest import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


def read_csv(path: Path, required: Sequence[str]) -> list[dict[str, str]]:
    """Rows of a CSV (a UTF-8 BOM is tolerated); a missing column is an error naming file and column."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            header = [h.strip() for h in reader.fieldnames or []]
            rows = [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise DataError(f"{path}: cannot read as CSV ({err})") from err
    _require(path, header, required)
    return rows


def read_xlsx(path: Path, required: Sequence[str]) -> list[dict[str, Any]]:
    """Rows of the first sheet of an .xlsx file; header row first."""
    import openpyxl  # only the ODIR source needs it

    try:
        wb = openpyxl.load_workbook(path, read_only=True, data_only=True)
    except Exception as err:  # openpyxl raises several unrelated types for a bad file
        raise DataError(f"{path}: cannot read as .xlsx ({type(err).__name__}: {err})") from err
    try:
        rows = list(wb.worksheets[0].iter_rows(values_only=True))
    finally:
        wb.close()
    if not rows:
        raise DataError(f"{path}: the first sheet is empty")
    header = [str(h).strip() if h is not None else "" for h in rows[0]]
    _require(path, header, required)
    return [dict(zip(header, r, strict=False)) for r in rows[1:] if any(v is not None for v in r)]


def _require(path: Path, header: list[str], required: Sequence[str]) -> None:
    missing = [c for c in required if c not in header]
    if missing:
        raise DataError(
            f"{path}: missing column{'s' if len(missing) > 1 else ''} {', '.join(map(repr, missing))} "
            f"(header: {', '.join(header) or 'none'})"
        )


def as_int(value: Any, path: Path, row: int, column: str, allowed: Iterable[int] | None = None) -> int:
    try:
        out = int(float(str(value).strip()))
    except ValueError:
        raise DataError(f"{path}: row {row}, column {column!r}: {value!r} is not an integer") from None
    if allowed is not None and out not in set(allowed):
        raise DataError(f"{path}: row {row}, column {column!r}: {out} is not one of {sorted(set(allowed))}")
    return out


def find_first(root: Path, candidates: Sequence[str], what: str, depth: int = 3) -> Path:
    """The first of ``candidates`` (relative paths) found at ``root`` or up to ``depth`` folders below."""
    found = search(root, candidates, depth)
    if found is None:
        raise DataError(
            f"{root}: cannot find the {what}; looked for {', '.join(repr(c) for c in candidates)} "
            f"in it and up to {depth} folder levels below"
        )
    return found


def search(root: Path, candidates: Sequence[str], depth: int = 3) -> Path | None:
    level = [root]
    for _ in range(depth + 1):
        for base in level:
            for c in candidates:
                if (base / c).exists():
                    return base / c
        level = sorted(
            d for base in level for d in base.iterdir() if d.is_dir() and not d.name.startswith(".")
        )
    return None


def images_in(folder: Path) -> dict[str, Path]:
    """File stem -> path for the images directly in ``folder``."""
    if not folder.is_dir():
        return {}
    return {p.stem: p for p in sorted(folder.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES}


@dataclass
class Tally:
    """Label rows whose image is missing and images no label row names: counted, listed, not fatal."""

    missing_image: list[str] = field(default_factory=list)
    unlabeled_image: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self, limit: int = 50) -> dict[str, Any]:
        return {
            "missing_image": len(self.missing_image),
            "missing_image_examples": self.missing_image[:limit],
            "unlabeled_image": len(self.unlabeled_image),
            "unlabeled_image_examples": self.unlabeled_image[:limit],
            "notes": self.notes,
        }


def read_bytes(path: Path) -> bytes:
    with open(path, "rb") as fh:
        return fh.read()
