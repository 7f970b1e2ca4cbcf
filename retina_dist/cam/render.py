"""CAM overlays as PNG: the raw image beside the heat-map overlay, named so a folder listing reads
as a table: ``<key>_true<...>_pred<...>_<method>.png``."""

from __future__ import annotations

import html
import re
from pathlib import Path

import cv2
import numpy as np

from retina_dist.data.codec import encode


def overlay(image: np.ndarray, cam: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """``image`` H x W (x 3) uint8, ``cam`` H x W in [0, 1] -> raw | overlay, RGB uint8."""
    rgb = image if image.ndim == 3 else np.repeat(image[..., None], 3, axis=2)
    heat = cv2.applyColorMap((np.clip(cam, 0, 1) * 255).astype(np.uint8), cv2.COLORMAP_JET)[..., ::-1]
    mixed = (rgb * (1 - alpha) + heat * alpha).astype(np.uint8)
    gap = np.full((rgb.shape[0], 4, 3), 255, np.uint8)
    return np.concatenate([rgb, gap, mixed], axis=1)


def safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]+", "-", text).strip("-")


def file_name(key: str, true: str, pred: str, method: str, suffix: str = "") -> str:
    tail = f"_{safe(suffix)}" if suffix else ""
    return f"{safe(key)}_true{safe(true)}_pred{safe(pred)}_{safe(method)}{tail}.png"


def write_png(path: Path, rgb: np.ndarray) -> None:
    path.write_bytes(encode(rgb, ".png"))


def index_html(rows: list[dict], title: str) -> str:
    cells = "\n".join(
        f'<figure><img src="{html.escape(r["file"])}" loading="lazy"><figcaption>{html.escape(r["key"])}<br>'
        f"true {html.escape(r['true'])} · pred {html.escape(r['pred'])}"
        + (f" · energy in lesions {r['cam_energy']:.2f}" if r.get("cam_energy") is not None else "")
        + "</figcaption></figure>"
        for r in rows
    )
    return (
        f"<!doctype html><meta charset=utf-8><title>{html.escape(title)}</title>"
        "<style>body{font-family:sans-serif}figure{display:inline-block;margin:6px}"
        "img{height:180px;image-rendering:pixelated}</style>"
        f"<h1>{html.escape(title)}</h1>{cells}"
    )
