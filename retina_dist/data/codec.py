"""Image bytes <-> arrays. JPEG (what packing writes) decodes with simplejpeg (libjpeg-turbo): the
same pixels as OpenCV's decoder, bit for bit, at ~25% less time per 512 px image in bench data;
everything else (PNG, TIFF, BMP) with OpenCV, several times faster than PIL."""

from __future__ import annotations

import io
import struct
import warnings

import cv2
import numpy as np
import simplejpeg

# An image's size is read from its header before any pixel is decoded: a file of a few KB can claim
# 30000 x 30000 px and expand to gigabytes (a decompression bomb). 8192^2 is 3x the largest fundus
# camera frame in DATASETS.md.
MAX_PIXELS = 8192 * 8192


def single_threaded() -> None:
    """OpenCV without its own thread pool, for processes that decode in parallel with others (loader
    and pack workers): parallelism comes from the processes, and nested pools only contend. Call it
    in a process before it forks workers, never first in a forked child."""
    cv2.setNumThreads(1)


class CorruptImage(ValueError):
    pass


def decode(
    data: bytes, name: str = "", bgr: bool = False, pad: bool = False, out: np.ndarray | None = None
) -> np.ndarray:
    """HxW (grey) or HxWx3 (RGB, or OpenCV's BGR with ``bgr``: the caller swaps on a smaller image)
    uint8; raises CorruptImage naming ``name`` when unreadable.

    ``pad``: a colour JPEG comes as HxWx4, RGBX (BGRX with ``bgr``), the fourth channel filler.
    libjpeg-turbo writes that layout at the same cost, and OpenCV's bilinear warp has a vector path
    for four channels and not for three (bench data: ~300 -> ~175 us per 224 px output here).

    ``out``: a C-contiguous uint8 array of the shape this call returns (``jpeg_shape``), which a
    JPEG is decoded straight into, sparing the copy of the frame into a batch buffer."""
    header = _jpeg_header(data)
    size = header[:2] if header is not None else _other_header(data)
    if size is not None and size[0] * size[1] > MAX_PIXELS:
        h, w = size
        raise CorruptImage(
            f"{name or 'image'}: claims {w} x {h} px ({h * w / 1e6:.0f} M pixels) in {len(data)} bytes, "
            f"over the {MAX_PIXELS / 1e6:.0f} M-pixel limit (a decompression bomb?); not decoded"
        )
    if header is not None and header[2] in ("YCbCr", "RGB", "Gray"):
        return _decode_jpeg(data, name, bgr, header[2], pad, out)
    arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED) if data else None
    if arr is None or arr.size == 0:
        raise CorruptImage(f"{name or 'image'}: cannot be decoded ({len(data)} bytes)")
    if arr.dtype != np.uint8:
        arr = cv2.convertScaleAbs(arr, alpha=255.0 / max(1, int(arr.max())))
    if arr.ndim == 3 and arr.shape[2] == 4:
        arr = cv2.cvtColor(arr, cv2.COLOR_BGRA2BGR if bgr else cv2.COLOR_BGRA2RGB)
    elif arr.ndim == 3 and not bgr:
        arr = cv2.cvtColor(arr, cv2.COLOR_BGR2RGB)
    return arr


def _jpeg_header(data: bytes) -> tuple[int, int, str] | None:
    """Height, width and simplejpeg's name for the colour space of a JPEG; None when ``data`` is
    not one or its header cannot be read (OpenCV then tries, and names the file if it fails too).
    CMYK/YCCK go to OpenCV too, which converts them."""
    if data[:3] != b"\xff\xd8\xff":
        return None
    try:
        h, w, space, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return None
    return h, w, space


def _other_header(data: bytes) -> tuple[int, int] | None:
    """Height and width of a PNG (its IHDR) or of anything else Pillow can open lazily; None when
    unknown (OpenCV then decodes it under its own limit, or names the file)."""
    if data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR":
        w, h = struct.unpack(">II", data[16:24])
        return h, w
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:  # reads the header only
                return im.height, im.width
    except Image.DecompressionBombError:
        return MAX_PIXELS, 2  # Pillow's own bomb limit, which is above ours
    except Exception:  # noqa: BLE001 - not an image Pillow knows: OpenCV has the last word
        return None


def jpeg_shape(data: bytes) -> tuple[int, ...] | None:
    """The shape ``decode`` (unpadded) gives a JPEG that it decodes itself, HxW grey or HxWx3
    colour, read from the header alone; None for anything else."""
    header = _jpeg_header(data)
    if header is None or header[2] not in ("YCbCr", "RGB", "Gray"):
        return None
    return header[:2] if header[2] == "Gray" else (*header[:2], 3)


def _decode_jpeg(
    data: bytes, name: str, bgr: bool, colourspace: str, pad: bool = False, out: np.ndarray | None = None
) -> np.ndarray:
    try:
        if colourspace == "Gray":
            grey = simplejpeg.decode_jpeg(data, "GRAY", strict=True, buffer=out)
            return grey[..., 0] if out is None else out
        # strict: a truncated or damaged stream is an error (libjpeg would only warn and pad with grey)
        order = ("BGR" if bgr else "RGB") + ("X" if pad else "")
        image = simplejpeg.decode_jpeg(data, order, strict=True, buffer=out)
        return image if out is None else out
    except ValueError as err:
        raise CorruptImage(f"{name or 'image'}: cannot be decoded ({len(data)} bytes): {err}") from err


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
