"""Image bytes <-> arrays. OpenCV decodes JPEG/PNG several times faster than PIL and is already here."""

from __future__ import annotations

import cv2
import numpy as np

cv2.setNumThreads(1)  # parallelism comes from loader workers; nested thread pools only contend


class CorruptImage(ValueError):
    pass


def decode(data: bytes, name: str = "") -> np.ndarray:
    """HxW (grey) or HxWx3 (RGB) uint8; raises CorruptImage naming ``name`` when unreadable."""
    arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED) if data else None
    if arr is None or arr.size == 0:
        raise CorruptImage(f"{name or 'image'}: cannot be decoded ({len(data)} bytes)")
    if arr.dtype != np.uint8:
        arr = cv2.convertScaleAbs(arr, alpha=255.0 / max(1, int(arr.max())))
    if arr.ndim == 3:
        arr = cv2.cvtColor(arr, cv2.COLOR_BGRA2RGB if arr.shape[2] == 4 else cv2.COLOR_BGR2RGB)
    return arr


def encode(arr: np.ndarray, ext: str, quality: int = 95) -> bytes:
    if arr.ndim == 3:
        arr = cv2.cvtColor(arr, cv2.COLOR_RGB2BGR)
    params = (
        [cv2.IMWRITE_JPEG_QUALITY, quality] if ext in (".jpg", ".jpeg") else [cv2.IMWRITE_PNG_COMPRESSION, 1]
    )
    ok, buf = cv2.imencode(ext, arr, params)
    if not ok:
        raise ValueError(f"cannot encode an array of shape {arr.shape} as {ext}")
    return buf.tobytes()


def fit_max_side(arr: np.ndarray, max_side: int, nearest: bool = False) -> np.ndarray:
    h, w = arr.shape[:2]
    if max(h, w) <= max_side:
        return arr
    scale = max_side / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return cv2.resize(arr, size, interpolation=cv2.INTER_NEAREST if nearest else cv2.INTER_AREA)
