"""APTOS 2019 Blindness Detection (Kaggle): ``train.csv`` (id_code,diagnosis) + ``train_images/<id>.png``.

DR grade 0-4, multiclass. No patient id (one image per id_code) and no official validation split;
the public test images have no labels and are not packed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from retina_dist.data.manifest import DataError
from retina_dist.data.sources.archive import extract
from retina_dist.data.sources.common import Tally, as_int, find_first, images_in, read_bytes, read_csv
from retina_dist.data.sources.record import Item, Record, TaskSpec

CLASSES = ("no_dr", "mild", "moderate", "severe", "proliferative")


@dataclass
class AptosSource:
    src: Path
    version: str = "auto"
    name: str = field(init=False, default="aptos")
    task: TaskSpec = field(init=False, default=TaskSpec("multiclass", CLASSES))
    tally: Tally = field(init=False, default_factory=Tally)

    def items(self) -> list[Item]:
        csv_path = find_first(Path(self.src), ["train.csv"], "APTOS label file")
        root = csv_path.parent
        folder = root / "train_images"
        if not folder.is_dir():
            # Some copies ship the images as an inner archive beside train.csv.
            inner = next((root / n for n in ("train_images.zip", "train.zip") if (root / n).exists()), None)
            if inner is None:
                raise DataError(
                    f"{root}: no train_images/ folder, train_images.zip or train.zip beside {csv_path.name}"
                )
            extracted = extract(inner, root / ".train_images-extracted")
            folder = find_first(extracted, ["train_images"], "train_images in " + inner.name, 1)
            self.version = "kaggle-inner-zip"
        elif self.version == "auto":
            self.version = "kaggle"
        files = images_in(folder)
        out: list[Item] = []
        seen: set[str] = set()
        for i, row in enumerate(read_csv(csv_path, ["id_code", "diagnosis"]), start=2):
            code = row["id_code"]
            label = as_int(row["diagnosis"], csv_path, i, "diagnosis", range(5))
            seen.add(code)
            if code not in files:
                self.tally.missing_image.append(f"train_images/{code}.png")
                continue
            out.append(Item(f"aptos/{code}", code, label, None, str(files[code])))
        self.tally.unlabeled_image += [f"train_images/{p.name}" for s, p in files.items() if s not in seen]
        test = images_in(root / "test_images")
        if test:
            self.tally.notes.append(f"{len(test)} unlabelled public test images in test_images/ not packed")
        return out

    def load(self, item: Item, split: str) -> Record:
        return Record(item.key, item.patient, split, {"img.png": read_bytes(Path(item.ref))}, item.label)

    def report(self) -> dict:
        return {"version": self.version, **self.tally.to_dict()}
