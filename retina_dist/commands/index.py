"""``retina-dist index``: manifest.json (and timm's _info.json) for WebDataset shards another tool
wrote, so `train`, `eval` and the rest read them as they read packed shards."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

log = logging.getLogger("retina_dist")
HELP = "describe WebDataset shards another tool wrote (folder or URL pattern) in a manifest.json"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "source",
        help="a folder of .tar shards, or a brace pattern of paths or URLs "
        "(https://host/data/train-{000000..000009}.tar)",
    )
    p.add_argument("--out", help="folder for manifest.json (default: the shards' folder; required for URLs)")
    p.add_argument("--label-key", default="cls", help="cls (a text class index) or json:FIELD (default cls)")
    p.add_argument(
        "--classes", default="", help="class names in index order, comma separated (default: inferred)"
    )
    p.add_argument("--task", default="multiclass", choices=("multiclass", "multilabel"))
    p.add_argument("--patient-key", default="", help="json:FIELD holding the patient (default: none)")
    p.add_argument("--split", default="", help="put every shard in this split (default: from file names)")
    p.add_argument("--name", default="", help="the dataset's name (default: the folder's)")
    p.add_argument("--force", action="store_true", help="replace an existing manifest.json")


def run(args: argparse.Namespace) -> int:
    from retina_dist import atomic
    from retina_dist.config import ConfigError
    from retina_dist.data import remote
    from retina_dist.data.index import IndexOptions, index_shards
    from retina_dist.data.manifest import INFO, MANIFEST, timm_info

    if args.out:
        out = Path(args.out)
    elif remote.is_remote(args.source):
        raise ConfigError("index: --out is required for remote shards (the manifest is written locally)")
    else:
        src = Path(args.source)
        out = src if src.is_dir() else src.parent
    if (out / MANIFEST).exists() and not args.force:
        raise ConfigError(f"{out / MANIFEST} exists; pass --force to replace it")
    opts = IndexOptions(
        label_key=args.label_key,
        classes=tuple(c.strip() for c in args.classes.split(",") if c.strip()),
        task=args.task,
        patient_key=args.patient_key,
        split=args.split,
        name=args.name,
    )
    manifest = index_shards(args.source, out, opts)
    out.mkdir(parents=True, exist_ok=True)
    atomic.write_json(out / MANIFEST, manifest.to_dict())
    if not remote.is_remote(args.source):
        atomic.write_json(out / INFO, timm_info(manifest))
    summary = {
        s: {"count": i.count, "shards": len(i.shards), "skipped": len(i.skipped)}
        for s, i in manifest.splits.items()
    }
    log.info("wrote %s: %s", out / MANIFEST, json.dumps(summary))
    print(
        json.dumps({"manifest": str(out / MANIFEST), "classes": manifest.task["classes"], "splits": summary})
    )
    return 0
