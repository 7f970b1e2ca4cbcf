"""Records -> WebDataset tar shards + manifest.json. Knows shards, nothing about any dataset.

Every image is decoded once here (a corrupt one is skipped and recorded, never packed), shrunk to
``max_side`` so training never decodes full-resolution photographs, and written into deterministic
tar files (fixed mtimes and owners) so a shard's sha256 depends only on its content. Shards are built
in parallel; a re-run reuses every shard whose file still matches the sha256 recorded for it.
"""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing as mp
import os
import tarfile
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
from tqdm import tqdm

from retina_dist import atomic
from retina_dist.data import codec
from retina_dist.data.codec import CorruptImage, decode, encode, fit_max_side
from retina_dist.data.manifest import INFO, MANIFEST, DataError, Manifest, timm_info
from retina_dist.data.sources.record import Item, Source

STATE = ".pack-state.json"


@dataclass(frozen=True)
class PackOptions:
    val_frac: float = 0.15
    test_frac: float = 0.0
    shard_size: int = 256
    min_shards: int = 4  # so 2 ranks x 2 loader workers all get a shard of a small split
    max_side: int = 0  # 0 keeps the source's size
    keep_original: bool = False
    image_format: str = "jpg"  # what a resized image is re-encoded as: jpg (quality 95), png, or keep
    max_corrupt_frac: float = 0.05  # more unreadable images than this fails the pack
    seed: int = 0


@dataclass
class ShardResult:
    name: str
    count: int
    sha256: str
    histogram: dict[str, int]
    skipped: list[dict[str, str]] = field(default_factory=list)


def split_by_patient(items: list[Item], opts: PackOptions) -> dict[str, list[Item]]:
    """Official splits stay as given; the rest are split by patient, stratified by the patient's label."""
    splits: dict[str, list[Item]] = {}
    free: dict[str, list[Item]] = {}
    for it in items:
        if it.split is not None:
            splits.setdefault(it.split, []).append(it)
        else:
            free.setdefault(it.patient, []).append(it)
    strata: dict[str, list[str]] = {}
    for patient, its in free.items():
        strata.setdefault(json.dumps(its[0].label), []).append(patient)
    rng = np.random.default_rng(opts.seed)
    assign: dict[str, str] = {}
    for stratum in sorted(strata):
        patients = sorted(strata[stratum])
        rng.shuffle(patients)
        n_val, n_test = round(len(patients) * opts.val_frac), round(len(patients) * opts.test_frac)
        for i, p in enumerate(patients):
            assign[p] = "val" if i < n_val else "test" if i < n_val + n_test else "train"
    for patient in sorted(free):
        splits.setdefault(assign[patient], []).extend(free[patient])
    return splits


def plan_shards(split: str, items: list[Item], opts: PackOptions) -> list[tuple[str, list[Item]]]:
    order = np.random.default_rng([opts.seed, len(items)]).permutation(len(items))  # mix classes per shard
    n_shards = max(-(-len(items) // opts.shard_size), min(opts.min_shards, len(items)))
    chunks = np.array_split(order, n_shards)
    return [(f"{split}-{i:06d}.tar", [items[j] for j in chunk]) for i, chunk in enumerate(chunks)]


def _tar_add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uname, info.gname = len(data), 0, 0o444, "", ""
    tar.addfile(info, io.BytesIO(data))


def _prepare_images(images: dict[str, bytes], key: str, opts: PackOptions) -> dict[str, bytes]:
    out = {}
    for name, data in images.items():
        arr = decode(data, f"{key}.{name}")  # raises CorruptImage
        if opts.max_side and max(arr.shape[:2]) > opts.max_side:
            view, ext = os.path.splitext(name)
            if opts.image_format != "keep" and not name.startswith("mask"):
                ext = f".{opts.image_format}"
            out[view + ext] = encode(fit_max_side(arr, opts.max_side, nearest=name.startswith("mask")), ext)
            if opts.keep_original:
                out[f"orig.{name}"] = data
        else:
            out[name] = data
    return out


def member_ext(name: str, single: bool) -> str:
    """A single-image sample's image under the bare extension (``<key>.jpg``), as timm and
    webdataset pipelines look for it; multi-view samples keep their view names (``left.jpg``)."""
    if single and name.startswith("img."):
        return name[4:]
    if single and name.startswith("orig.img."):
        return "orig." + name[9:]
    return name


def write_shard(job: tuple[Source, str, str, list[Item], PackOptions, str]) -> ShardResult:
    source, out_dir, name, items, opts, split = job
    codec.single_threaded()  # shards are written in parallel processes
    path = Path(out_dir) / name
    hist: Counter[str] = Counter()
    skipped: list[dict[str, str]] = []
    count = 0
    single = tuple(getattr(source, "views", ("img",))) == ("img",)

    def fill(fh: IO[bytes]) -> None:
        nonlocal count
        with tarfile.open(fileobj=fh, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for item in items:
                try:
                    rec = source.load(item, split)
                    images = _prepare_images(rec.images, rec.key, opts)
                except (CorruptImage, OSError) as err:
                    skipped.append({"key": item.key, "reason": str(err)})
                    continue
                meta = {"key": rec.key, "patient": rec.patient, "label": rec.label, "meta": rec.meta}
                for ext, data in images.items():
                    _tar_add(tar, f"{rec.key}.{member_ext(ext, single)}", data)
                if isinstance(rec.label, int):  # the class index, as timm's reader and `.cls` users expect
                    _tar_add(tar, f"{rec.key}.cls", str(rec.label).encode())
                _tar_add(tar, f"{rec.key}.json", json.dumps(meta).encode())
                hist[json.dumps(rec.label)] += 1
                count += 1

    atomic.write_with(path, fill)
    return ShardResult(name, count, sha256_file(path), dict(hist), skipped)


def sha256_file(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def pack(
    source: Source,
    out_dir: str | Path,
    opts: PackOptions | None = None,
    workers: int | None = None,
    progress: bool = True,
) -> Manifest:
    """Pack ``source`` into ``out_dir``; returns the manifest (also written as manifest.json)."""
    opts = opts or PackOptions()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    items = source.items()
    if not items:
        raise DataError(f"{source.name}: the source lists no samples")
    dupes = sorted(k for k, n in Counter(it.key for it in items).items() if n > 1)
    if dupes:
        raise DataError(f"{source.name}: {len(dupes)} duplicate sample keys, e.g. {', '.join(dupes[:5])}")
    splits = split_by_patient(items, opts)
    jobs = [
        (split, name, its)
        for split in sorted(splits)
        for name, its in plan_shards(split, splits[split], opts)
    ]

    options = {"source": _describe(source), **asdict(opts)}
    state_path = out / STATE
    state = json.loads(state_path.read_text()) if state_path.exists() else {}
    done: dict[str, dict] = state.get("shards", {}) if state.get("options") == options else {}
    done = {n: r for n, r in done.items() if (out / n).exists() and sha256_file(out / n) == r["sha256"]}
    todo = [(source, str(out), name, its, opts, split) for split, name, its in jobs if name not in done]

    n_proc = min(workers or os.cpu_count() or 1, max(1, len(todo)))
    bar = tqdm(
        total=sum(len(j[3]) for j in todo),
        unit="img",
        desc=f"pack {source.name}",
        disable=not progress,
        dynamic_ncols=True,
    )
    # Forked workers start in milliseconds where spawned ones take a second to start Python and
    # import the package: the difference between 1.5x and 1.9x on two cores at 1k images. OpenCV's
    # own pool is stopped first, in this process: a child forked from a process whose pool ran
    # could not resize it.
    codec.single_threaded()
    ctx = mp.get_context("fork")
    with ctx.Pool(n_proc) if n_proc > 1 else _InlinePool() as pool:
        for res in pool.imap_unordered(write_shard, todo):
            done[res.name] = asdict(res)
            atomic.write_json(state_path, {"options": options, "shards": done})
            bar.update(res.count + len(res.skipped))
    bar.close()

    manifest = _manifest(source, jobs, done, splits, options)
    atomic.write_json(out / MANIFEST, manifest)
    atomic.write_json(out / INFO, timm_info(Manifest.from_dict(manifest)))
    skipped = sum(len(s["skipped"]) for s in manifest["splits"].values())
    if skipped > opts.max_corrupt_frac * len(items):
        raise DataError(
            f"{out / MANIFEST}: {skipped} of {len(items)} images unreadable, more than "
            f"max_corrupt_frac={opts.max_corrupt_frac}; e.g. "
            + "; ".join(s["reason"] for sp in manifest["splits"].values() for s in sp["skipped"][:3])
        )
    return Manifest.from_dict(manifest)


def _describe(source: Source) -> dict[str, Any]:
    # Constructor arguments only: a re-run with the same ones may reuse verified shards.
    fields = getattr(source, "__dataclass_fields__", {})
    return {
        "name": source.name,
        **{
            k: _plain(getattr(source, k))
            for k, f in fields.items()
            if f.init and k not in ("name", "task", "version")
        },
    }


def _plain(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else str(v) if isinstance(v, Path) else v


def _manifest(source, jobs, done, splits, options) -> dict[str, Any]:
    out: dict[str, Any] = {
        "dataset": source.name,
        "task": source.task.to_dict(),
        "views": list(getattr(source, "views", ("img",))),
        "options": options,
        "source_report": source.report() if hasattr(source, "report") else {},
        "splits": {},
    }
    for split in sorted(splits):
        shards = [done[name] for s, name, _ in jobs if s == split]
        hist: Counter[str] = Counter()
        for sh in shards:
            hist.update(sh["histogram"])
        out["splits"][split] = {
            "count": sum(sh["count"] for sh in shards),
            "patients": len({it.patient for it in splits[split]}),
            "histogram": _named_histogram(hist, source.task.classes),
            "shards": [{"name": sh["name"], "count": sh["count"], "sha256": sh["sha256"]} for sh in shards],
            "skipped": [s for sh in shards for s in sh["skipped"]],
        }
    patients = {split: {it.patient for it in its} for split, its in splits.items()}
    names = sorted(patients)
    out["patient_overlap"] = {
        f"{a}&{b}": len(patients[a] & patients[b]) for i, a in enumerate(names) for b in names[i + 1 :]
    }
    return out


def _named_histogram(hist: Counter[str], classes: tuple[str, ...]) -> dict[str, int]:
    """Per class: samples of that class (multiclass) or samples positive for it (multilabel)."""
    named = dict.fromkeys(classes, 0)
    for label_json, n in hist.items():
        label = json.loads(label_json)
        if isinstance(label, list):
            for c, on in zip(classes, label, strict=True):
                named[c] += n * int(on)
        else:
            named[classes[label]] += n
    return named


class _InlinePool:
    def __enter__(self) -> _InlinePool:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def imap_unordered(self, fn, jobs):
        return map(fn, jobs)
