"""Fundus (APTOS) + OCT (Kermany) **virtual pairs**: images of different patients, paired only by
normal vs disease. Not a paired clinical dataset; every report of it says so.

Two tasks over the same pairs: ``fusion`` (normal vs disease) and ``fusion_multiclass`` (the
fundus's DR grade and the OCT's class, two heads: a row one-hot within each head).

Within each class, fundus and OCT images are shuffled (seeded) and zipped, so every image is used at
most once. A pair's patient is its OCT patient: the packer's patient split then keeps each Kermany
patient in one split, and each fundus image (APTOS has one per id) occurs in one pair only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from retina_dist.data.sources.aptos import AptosSource
from retina_dist.data.sources.common import read_bytes
from retina_dist.data.sources.kermany import CLASSES as OCT_CLASSES
from retina_dist.data.sources.kermany import KermanySource
from retina_dist.data.sources.record import Item, Record, TaskSpec

CLASSES = ("normal", "disease")
DR_GRADES = ("no_dr", "mild", "moderate", "severe", "proliferative")
HEADS = {"dr": DR_GRADES, "oct": OCT_CLASSES}


def joint_task() -> TaskSpec:
    return TaskSpec("multihead", tuple(f"{h}:{c}" for h, cs in HEADS.items() for c in cs), HEADS)


def joint_label(grade: int, oct_class: int) -> list[int]:
    row = [0] * (len(DR_GRADES) + len(OCT_CLASSES))
    row[grade] = row[len(DR_GRADES) + oct_class] = 1
    return row


CAVEAT = "virtual pairs: fundus (APTOS) and OCT (Kermany) come from different patients, paired by class"


@dataclass
class FusionSource:
    src: Path  # APTOS
    oct_src: Path  # Kermany
    seed: int = 0
    joint: bool = False  # the DR grade and the OCT class (two heads) instead of normal vs disease
    name: str = field(init=False, default="fusion_virtual_pairs")
    views: tuple[str, ...] = field(init=False, default=("fundus", "oct"))  # images per sample, in model order
    task: TaskSpec = field(init=False, default=TaskSpec("binary", CLASSES))

    def __post_init__(self) -> None:
        if self.joint:
            self.task = joint_task()

    def items(self) -> list[Item]:
        fundus = AptosSource(Path(self.src)).items()
        octs = KermanySource(Path(self.oct_src)).items()
        rng = np.random.default_rng(self.seed)
        out: list[Item] = []
        self.unpaired = {}
        for cls in (0, 1):
            f = [it for it in fundus if int(it.label > 0) == cls]
            o = [it for it in octs if int(it.label != OCT_CLASSES.index("NORMAL")) == cls]
            f = [f[i] for i in rng.permutation(len(f))]
            o = [o[i] for i in rng.permutation(len(o))]
            n = min(len(f), len(o))
            self.unpaired[CLASSES[cls]] = {"fundus": len(f) - n, "oct": len(o) - n}
            for a, b in zip(f[:n], o[:n], strict=True):
                key = f"pair/{a.key.split('/')[-1]}+{b.key.split('/')[-1]}"
                label = joint_label(int(a.label), int(b.label)) if self.joint else cls
                out.append(Item(key, f"kermany/{b.patient}", label, None, (a.ref, b.ref, a.key, b.key)))
        return sorted(out, key=lambda it: it.key)

    def load(self, item: Item, split: str) -> Record:
        fundus, oct_, fkey, okey = item.ref
        images = {
            f"fundus{Path(fundus).suffix.lower()}": read_bytes(Path(fundus)),
            f"oct{Path(oct_).suffix.lower()}": read_bytes(Path(oct_)),
        }
        meta = {"virtual_pair": True, "fundus_key": fkey, "oct_key": okey}
        return Record(item.key, item.patient, split, images, item.label, meta)

    def report(self) -> dict:
        return {"caveat": CAVEAT, "unpaired": getattr(self, "unpaired", {})}
