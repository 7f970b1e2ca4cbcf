"""Per-sample augmentation with albumentations (it applies one draw to the image and its lesion mask)."""

from __future__ import annotations

import albumentations as A
import cv2
import numpy as np


def build_transform(image_size: int, train: bool, augment: bool, colour: bool) -> A.Compose:
    """Resize to ``image_size``; for training add flips, small rotations and photometric jitter.

    ``colour`` adds hue/saturation jitter, which suits fundus photographs and not grey OCT scans.
    """
    # Linear, not area: prescale() has already done the large-factor, anti-aliased part of the shrink,
    # and INTER_AREA at a non-integer factor cost more than the JPEG decode itself (bench data).
    ops: list[A.BasicTransform] = [
        A.Resize(image_size, image_size, interpolation=cv2.INTER_LINEAR, mask_interpolation=cv2.INTER_NEAREST)
    ]
    if train and augment:
        ops += [
            A.HorizontalFlip(p=0.5),
            A.Affine(rotate=(-15, 15), scale=(0.9, 1.1), border_mode=cv2.BORDER_CONSTANT, p=0.7),
            A.RandomBrightnessContrast(brightness_limit=0.15, contrast_limit=0.15, p=0.5),
        ]
        if colour:
            ops.append(A.ColorJitter(brightness=0, contrast=0, saturation=0.15, hue=0.03, p=0.5))
    return A.Compose(ops, seed=0)


def prescale(image: np.ndarray, size: int, nearest: bool = False) -> np.ndarray:
    """Shrink by the largest integer factor that keeps both sides >= ``size``, with OpenCV's fast
    integer-factor area path: anti-aliased like INTER_AREA at a fraction of its cost, and no detail
    below the training resolution is lost. The few rows/columns past a multiple of the factor go."""
    h, w = image.shape[:2]
    k = min(h, w) // size
    if k < 2:
        return image
    h2, w2 = h // k * k, w // k * k
    return cv2.resize(
        image[:h2, :w2], (w2 // k, h2 // k), interpolation=cv2.INTER_NEAREST if nearest else cv2.INTER_AREA
    )
