"""The built-in synthetic retina set: fundus DR grading or OCT B-scan classes, generated from a seed."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from retina_dist.data.codec import encode
from retina_dist.data.sources.record import Item, Record, TaskSpec
from retina_dist.data.synthetic.images import MODALITIES, generate


@dataclass
class SyntheticSource:
    n: int = 2000
    image_size: int = 128
    modality: str = "fundus"
    seed: int = 0
    images_per_patient: tuple[int, int] = (1, 3)
    name: str = field(init=False)
    task: TaskSpec = field(init=False)

    def __post_init__(self) -> None:
        if self.modality not in MODALITIES:
            raise ValueError(f"synthetic modality {self.modality!r}: expected one of {sorted(MODALITIES)}")
        self.name = "synthetic" if self.modality == "fundus" else f"synthetic_{self.modality}"
        self.task = TaskSpec("multiclass", MODALITIES[self.modality][1])

    def items(self) -> list[Item]:
        """Patients with 1-3 images each; a patient's images share the class, as both eyes often do."""
        rng = np.random.default_rng([self.seed, 0x5EED])
        n_cls = len(self.task.classes)
        out: list[Item] = []
        patient = 0
        while len(out) < self.n:
            label = int(rng.integers(n_cls))
            for _ in range(int(rng.integers(self.images_per_patient[0], self.images_per_patient[1] + 1))):
                if len(out) == self.n:
                    break
                idx = len(out)
                out.append(Item(f"{self.name}/{idx:06d}", f"p{patient:05d}", label, None, idx))
            patient += 1
        return out

    def load(self, item: Item, split: str) -> Record:
        s = generate(self.modality, self.seed, item.ref, self.image_size, item.label)
        images = {"img.jpg": encode(s.image, ".jpg"), "mask.png": encode(s.mask, ".png")}
        return Record(item.key, item.patient, split, images, item.label, {"modality": self.modality})
