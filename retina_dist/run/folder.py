"""A run folder and every file in it. Nothing else in the package spells these names.

The training owns the root: config.yaml, manifest.json, calibration.json, metrics.json,
predictions/, figures/, checkpoints/, tb/. A later command never writes those: ``eval`` writes
under ``evals/<name>/``, ``cam`` under ``cam/<split>/``, and TensorBoard is only appended to.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from retina_dist import atomic

if TYPE_CHECKING:
    from retina_dist.config import Config
    from retina_dist.data.manifest import Manifest
    from retina_dist.run.checkpoints import Checkpointer

CONFIG = "config.yaml"
MANIFEST = "manifest.json"
METRICS = "metrics.json"
CALIBRATION = "calibration.json"
PRETRAINED_REPORT = "pretrained_report.json"
LOG = "train.log"
# Written by rank 0 once a preemption checkpoint is committed. srun's exit code can be a killed
# rank's rather than 75 (--kill-on-bad-exit), so the batch script trusts this file instead.
PREEMPTED = "PREEMPTED"


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.exists() else {}


@dataclass(frozen=True)
class Results:
    """Where one evaluation's outputs land: metrics.json keyed by split, predictions/, figures/,
    and the TensorBoard tag prefix. The training's are at the run's root; a later eval's apart."""

    root: Path
    name: str = ""  # "" for the training's own results

    @property
    def metrics_path(self) -> Path:
        return self.root / METRICS

    def predictions(self, split: str) -> Path:
        return self.root / "predictions" / f"{split}.csv"

    @property
    def figures(self) -> Path:
        return self.root / "figures"

    def tag(self, split: str) -> str:
        return f"eval-{self.name}" if self.name else split

    def read_metrics(self) -> dict[str, Any]:
        return _read_json(self.metrics_path)

    def update_metrics(self, split: str, values: dict[str, Any]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        merged = self.read_metrics()
        merged[split] = values
        atomic.write_json(self.metrics_path, merged)


class RunDir:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"RunDir({str(self.root)!r})"

    # -- paths ----------------------------------------------------------------------------------
    @property
    def config_path(self) -> Path:
        return self.root / CONFIG

    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST

    @property
    def calibration_path(self) -> Path:
        return self.root / CALIBRATION

    @property
    def pretrained_report_path(self) -> Path:
        return self.root / PRETRAINED_REPORT

    @property
    def log_path(self) -> Path:
        return self.root / LOG

    @property
    def tb(self) -> Path:
        return self.root / "tb"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def preempted_marker(self) -> Path:
        return self.root / PREEMPTED

    @property
    def export_dir(self) -> Path:
        return self.root / "export"

    def cam(self, split: str) -> Path:
        return self.root / "cam" / split

    @property
    def training(self) -> Results:
        return Results(self.root)

    def evaluation(self, name: str) -> Results:
        """A later evaluation's own place (``evals/<name>/``), never the training's."""
        return Results(self.root / "evals" / name, name)

    # -- typed reads and writes -----------------------------------------------------------------
    def create(self) -> RunDir:
        self.root.mkdir(parents=True, exist_ok=True)
        return self

    def require(self) -> RunDir:
        """This folder, if it holds a run (else a ConfigError that says what to pass)."""
        if not self.config_path.exists():
            from retina_dist.config import ConfigError

            raise ConfigError(f"{self.root}: not a run folder (no {CONFIG}); pass a run folder, runs/<name>")
        return self

    def read_config(self) -> Config:
        from retina_dist.config import load_config

        return load_config(str(self.require().config_path))

    def write_config(self, cfg: Config) -> Path:
        from retina_dist.config import save_config

        self.create()
        save_config(cfg, self.config_path)
        return self.config_path

    def read_manifest(self) -> Manifest:
        """The manifest the run was trained on: its copy in the run, else the shards' own."""
        from retina_dist.data.manifest import load_manifest, read_manifest

        if self.manifest_path.exists():
            return read_manifest(self.manifest_path)
        return load_manifest(self.read_config().data.shards)

    def write_manifest(self, manifest: Manifest) -> None:
        atomic.write_json(self.create().manifest_path, manifest.to_dict())

    def read_metrics(self) -> dict[str, Any]:
        return self.training.read_metrics()

    def write_pretrained_report(self, reports: list[dict[str, Any]]) -> None:
        """What each pretrained load did (loaded, dropped, fresh, resampled), one entry per file."""
        atomic.write_json(self.create().pretrained_report_path, {"loads": reports})

    def read_pretrained_report(self) -> dict[str, Any]:
        return _read_json(self.pretrained_report_path)

    def read_calibration(self) -> dict[str, Any]:
        return _read_json(self.calibration_path)

    def write_calibration(self, fitted: dict[str, Any]) -> None:
        atomic.write_json(self.create().calibration_path, fitted)

    def checkpointer(self, keep_last: int = 2) -> Checkpointer:
        from retina_dist.run.checkpoints import Checkpointer

        return Checkpointer(self.checkpoints, keep_last)

    def mark_preempted(self, step: int) -> None:
        atomic.write_text(self.preempted_marker, f"step {step}\n")

    def clear_preempted(self) -> None:
        self.preempted_marker.unlink(missing_ok=True)
