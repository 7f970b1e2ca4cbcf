"""Model construction from a timm name. Models know nothing of DDP or DeepSpeed."""

from __future__ import annotations

import timm
import torch
from torch import nn

from retina_dist.config import ModelConfig


def build_model(cfg: ModelConfig, num_classes: int, in_chans: int) -> nn.Module:
    model = timm.create_model(
        cfg.name,
        pretrained=False,
        num_classes=num_classes,
        in_chans=in_chans,
        drop_path_rate=cfg.drop_path or None,
    )
    if cfg.pretrained:
        load_pretrained(model, cfg.pretrained)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def load_pretrained(model: nn.Module, path: str) -> None:
    """Load a local weights file; the classifier head may differ (it stays freshly initialised),
    any other missing, unexpected or mis-shaped key is an error that lists the keys."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("model", state.get("state_dict", state))
    own = model.state_dict()
    head = {k for k in own if k.startswith(_head_prefix(model))}
    shape_diff = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    missing = [k for k in own if k not in state and k not in head]
    unexpected = [k for k in state if k not in own and not k.startswith(_head_prefix(model))]
    bad = [k for k in shape_diff if k not in head]
    if missing or unexpected or bad:
        raise ValueError(
            f"{path}: weights do not match {type(model).__name__}: "
            f"missing {missing[:8]}{'…' if len(missing) > 8 else ''}, "
            f"unexpected {unexpected[:8]}{'…' if len(unexpected) > 8 else ''}, "
            f"shape mismatch {bad[:8]}"
        )
    model.load_state_dict({k: v for k, v in state.items() if k in own and k not in shape_diff}, strict=False)


def _head_prefix(model: nn.Module) -> str:
    name = model.default_cfg.get("classifier", "head") if hasattr(model, "default_cfg") else "head"
    return name if isinstance(name, str) else name[0]
