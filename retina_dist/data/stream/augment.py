"""Image transforms of the stream. ``FusedTrainAugment``: the training augmentation as one OpenCV
warp (resize, flip, rotation, scale to the output size) and one 3x4 colour matrix, from draws a
batch takes from one seeded generator (applied in the worker, or by ``augment_device`` on the
accelerator). ``build_transform``: albumentations' resize for evaluation (and the PIL baseline of
``bench data``), which applies the same resize to an image and its lesion mask."""

from __future__ import annotations

import math

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


# RGB -> YIQ (NTSC): hue is a rotation and saturation a scaling of the chroma plane (I, Q).
_TO_YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_FROM_YIQ = np.linalg.inv(_TO_YIQ)
_BGR_TO_RGB = np.eye(3)[::-1]

# Uniforms per image: flip; affine?, angle, scale; tone?, contrast, brightness; colour?, saturation, hue.
N_DRAWS = 10


class FusedTrainAugment:
    """The training augmentation of ``build_transform`` in two OpenCV calls: resize, flip, rotation
    and scale as one ``warpAffine`` straight to the output size, then brightness, contrast,
    saturation and hue as one 3x4 colour matrix (``cv2.transform``). Same ranges as the
    albumentations pipeline; measured in ``bench data``: its Compose spent ~0.8 ms per 512 px image
    (more than the JPEG decode, half of it in per-call bookkeeping), this ~0.15 ms.

    The random numbers are drawn up front, a fixed ``N_DRAWS`` per image whatever branches fire, so
    the caller can draw a whole batch from one generator seeded by the batch's position: a resumed
    epoch augments exactly as before. The output can go straight into a slot of the caller's batch
    buffer (``dst``), and a BGR image (as OpenCV decodes) comes out RGB at no cost: the channel swap
    is folded into the colour matrix, or done on the small output, never on the decoded frame."""

    def __init__(self, image_size: int, colour: bool) -> None:
        self.size, self.colour = image_size, colour
        self._padded: np.ndarray | None = None  # four-channel warp output, reused image after image

    @staticmethod
    def draw(rng: np.random.Generator, n: int, views: int = 1) -> np.ndarray:
        return rng.random((n, views, N_DRAWS))

    def geometry(self, h: int, w: int, u: np.ndarray) -> np.ndarray:
        """2x3 map from source to output: scale to ``size``, flip, rotate and zoom about the centre."""
        flip = u[0] < 0.5
        angle, scale = (math.radians(-15 + 30 * u[2]), 0.9 + 0.2 * u[3]) if u[1] < 0.7 else (0.0, 1.0)
        c, s = scale * math.cos(angle), scale * math.sin(angle)
        sx, sy = (-1.0 if flip else 1.0) * self.size / w, self.size / h
        a, b, d, e = c * sx, -s * sy, s * sx, c * sy
        cx, cy, co = (w - 1) / 2, (h - 1) / 2, (self.size - 1) / 2
        return np.array([[a, b, co - a * cx - b * cy], [d, e, co - d * cx - e * cy]])

    def photometric(self, u: np.ndarray, channels: int, bgr: bool = False) -> np.ndarray | None:
        """3x4 (or 1x2 for grey) affine colour map to RGB, or None when no jitter fires; with ``bgr``
        it takes BGR input (the channel swap folded into the matrix)."""
        m, offset, touched = np.eye(channels), np.zeros(channels), False
        if u[4] < 0.5:  # contrast about mid-grey, then brightness (fractions of full scale)
            alpha, beta = 1 + (-0.15 + 0.3 * u[5]), (-0.15 + 0.3 * u[6]) * 255
            m, offset, touched = alpha * m, np.full(channels, beta + 127.5 * (1 - alpha)), True
        if self.colour and channels == 3 and u[7] < 0.5:
            sat, hue = 1 + (-0.15 + 0.3 * u[8]), (-0.03 + 0.06 * u[9]) * 2 * math.pi
            c, s = math.cos(hue), math.sin(hue)
            chroma = np.array([[1.0, 0, 0], [0, sat * c, -sat * s], [0, sat * s, sat * c]])  # luma untouched
            colour = _FROM_YIQ @ chroma @ _TO_YIQ
            m, offset, touched = colour @ m, colour @ offset, True
        if not touched:
            return None
        return np.hstack([m @ _BGR_TO_RGB if bgr and channels == 3 else m, offset[:, None]])

    def colour_map(self, u: np.ndarray, channels: int, bgr: bool) -> np.ndarray:
        """The colour step as one C x (C+1) matrix, never None (the identity, or the bare channel
        swap, when no jitter fires): what the device-side augmentation applies."""
        colour = self.photometric(u, channels, bgr)
        if colour is not None:
            return colour
        return np.hstack(
            [_BGR_TO_RGB if bgr and channels == 3 else np.eye(channels), np.zeros((channels, 1))]
        )

    def __call__(
        self,
        image: np.ndarray,
        u: np.ndarray,
        mask: np.ndarray | None = None,
        dst: np.ndarray | None = None,
        bgr: bool = False,
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """``image``: grey, three channels, or four with the fourth filler (``decode(pad=True)``);
        ``u``: its ``N_DRAWS`` uniforms. Returns (RGB or grey image, mask), the image written into
        ``dst`` when given."""
        h, w = image.shape[:2]
        geo = self.geometry(h, w, u)
        size = (self.size, self.size)
        if image.ndim == 3 and image.shape[2] == 4:
            # Padded colour (codec.decode(pad=True)): warp the four channels (OpenCV's vector path),
            # then drop the filler, and the channel swap with it, straight into the output.
            self._padded = cv2.warpAffine(
                image, geo, size, dst=self._padded, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT
            )
            out = cv2.cvtColor(self._padded, cv2.COLOR_BGRA2RGB if bgr else cv2.COLOR_RGBA2RGB, dst=dst)
            bgr = False
        else:
            out = cv2.warpAffine(
                image, geo, size, dst=dst, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT
            )
        if dst is not None and not np.may_share_memory(out, dst):
            raise ValueError(f"output slot {dst.shape} does not fit a {out.shape} image")
        if mask is not None:
            mask = cv2.warpAffine(mask, geo, size, flags=cv2.INTER_NEAREST, borderMode=cv2.BORDER_CONSTANT)
        rgb = out.ndim == 3
        colour = self.photometric(u, 3 if rgb else 1, bgr and rgb)
        if colour is not None:
            if rgb:
                cv2.transform(out, colour.astype(np.float32), dst=out)  # in place; saturates to uint8
            else:
                cv2.addWeighted(out, float(colour[0, 0]), out, 0.0, float(colour[0, 1]), dst=out)
        elif rgb and bgr:
            cv2.cvtColor(out, cv2.COLOR_BGR2RGB, dst=out)
        return out, mask
