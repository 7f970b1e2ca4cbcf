"""Dataset sources by name: each knows one dataset's real layout(s) and yields Records."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from retina_dist.data.sources.record import Source

REAL = ("aptos", "kermany", "octmnist", "odir", "rfmid", "fusion", "fusion_multiclass")
SYNTHETIC = ("synthetic", "synthetic_oct")


def build_source(name: str, **options: Any) -> Source:
    if name in SYNTHETIC:
        from retina_dist.data.sources.synthetic import SyntheticSource

        if name == "synthetic_oct":
            options.setdefault("modality", "oct")
        return SyntheticSource(**options)
    if name not in REAL:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(SYNTHETIC + REAL)}")
    src = options.pop("src", None)
    if src is None:
        raise ValueError(f"{name}: --src (the dataset folder or archive) is required")
    src = Path(src)
    if name == "aptos":
        from retina_dist.data.sources.aptos import AptosSource

        return AptosSource(src)
    if name == "kermany":
        from retina_dist.data.sources.kermany import KermanySource

        return KermanySource(src)
    if name == "octmnist":
        from retina_dist.data.sources.octmnist import OctMnistSource

        return OctMnistSource(src, size=options.get("size") or 0)
    if name == "odir":
        from retina_dist.data.sources.odir import OdirSource

        return OdirSource(src)
    if name == "rfmid":
        from retina_dist.data.sources.rfmid import RfmidSource

        return RfmidSource(src)
    from retina_dist.data.sources.fusion import FusionSource

    if options.get("oct_src") is None:
        raise ValueError(
            f"{name}: --oct-src (the Kermany folder or archive) is required beside --src (APTOS)"
        )
    return FusionSource(
        src, Path(options["oct_src"]), seed=options.get("seed", 0), joint=name == "fusion_multiclass"
    )
