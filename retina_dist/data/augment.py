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


class FusedTrainAugment:
    """The training augmentation of ``build_transform`` in two OpenCV calls: resize, flip, rotation
    and scale as one ``warpAffine`` straight to the output size, then brightness, contrast,
    saturation and hue as one 3x4 colour matrix (``cv2.transform``). Same draws and ranges; measured
    in ``bench data``: albumentations' Compose spent ~0.8 ms per 512 px image (more than its JPEG
    decode, half of it in per-call bookkeeping), this ~0.15 ms. Parameters come from the caller's
    generator, so a resumed epoch augments exactly as before."""

    def __init__(self, image_size: int, colour: bool) -> None:
        self.size, self.colour = image_size, colour

    def geometry(self, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
        flip = rng.random() < 0.5
        angle, scale = (rng.uniform(-15, 15), rng.uniform(0.9, 1.1)) if rng.random() < 0.7 else (0.0, 1.0)
        a = np.deg2rad(angle)
        rot = scale * np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
        lin = rot @ np.diag([(-1.0 if flip else 1.0) * self.size / w, self.size / h])
        c_src, c_out = np.array([(w - 1) / 2, (h - 1) / 2]), np.full(2, (self.size - 1) / 2)
        return np.hstack([lin, (c_out - lin @ c_src)[:, None]])

    def photometric(self, rng: np.random.Generator, channels: int) -> np.ndarray | None:
        m, offset, touched = np.eye(channels), np.zeros(channels), False
        if rng.random() < 0.5:  # contrast about mid-grey, then brightness (fractions of full scale)
            alpha, beta = 1 + rng.uniform(-0.15, 0.15), rng.uniform(-0.15, 0.15) * 255
            m, offset, touched = alpha * m, np.full(channels, beta + 127.5 * (1 - alpha)), True
        if self.colour and channels == 3 and rng.random() < 0.5:
            sat, hue = 1 + rng.uniform(-0.15, 0.15), rng.uniform(-0.03, 0.03) * 2 * np.pi
            to_yiq = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
            c, s = np.cos(hue), np.sin(hue)
            chroma = sat * np.array([[1, 0, 0], [0, c, -s], [0, s, c]])
            chroma[0, 0] = 1.0  # luma untouched
            colour = np.linalg.inv(to_yiq) @ chroma @ to_yiq
            m, offset, touched = colour @ m, colour @ offset, True
        return np.hstack([m, offset[:, None]]).astype(np.float32) if touched else None

    def __call__(
        self, image: np.ndarray, rng: np.random.Generator, mask: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray | None]:
        h, w = image.shape[:2]
        geo = self.geometry(h, w, rng)
        size = (self.size, self.size)
        out = cv2.warpAffine(image, geo, size, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
        if mask is not None:
            mask = cv2.warpAffine(mask, geo, size, flags=cv2.INTER_NEAREST, borderMode=cv2.BORDER_CONSTANT)
        colour = self.photometric(rng, 3 if out.ndim == 3 else 1)
        if colour is not None:
            if out.ndim == 3:
                out = cv2.transform(out, colour)  # saturates to uint8
            else:
                out = cv2.addWeighted(out, float(colour[0, 0]), out, 0.0, float(colour[0, 1]))  # saturates
        return out, mask
