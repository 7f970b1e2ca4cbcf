"""OCTMNIST (MedMNIST v2 / MedMNIST+): one ``octmnist[_64|_128|_224].npz`` with official splits.

Read with ``np.load`` (the ``medmnist`` classes assert the official sample counts). Images are
N x S x S uint8, labels N x 1: 0 CNV, 1 DME, 2 drusen, 3 normal. No patient id.
"""

from __future__ import annotations

import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from retina_dist.data.codec import encode
from retina_dist.data.manifest import DataError
from retina_dist.data.sources.record import Item, Record, TaskSpec

CLASSES = ("CNV", "DME", "DRUSEN", "NORMAL")
FILE = re.compile(r"^octmnist(?:_(64|128|224))?\.npz$")
SPLITS = {"train": "train", "val": "val", "test": "test"}


def _size(path: Path) -> int:
    m = FILE.match(path.name)
    return int(m.group(1) or 28) if m else 0


@dataclass
class OctMnistSource:
    src: Path
    size: int = 0  # 0: the only npz there, or the largest of several
    version: str = "auto"
    name: str = field(init=False, default="octmnist")
    task: TaskSpec = field(init=False, default=TaskSpec("multiclass", CLASSES))

    def _file(self) -> Path:
        src = Path(self.src)
        if src.is_file():
            return src
        found = sorted((p for p in src.rglob("*.npz") if FILE.match(p.name)), key=_size)
        if self.size:
            found = [p for p in found if _size(p) == self.size]
        if not found:
            want = f"octmnist_{self.size}.npz" if self.size not in (0, 28) else "octmnist[_64|_128|_224].npz"
            raise DataError(f"{src}: no {want} found (searched all subfolders)")
        return found[-1]

    def _arrays(self, path: Path | None = None) -> dict[str, np.ndarray]:
        path = path or self._file()
        try:
            with np.load(path, allow_pickle=False) as npz:
                arrays = {k: npz[k] for k in npz.files}
        except (OSError, ValueError, zipfile.BadZipFile) as err:
            raise DataError(f"{path}: cannot read as .npz ({err})") from err
        for split in SPLITS:
            for kind in ("images", "labels"):
                if f"{split}_{kind}" not in arrays:
                    raise DataError(
                        f"{path}: missing array {split}_{kind!s} (has: {', '.join(sorted(arrays))})"
                    )
            x, y = arrays[f"{split}_images"], arrays[f"{split}_labels"]
            if x.ndim not in (3, 4) or len(x) != len(y):
                raise DataError(f"{path}: {split}_images {x.shape} does not match {split}_labels {y.shape}")
            if y.size and (y.min() < 0 or y.max() > 3):
                raise DataError(f"{path}: {split}_labels outside 0..3")
        self.version = f"medmnist-{_size(path)}px"
        return arrays

    def items(self) -> list[Item]:
        path = self._file()  # resolved once here; items carry it, so workers never search again
        arrays = self._arrays(path)
        out = []
        for split in SPLITS:
            labels = arrays[f"{split}_labels"].reshape(-1)
            for i, label in enumerate(labels):
                key = f"octmnist/{split}/{i:06d}"
                out.append(Item(key, key, int(label), SPLITS[split], (str(path), split, i)))
        return out

    def load(self, item: Item, split: str) -> Record:
        path, name, i = item.ref
        if path not in _CACHE:  # each packing worker reads the npz once
            _CACHE[path] = self._arrays(Path(path))
        arrays = _CACHE[path]
        return Record(
            item.key,
            item.patient,
            split,
            {"img.png": encode(arrays[f"{name}_images"][i], ".png")},
            item.label,
        )

    def report(self) -> dict:
        return {"version": self.version, "file": self._file().name}


_CACHE: dict[str, dict[str, np.ndarray]] = {}
