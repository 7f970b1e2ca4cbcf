"""From a decoded image to the array the model's transform sees: the one path shared by the shard
stream (training, evaluation, CAM) and by ``predict`` / ``serve``, so inference cannot drift from
training."""

from __future__ import annotations

import cv2
import numpy as np

from retina_dist.data.codec import fit_max_side


def to_channels(image: np.ndarray, in_chans: int) -> np.ndarray:
    if in_chans == 3 and image.ndim == 2:
        return np.repeat(image[..., None], 3, axis=2)
    if in_chans == 1 and image.ndim == 3:
        return (image @ np.array([0.299, 0.587, 0.114])).astype(np.uint8)
    return image


def view(image: np.ndarray, in_chans: int, image_size: int) -> np.ndarray:
    """A decoded shard image as the transform expects it: the model's channels, shrunk by the
    largest integer factor first (anti-aliased, cheap)."""
    return prescale(to_channels(image, in_chans), image_size)


def view_unchanged(shape: tuple[int, ...], in_chans: int, image_size: int) -> bool:
    """Whether ``view`` returns a decoded image of ``shape`` as it is: already the model's
    channels, and too small to prescale (it can then be decoded straight into its batch slot)."""
    return len(shape) == (3 if in_chans == 3 else 2) and prescale_factor(shape[0], shape[1], image_size) < 2


def as_packed(image: np.ndarray, max_side: int) -> np.ndarray:
    """What packing did to an image before it reached a shard (``max_side`` from the manifest)."""
    return fit_max_side(image, max_side) if max_side else image


def prescale_factor(h: int, w: int, size: int) -> int:
    """The integer shrink ``prescale`` applies to an h x w image (below 2: none)."""
    return min(h, w) // size


def prescale(image: np.ndarray, size: int, nearest: bool = False) -> np.ndarray:
    """Shrink by the largest integer factor that keeps both sides >= ``size``, with OpenCV's fast
    integer-factor area path: anti-aliased like INTER_AREA at a fraction of its cost, and no detail
    below the training resolution is lost. The few rows/columns past a multiple of the factor go."""
    h, w = image.shape[:2]
    k = prescale_factor(h, w, size)
    if k < 2:
        return image
    h2, w2 = h // k * k, w // k * k
    return cv2.resize(
        image[:h2, :w2], (w2 // k, h2 // k), interpolation=cv2.INTER_NEAREST if nearest else cv2.INTER_AREA
    )
