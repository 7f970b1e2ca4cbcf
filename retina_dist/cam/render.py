"""Explanations as pictures: the stored image | the heat map over it | the lesion mask, each panel
titled, with the colour bar; PNGs named so a folder listing reads as a table:
``<key>_true<...>_pred<...>_<method>.png``."""

from __future__ import annotations

import html
import re
from pathlib import Path

import cv2
import numpy as np

from retina_dist.data.codec import encode


def overlay(image: np.ndarray, cam: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """``image`` H x W (x 3) uint8, ``cam`` H x W in [0, 1] -> the heat map blended on the image."""
    rgb = image if image.ndim == 3 else np.repeat(image[..., None], 3, axis=2)
    return (rgb * (1 - alpha) + _jet(cam) * alpha).astype(np.uint8)


def mask_view(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The image dimmed, the lesion mask in yellow with its outline: where the answer is."""
    rgb = image if image.ndim == 3 else np.repeat(image[..., None], 3, axis=2)
    out = (rgb * 0.45).astype(np.uint8)
    out[mask] = (out[mask] * 0.3 + np.array([255, 230, 0]) * 0.7).astype(np.uint8)
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(out, contours, -1, (255, 255, 255), max(1, rgb.shape[0] // 256))
    return out


MIN_PANEL = 320  # px: a smaller stored image is enlarged (whole pixels) so its panel stays readable


def compose(columns: list[tuple[str, np.ndarray]], bar: bool = True) -> np.ndarray:
    """Panels side by side, each under its title, all at the first one's height, and the heat
    map's colour bar (low at the bottom, high at the top) at the right: RGB uint8. Panels under
    ``MIN_PANEL`` px are enlarged by a whole factor, each stored pixel a block (never smoothed: what
    is shown is what was stored)."""
    k = -(-MIN_PANEL // columns[0][1].shape[0])
    if k > 1:
        columns = [
            (t, cv2.resize(img, None, fx=k, fy=k, interpolation=cv2.INTER_NEAREST)) for t, img in columns
        ]
    h = columns[0][1].shape[0]
    strip = max(16, h // 14)
    gap = np.full((h + strip, max(4, h // 64), 3), 255, np.uint8)
    parts: list[np.ndarray] = []
    for title, img in columns:
        if img.shape[0] != h:
            img = cv2.resize(img, (round(img.shape[1] * h / img.shape[0]), h), interpolation=cv2.INTER_AREA)
        head = np.full((strip, img.shape[1], 3), 255, np.uint8)
        _text(head, title, strip)
        parts += [np.concatenate([head, img], axis=0), gap]
    if bar:
        parts.append(_colour_bar(h, strip))
    else:
        parts.pop()
    return np.concatenate(parts, axis=1)


def _jet(cam: np.ndarray) -> np.ndarray:
    return cv2.applyColorMap((np.clip(cam, 0, 1) * 255).astype(np.uint8), cv2.COLORMAP_JET)[..., ::-1]


def _colour_bar(h: int, strip: int) -> np.ndarray:
    width = max(10, h // 32)
    ramp = np.linspace(1, 0, h, dtype=np.float32)[:, None].repeat(width, 1)
    labels = np.full((h, 3 * width, 3), 255, np.uint8)
    _text(labels, "high", strip, y=strip // 2 + 4)
    _text(labels, "low", strip, y=h - 4)
    body = np.concatenate([_jet(ramp), labels], axis=1)
    return np.concatenate([np.full((strip, body.shape[1], 3), 255, np.uint8), body], axis=0)


def _text(canvas: np.ndarray, text: str, strip: int, y: int | None = None) -> None:
    """ASCII text (OpenCV's Hershey font has no other glyphs), shrunk to fit the canvas's width."""
    text = text.encode("ascii", "replace").decode()
    font, scale, thick = cv2.FONT_HERSHEY_SIMPLEX, strip / 32, max(1, strip // 20)
    (w, _), _ = cv2.getTextSize(text, font, scale, thick)
    if w > canvas.shape[1] - 4:
        scale *= (canvas.shape[1] - 4) / w
    y = round(strip * 0.72) if y is None else y
    cv2.putText(canvas, text, (2, y), font, scale, (20, 20, 20), thick, cv2.LINE_AA)


def safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]+", "-", text).strip("-")


def file_name(key: str, true: str, pred: str, method: str, suffix: str = "") -> str:
    tail = f"_{safe(suffix)}" if suffix else ""
    return f"{safe(key)}_true{safe(true)}_pred{safe(pred)}_{safe(method)}{tail}.png"


def write_png(path: Path, rgb: np.ndarray) -> None:
    path.write_bytes(encode(rgb, ".png"))


def index_html(rows: list[dict], title: str, summary: dict | None = None) -> str:
    """One row per explanation: the sample and its scores, then its stored image | the overlay |
    the lesion mask (one picture, so the three stay aligned at any zoom); the pass's localisation
    scores against the centre prior on top."""
    head = ""
    summary = summary or {}
    loc = summary.get("localisation")
    if loc:
        head = (
            f"<table class=s><tr><th></th><th>pointing</th><th>energy in lesions</th><th>IoU</th></tr>"
            f"<tr><td>{html.escape(summary.get('label', 'explanation'))}</td>"
            + "".join(f"<td>{loc[f'cam_{k}']:.3f}</td>" for k in ("pointing", "energy", "iou"))
            + "</tr><tr><td>centre prior</td>"
            + "".join(f"<td>{loc[f'centre_{k}']:.3f}</td>" for k in ("pointing", "energy", "iou"))
            + f"</tr></table><p>{loc['n']} samples with a lesion mask, scored on the stored image.</p>"
        )

    def scores(r: dict) -> str:
        if r.get("cam_energy") is None:
            return ""
        hit = "hit" if r["cam_pointing"] else "miss"
        return f"<br>pointing {hit} · energy {r['cam_energy']:.2f} (centre {r['centre_energy']:.2f})"

    body = "\n".join(
        f"<tr><td>{html.escape(r['key'])}<br>true {html.escape(r['true'])} · pred {html.escape(r['pred'])}"
        f"<br>explained: {html.escape(r['class'])}{scores(r)}</td>"
        f'<td><img src="{html.escape(r["file"])}" loading="lazy"></td></tr>'
        for r in rows
    )
    return (
        f"<!doctype html><meta charset=utf-8><title>{html.escape(title)}</title>"
        "<style>body{font-family:sans-serif}td{vertical-align:top;padding:4px}"
        "table.s td,table.s th{padding:2px 10px;text-align:right}img{max-width:90vw;max-height:420px}</style>"
        f"<h1>{html.escape(title)}</h1>{head}"
        f"<table><tr><th>sample</th><th>stored image | overlay | lesion mask</th></tr>{body}</table>"
    )
