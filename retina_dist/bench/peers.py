"""The loaders a user would pick instead of the shard stream, on the same pre-resized JPEG bytes, the
same output size, batch, worker count and augmentation class (resize, flip, small affine or crop,
photometric jitter), each ending in the uint8 batch the stream ships (normalisation happens on the
device for all of them; timm's prefetcher does it there too):

- timm's ``create_loader`` over ``create_dataset`` on a class-per-folder tree of the JPEGs (its
  training transform: random-resized crop, flip, colour jitter), prefetcher on;
- a webdataset pipeline over the very shards the stream reads, decoded to RGB arrays, through the
  stream's own albumentations transform (``data/stream/augment.build_transform``);
- torchvision's ``ImageFolder`` with v2 transforms (resize, flip, affine, colour jitter) on the tree.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from retina_dist.data.sample_format import image_member
from retina_dist.data.stream.augment import build_transform
from retina_dist.data.stream.shard_reader import read_samples

PEERS = ("timm", "webdataset", "torchvision")


def export_tree(shards: list[str], root: Path) -> Path:
    """The shards' image bytes, unchanged, as ``root/<class>/<key>.<ext>`` (what folder loaders read)."""
    if root.exists() and any(p.is_file() for p in root.rglob("*")):
        return root
    for sample in read_samples(shards):
        cls = sample.get("cls", b"0")
        label = cls.decode().strip() if isinstance(cls, bytes) else str(cls)
        folder = root / f"class_{label}"
        folder.mkdir(parents=True, exist_ok=True)
        member = image_member(sample, "img", True)
        ext = member.rsplit(".", 1)[-1]
        (folder / f"{sample['__key__'].replace('/', '_')}.{ext}").write_bytes(sample[member])
    return root


def loader(name: str, shards: list[str], tree: Path, size: int, batch: int, workers: int) -> Iterator[Any]:
    """Endless batches of ``name``'s loader (its first element is the image batch)."""
    make: dict[str, Callable[[], Iterator[Any]]] = {
        "timm": lambda: _timm(tree, size, batch, workers),
        "webdataset": lambda: _webdataset(shards, size, batch, workers),
        "torchvision": lambda: _torchvision(tree, size, batch, workers),
    }
    return make[name]()


def batch_len(batch: Any) -> int:
    return len(batch[0])


def _timm(tree: Path, size: int, batch: int, workers: int) -> Iterator[Any]:
    from timm.data import create_dataset, create_loader

    ds = create_dataset("", root=str(tree), split="train", is_training=True)
    dl = create_loader(
        ds,
        input_size=(3, size, size),
        batch_size=batch,
        is_training=True,
        num_workers=workers,
        device=torch.device("cpu"),
        use_prefetcher=True,
        persistent_workers=workers > 0,
    )
    while True:
        yield from dl


def _webdataset(shards: list[str], size: int, batch: int, workers: int) -> Iterator[Any]:
    import webdataset as wds

    transform = build_transform(size, True, True, True)

    def augment(rgb: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(transform(image=rgb)["image"].transpose(2, 0, 1)))

    pipeline = (
        wds.WebDataset(shards, shardshuffle=len(shards), nodesplitter=wds.split_by_node, empty_check=False)
        .repeat()
        .shuffle(256)
        .decode("rgb8")
        .to_tuple("jpg;png;img.jpg;img.png", "__key__")
        .map_tuple(augment, lambda k: k)
        .batched(batch, partial=False)
    )
    return iter(wds.WebLoader(pipeline, batch_size=None, num_workers=workers))


def _torchvision(tree: Path, size: int, batch: int, workers: int) -> Iterator[Any]:
    from torchvision.datasets import ImageFolder
    from torchvision.transforms import v2

    transform = v2.Compose(
        [
            v2.PILToTensor(),
            v2.Resize((size, size), antialias=True),
            v2.RandomHorizontalFlip(),
            v2.RandomApply([v2.RandomAffine(degrees=15, scale=(0.9, 1.1))], p=0.7),
            v2.ColorJitter(brightness=0.15, contrast=0.15, saturation=0.15, hue=0.03),
        ]
    )
    ds = ImageFolder(str(tree), transform=transform)
    dl = torch.utils.data.DataLoader(
        ds, batch_size=batch, shuffle=True, num_workers=workers, persistent_workers=workers > 0,
        drop_last=True,
    )
    while True:
        yield from dl
