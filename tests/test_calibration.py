"""Temperature scaling, per-class thresholds, flip TTA and class-balanced repeat-factor sampling."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from sklearn.metrics import f1_score

from retina_dist import calibration
from retina_dist.data.manifest import load_manifest, split_shards
from retina_dist.data.pack import PackOptions, pack
from retina_dist.data.sources import build_source
from retina_dist.data.stream import StreamSpec, make_loader, repeat_factors
from retina_dist.data.stream.feeder import DeviceInputs
from retina_dist.data.synthetic.layouts import synth
from retina_dist.dist import DistEnv
from retina_dist.engine.evaluate import Evaluator
from retina_dist.tasks import build_task


def test_temperature_scaling_recovers_an_overconfident_factor():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(4000, 5)) * 1.5
    p_true = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    y = np.array([rng.choice(5, p=p) for p in p_true])
    over = np.exp(3 * z) / np.exp(3 * z).sum(1, keepdims=True)  # a model three times too confident
    t = calibration.fit_temperature(over, y, multilabel=False)
    assert t == pytest.approx(3.0, rel=0.1)
    fixed = calibration.apply_temperature(over, t, False)
    assert calibration.nll(fixed, y, False) < calibration.nll(over, y, False)


def test_multilabel_temperature_and_thresholds():
    rng = np.random.default_rng(1)
    z = rng.normal(size=(3000, 3)) * 2
    y = (rng.random((3000, 3)) < 1 / (1 + np.exp(-z))).astype(int)
    over = 1 / (1 + np.exp(-2 * z))
    assert calibration.fit_temperature(over, y, multilabel=True) == pytest.approx(2.0, rel=0.1)
    thr = calibration.tune_thresholds(y, over)
    for c, t in enumerate(thr):
        grid = np.round(np.arange(0.05, 0.951, 0.01), 2)
        best = max(f1_score(y[:, c], over[:, c] >= g) for g in grid)
        assert f1_score(y[:, c], over[:, c] >= t) == pytest.approx(best)
        assert best >= f1_score(y[:, c], over[:, c] >= 0.5)


def test_flip_tta_averages_the_two_views(shards):
    m = load_manifest(shards)
    task = build_task(m)
    spec = StreamSpec(tuple(split_shards(shards, m, "val")), 16, 32)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(5))
    inputs = DeviceInputs([0.5] * 3, [0.25] * 3, 3, torch.device("cpu"))
    model(torch.zeros(1, 3, 32, 32))
    plain = Evaluator(model, DistEnv(), inputs, task, 0).predict(spec)
    tta = Evaluator(model, DistEnv(), inputs, task, 0, tta=True).predict(spec)
    flipped = torch.nn.Sequential(_Flip(), model)
    only_flip = Evaluator(flipped, DistEnv(), inputs, task, 0).predict(spec)
    assert plain.keys == tta.keys == only_flip.keys
    np.testing.assert_allclose(tta.probs, (plain.probs + only_flip.probs) / 2, atol=1e-6)
    assert not np.allclose(tta.probs, plain.probs)


class _Flip(torch.nn.Module):
    def forward(self, x):
        return x.flip(-1)


def test_repeat_factor_sampling_moves_class_frequencies_toward_balance(tmp_path):
    src = synth("aptos", tmp_path / "src", n=200, size=32, seed=3)  # skewed: no DR ~45%, severe ~8%
    out = tmp_path / "shards"
    m = pack(
        build_source("aptos", src=src),
        out,
        PackOptions(min_shards=4, val_frac=0.0),
        workers=1,
        progress=False,
    )
    split = m.splits["train"]
    classes = tuple(m.task["classes"])
    f = np.array([split.histogram[c] for c in classes]) / split.count
    r = np.array(repeat_factors(split.histogram, split.count, classes))
    assert r[f.argmax()] == 1.0 and all(r >= 1) and r[f.argmin()] == pytest.approx(np.sqrt(f.max() / f.min()))
    expected = f * r / (f * r).sum()

    def observed(repeat):
        spec = StreamSpec(
            tuple(split_shards(out, m, "train")), 20, 16, train=True, augment=False, repeat=repeat
        )
        counts = Counter()
        for epoch in range(6):
            for b in make_loader(spec, 0, 1, 0, epoch=epoch, num_batches=10):
                counts.update(b["target"].tolist())
        n = sum(counts.values())
        return np.array([counts[i] / n for i in range(len(classes))])

    plain, balanced = observed(()), observed(tuple(r))
    assert np.abs(plain - f).max() < 0.04  # without it the stream keeps the split's shares
    assert np.abs(balanced - expected).max() < 0.04, (balanced, expected)  # with it, the predicted shares
    assert balanced.min() > plain.min() + 0.03 and balanced.max() < plain.max() - 0.05  # toward balance
