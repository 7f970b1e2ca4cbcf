"""RandAugment and random erasing of the fine-tuning recipe: timm's own transforms, seeded by the
batch's place in the epoch (the same pixels with 0 or 1 workers and after a resume), leaving the
warp's draws as they were, erasing in timm's proportions, and config errors that name the key."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from retina_dist.config import ConfigError, load_config
from retina_dist.data.manifest import load_manifest, split_shards
from retina_dist.data.stream import StreamSpec, make_loader
from retina_dist.data.stream.buffers import release
from retina_dist.data.stream.feeder import DeviceInputs
from retina_dist.data.stream.recipe_augment import RandAugmentStep


def _batches(spec: StreamSpec, workers: int = 0, skip: int = 0, n: int = 3) -> list[tuple[torch.Tensor, int]]:
    out = []
    for b in make_loader(spec, 0, 1, workers, epoch=1, num_batches=n, skip_batches=skip):
        out.append((b["image"].clone(), b["seed"]))
        release(b)
    return out


@pytest.fixture(scope="module")
def spec(shards) -> StreamSpec:
    return StreamSpec(tuple(split_shards(shards, load_manifest(shards), "train")), 8, 40, train=True)


def test_randaugment_is_deterministic_resumable_and_changes_only_what_follows_the_warp(spec):
    ra = dataclasses.replace(spec, randaugment="rand-m9-mstd0.5-inc1")
    plain, augmented = _batches(spec), _batches(ra)
    one_worker = _batches(ra, workers=1)
    assert all(torch.equal(a[0], b[0]) and a[1] == b[1] for a, b in zip(one_worker, augmented, strict=True))
    resumed = _batches(ra, skip=2, n=3)
    assert torch.equal(resumed[0][0], augmented[2][0])
    # The erasing seeds and the warp's draws are drawn as without RandAugment: only the RA ops differ.
    assert [s for _, s in plain] == [s for _, s in augmented]
    changed = [(a[0] != b[0]).float().mean().item() for a, b in zip(plain, augmented, strict=True)]
    assert all(c > 0.2 for c in changed), changed
    untouched = sum(
        torch.equal(p[0][i], a[0][i]) for p, a in zip(plain, augmented, strict=True) for i in range(len(p[0]))
    )
    assert 1 <= untouched <= 12  # of 24: each of 2 ops fires with p=0.5, so ~1/4 are left as warped


def test_random_erasing_follows_timm_proportions_and_the_batch_seed():
    inputs = DeviceInputs([0.5] * 3, [0.25] * 3, 3, torch.device("cpu"), erase=0.25)
    image = torch.full((64, 3, 32, 32), 128, dtype=torch.uint8)
    clean = inputs.images(image)
    erased_frac, areas = [], []
    for seed in range(8):
        x, _ = inputs({"image": image, "target": torch.zeros(64), "seed": seed})
        again, _ = inputs({"image": image, "target": torch.zeros(64), "seed": seed})
        assert torch.equal(x, again)
        hit = (x != clean).any(1)  # B x H x W: erased pixels
        frac = hit.flatten(1).float().mean(1)
        erased_frac.append((frac > 0).float().mean().item())
        areas += [f for f in frac.tolist() if f > 0]
        noise = x[(x != clean)]
        assert abs(noise.mean().item()) < 0.2 and 0.8 < noise.std().item() < 1.2  # N(0, 1) per pixel
    assert 0.15 < sum(erased_frac) / len(erased_frac) < 0.35
    assert areas and all(0.015 < a < 0.34 for a in areas)
    eval_batch, _ = inputs({"image": image, "target": torch.zeros(64)})  # no seed: evaluation
    assert torch.equal(eval_batch, clean)


def test_recipe_augment_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="data.randaugment.*rand-q9"):
        load_config("synthetic", ["data.randaugment=rand-q9"])
    with pytest.raises(ConfigError, match="data.randaugment.*augment_on=worker"):
        load_config("synthetic", ["data.randaugment=rand-m9-mstd0.5-inc1", "data.augment_on=device"])
    with pytest.raises(ConfigError, match="data.reprob"):
        load_config("synthetic", ["data.reprob=1.5"])
    cfg = load_config("synthetic", ["data.randaugment=rand-m9-mstd0.5-inc1", "data.reprob=0.25"])
    assert cfg.data.randaugment == "rand-m9-mstd0.5-inc1" and cfg.data.reprob == 0.25


def test_randaugment_survives_its_strongest_draws_on_colour_and_grey():
    # m10 puts half the draws at the top level, where timm's posterize would keep 0 bits.
    for chans, shape in ((3, (24, 24, 3)), (1, (24, 24))):
        step = RandAugmentStep("rand-m10-mstd0.5-inc1", 24, chans, [0.485, 0.456, 0.406])
        base = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
        outs = []
        for seed in range(150):
            slot = base.copy()
            step(slot, seed)
            outs.append(slot)
        again = base.copy()
        step(again, 7)
        assert np.array_equal(again, outs[7])
        assert sum(not np.array_equal(o, base) for o in outs) > 100
