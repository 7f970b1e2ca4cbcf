"""Scoring a CAM against a lesion mask: pointing game, energy inside the mask, IoU at a threshold.
Pure numpy on H x W arrays; a centre-bias map is the baseline any CAM must beat."""

from __future__ import annotations

import numpy as np


def pointing_hit(cam: np.ndarray, mask: np.ndarray) -> float:
    """1.0 when the CAM's maximum lies on the mask."""
    y, x = np.unravel_index(int(np.argmax(cam)), cam.shape)
    return float(mask[y, x] > 0)


def energy_in_mask(cam: np.ndarray, mask: np.ndarray) -> float:
    total = float(cam.sum())
    return float(cam[mask > 0].sum()) / total if total > 0 else 0.0


def iou_at(cam: np.ndarray, mask: np.ndarray, threshold: float = 0.5) -> float:
    """IoU of {cam >= threshold x max} with the mask."""
    on = cam >= threshold * float(cam.max()) if cam.max() > 0 else np.zeros_like(cam, bool)
    m = mask > 0
    union = np.logical_or(on, m).sum()
    return float(np.logical_and(on, m).sum() / union) if union else 0.0


def score(cam: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    return {
        "pointing": pointing_hit(cam, mask),
        "energy": energy_in_mask(cam, mask),
        "iou": iou_at(cam, mask),
    }


def centre_baseline(shape: tuple[int, int], sigma_frac: float = 0.25) -> np.ndarray:
    """A Gaussian at the image centre: what a CAM that only knows 'look at the middle' would give."""
    h, w = shape
    yy, xx = np.mgrid[:h, :w]
    s = sigma_frac * max(h, w)
    return np.exp(-(((yy - (h - 1) / 2) ** 2) + ((xx - (w - 1) / 2) ** 2)) / (2 * s * s)).astype(np.float32)


def summarise(rows: list[dict], classes: tuple[str, ...]) -> dict:
    """Mean of each score per class and overall, for CAM and centre baseline, over samples with a
    non-empty mask."""
    out: dict = {"n": len(rows)}
    for prefix in ("cam", "centre"):
        for k in ("pointing", "energy", "iou"):
            vals = [r[f"{prefix}_{k}"] for r in rows]
            out[f"{prefix}_{k}"] = float(np.mean(vals)) if vals else None
    per_class = {}
    for c in classes:
        sel = [r for r in rows if r["class"] == c]
        if sel:
            per_class[c] = {
                "n": len(sel),
                **{
                    f"cam_{k}": float(np.mean([r[f"cam_{k}"] for r in sel]))
                    for k in ("pointing", "energy", "iou")
                },
                **{
                    f"centre_{k}": float(np.mean([r[f"centre_{k}"] for r in sel]))
                    for k in ("pointing", "energy")
                },
            }
    out["per_class"] = per_class
    return out
