"""Every explanation method behind one call: ``explainer(x, cls)`` -> one H x W map in [0, 1] per view,
at the network input's size (``stored.to_stored`` maps it onto the stored image).

- The CAM family (Grad-CAM, Grad-CAM++, XGrad-CAM, LayerCAM, EigenCAM) comes from pytorch-grad-cam on a
  target layer (ViT tokens through ``vit_reshape``).
- ``ig``: Integrated Gradients from captum, from the dataset-mean image (zero after normalisation) to
  the input; per pixel the absolute attribution summed over channels, lightly smoothed (one input
  pixel), because raw IG is speckle at the scale of a pixel and the masks are lesions, not pixels.
- ``rollout``: attention rollout for ViTs (Abnar & Zuidema 2020): each block's head-averaged
  attention plus the residual identity, rows renormalised, multiplied through the depth; the row of
  the class token (or the mean over patch tokens for a mean-pooled head) over the patch grid. It is
  class-agnostic: it shows what the network attends to, not what argues for one class.
- The dual-eye and fusion models run both views through encoders inside one graph (fusion encoders
  frozen under no_grad): gradient-free EigenCAM on each encoder, one map per view.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import cv2
import numpy as np
import torch
from torch import nn

from retina_dist.cam.targets import is_vit, target_layer, vit_reshape
from retina_dist.config import ConfigError
from retina_dist.models import DualEyeNet, LateFusionNet

CAM_METHODS = ("gradcam", "gradcam++", "xgradcam", "layercam", "eigencam")
METHODS = (*CAM_METHODS, "ig", "rollout")
LABELS = {
    "gradcam": "Grad-CAM",
    "gradcam++": "Grad-CAM++",
    "xgradcam": "XGrad-CAM",
    "layercam": "LayerCAM",
    "eigencam": "EigenCAM",
    "ig": "Integrated Gradients",
    "rollout": "attention rollout",
}

Explain = Callable[[torch.Tensor, int], list[np.ndarray]]


def cam_class(method: str) -> Any:
    from pytorch_grad_cam import EigenCAM, GradCAM, GradCAMPlusPlus, LayerCAM, XGradCAM

    return dict(zip(CAM_METHODS, (GradCAM, GradCAMPlusPlus, XGradCAM, LayerCAM, EigenCAM), strict=True))[
        method
    ]


class Explainer:
    """``method`` as built for ``model`` (multi-view models always get per-view EigenCAM), and
    ``layer``: the module explained, or '' where the method has none (IG, rollout)."""

    def __init__(self, model: nn.Module, method: str, layer_name: str = "") -> None:
        if method not in METHODS:
            raise ConfigError(f"explanation method {method!r}: expected one of {', '.join(METHODS)}")
        self.model = model
        self.multi_view = isinstance(model, (DualEyeNet, LateFusionNet))
        self.layer = ""
        self._fn: Explain
        if self.multi_view:
            self.method = "eigencam"
            self._fn = self._per_view()
        elif method == "ig":
            self.method = method
            self._fn = self._ig()
        elif method == "rollout":
            if not is_vit(model):
                raise ConfigError(f"rollout explains attention: {type(model).__name__} is not a ViT")
            self.method = method
            self._fn = self._rollout
        else:
            self.method = method
            layer = _layer(model, layer_name)
            self.layer = layer_name or _name_of(model, layer)
            cam = cam_class(method)(model=model, target_layers=[layer], reshape_transform=vit_reshape(model))
            self._fn = lambda x, c: [_cam_call(cam, x, c)]

    @property
    def label(self) -> str:
        return LABELS[self.method] + (f" · {self.layer}" if self.layer else "")

    def __call__(self, x: torch.Tensor, cls: int) -> list[np.ndarray]:
        """``x``: one normalised sample, 1 x C x H x W (1 x V x C x H x W for two views)."""
        with torch.enable_grad():
            return self._fn(x, cls)

    def _per_view(self) -> Explain:
        m = self.model
        encoders: list[nn.Module] = (
            [m.backbone, m.backbone] if isinstance(m, DualEyeNet) else [m.fundus, m.oct]  # type: ignore[list-item]
        )
        cams = [
            cam_class("eigencam")(model=e, target_layers=[target_layer(e)], reshape_transform=vit_reshape(e))
            for e in encoders
        ]
        return lambda x, c: [cam(input_tensor=x[:, v], targets=None)[0] for v, cam in enumerate(cams)]

    def _ig(self) -> Explain:
        from captum.attr import IntegratedGradients

        ig = IntegratedGradients(self.model)

        def explain(x: torch.Tensor, c: int) -> list[np.ndarray]:
            attr = ig.attribute(
                x, baselines=torch.zeros_like(x), target=c, n_steps=32, internal_batch_size=16
            )
            heat = attr.detach().abs().sum(1)[0].float().cpu().numpy()
            return [norm01(cv2.GaussianBlur(heat, (0, 0), 1.0))]

        return explain

    def _rollout(self, x: torch.Tensor, c: int) -> list[np.ndarray]:
        model: Any = self.model
        maps: list[torch.Tensor] = []
        hooks, fused = [], []
        for blk in model.blocks:
            fused.append(blk.attn.fused_attn)
            blk.attn.fused_attn = False  # the fused kernel never materialises the attention matrix
            hooks.append(blk.attn.attn_drop.register_forward_hook(lambda _m, _i, out: maps.append(out)))
        try:
            with torch.no_grad():
                model(x)
        finally:
            for h in hooks:
                h.remove()
            for blk, f in zip(model.blocks, fused, strict=True):
                blk.attn.fused_attn = f
        n = maps[0].shape[-1]
        eye = torch.eye(n, device=x.device)
        joint = eye
        for a in maps:
            a = a[0].float().mean(0) + eye
            joint = (a / a.sum(-1, keepdim=True)) @ joint
        prefix = getattr(model, "num_prefix_tokens", 1)
        token_pooled = prefix > 0 and getattr(model, "global_pool", "token") == "token"
        row = joint[0, prefix:] if token_pooled else joint[prefix:, prefix:].mean(0)
        side = math.isqrt(row.numel())
        grid = row[: side * side].reshape(1, 1, side, side)
        grid = torch.nn.functional.interpolate(grid, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return [norm01(grid[0, 0].cpu().numpy())]


def _cam_call(cam: Any, x: torch.Tensor, c: int) -> np.ndarray:
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    return cam(input_tensor=x, targets=[ClassifierOutputTarget(c)])[0]


def _layer(model: nn.Module, name: str) -> nn.Module:
    try:
        return target_layer(model, name)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def _name_of(model: nn.Module, layer: nn.Module) -> str:
    return next((n for n, m in model.named_modules() if m is layer), type(layer).__name__)


def norm01(a: np.ndarray) -> np.ndarray:
    a = a - a.min()
    return (a / a.max() if a.max() > 0 else a).astype(np.float32)
