"""``retina-dist predict``: a run's model over files, folders and zips, in batches with a progress
bar; calibrated probabilities and decisions to CSV, optional CAM overlays beside it; unreadable or
unsupported inputs listed in ``<out>.skipped.csv`` and never a crash."""

from __future__ import annotations

import csv
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from retina_dist.cam import render
from retina_dist.data.codec import CorruptImage, decode
from retina_dist.data.preprocess import as_packed
from retina_dist.infer.inputs import Sample, Skipped, collect
from retina_dist.infer.predictor import Predictor

log = logging.getLogger(__name__)


@dataclass
class Summary:
    predicted: int = 0
    skipped: list[Skipped] = field(default_factory=list)
    seconds: float = 0.0
    out: str = ""

    @property
    def images_per_s(self) -> float:
        return self.predicted / self.seconds if self.seconds else 0.0


def _load(sample: Sample) -> list[np.ndarray]:
    return [decode(v.read(), v.name) for v in sample.views]


def predict_files(
    predictor: Predictor,
    paths: list[str],
    out: Path,
    pairs: tuple[list[str], list[str]] | None = None,
    batch_size: int = 32,
    explain: str = "",
    progress: bool = True,
) -> Summary:
    """Calibrated predictions for ``paths`` into the CSV ``out``; with ``explain`` (a method of
    ``cam.explainers``, or 'cam' for the run's own), one explanation picture per sample in
    ``<out>_cam/``, drawn on the image at the pack's stored size."""
    samples, skipped = collect(paths, predictor.views, pairs)
    summary = Summary(skipped=skipped, out=str(out))
    out.parent.mkdir(parents=True, exist_ok=True)
    cam_dir = out.with_name(out.stem + "_cam")
    cam = bool(explain)
    if cam:
        cam_dir.mkdir(exist_ok=True)
    classes = predictor.task.classes
    started = time.perf_counter()
    tmp = out.with_name(out.name + ".tmp")
    with (
        open(tmp, "w", newline="") as fh,
        tqdm(total=len(samples), unit="img", disable=not progress, desc="predict") as bar,
    ):
        w = csv.writer(fh)
        w.writerow(["name", "predicted", *[f"prob_{c}" for c in classes], *(["cam"] if cam else [])])
        for i in range(0, len(samples), batch_size):
            names, arrays, shown = [], [], []
            for s in samples[i : i + batch_size]:
                try:
                    images = _load(s)
                    arrays.append(predictor.prepare(images))
                    names.append(s.name)
                    if cam:
                        shown.append([as_packed(im, predictor.max_side) for im in images])
                except (CorruptImage, OSError, ValueError) as err:
                    summary.skipped.append(Skipped(s.name, str(err).removeprefix(f"{s.name}: ")))
                    log.warning("skipping %s: %s", s.name, err)
            if arrays:
                batch = np.stack(arrays)
                for j, (name, res) in enumerate(zip(names, predictor.results(batch), strict=True)):
                    row = [name, ";".join(res.predicted), *[f"{p:.6f}" for p in res.probs]]
                    if cam:
                        stem = render.safe(Path(name.split("|")[0]).stem) or "image"  # e.g. a name in CJK
                        file = f"{i + j:06d}_{stem}.png"
                        method = "" if explain == "cam" else explain
                        render.write_png(
                            cam_dir / file, predictor.explanation(batch[j], res, shown[j], method)
                        )
                        row.append(str(cam_dir / file))
                    w.writerow(row)
                summary.predicted += len(names)
            bar.update(len(samples[i : i + batch_size]))
    tmp.replace(out)
    summary.seconds = time.perf_counter() - started
    skipped_path = out.with_name(out.stem + ".skipped.csv")
    if summary.skipped:
        with open(skipped_path, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["name", "reason"])
            w.writerows([s.name, s.reason] for s in summary.skipped)
    else:
        skipped_path.unlink(missing_ok=True)
    return summary
