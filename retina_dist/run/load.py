"""A trained run, loaded once: config, manifest, task and the model with its weights."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from retina_dist.config import Config, ConfigError
from retina_dist.data.manifest import Manifest
from retina_dist.run.folder import RunDir
from retina_dist.tasks import Task, build_task


@dataclass
class LoadedRun:
    run: RunDir
    cfg: Config
    manifest: Manifest
    task: Task
    model: nn.Module  # on the CPU, in eval mode, with the weights asked for
    weights: str  # what was loaded: "latest (step-….pt)" or the file given

    @property
    def views(self) -> tuple[str, ...]:
        return self.manifest.views


def load_run(path: str | Path, weights: str | Path | None = None) -> LoadedRun:
    """The run at ``path`` with its latest checkpoint's weights (or ``weights``: a state-dict file,
    e.g. from ``consolidate``). The model is built with ``pretrained`` and ``compile`` off: the
    weights come from the run, and the pretrained source need not exist where the run is used."""
    from retina_dist.models import build_model
    from retina_dist.models.backbone import read_weights
    from retina_dist.run.checkpoints import Checkpointer

    run = RunDir(path).require()
    cfg = run.read_config()
    manifest = run.read_manifest()
    task = build_task(manifest)
    model = build_model(
        dataclasses.replace(cfg.model, pretrained="", compile=False),
        task.num_classes,
        cfg.data.in_chans,
        cfg.data.image_size,
        heads=task.groups,
    )
    if weights is None:
        latest = Checkpointer(run.checkpoints).latest() if run.checkpoints.is_dir() else None
        if latest is None:
            raise ConfigError(f"{run.root}: no checkpoint in {run.checkpoints}")
        state, what = read_weights(run.root), f"latest ({latest.name})"
    else:
        state, what = read_weights(weights), str(weights)
    model.load_state_dict(state)
    return LoadedRun(run, cfg, manifest, task, model.eval(), what)
