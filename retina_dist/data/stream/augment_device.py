"""The training augmentation on the accelerator: the loader worker only decodes and ships the frames
on a common canvas with each image's 2x3 geometry and colour matrix (drawn exactly as the worker-side
``FusedTrainAugment`` draws them); here one ``grid_sample`` and one batched matrix product apply them
to the whole batch. On a GPU this moves the costliest per-pixel work off the CPU workers: bench data
measured the worker-side warp at a third or more of the JPEG decode, which caps the worker-side
stream well below bare decode whatever else is tuned."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


def warp_and_colour(
    canvas: torch.Tensor, geometry: torch.Tensor, colour: torch.Tensor, size: int
) -> torch.Tensor:
    """``canvas``: uint8 N x C x Hc x Wc (images top-left, zeros beyond them); ``geometry``: N x 2 x 3
    maps from source pixel to output pixel (centres); ``colour``: N x C x (C+1) affine colour maps.
    Returns float N x C x size x size in 0..255, rounded as the worker path's uint8 output is."""
    n, c, hc, wc = canvas.shape
    dev = canvas.device
    geometry, colour = geometry.to(dev, torch.float32), colour.to(dev, torch.float32)
    lin, shift = geometry[:, :, :2], geometry[:, :, 2]
    inv = torch.linalg.inv(lin)  # output pixel -> source pixel
    ys, xs = torch.meshgrid(
        torch.arange(size, device=dev, dtype=torch.float32),
        torch.arange(size, device=dev, dtype=torch.float32),
        indexing="ij",
    )
    out_px = torch.stack([xs, ys], dim=-1).view(1, -1, 2) - shift[:, None, :]  # N x S*S x 2
    src = out_px @ inv.transpose(1, 2)
    # align_corners=True: -1 and 1 are the centres of the canvas' first and last pixels.
    norm = torch.tensor([2.0 / max(wc - 1, 1), 2.0 / max(hc - 1, 1)], device=dev)
    grid = (src * norm - 1).view(n, size, size, 2)
    x = F.grid_sample(canvas.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    x = torch.einsum("nij,njhw->nihw", colour[:, :, :c], x) + colour[:, :, c, None, None]
    return x.round_().clamp_(0, 255)


def apply(images: torch.Tensor, plan: dict[str, Any]) -> torch.Tensor:
    """A loader batch's canvas (B x C x Hc x Wc, or B x V x C x Hc x Wc) -> augmented float pixels of
    the same rank at the training size."""
    multi = images.ndim == 5
    flat = images.flatten(0, 1) if multi else images
    out = warp_and_colour(
        flat, plan["geometry"].flatten(0, 1), plan["colour"].flatten(0, 1), int(plan["size"])
    )
    return out.view(*images.shape[:2], *out.shape[1:]) if multi else out
