"""A trained run, ready to answer: its model, its preprocessing (the stream's own code path), its
calibration (temperature, multi-label thresholds) and, on request, a CAM overlay per image."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from retina_dist import calibration
from retina_dist.data.codec import decode
from retina_dist.data.preprocess import as_packed
from retina_dist.data.preprocess import view as prepare_view
from retina_dist.data.stream.augment import build_transform
from retina_dist.data.stream.feeder import DeviceInputs
from retina_dist.run import load_run

log = logging.getLogger(__name__)


@dataclass
class Result:
    probs: np.ndarray  # calibrated, one per class
    predicted: list[str]  # argmax class, or every class at or above its threshold (multi-label)


class Predictor:
    def __init__(self, run_dir: str | Path, device: str = "cpu", tta: bool | None = None) -> None:
        loaded = load_run(run_dir)
        self.run, self.run_dir = loaded.run, loaded.run.root
        self.cfg, self.manifest, self.task = loaded.cfg, loaded.manifest, loaded.task
        d = self.cfg.data
        self.views: tuple[str, ...] = loaded.views
        self.max_side = self.manifest.max_side
        self.image_size, self.in_chans = d.image_size, d.in_chans
        self.tta = self.cfg.eval.tta if tta is None else tta
        self.device = torch.device(device)
        self.model = loaded.model.to(self.device).eval()
        self.inputs = DeviceInputs(d.mean, d.std, d.in_chans, self.device, self.cfg.model.channels_last)
        self.transform = build_transform(d.image_size, train=False, augment=False, colour=d.in_chans == 3)
        cal = self.run.read_calibration()
        self.temperature = float(cal.get("temperature", 1.0))
        self.calibrated_on = cal.get("split")
        raw_thr = np.array([cal.get("thresholds", {}).get(c, 0.5) for c in self.task.classes])
        # Thresholds were tuned on uncalibrated probabilities; temperature scaling is monotonic per
        # class, so the same decisions in calibrated units are the thresholds passed through it.
        self.thresholds = (
            calibration.apply_temperature(raw_thr[None], self.temperature, True)[0]
            if self.task.multilabel
            else None
        )
        self._explainer: Any = None

    # -- preprocessing --------------------------------------------------------------------------
    def prepare(self, images: list[np.ndarray]) -> np.ndarray:
        """Decoded images (one per view) -> uint8 C x H x W (or V x C x H x W), exactly as a shard
        sample of this run reaches the model at evaluation."""
        out = []
        for image in images:
            image = prepare_view(as_packed(image, self.max_side), self.in_chans, self.image_size)
            image = self.transform(image=image)["image"]
            out.append(image[None] if image.ndim == 2 else image.transpose(2, 0, 1))
        return out[0] if len(out) == 1 else np.stack(out)

    def prepare_bytes(self, blobs: list[bytes], names: list[str]) -> np.ndarray:
        return self.prepare([decode(b, n) for b, n in zip(blobs, names, strict=True)])

    # -- inference ------------------------------------------------------------------------------
    @torch.no_grad()
    def probabilities(self, batch: np.ndarray) -> np.ndarray:
        """uint8 B x C x H x W (B x V x C x H x W) -> calibrated probabilities, B x classes."""
        x = self.inputs.images(torch.from_numpy(np.ascontiguousarray(batch)))
        p = self.task.probabilities(self.model(x))
        if self.tta:
            p = (p + self.task.probabilities(self.model(x.flip(-1)))) / 2
        return self.task.apply_temperature(p.float().cpu().numpy(), self.temperature)

    def decide(self, probs: np.ndarray) -> list[str]:
        if self.thresholds is not None:  # multi-label
            return [c for c, p, t in zip(self.task.classes, probs, self.thresholds, strict=True) if p >= t]
        return self.task.decide(probs)

    def results(self, batch: np.ndarray) -> list[Result]:
        return [Result(p, self.decide(p)) for p in self.probabilities(batch)]

    # -- explanation ----------------------------------------------------------------------------
    def explanation(
        self, sample: np.ndarray, result: Result, shown: list[np.ndarray], method: str = ""
    ) -> np.ndarray:
        """``method``'s map (the run's ``cam.method`` by default) of the predicted class (the most
        likely one if no multi-label class passed its threshold), drawn over ``shown``: each view as
        the pack would store it (``as_packed``), not the network input. Image | overlay per view,
        titled, with the colour bar: RGB uint8."""
        from retina_dist.cam import render
        from retina_dist.cam.explainers import Explainer
        from retina_dist.cam.stored import to_stored

        method = method or self.cfg.cam.method
        if self._explainer is None or self._explainer.method != method:
            self._explainer = Explainer(self.model, method, self.cfg.cam.target_layer)
        ex = self._explainer
        x = self.inputs.images(torch.from_numpy(np.ascontiguousarray(sample[None])))
        c = self.task.classes.index(result.predicted[0]) if result.predicted else int(np.argmax(result.probs))
        columns = []
        for v, (img, heat) in enumerate(zip(shown, ex(x, c), strict=True)):
            rgb = img if img.ndim == 3 else np.repeat(img[..., None], 3, axis=2)
            what = (
                self.views[v] if len(self.views) > 1 else f"{self.task.classes[c]} (p {result.probs[c]:.2f})"
            )
            columns += [
                (f"{self.views[v]} ({rgb.shape[1]}x{rgb.shape[0]})", rgb),
                (f"{ex.label}: {what}", render.overlay(rgb, to_stored(heat, rgb.shape[:2], self.image_size))),
            ]
        return render.compose(columns)
