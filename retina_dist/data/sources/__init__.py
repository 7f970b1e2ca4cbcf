"""Dataset sources by name: each knows one dataset's real layout and yields Records."""

from __future__ import annotations

from typing import Any

from retina_dist.data.record import Source


def build_source(name: str, **options: Any) -> Source:
    if name in ("synthetic", "synthetic_oct"):
        from retina_dist.data.sources.synthetic import SyntheticSource

        if name == "synthetic_oct":
            options.setdefault("modality", "oct")
        return SyntheticSource(**options)
    raise ValueError(f"unknown dataset {name!r}; known: synthetic, synthetic_oct")
