import dataclasses

import numpy as np
import pytest

from retina_dist.data.codec import decode, encode
from retina_dist.data.manifest import load_manifest, split_shards
from retina_dist.data.pack import PackOptions, pack
from retina_dist.data.sources import build_source
from retina_dist.data.stream import StreamSpec, augment_device, batches_per_rank, make_loader
from retina_dist.data.stream.buffers import BufferPool, release
from retina_dist.data.stream.canvas import Canvas
from retina_dist.data.stream.shard_reader import read_samples


def test_frames_decoded_in_place_put_and_moved_when_the_canvas_grows():
    pool, rng = BufferPool(), np.random.default_rng(0)
    canvas = Canvas(pool, (4, 1), 3, (0, 0))
    a = rng.integers(1, 255, (5, 6, 3), dtype=np.uint8)
    canvas.slot(0, 0, 5, 6)[...] = a  # the first frame sets the width: in place
    narrow = rng.integers(1, 255, (4, 3, 3), dtype=np.uint8)
    assert canvas.slot(1, 0, 4, 3) is None  # rows would not be contiguous
    canvas.put(1, 0, narrow)
    failed = canvas.slot(2, 0, 5, 6)
    failed[...] = 7  # a decode that then failed: its slot goes to the next sample
    canvas.forget(2)
    wide = rng.integers(1, 255, (7, 9, 3), dtype=np.uint8)
    assert canvas.slot(2, 0, 7, 9) is not None and canvas.size == (7, 9)  # grown, frames moved over
    canvas.slot(2, 0, 7, 9)[...] = wide
    out = canvas.finish(3).numpy()
    assert out.shape == (3, 1, 7, 9, 3)
    for i, frame in enumerate((a, narrow, wide)):
        h, w = frame.shape[:2]
        assert np.array_equal(out[i, 0, :h, :w], frame)
        assert not out[i, 0, h:].any() and not out[i, 0, :h, w:].any()
    assert pool.allocated == 2  # the first buffer was handed back when the canvas grew


@pytest.fixture(scope="module")
def mixed_shards(tmp_path_factory):
    """APTOS layout, photographs of four aspect ratios, packed at max side 64 (JPEG): frames of
    widths 64 and 48 and heights 64 down to 32 in every batch."""
    root = tmp_path_factory.mktemp("mixed")
    (root / "train_images").mkdir()
    rng = np.random.default_rng(3)
    rows = ["id_code,diagnosis"]
    for i in range(48):
        h, w = [(96, 128), (128, 96), (64, 128), (128, 128)][i % 4]
        yy, xx = np.mgrid[0:h, 0:w]
        image = np.stack([xx * 1.5 + i, yy * 1.8, (xx + yy) * 0.7], 2) + rng.normal(0, 6, (h, w, 3))
        (root / "train_images" / f"im{i:03d}.png").write_bytes(
            encode(np.clip(image, 0, 255).astype(np.uint8), ".png")
        )
        rows.append(f"im{i:03d},{i % 5}")
    (root / "train.csv").write_text("\n".join(rows) + "\n")
    out = root / "shards"
    pack(
        build_source("aptos", src=root),
        out,
        PackOptions(max_side=64, val_frac=0.0, min_shards=2),
        progress=False,
    )
    return out


def test_stream_canvas_holds_each_decoded_frame_and_warps_like_the_workers(mixed_shards):
    base = StreamSpec(
        tuple(split_shards(mixed_shards, load_manifest(mixed_shards), "train")), 8, 40, train=True
    )
    frames = {
        s["__key__"].split("/")[-1]: decode(s["jpg"], bgr=True)
        for s in read_samples([p for p, _ in base.shards])
    }
    assert {f.shape[:2] for f in frames.values()} == {(48, 64), (64, 48), (32, 64), (64, 64)}
    n = batches_per_rank(base, 1)
    worker = list(make_loader(base, 0, 1, workers=0, epoch=1, num_batches=n))
    device = make_loader(dataclasses.replace(base, augment_on_device=True), 0, 1, 1, epoch=1, num_batches=n)
    sizes = []
    for w, d in zip(worker, device, strict=True):  # buffers released, so reused: no stale pixels
        sizes.append(tuple(d["image"].shape[2:]))
        assert w["key"] == d["key"]
        canvas = d["image"].permute(0, 2, 3, 1).numpy()  # B x H x W x C
        for i, key in enumerate(d["key"]):
            f = frames[key.split("/")[-1]]
            h, wd = f.shape[:2]
            assert np.array_equal(canvas[i, :h, :wd], f)
            assert not canvas[i, h:].any() and not canvas[i, :h, wd:].any()
        out = augment_device.apply(d["image"], d["augment"])
        assert (out - w["image"].float()).abs().max().item() <= 1.0
        release(d)
    assert len(sizes) == n > 3 and sizes[-1] == (64, 64)
