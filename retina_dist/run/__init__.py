"""The run folder: its owner (``RunDir``), its checkpoints, and ``load_run`` for every command that
uses a trained run (eval, cam, predict, export, serve)."""

from retina_dist.run.folder import Results, RunDir
from retina_dist.run.load import LoadedRun, load_run

__all__ = ["RunDir", "Results", "LoadedRun", "load_run"]
