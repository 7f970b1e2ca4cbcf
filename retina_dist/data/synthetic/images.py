"""Synthetic retina images with known lesion masks: the toolkit's built-in dataset.

Every image is a pure function of ``(seed, index)``, so any process can regenerate any sample and a
packed set is reproducible bit for bit. Smooth fields (illumination, disc, retinal layers, speckle)
are vectorised numpy; thin primitives (vessel polylines, lesion dots) go through OpenCV's
rasteriser, which draws them far faster than any per-pixel distance field would.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

FUNDUS_CLASSES = ("no_dr", "mild", "moderate", "severe", "proliferative")
OCT_CLASSES = ("CNV", "DME", "DRUSEN", "NORMAL")

# Lesion counts per DR grade: (microaneurysms, haemorrhages, hard exudates, new vessels).
_DR_LESIONS = {
    0: (0, 0, 0, 0),
    1: (4, 0, 0, 0),
    2: (8, 3, 4, 0),
    3: (12, 10, 8, 0),
    4: (12, 10, 8, 6),
}


@dataclass(frozen=True)
class SynthImage:
    image: np.ndarray  # HxWx3 uint8 (fundus, RGB) or HxW uint8 (OCT)
    mask: np.ndarray  # HxW uint8, 255 inside lesions
    label: int


def sample_rng(seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, index])


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    axis = np.linspace(-1.0, 1.0, size, dtype=np.float32)
    return axis[None, :], axis[:, None]  # broadcastable x (1,W) and y (H,1)


def fundus(rng: np.random.Generator, size: int, grade: int) -> SynthImage:
    """A colour fundus photograph with DR lesions drawn according to ``grade`` (0-4)."""
    x, y = _grid(size)
    cx, cy = rng.normal(0, 0.04, 2)
    r2 = (x - cx) ** 2 + (y - cy) ** 2
    light = np.clip(1.0 - 0.55 * r2 * rng.uniform(0.8, 1.2), 0, 1) * rng.uniform(0.75, 1.05)
    side = rng.choice([-1.0, 1.0])  # left or right eye: the disc sits nasally
    dx, dy = side * rng.uniform(0.3, 0.42), rng.normal(0, 0.05)
    disc = np.exp((x - dx) ** 2 * (-1 / (2 * 0.07**2))) * np.exp((y - dy) ** 2 * (-1 / (2 * 0.07**2)))
    tint = np.array([219, 107, 41], np.float32) * rng.uniform(0.9, 1.1, 3).astype(np.float32)

    vessels = np.zeros((size, size), np.float32)
    disc_px = np.array([(dx + 1) * (size - 1) / 2, (dy + 1) * (size - 1) / 2])
    _vessels(rng, vessels, disc_px, size, n=int(rng.integers(7, 10)), width=max(1, size // 128))
    mask = np.zeros((size, size), np.uint8)
    n_ma, n_hem, n_ex, n_nv = _DR_LESIONS[int(grade)]
    if n_nv:  # neovascularisation: fine tortuous vessels at the disc
        nv = np.zeros_like(vessels)
        _vessels(rng, nv, disc_px, size, n=n_nv, width=1, length=0.25, wiggle=0.9)
        vessels += nv
        mask[nv > 0] = 255
    grain = rng.standard_normal((size, size), dtype=np.float32) * 4.0
    # One pass per channel keeps this at a few full-image operations.
    channels = [
        light * t + disc * d - vessels * v + grain
        for t, d, v in zip(tint, (64.0, 115.0, 90.0), (0.35, 0.55, 0.6), strict=True)
    ]
    img = cv2.merge(channels)

    lesion = np.zeros((size, size, 3), np.float32)
    drawn = False
    for count, radius, colour in (
        (n_ma, 0.012, (-70, -100, -40)),
        (n_hem, 0.035, (-90, -115, -45)),
        (n_ex, 0.018, (60, 110, -10)),
    ):
        if not count:
            continue
        drawn = True
        pts = _lesion_points(rng, count, size, disc_px)
        rad = np.maximum(1, (radius * size * rng.uniform(0.7, 1.4, count))).astype(int)
        for (px, py), rr in zip(pts, rad, strict=True):
            cv2.circle(lesion, (int(px), int(py)), int(rr), colour, -1, lineType=cv2.LINE_AA)
            cv2.circle(mask, (int(px), int(py)), int(rr), 255, -1)
    if drawn:
        img += cv2.GaussianBlur(lesion, (0, 0), max(0.6, size / 256))
    outside = r2 >= 0.92**2
    img[outside] = 0
    mask[outside] = 0
    return SynthImage(np.clip(img, 0, 255, out=img).astype(np.uint8), mask, int(grade))


def _lesion_points(rng: np.random.Generator, n: int, size: int, disc_px: np.ndarray) -> np.ndarray:
    """Points inside the field, kept off the optic disc (lesions cluster round the macula)."""
    ang = rng.uniform(0, 2 * np.pi, n)
    rad = np.sqrt(rng.uniform(0.0, 1.0, n)) * 0.7
    pts = np.stack([np.cos(ang) * rad, np.sin(ang) * rad], 1)
    pts = (pts + 1) * (size - 1) / 2
    close = np.linalg.norm(pts - disc_px, axis=1) < 0.12 * size
    pts[close] = size - 1 - pts[close]  # mirror away from the disc
    return pts


def _vessels(
    rng: np.random.Generator,
    canvas: np.ndarray,
    origin: np.ndarray,
    size: int,
    n: int,
    width: int,
    length: float = 1.1,
    wiggle: float = 0.25,
) -> None:
    """Random-walk vessel trees from ``origin``: each trunk forks once into a thinner branch."""
    steps = 24
    seg = length * size / steps
    angles = rng.uniform(0, 2 * np.pi, n)
    turns = np.cumsum(rng.normal(0, wiggle, (n, steps)), axis=1) * 0.35 + angles[:, None]
    paths = origin + np.cumsum(np.stack([np.cos(turns), np.sin(turns)], -1) * seg, axis=1)
    paths = np.concatenate([np.broadcast_to(origin, (n, 1, 2)), paths], axis=1)
    fork = rng.integers(steps // 4, steps // 2, n)
    for i in range(n):
        cv2.polylines(canvas, [paths[i].astype(np.int32)], False, 120, width + 1, cv2.LINE_AA)
        start = paths[i, fork[i]]
        bend = turns[i, fork[i] :] + rng.choice([-0.7, 0.7])
        branch = start + np.cumsum(np.stack([np.cos(bend), np.sin(bend)], -1) * seg * 0.8, axis=0)
        cv2.polylines(canvas, [branch.astype(np.int32)], False, (100, 100, 100), width, cv2.LINE_AA)


def oct_bscan(rng: np.random.Generator, size: int, label: int) -> SynthImage:
    """An OCT B-scan: layered bands with speckle and the lesion of ``OCT_CLASSES[label]``."""
    w = h = size
    xs = np.linspace(-1, 1, w, dtype=np.float32)
    ys = np.arange(h, dtype=np.float32)[:, None]
    tilt = rng.normal(0, 0.04) * xs
    pit = 0.07 * np.exp(-((xs / 0.18) ** 2))
    ilm = (0.30 + tilt + pit + rng.normal(0, 0.01)) * h
    rpe = (0.62 + tilt + rng.normal(0, 0.01)) * h
    rpe_lift = np.zeros(w, np.float32)
    thick = np.zeros(w, np.float32)
    name = OCT_CLASSES[label]
    if name == "CNV":
        c, s = rng.uniform(-0.35, 0.35), rng.uniform(0.1, 0.18)
        rpe_lift = 0.11 * h * np.exp(-(((xs - c) / s) ** 2))
        thick = 0.05 * h * np.exp(-(((xs - c) / (1.5 * s)) ** 2))
    elif name == "DRUSEN":
        for c in rng.uniform(-0.7, 0.7, int(rng.integers(3, 6))):
            rpe_lift += 0.035 * h * np.exp(-(((xs - c) / rng.uniform(0.03, 0.06)) ** 2))
    elif name == "DME":
        thick = 0.08 * h * np.exp(-((xs / 0.4) ** 2))
    top = ilm - thick
    rpe_top = rpe - rpe_lift
    depth = (ys - top) / np.maximum(rpe_top - top, 1)  # 0 at the ILM, 1 at the RPE
    # Reflectivity by depth through the retina: NFL bright, plexiform bands, nuclear layers dark.
    bands = np.interp(
        depth,
        [0, 0.08, 0.15, 0.35, 0.45, 0.55, 0.62, 0.9, 1.0],
        [0.85, 0.7, 0.45, 0.5, 0.25, 0.55, 0.2, 0.22, 0.6],
    )
    img = np.where((depth >= 0) & (depth <= 1), bands, 0.04).astype(np.float32)
    rpe_band = np.exp(-(((ys - rpe_top) / (0.018 * h)) ** 2))
    choroid = (ys > rpe_top) * np.exp(-(ys - rpe_top) / (0.25 * h)) * 0.45
    img = np.maximum(img, rpe_band * 0.95) + choroid * (ys > rpe_top + 0.02 * h)
    mask = np.zeros((h, w), np.uint8)
    if name in ("CNV", "DRUSEN"):
        lifted = (ys > rpe_top - 0.01 * h) & (ys < rpe + 0.01 * h) & (rpe_lift > 0.008 * h)
        img = np.where(lifted & (ys > rpe_top + 0.02 * h), 0.55 if name == "CNV" else 0.4, img)
        mask[lifted] = 255
    elif name == "DME":
        for _ in range(int(rng.integers(3, 6))):
            cx = rng.uniform(-0.35, 0.35)
            col = int((cx + 1) * (w - 1) / 2)
            cy = top[col] + (rpe_top[col] - top[col]) * rng.uniform(0.35, 0.65)
            axes = (int(rng.uniform(0.03, 0.07) * w), int(rng.uniform(0.02, 0.04) * h))
            cyst = np.zeros((h, w), np.uint8)
            cv2.ellipse(cyst, (col, int(cy)), axes, 0, 0, 360, 255, -1)
            img = np.where(cyst > 0, 0.05, img)
            mask |= cyst
    speckle = rng.gamma(4.0, 0.25, (h, w)).astype(np.float32)
    img = cv2.GaussianBlur(img * speckle, (0, 0), 0.6) + rng.standard_normal((h, w), dtype=np.float32) * 0.02
    return SynthImage((np.clip(img, 0, 1) * 255).astype(np.uint8), mask, int(label))


MODALITIES = {"fundus": (fundus, FUNDUS_CLASSES), "oct": (oct_bscan, OCT_CLASSES)}


def generate(modality: str, seed: int, index: int, size: int, label: int) -> SynthImage:
    draw, _ = MODALITIES[modality]
    return draw(sample_rng(seed, index), size, label)
