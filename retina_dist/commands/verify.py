"""``retina-dist verify``: every shard re-read, counts and sha256 against the manifest."""

from __future__ import annotations

import argparse
import json

HELP = "re-read every shard and check counts and sha256 against the manifest"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("shards", help="the shards folder (holding manifest.json)")


def run(args: argparse.Namespace) -> int:
    from retina_dist.data.manifest import verify

    print(json.dumps(verify(args.shards)))
    return 0
