"""One module per subcommand, each with ``HELP``, ``add_arguments(parser)`` and ``run(args) -> int``.
The registry's order is the order ``retina-dist --help`` lists them in."""

from __future__ import annotations

from importlib import import_module
from types import ModuleType

NAMES = (
    "run",
    "train",
    "prepare",
    "eval",
    "ensemble",
    "cam",
    "bench",
    "consolidate",
    "pack",
    "synth",
    "verify",
    "index",
    "predict",
    "export",
    "serve",
)


def load(name: str) -> ModuleType:
    return import_module(f"retina_dist.commands.{name}")
