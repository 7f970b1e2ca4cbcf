"""Kermany 2018 OCT: ``<CLASS>/<CLASS>-<patient>-<n>.jpeg`` under official train/(val)/test folders.

Versions: Kaggle ``OCT2017 /{train,val,test}`` (the root really ends in a space), Mendeley v2
``OCT2017/{train,test}``, Mendeley v3 ``ZhangLabData/CellData/OCT/{train,test}``. The patient id is
the middle integer, shared across class folders, so patients are grouped by the integer alone.
Official splits are kept; without an official val split one is drawn from train by patient.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from retina_dist.data.manifest import DataError
from retina_dist.data.sources.common import Tally, read_bytes, search
from retina_dist.data.sources.record import Item, Record, TaskSpec

CLASSES = ("CNV", "DME", "DRUSEN", "NORMAL")
NAME = re.compile(r"^(CNV|DME|DRUSEN|NORMAL)-(\d+)-(\d+)\.jpe?g$", re.IGNORECASE)
LAYOUTS = {  # version -> the folder holding train/ and test/
    "kaggle": "OCT2017 ",
    "mendeley-v3": "CellData/OCT",
    "mendeley-v2": "OCT2017",
}


def find_root(src: Path) -> tuple[str, Path]:
    for version, rel in LAYOUTS.items():
        hit = search(src, [rel], depth=3)
        if hit is not None and (hit / "train").is_dir():
            return version, hit
    if (src / "train").is_dir() and (src / "test").is_dir():
        return "folders", src
    raise DataError(
        f"{src}: cannot find a Kermany OCT layout; looked for 'OCT2017 /train' (Kaggle, trailing space), "
        "'CellData/OCT/train' (Mendeley v3), 'OCT2017/train' (Mendeley v2) or train/ + test/ folders, "
        "up to 3 levels down"
    )


@dataclass
class KermanySource:
    src: Path
    version: str = "auto"
    name: str = field(init=False, default="kermany")
    task: TaskSpec = field(init=False, default=TaskSpec("multiclass", CLASSES))
    tally: Tally = field(init=False, default_factory=Tally)

    def items(self) -> list[Item]:
        version, root = find_root(Path(self.src))
        self.version = version
        out: list[Item] = []
        has_val = any(d.name.lower() == "val" and d.is_dir() for d in root.iterdir())
        for split_dir in sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")):
            # train is split by patient into train/val by the packer unless the version ships a val split
            official = {"train": "train" if has_val else None, "val": "val", "test": "test"}
            split = official.get(split_dir.name.lower(), "skip")
            if split == "skip":
                self.tally.notes.append(f"folder {split_dir.name!r} is not train/val/test: ignored")
                continue
            for cls_dir in sorted(d for d in split_dir.iterdir() if d.is_dir()):
                if cls_dir.name.upper() not in CLASSES:
                    self.tally.notes.append(f"{split_dir.name}/{cls_dir.name}: not a Kermany class, ignored")
                    continue
                for path in sorted(cls_dir.iterdir()):
                    m = NAME.match(path.name)
                    if path.name.startswith(".") or not path.is_file():
                        continue
                    if m is None or m.group(1).upper() != cls_dir.name.upper():
                        self.tally.unlabeled_image.append(f"{split_dir.name}/{cls_dir.name}/{path.name}")
                        continue
                    label = CLASSES.index(cls_dir.name.upper())
                    key = f"kermany/{split_dir.name}/{path.stem}"
                    out.append(Item(key, m.group(2), label, split, str(path)))
        if not out:
            raise DataError(f"{root}: no images named <CLASS>-<patient>-<n>.jpeg under {sorted(LAYOUTS)}")
        return out

    def load(self, item: Item, split: str) -> Record:
        return Record(item.key, item.patient, split, {"img.jpg": read_bytes(Path(item.ref))}, item.label)

    def report(self) -> dict:
        return {"version": self.version, **self.tally.to_dict()}
