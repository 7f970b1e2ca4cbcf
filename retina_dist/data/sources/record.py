"""The one currency between dataset sources and the packer."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True)
class TaskSpec:
    """What the labels mean: ``multiclass`` (an int), ``multilabel`` (a 0/1 list), ``binary``, or
    ``multihead`` (a 0/1 list, one-hot within each head; ``heads`` names each head's classes, and
    ``classes`` are ``head:class`` in column order)."""

    type: str
    classes: tuple[str, ...]
    heads: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.type, "classes": list(self.classes)}
        if self.heads:
            out["heads"] = {h: list(c) for h, c in self.heads.items()}
        return out


@dataclass(frozen=True)
class Item:
    """A sample before its bytes are read: cheap to list, cheap to send to a packing worker."""

    key: str
    patient: str
    label: Any
    split: str | None = None  # an official split, kept as given; None lets the packer split by patient
    ref: Any = None  # whatever the source needs to load it (paths, an index)


@dataclass
class Record:
    key: str
    patient: str
    split: str
    images: dict[str, bytes]  # e.g. {"img.png": b"...", "mask.png": b"..."}; the extension names the codec
    label: Any
    meta: dict[str, Any] = field(default_factory=dict)


class Source(Protocol):
    """A dataset's on-disk layout. It knows nothing about shards."""

    name: str
    task: TaskSpec

    def items(self) -> list[Item]: ...

    def load(self, item: Item, split: str) -> Record: ...
