"""``retina-dist``: pack, train, evaluate and verify — or ``run`` for all of it; then predict, export
and serve a trained run. Each subcommand lives in ``retina_dist/commands/<name>.py``."""

from __future__ import annotations

import argparse
import logging

from retina_dist import commands

log = logging.getLogger("retina_dist")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="retina-dist", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in commands.NAMES:
        module = commands.load(name)
        module.add_arguments(sub.add_parser(name, help=module.HELP, description=module.HELP))
    return parser


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = build_parser()
    # KEY=VALUE overrides may sit on either side of options (``train --nproc 2 a=1 --smoke b=2``).
    args, extra = parser.parse_known_args(argv)
    stray = [e for e in extra if e.startswith("-") or "=" not in e or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    return args


def main(argv: list[str] | None = None) -> int:
    from retina_dist.commands.common import RanksFailed
    from retina_dist.config import ConfigError
    from retina_dist.data import codec
    from retina_dist.data.manifest import DataError
    from retina_dist.run.checkpoints import CorruptCheckpoint, ResumeError

    args = parse(argv)
    codec.single_threaded()  # before any fork (loader workers, pack pools): see data/stream/loader.py
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return commands.load(args.command).run(args)
    # The user's to fix: a message, no traceback.
    except (ConfigError, DataError, FileNotFoundError, ResumeError, CorruptCheckpoint) as err:
        log.error("%s", err)
        return 2
    except RanksFailed as err:  # each rank logged its own error above this
        log.error("%s", err)
        return 1
