"""How a sample's members are read: its image per view, its label, its patient. One place for the
stream, ``index`` and ``bench``, so shards `pack` wrote (now and in earlier versions) and shards
other tools wrote (webdataset's ``ShardWriter``, img2dataset) are read by the same rules.

- images: a multi-view sample names each view (``left.jpg``, ``right.jpg``); a single-image one
  stores it under the bare extension (``<key>.jpg``, as timm and webdataset look for it) or, packed
  by an earlier retina-dist, as ``img.<ext>``;
- labels: ``json:FIELD`` (a field of the sidecar JSON, dotted for nesting) or an extension holding a
  text integer (``cls``). A value is a class index, a class name, a multi-hot list or a list of
  class names.
"""

from __future__ import annotations

import json
from typing import Any

from retina_dist.data.errors import DataError

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "tif", "tiff", "bmp")


def image_member(raw: dict[str, Any], view: str, single: bool) -> str:
    """The member holding ``view``'s image; KeyError when the sample has none."""
    if single:
        for ext in IMAGE_EXTS:
            if ext in raw:
                return ext
    prefix = f"{view}."
    for k in raw:
        if k.startswith(prefix):
            return k
    raise KeyError(f"no {view!r} image among {sorted(k for k in raw if not k.startswith('__'))}")


def field(raw: dict[str, Any], key: str, parsed: dict[str, Any] | None = None) -> Any:
    """The value ``key`` names in a raw sample; KeyError when it is absent."""
    if key.startswith("json:"):
        value: Any = parsed if parsed is not None else json.loads(raw["json"])
        for part in key[5:].split("."):
            value = value[part]
        return value
    data = raw[key]
    return data.decode("utf-8").strip() if isinstance(data, bytes) else data


def label(value: Any, classes: tuple[str, ...], multilabel: bool) -> int | list[float]:
    """A label value in any of the accepted forms -> a class index or a multi-hot vector."""
    index = {c: i for i, c in enumerate(classes)}

    def one(v: Any) -> int:
        if isinstance(v, str) and v in index:
            return index[v]
        i = int(v)
        if not 0 <= i < len(classes):
            raise ValueError(f"class index {i} outside 0..{len(classes) - 1}")
        return i

    if not multilabel:
        return one(value)
    if isinstance(value, str):
        value = [v for v in value.replace(";", ",").split(",") if v.strip()] if value else []
    if not isinstance(value, list):
        value = [value]
    if len(value) == len(classes) and all(v in (0, 1, 0.0, 1.0, True, False) for v in value):
        return [float(v) for v in value]  # already multi-hot
    hot = [0.0] * len(classes)
    for v in value:
        hot[one(v.strip() if isinstance(v, str) else v)] = 1.0
    return hot


def label_of(value: Any, classes: tuple[str, ...], multilabel: bool) -> Any:
    """``label`` when the task's classes are known, else the value as stored (pack's own labels)."""
    return label(value, classes, multilabel) if classes else value


def check_key(key: str) -> str:
    if not (key.startswith("json:") and len(key) > 5) and (not key or "." in key or ":" in key):
        raise DataError(f"label/patient key {key!r}: use json:FIELD or an extension such as cls")
    return key
