import dataclasses

import cv2
import numpy as np
import pytest
import torch

from retina_dist.data.manifest import load_manifest, split_shards
from retina_dist.data.stream import StreamSpec, batches_per_rank, make_loader
from retina_dist.data.stream.augment import N_DRAWS, FusedTrainAugment

QUIET = np.array([0.9, 0.9, 0.5, 0.5, 0.9, 0.5, 0.5, 0.9, 0.5, 0.5])  # no flip, affine or jitter fires
LOUD = np.array([0.2, 0.1, 0.8, 0.3, 0.1, 0.9, 0.2, 0.1, 0.9, 0.8])  # every branch fires


@pytest.fixture(scope="module")
def fundus() -> np.ndarray:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:150, 0:200]
    base = np.stack([xx * 1.2, yy * 1.5, (xx + yy) * 0.6], axis=2)
    return np.clip(base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8)


def test_quiet_draws_are_the_plain_resize(fundus):
    out, _ = FusedTrainAugment(64, colour=True)(fundus, QUIET)
    ref = cv2.resize(fundus, (64, 64), interpolation=cv2.INTER_LINEAR)
    assert out.shape == (64, 64, 3)
    assert np.abs(out.astype(int) - ref).max() <= 1


def test_bgr_input_comes_out_as_the_rgb_result(fundus):
    aug = FusedTrainAugment(64, colour=True)
    bgr = np.ascontiguousarray(fundus[..., ::-1])
    for u in (QUIET, LOUD):
        rgb_out, _ = aug(fundus, u)
        bgr_out, _ = aug(bgr, u, bgr=True)
        assert np.abs(rgb_out.astype(int) - bgr_out).max() <= 1
    assert np.abs(aug(fundus, LOUD)[0].astype(int) - aug(fundus, QUIET)[0]).mean() > 5  # jitter acts


def test_padded_input_gives_the_three_channel_result(fundus):
    """Four channels (the decoder's padded layout, filler last) take OpenCV's faster warp; the
    output is the same RGB image, written into the caller's slot."""
    aug = FusedTrainAugment(64, colour=True)
    filler = np.full(fundus.shape[:2] + (1,), 255, np.uint8)
    for order, bgr in ((fundus, False), (np.ascontiguousarray(fundus[..., ::-1]), True)):
        padded = np.concatenate([order, filler], axis=2)
        for u in (QUIET, LOUD):
            slot = np.zeros((64, 64, 3), np.uint8)
            out, _ = aug(padded, u, dst=slot, bgr=bgr)
            ref, _ = aug(fundus, u)
            assert np.shares_memory(out, slot) and out.shape == (64, 64, 3)
            assert np.abs(out.astype(int) - ref).max() <= 1
            if u is QUIET:
                assert np.array_equal(out, ref)


def test_flip_mirrors_and_brightness_shifts(fundus):
    aug = FusedTrainAugment(64, colour=False)
    flipped = QUIET.copy()
    flipped[0] = 0.1
    assert np.abs(aug(fundus, flipped)[0][:, ::-1].astype(int) - aug(fundus, QUIET)[0]).max() <= 1
    grey = np.full((80, 80), 100, np.uint8)
    brighter = QUIET.copy()
    brighter[4:7] = (0.1, 0.5, 1.0)  # tone fires, contrast 1.0, brightness +0.15 of full scale
    assert aug(grey, brighter)[0].mean() == pytest.approx(100 + 0.15 * 255, abs=1)


def test_writes_into_the_callers_slot_and_refuses_a_wrong_one(fundus):
    aug = FusedTrainAugment(64, colour=True)
    buf = np.zeros((2, 64, 64, 3), np.uint8)
    out, _ = aug(fundus, LOUD, dst=buf[1])
    assert np.shares_memory(out, buf) and np.array_equal(buf[1], out) and not buf[0].any()
    with pytest.raises(ValueError, match="does not fit"):
        aug(fundus, LOUD, dst=np.zeros((32, 32, 3), np.uint8))


def test_draws_are_fixed_per_image_whatever_fires():
    draws = FusedTrainAugment.draw(np.random.default_rng(3), 5, views=2)
    assert draws.shape == (5, 2, N_DRAWS) and 0 <= draws.min() and draws.max() < 1


def test_worker_batches_in_shared_memory_equal_in_process_batches(shards):
    """One worker deals samples exactly as the main process does, so the shared-memory buffer path
    must give the same keys and the same pixels, in a channels-last view of B x C x H x W."""
    spec = StreamSpec(
        tuple(split_shards(shards, load_manifest(shards), "train")), batch_size=8, image_size=32, train=True
    )
    n = batches_per_rank(spec, 1)
    inproc = list(make_loader(spec, 0, 1, workers=0, epoch=1, num_batches=n))
    worker = list(make_loader(spec, 0, 1, workers=1, epoch=1, num_batches=n))
    assert len(worker) == len(inproc) == n > 1
    for a, b in zip(inproc, worker, strict=True):
        assert a["key"] == b["key"]
        assert b["image"].shape == (8, 3, 32, 32) and b["image"].dtype == torch.uint8
        assert b["image"].is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(a["image"], b["image"])
    assert len({b["image"].float().mean().item() for b in worker}) == n  # batches are not one buffer


def test_device_augmentation_equals_the_worker_path_to_one_grey_level(shards):
    """Same draws, same matrices: the canvas + grid_sample path on the device gives the worker's
    OpenCV pixels to within rounding, for single images and for two views per sample."""
    from retina_dist.data.stream import augment_device
    from retina_dist.data.stream.feeder import DeviceInputs

    base = StreamSpec(
        tuple(split_shards(shards, load_manifest(shards), "train")), batch_size=8, image_size=40, train=True
    )
    on_device = dataclasses.replace(base, augment_on_device=True)
    n = batches_per_rank(base, 1)
    worker = list(make_loader(base, 0, 1, workers=0, epoch=2, num_batches=n))
    device = list(make_loader(on_device, 0, 1, workers=1, epoch=2, num_batches=n))
    diffs = []
    for w, d in zip(worker, device, strict=True):
        assert w["key"] == d["key"] and "augment" not in w
        assert d["image"].shape[:2] == (8, 3) and d["image"].shape[2] == 48  # the 48 px frames, unwarped
        out = augment_device.apply(d["image"], d["augment"])
        assert out.shape == (8, 3, 40, 40)
        diffs.append((out - w["image"].float()).abs().max().item())
    assert max(diffs) <= 1.0

    two = {  # two views per sample: the second view is the first mirrored
        "geometry": torch.stack([d["augment"]["geometry"][:, 0], d["augment"]["geometry"][:, 0]], 1),
        "colour": torch.cat([d["augment"]["colour"]] * 2, 1),
        "size": 40,
    }
    two["geometry"][:, 1, 0, :2] *= -1
    two["geometry"][:, 1, 0, 2] = 39 - two["geometry"][:, 0, 0, 2]
    pair = augment_device.apply(torch.stack([d["image"], d["image"]], 1), two)
    assert pair.shape == (8, 2, 3, 40, 40)
    assert torch.equal(pair[:, 0], augment_device.apply(d["image"], d["augment"]))
    assert (pair[:, 1] - pair[:, 0].flip(-1)).abs().max() <= 1.0

    inputs = DeviceInputs([0.5] * 3, [0.25] * 3, 3, torch.device("cpu"))
    x, y = inputs(d)
    assert torch.allclose(x, (augment_device.apply(d["image"], d["augment"]) / 255 - 0.5) / 0.25, atol=1e-5)
    assert torch.equal(y, d["target"])
