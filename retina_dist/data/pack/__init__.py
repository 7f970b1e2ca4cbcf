"""Packing: records from a source -> deterministic WebDataset tar shards + manifest.json."""

from retina_dist.data.pack.writer import PackOptions, pack, sha256_file

__all__ = ["PackOptions", "pack", "sha256_file"]
