import hashlib
import json
import tarfile
from dataclasses import dataclass, field

import pytest
import webdataset as wds

from retina_dist.data.manifest import DataError, load_manifest, verify
from retina_dist.data.pack import PackOptions, pack
from retina_dist.data.sources import build_source
from retina_dist.data.sources.record import Item, Record, TaskSpec


def test_shards_are_real_tars_matching_the_manifest(shards):
    m = load_manifest(shards)
    assert m.dataset == "synthetic" and m.task["type"] == "multiclass"
    assert sum(s.count for s in m.splits.values()) == 300
    for _split, info in m.splits.items():
        assert sum(info.histogram.values()) == info.count
        for sh in info.shards:
            path = shards / sh.name
            assert hashlib.sha256(path.read_bytes()).hexdigest() == sh.sha256
            with tarfile.open(path) as tar:
                names = tar.getnames()
            keys = {n.split(".", 1)[0] for n in names}
            assert len(keys) == sh.count
            assert all(n.endswith((".jpg", ".mask.png", ".json", ".cls")) for n in names)
            assert not any(n.endswith(".img.jpg") for n in names)
        # webdataset reads the same samples back
        ds = wds.WebDataset(
            [str(shards / s.name) for s in info.shards],
            shardshuffle=False,
            nodesplitter=wds.split_by_node,
        )
        samples = list(ds)
        assert len(samples) == info.count
        assert {"jpg", "mask.png", "json", "cls"} <= set(samples[0])
        assert int(samples[0]["cls"]) == json.loads(samples[0]["json"])["label"]
    assert verify(shards) == {s: {"count": v.count, "shards": len(v.shards)} for s, v in m.splits.items()}


def test_split_is_by_patient(shards):
    m = load_manifest(shards)
    patients = {}
    for split, info in m.splits.items():
        seen = set()
        for sh in info.shards:
            for s in wds.WebDataset(
                str(shards / sh.name), shardshuffle=False, nodesplitter=wds.split_by_node
            ):
                seen.add(json.loads(s["json"])["patient"])
        patients[split] = seen
        assert len(seen) == info.patients
    assert not patients["train"] & patients["val"]
    assert m.splits["val"].count > 0.08 * 300


def test_rerun_reuses_verified_shards_and_rebuilds_tampered_ones(tmp_path):
    src = build_source("synthetic", n=80, image_size=32)
    opts = PackOptions(shard_size=20)
    m1 = pack(src, tmp_path, opts, workers=1, progress=False)
    first = tmp_path / m1.splits["train"].shards[0].name
    second = tmp_path / m1.splits["train"].shards[1].name
    mtime = second.stat().st_mtime_ns
    first.write_bytes(b"garbage")  # damaged since the last run
    with pytest.raises(DataError, match=f"{first.name}: sha256"):
        verify(tmp_path)
    m2 = pack(src, tmp_path, opts, workers=1, progress=False)
    assert m2 == m1  # deterministic tars: the rebuilt shard has the same hash
    assert second.stat().st_mtime_ns == mtime  # untouched shard was reused, not rewritten
    verify(tmp_path)


@dataclass
class _FlakySource:
    """A source whose second image is not an image: the packer must skip and record it."""

    name: str = "flaky"
    task: TaskSpec = field(default_factory=lambda: TaskSpec("multiclass", ("a", "b")))

    def items(self):
        return [Item(f"flaky/{i}", f"p{i}", i % 2, "train", i) for i in range(6)]

    def load(self, item, split):
        from retina_dist.data.codec import encode
        from retina_dist.data.synthetic import generate

        data = (
            b"\xff\xd8 not a jpeg"
            if item.ref == 1
            else encode(generate("oct", 0, item.ref, 32, 0).image, ".jpg")
        )
        return Record(item.key, item.patient, split, {"img.jpg": data}, item.label)


def test_corrupt_image_is_skipped_and_counted(tmp_path):
    opts = PackOptions(shard_size=3, min_shards=1, max_corrupt_frac=0.2)
    m = pack(_FlakySource(), tmp_path, opts, workers=1, progress=False)
    train = m.splits["train"]
    assert train.count == 5
    assert len(train.skipped) == 1
    assert train.skipped[0]["key"] == "flaky/1"
    assert "cannot be decoded" in train.skipped[0]["reason"]


def test_max_side_shrinks_at_pack_time(tmp_path):
    from retina_dist.data.codec import decode

    m = pack(
        build_source("synthetic", n=8, image_size=96),
        tmp_path,
        PackOptions(max_side=40, min_shards=1),
        workers=1,
        progress=False,
    )
    name = m.splits["train"].shards[0].name
    sample = next(
        iter(wds.WebDataset(str(tmp_path / name), shardshuffle=False, nodesplitter=wds.split_by_node))
    )
    assert decode(sample["jpg"]).shape == (40, 40, 3)
    assert decode(sample["mask.png"]).shape == (40, 40)


def test_more_corrupt_images_than_allowed_fail_the_pack(tmp_path):
    from retina_dist.data.manifest import DataError

    opts = PackOptions(shard_size=3, min_shards=1, max_corrupt_frac=0.1)  # 1 of 6 is 17%
    with pytest.raises(DataError, match=r"1 of 6 images unreadable, more than max_corrupt_frac=0.1"):
        pack(_FlakySource(), tmp_path, opts, workers=1, progress=False)
    assert (tmp_path / "manifest.json").exists()  # the record of what was skipped is kept
