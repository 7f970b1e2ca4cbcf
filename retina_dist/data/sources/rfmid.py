"""RFMiD (RIADD, ISBI 2021): 29 labels = Disease_Risk + 27 named diseases + OTHER, official splits.

Versions (auto-detected): ``original`` (``Training_Set/{Training/, RFMiD_Training_Labels.csv}`` ...),
``kaggle`` (each split folder nested twice), ``dataport`` (``1. Original Images/a. Training Set/`` +
``2. Groundtruths/a. RFMiD_Training_Labels.csv``). Label CSVs have 47 columns (45 conditions: OTHER
is the OR of the 18 rare ones) or 30 (RIADD: OTHER given). IDs restart at 1 in every split, so the
key is (split, ID). CSVs are read as ``utf-8-sig`` (one copy has a BOM).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from retina_dist.data.manifest import DataError
from retina_dist.data.sources.common import Tally, as_int, images_in, read_bytes, read_csv, search
from retina_dist.data.sources.record import Item, Record, TaskSpec

NAMED = (
    "DR",
    "ARMD",
    "MH",
    "DN",
    "MYA",
    "BRVO",
    "TSLN",
    "ERM",
    "LS",
    "MS",
    "CSR",
    "ODC",
    "CRVO",
    "TV",
    "AH",
    "ODP",
    "ODE",
    "ST",
    "AION",
    "PT",
    "RT",
    "RS",
    "CRS",
    "EDN",
    "RPEC",
    "MHL",
    "RP",
)
RARE = (
    "CWS",
    "CB",
    "ODPM",
    "PRH",
    "MNF",
    "HR",
    "CRAO",
    "TD",
    "CME",
    "PTCR",
    "CF",
    "VH",
    "MCA",
    "VS",
    "BRAO",
    "PLQ",
    "HPED",
    "CL",
)
CLASSES = ("Disease_Risk", *NAMED, "OTHER")
SPLITS = (  # split, original folder + csv, dataport folder + csv
    (
        "train",
        "Training_Set",
        "Training",
        "RFMiD_Training_Labels.csv",
        "a. Training Set",
        "a. RFMiD_Training_Labels.csv",
    ),
    (
        "val",
        "Evaluation_Set",
        "Validation",
        "RFMiD_Validation_Labels.csv",
        "b. Validation Set",
        "b. RFMiD_Validation_Labels.csv",
    ),
    ("test", "Test_Set", "Test", "RFMiD_Testing_Labels.csv", "c. Testing Set", "c. RFMiD_Testing_Labels.csv"),
)


@dataclass
class RfmidSource:
    src: Path
    version: str = "auto"
    name: str = field(init=False, default="rfmid")
    task: TaskSpec = field(init=False, default=TaskSpec("multilabel", CLASSES))
    tally: Tally = field(init=False, default_factory=Tally)
    columns: int = field(init=False, default=0)

    def _layout(self) -> list[tuple[str, Path, Path]]:
        src = Path(self.src)
        if (hit := search(src, ["1. Original Images"])) is not None:
            self.version = "dataport"
            truths = hit.parent / "2. Groundtruths"
            return [(s, truths / dcsv, hit / dfolder) for s, _, _, _, dfolder, dcsv in SPLITS]
        if (hit := search(src, ["Training_Set/Training_Set/RFMiD_Training_Labels.csv"])) is not None:
            self.version, base = "kaggle", hit.parents[2]
            return [(s, base / top / top / csv, base / top / top / sub) for s, top, sub, csv, _, _ in SPLITS]
        if (hit := search(src, ["Training_Set/RFMiD_Training_Labels.csv"])) is not None:
            self.version, base = "original", hit.parents[1]
            return [(s, base / top / csv, base / top / sub) for s, top, sub, csv, _, _ in SPLITS]
        raise DataError(
            f"{src}: cannot find an RFMiD layout; looked for 'Training_Set/RFMiD_Training_Labels.csv' "
            "(original), 'Training_Set/Training_Set/...' (Kaggle) and '1. Original Images/' (IEEE DataPort), "
            "up to 3 levels down"
        )

    def items(self) -> list[Item]:
        out: list[Item] = []
        for split, csv_path, folder in self._layout():
            if not csv_path.exists():
                self.tally.notes.append(f"{split}: no {csv_path.name}; split not packed")
                continue
            rows = read_csv(csv_path, ["ID", "Disease_Risk", *NAMED])
            header = list(rows[0]) if rows else []
            if "OTHER" in header:
                columns = 30
            else:
                read_csv(csv_path, ["ID", "Disease_Risk", *NAMED, *RARE])  # names the missing rare column
                columns = 47
            self.columns = self.columns or columns
            files = images_in(folder)
            seen = set()
            for i, row in enumerate(rows, start=2):
                rid = as_int(row["ID"], csv_path, i, "ID")
                label = [as_int(row[c], csv_path, i, c, (0, 1)) for c in ("Disease_Risk", *NAMED)]
                other = (
                    as_int(row["OTHER"], csv_path, i, "OTHER", (0, 1))
                    if columns == 30
                    else int(any(as_int(row[c], csv_path, i, c, (0, 1)) for c in RARE))
                )
                label.append(other)
                seen.add(str(rid))
                if str(rid) not in files:
                    self.tally.missing_image.append(f"{folder.name}/{rid}.png")
                    continue
                key = f"rfmid/{split}/{rid}"
                out.append(Item(key, key, label, split, str(files[str(rid)])))
            self.tally.unlabeled_image += [
                f"{folder.name}/{p.name}" for s, p in files.items() if s not in seen
            ]
        if not out:
            raise DataError(f"{self.src}: no labelled RFMiD images found")
        return out

    def load(self, item: Item, split: str) -> Record:
        path = Path(item.ref)
        return Record(
            item.key, item.patient, split, {f"img{path.suffix.lower()}": read_bytes(path)}, item.label
        )

    def report(self) -> dict:
        return {"version": self.version, "csv_columns": self.columns, **self.tally.to_dict()}
