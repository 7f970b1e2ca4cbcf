"""ODIR-5K: one sample = one patient = left + right fundus, multi-label N D G C A H M O (patient-level).

Versions (auto-detected):
- ``official``: ``ODIR-5K_Training_Annotations(Updated)_V2.xlsx`` + ``ODIR-5K_Training_Dataset/``;
- ``oia-odir``: ``Training Set/Annotation/training annotation (English).xlsx`` + ``Training Set/Images/``
  (and the off-site / on-site test sets, kept as official splits ``test`` / ``test_onsite``);
- ``kaggle``: ``ODIR-5K/ODIR-5K/data.xlsx`` (or one ``ODIR-5K`` level) + ``Training Images/``;
- ``kaggle-full_df``: only ``full_df.csv`` + ``preprocessed_images/``: one row per eye with the
  patient-level labels copied onto both; rows are grouped by ID and files found by name (its
  ``filepath`` column is stale).
Diagnostic keywords are separated by a full-width comma (U+FF0C) or a comma; both are split.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from retina_dist.data.manifest import DataError
from retina_dist.data.sources.common import Tally, as_int, read_bytes, read_csv, read_xlsx, search
from retina_dist.data.sources.record import Item, Record, TaskSpec

CLASSES = ("N", "D", "G", "C", "A", "H", "M", "O")
COLUMNS = ["ID", "Left-Fundus", "Right-Fundus", *CLASSES]
KEYWORDS = re.compile(r"[，,]")
OFFICIAL_XLSX = "ODIR-5K_Training_Annotations(Updated)_V2.xlsx"


def keywords(text: Any) -> list[str]:
    return [k.strip() for k in KEYWORDS.split(str(text or "")) if k.strip()]


@dataclass
class OdirSource:
    src: Path
    version: str = "auto"
    name: str = field(init=False, default="odir")
    views: tuple[str, ...] = field(init=False, default=("left", "right"))  # images per sample, in model order
    task: TaskSpec = field(init=False, default=TaskSpec("multilabel", CLASSES))
    tally: Tally = field(init=False, default_factory=Tally)

    def _tables(self) -> list[tuple[str | None, Path, list[Path]]]:
        """(official split or None, label table, image folders) for the detected version."""
        src = Path(self.src)
        if (hit := search(src, [OFFICIAL_XLSX])) is not None:
            self.version = "official"
            return [(None, hit, [hit.parent / "ODIR-5K_Training_Dataset"])]
        if (hit := search(src, ["Training Set/Annotation"])) is not None:
            self.version = "oia-odir"
            out = []
            for folder, split in (
                ("Training Set", None),
                ("Off-site Test Set", "test"),
                ("On-site Test Set", "test_onsite"),
            ):
                ann = hit.parent.parent / folder / "Annotation"
                sheets = sorted(ann.glob("*English*.xlsx")) or sorted(ann.glob("*.xlsx"))
                if sheets:
                    out.append((split, sheets[0], [hit.parent.parent / folder / "Images"]))
            return out
        if (hit := search(src, ["ODIR-5K/ODIR-5K/data.xlsx", "ODIR-5K/data.xlsx"])) is not None:
            self.version = "kaggle"
            return [(None, hit, [hit.parent / "Training Images", hit.parents[2] / "preprocessed_images"])]
        if (hit := search(src, ["full_df.csv"])) is not None:
            self.version = "kaggle-full_df"
            return [(None, hit, [hit.parent / "preprocessed_images"])]
        raise DataError(
            f"{src}: cannot find an ODIR-5K layout; looked for {OFFICIAL_XLSX!r}, 'Training Set/Annotation/' "
            "(OIA-ODIR), 'ODIR-5K/ODIR-5K/data.xlsx' or 'ODIR-5K/data.xlsx' (Kaggle) and 'full_df.csv', "
            "up to 3 levels down"
        )

    def _rows(self, table: Path) -> list[dict[str, Any]]:
        if table.suffix == ".csv":
            rows, patients = read_csv(table, COLUMNS), dict[str, dict[str, Any]]()
            for r in rows:  # one row per eye; the patient-level labels are on both
                patients.setdefault(r["ID"], r)
            return list(patients.values())
        return read_xlsx(table, COLUMNS)

    def items(self) -> list[Item]:
        out: list[Item] = []
        for split, table, folders in self._tables():
            files: dict[str, Path] = {}
            for folder in folders:  # the first folder wins (originals over Kaggle's preprocessed copies)
                for p in sorted(folder.iterdir()) if folder.is_dir() else ():
                    files.setdefault(p.name, p)
            named: set[str] = set()
            for i, row in enumerate(self._rows(table), start=2):
                pid = as_int(row["ID"], table, i, "ID")
                label = [as_int(row[c], table, i, c, (0, 1)) for c in CLASSES]
                eyes = {"left": str(row["Left-Fundus"]).strip(), "right": str(row["Right-Fundus"]).strip()}
                named.update(eyes.values())
                missing = [n for n in eyes.values() if n not in files]
                if missing:
                    self.tally.missing_image += missing
                    continue
                meta = {
                    "age": row.get("Patient Age"),
                    "sex": row.get("Patient Sex"),
                    "left_keywords": keywords(row.get("Left-Diagnostic Keywords")),
                    "right_keywords": keywords(row.get("Right-Diagnostic Keywords")),
                }
                paths = {eye: str(files[n]) for eye, n in eyes.items()}
                prefix = "odir" if split is None else f"odir/{split}"
                out.append(Item(f"{prefix}/{pid}", f"{prefix}/{pid}", label, split, (paths, meta)))
            self.tally.unlabeled_image += sorted(
                n
                for n, p in files.items()
                if n not in named and p.suffix.lower() in (".jpg", ".jpeg", ".png")
            )
        return out

    def load(self, item: Item, split: str) -> Record:
        paths, meta = item.ref
        images = {f"{eye}{Path(p).suffix.lower()}": read_bytes(Path(p)) for eye, p in paths.items()}
        return Record(item.key, item.patient, split, images, item.label, meta)

    def report(self) -> dict:
        return {"version": self.version, **self.tally.to_dict()}
