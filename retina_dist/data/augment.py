"""Per-sample augmentation with albumentations (it applies one draw to the image and its lesion mask)."""

from __future__ import annotations

import albumentations as A
import cv2


def build_transform(image_size: int, train: bool, augment: bool, colour: bool) -> A.Compose:
    """Resize to ``image_size``; for training add flips, small rotations and photometric jitter.

    ``colour`` adds hue/saturation jitter, which suits fundus photographs and not grey OCT scans.
    """
    ops: list[A.BasicTransform] = [A.Resize(image_size, image_size, interpolation=cv2.INTER_AREA)]
    if train and augment:
        ops += [
            A.HorizontalFlip(p=0.5),
            A.Affine(rotate=(-15, 15), scale=(0.9, 1.1), border_mode=cv2.BORDER_CONSTANT, p=0.7),
            A.RandomBrightnessContrast(brightness_limit=0.15, contrast_limit=0.15, p=0.5),
        ]
        if colour:
            ops.append(A.ColorJitter(brightness=0, contrast=0, saturation=0.15, hue=0.03, p=0.5))
    return A.Compose(ops, seed=0)
