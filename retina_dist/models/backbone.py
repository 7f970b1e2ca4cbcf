"""timm backbones by name, and local weight files (compute nodes are offline). No DDP/DeepSpeed here."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from retina_dist.config import ConfigError


def create(
    name: str, num_classes: int, in_chans: int, drop_path: float = 0.0, grad_ckpt: bool = False
) -> nn.Module:
    """A timm model; ``num_classes=0`` gives the pooled-embedding encoder (``num_features`` wide)."""
    if name == "small_cnn":
        from retina_dist.models.small_cnn import SmallCNN

        return SmallCNN(num_classes, in_chans)
    try:
        model = timm.create_model(
            name,
            pretrained=False,
            num_classes=num_classes,
            in_chans=in_chans,
            drop_path_rate=drop_path or None,
        )
    except RuntimeError as err:  # timm's "Unknown model"
        raise ConfigError(f"model.name {name!r}: {err}") from None
    if grad_ckpt:
        model.set_grad_checkpointing(True)  # type: ignore[operator]  # timm's method, not a tensor
    return model


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors``, a ``.pt/.pth`` file (``weights_only``), or a run folder's
    latest checkpoint (DeepSpeed checkpoints are consolidated)."""
    path = Path(path)
    if path.is_dir():
        from retina_dist.run.checkpoints import Checkpointer, weights_of

        latest = Checkpointer(path / "checkpoints" if (path / "checkpoints").is_dir() else path).latest()
        if latest is None:
            raise ConfigError(f"{path}: no checkpoint to load weights from")
        return weights_of(latest)
    if not path.exists():
        raise ConfigError(f"{path}: weights file does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state: Any = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    return state


def load_pretrained(model: nn.Module, source: str | Path | dict[str, torch.Tensor]) -> None:
    """Load weights; the classifier head may differ (it stays freshly initialised). Any other missing,
    unexpected or mis-shaped key is an error that lists the keys."""
    state = source if isinstance(source, dict) else read_weights(source)
    where = "weights" if isinstance(source, dict) else str(source)
    own = model.state_dict()
    prefix = head_prefix(model)
    head = {k for k in own if k.startswith(prefix)}
    shape_diff = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    missing = [k for k in own if k not in state and k not in head]
    unexpected = [k for k in state if k not in own and not k.startswith(prefix)]
    bad = [k for k in shape_diff if k not in head]
    if missing or unexpected or bad:
        raise ConfigError(
            f"{where}: weights do not match {type(model).__name__}: "
            f"missing {missing[:8]}{'…' if len(missing) > 8 else ''}, "
            f"unexpected {unexpected[:8]}{'…' if len(unexpected) > 8 else ''}, "
            f"shape mismatch {bad[:8]}"
        )
    model.load_state_dict({k: v for k, v in state.items() if k in own and k not in shape_diff}, strict=False)


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
    return f.flatten(2).transpose(1, 2) if f.ndim == 4 else f
