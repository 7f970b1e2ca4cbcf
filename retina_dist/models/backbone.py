"""timm backbones by name, and local weight files (compute nodes are offline). No DDP/DeepSpeed here."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from retina_dist.config import ConfigError
from retina_dist.models.pretrained import LoadReport, fit, read_file

log = logging.getLogger(__name__)


def create(
    name: str,
    num_classes: int,
    in_chans: int,
    drop_path: float = 0.0,
    grad_ckpt: bool = False,
    img_size: int = 0,
    global_pool: str = "",
) -> nn.Module:
    """A timm model; ``num_classes=0`` gives the pooled-embedding encoder (``num_features`` wide).
    ``img_size`` goes to the models that take one (ViTs: their patch grid and pos_embed);
    ``global_pool`` ``token`` or ``avg`` (a ViT with ``avg`` gets timm's ``fc_norm``: RETFound's head)."""
    if name == "small_cnn":
        from retina_dist.models.small_cnn import SmallCNN

        return SmallCNN(num_classes, in_chans)
    kwargs: dict[str, Any] = {
        "num_classes": num_classes,
        "in_chans": in_chans,
        "drop_path_rate": drop_path or None,
    }
    if global_pool:
        kwargs["global_pool"] = global_pool
    sized: dict[str, Any] = {**kwargs, "img_size": img_size} if img_size else kwargs
    try:
        try:
            model = timm.create_model(name, pretrained=False, **sized)
        except TypeError as err:
            if "img_size" not in str(err):
                raise
            model = timm.create_model(name, pretrained=False, **kwargs)  # a CNN: any input size
    except RuntimeError as err:  # timm's "Unknown model"
        raise ConfigError(f"model.name {name!r}: {err}") from None
    except (TypeError, AssertionError, ValueError) as err:
        raise ConfigError(f"model.name {name!r} with {kwargs}: {err}") from None
    if grad_ckpt:
        model.set_grad_checkpointing(True)  # type: ignore[operator]  # timm's method, not a tensor
    return model


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a weights file in any layout ``pretrained.read_file`` reads, or of a run folder's
    latest checkpoint (DeepSpeed checkpoints are consolidated)."""
    return read_file(path)[0]


def load_pretrained(model: nn.Module, source: str | Path | dict[str, torch.Tensor]) -> LoadReport:
    """Load published weights into ``model`` (see ``pretrained``): the classifier head may differ
    (it starts fresh), pos_embed is resampled to the model's grid, pretraining-only tensors are
    dropped; any other missing, unexpected or mis-shaped key is an error that lists the keys."""
    if isinstance(source, dict):
        state, layout, where = source, "state dict", "weights"
    else:
        (state, layout), where = read_file(source), str(source)
    head = head_prefix(model)
    fitted, report = fit(model, state, where, layout, head)
    model.load_state_dict(fitted, strict=False)
    layer = getattr(model, head, None)
    if (
        any(k.startswith(f"{head}.") for k in report.fresh)
        and hasattr(model, "fc_norm")
        and isinstance(layer, nn.Linear)
    ):
        # RETFound's fine-tuning starts a ViT's new head this small, so early steps barely move the encoder.
        nn.init.trunc_normal_(layer.weight, std=2e-5)
        nn.init.zeros_(layer.bias)
    log.info("pretrained: %s", report.summary())
    return report


def head_prefix(model: nn.Module) -> str:
    cfg: dict[str, Any] = getattr(model, "default_cfg", {})
    name = cfg.get("classifier", "head")
    return name if isinstance(name, str) else name[0]


def tokens(backbone: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Spatial features as a token sequence B x N x C (CNN maps flattened; ViT tokens as they are)."""
    f = backbone.forward_features(x)  # type: ignore[operator]  # timm's method
    norm = getattr(getattr(backbone, "head", None), "norm", None)
    if f.ndim == 4 and isinstance(norm, nn.Module):
        f = norm(f)  # ConvNeXt normalises its final map in the head; unused parameters would stall DDP
    fc_norm = getattr(backbone, "fc_norm", None)
    if f.ndim == 3 and isinstance(fc_norm, nn.LayerNorm):
        f = fc_norm(f)  # a mean-pooling ViT has no final norm: its fc_norm normalises each token
    return f.flatten(2).transpose(1, 2) if f.ndim == 4 else f
