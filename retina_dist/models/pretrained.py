"""Pretrained weights as they are published, read safely and fitted to the model being built.

Layouts read (``FOUNDATION.md``): RETFound MAE pretraining files (``{'model': encoder + decoder,
'optimizer', 'epoch', 'scaler', 'args'}``), RETFound fine-tuned files (``fc_norm`` + ``head``, no
``norm``), DINOv2-style files (``teacher`` / ``student`` with ``backbone.`` prefixes and
``dino_head`` / ``ibot_head``), timm and Hugging Face ``.safetensors`` / ``.bin``, checkpoints
under ``module.`` / ``model.`` prefixes, and this project's run folders.

Only ``weights_only=True`` loading, with exactly one extra global allowed: ``argparse.Namespace``,
plain data that MAE-style training scripts store as ``args``. A file that needs any other global is
refused with that global's name. What is known not to belong to the encoder (the MAE decoder and
mask token, DINO heads, a classifier head of another size) is dropped, what the new model has and
the file cannot have (its head, RETFound's ``fc_norm``) starts fresh, and ``pos_embed`` is resampled
to the new grid with timm's own resampler; everything else must match, or it is an error listing
the keys. ``LoadReport`` says what happened to each group, with counts."""

from __future__ import annotations

import argparse
import logging
import pickle
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from retina_dist.config import ConfigError

log = logging.getLogger(__name__)

SAFE_GLOBALS: list[Any] = [argparse.Namespace]
# Keys that belong to a pretraining objective, not to the encoder.
_OBJECTIVE = re.compile(r"^(mask_token|decoder_.*|dino_head\..*|ibot_head\..*|dino_loss\..*|ibot_.*)$")
# Where the weights sit in a checkpoint dict, in order of preference (the teacher is DINO's EMA model,
# the one it releases and evaluates).
_CONTAINERS = ("model", "state_dict", "teacher", "model_ema", "module")
_OTHER_PARTS = ("student.", "teacher.", "dino_head.", "ibot_head.", "dino_loss.", "ibot_patch_loss.")
_PREFIXES = (
    "",
    "module.",
    "model.",
    "backbone.",
    "teacher.backbone.",
    "teacher.",
    "module.backbone.",
    "encoder.",
    "_orig_mod.",
    "student.backbone.",
    "student.",
)


@dataclass
class LoadReport:
    source: str
    layout: str
    prefix: str = ""
    loaded: int = 0
    dropped: dict[str, list[str]] = field(default_factory=dict)  # reason -> keys
    fresh: list[str] = field(default_factory=list)
    renamed: dict[str, str] = field(default_factory=dict)
    resampled: dict[str, dict[str, list[int]]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["counts"] = {
            "loaded": self.loaded,
            "dropped": sum(len(v) for v in self.dropped.values()),
            "fresh": len(self.fresh),
            "renamed": len(self.renamed),
            "resampled": len(self.resampled),
        }
        return out

    def summary(self) -> str:
        c = self.to_dict()["counts"]
        grids = ", ".join(f"{k} {v['from']}->{v['to']}" for k, v in self.resampled.items())
        return (
            f"{self.source} ({self.layout}): {c['loaded']} tensors loaded, {c['dropped']} dropped "
            f"({', '.join(f'{r}: {len(k)}' for r, k in self.dropped.items()) or 'none'}), "
            f"{c['fresh']} fresh ({', '.join(sorted({k.split('.')[0] for k in self.fresh})) or 'none'})"
            + (f", {c['renamed']} renamed" if self.renamed else "")
            + (f", resampled {grids}" if grids else "")
        )


def read_file(path: str | Path) -> tuple[dict[str, torch.Tensor], str]:
    """The tensors of a weights file and a name for its layout."""
    path = Path(path)
    if path.is_dir():
        from retina_dist.run.checkpoints import Checkpointer, weights_of

        folder = path / "checkpoints" if (path / "checkpoints").is_dir() else path
        latest = Checkpointer(folder).latest(verify=True)
        if latest is None:
            raise ConfigError(f"{path}: no checkpoint to load weights from")
        return weights_of(latest), "retina-dist run folder"
    if not path.exists():
        raise ConfigError(f"{path}: weights file does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path)), "safetensors"
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            raw: Any = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL ([\w.]+)", str(err))
        what = found.group(1) if found else str(err).splitlines()[0]
        raise ConfigError(
            f"{path}: refused: unpickling it needs the global {what}, which safe loading does not allow "
            f"(only tensors, plain containers and argparse.Namespace are)"
        ) from None
    except (RuntimeError, EOFError, OSError) as err:
        raise ConfigError(f"{path}: not a readable torch checkpoint ({str(err).splitlines()[0]})") from None
    return _unwrap(raw, path)


def _unwrap(raw: Any, path: Path) -> tuple[dict[str, torch.Tensor], str]:
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: holds a {type(raw).__name__}, not a state dict")
    extras = sorted(k for k in raw if k in ("optimizer", "epoch", "scaler", "args"))
    for key in _CONTAINERS:
        if isinstance(raw.get(key), dict) and raw[key] and not _is_tensors(raw):
            state = raw[key]
            kind = "DINOv2-style teacher" if key == "teacher" else f"checkpoint[{key!r}]"
            if extras:
                kind += f" (+ {', '.join(extras)})"
            return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}, kind
    if not _is_tensors(raw):
        raise ConfigError(f"{path}: no state dict inside (top-level keys {sorted(raw)[:8]})")
    return raw, "state dict"


def _is_tensors(d: dict) -> bool:
    return bool(d) and all(isinstance(v, torch.Tensor) for v in d.values())


def fit(
    model: nn.Module, state: dict[str, torch.Tensor], source: str, layout: str, head: str
) -> tuple[dict[str, torch.Tensor], LoadReport]:
    """``state`` renamed, filtered and resampled for ``model`` (whose classifier is ``head``), and the
    report. Raises ConfigError listing any key that fits none of the known cases."""
    own = model.state_dict()
    prefix = max(_PREFIXES, key=lambda p: sum(k.startswith(p) and k[len(p) :] in own for k in state))
    report = LoadReport(source, _describe(layout, state, prefix), prefix=prefix)
    dropped: dict[str, list[str]] = {}
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if not key.startswith(prefix):
            if key.startswith(_OTHER_PARTS) or _OBJECTIVE.match(key):
                dropped.setdefault("other parts of the training model (student, heads)", []).append(key)
            else:
                out[key] = value  # reported as unexpected below
            continue
        name = key[len(prefix) :]
        if _OBJECTIVE.match(name):
            dropped.setdefault("pretraining objective (decoder, mask token, DINO heads)", []).append(name)
        elif name.startswith(f"{head}."):
            if name in own and own[name].shape == value.shape:
                out[name] = value
            else:
                dropped.setdefault("classifier head of another shape", []).append(name)
        else:
            out[name] = value
    _pool_norm(own, out, report, dropped)
    _resample(model, own, out, report)
    for name in [k for k in own if k not in out]:
        if name.startswith((f"{head}.", "fc_norm.")):
            report.fresh.append(name)
    missing = [k for k in own if k not in out and k not in report.fresh]
    unexpected = [k for k in out if k not in own]
    bad = [k for k in out if k in own and own[k].shape != out[k].shape]
    if missing or unexpected or bad:
        raise ConfigError(
            f"{source}: weights do not match {type(model).__name__}: "
            f"missing {_few(missing)}, unexpected {_few(unexpected)}, "
            f"shape mismatch {[(k, tuple(out[k].shape), tuple(own[k].shape)) for k in bad[:8]]}"
        )
    report.loaded, report.dropped = len(out), dropped
    return out, report


def _pool_norm(
    own: dict[str, torch.Tensor], out: dict[str, torch.Tensor], report: LoadReport, dropped: dict
) -> None:
    """RETFound's head: a model pooling the mean of the patch tokens has ``fc_norm`` and no final
    ``norm``. Pretrained ``norm`` then goes (RETFound deletes it and starts ``fc_norm`` fresh); a
    fine-tuned file's ``fc_norm`` into a cls-token model becomes its ``norm``, the same LayerNorm of
    the same token."""
    for p in ("weight", "bias"):
        norm, fc = f"norm.{p}", f"fc_norm.{p}"
        if norm in out and norm not in own and fc in own:
            dropped.setdefault("final norm (mean-pooled head uses a fresh fc_norm)", []).append(norm)
            del out[norm]
        elif fc in out and fc not in own and norm in own:
            out[norm] = out.pop(fc)
            report.renamed[fc] = norm


def _resample(
    model: nn.Module, own: dict[str, torch.Tensor], out: dict[str, torch.Tensor], report: LoadReport
) -> None:
    if "pos_embed" not in out or "pos_embed" not in own or out["pos_embed"].shape == own["pos_embed"].shape:
        return
    from timm.layers import resample_abs_pos_embed

    prefix = 0 if getattr(model, "no_embed_class", False) else int(getattr(model, "num_prefix_tokens", 1))
    patch_embed: Any = model.patch_embed  # a timm ViT's
    grid = [int(v) for v in patch_embed.grid_size]
    old_n = out["pos_embed"].shape[1] - prefix
    side = int(round(old_n**0.5))
    if side * side != old_n:
        raise ConfigError(f"pos_embed of {old_n} patch positions is not a square grid")
    out["pos_embed"] = resample_abs_pos_embed(
        out["pos_embed"], new_size=grid, old_size=[side, side], num_prefix_tokens=prefix
    )
    report.resampled["pos_embed"] = {"from": [side, side], "to": grid}


def _describe(layout: str, state: dict[str, torch.Tensor], prefix: str) -> str:
    names = {k[len(prefix) :] for k in state if k.startswith(prefix)}
    if any(n.startswith("decoder_") for n in names):
        return f"MAE pretraining, encoder + decoder; {layout}"
    if "fc_norm.weight" in names and "norm.weight" not in names:
        return f"fine-tuned, mean-pooled head (fc_norm + head); {layout}"
    if any(k.startswith(("dino_head.", "teacher.", "student.")) for k in state) or "teacher" in layout:
        return f"DINOv2-style; {layout}"
    return layout


def _few(keys: list[str]) -> str:
    return f"{keys[:8]}{'…' if len(keys) > 8 else ''}"
