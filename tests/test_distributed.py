"""Real 2-process gloo groups: gradient accumulation under DDP, exact-once evaluation, and whole
training runs started through the CLI (torchrun)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, cohen_kappa_score, f1_score, roc_auc_score

from retina_dist.data.manifest import load_manifest, split_shards
from retina_dist.data.pack import PackOptions, pack
from retina_dist.data.sources import build_source
from retina_dist.data.stream import StreamSpec
from retina_dist.data.stream.feeder import DeviceInputs
from retina_dist.dist import DistEnv
from retina_dist.engine.evaluate import Evaluator
from retina_dist.tasks import build_task
from tests import dist_workers


def test_accumulation_4x2_equals_8x1_under_ddp(tmp_path, scratch):
    """Through the one train step (engine.step.TrainStep): the reduced gradients, the updated
    parameters and the reported loss of micro 4 x accum 2 equal those of micro 8 x accum 1."""
    dist_workers.run(dist_workers.accumulation, 8, 1, str(tmp_path / "a.pt"))
    dist_workers.run(dist_workers.accumulation, 4, 2, str(tmp_path / "b.pt"))
    a, b = torch.load(tmp_path / "a.pt"), torch.load(tmp_path / "b.pt")
    assert a["grads"].keys() == b["grads"].keys() and len(a["grads"]) > 10
    for name in a["grads"]:
        torch.testing.assert_close(a["grads"][name], b["grads"][name], rtol=1e-4, atol=1e-6, msg=name)
        # AdamW's first update is about lr * sign(grad): a 1e-7 difference in a near-zero gradient
        # moves an element by up to lr, so parameters are compared at a tolerance of a tenth of lr.
        torch.testing.assert_close(a["params"][name], b["params"][name], rtol=0, atol=1e-4, msg=name)
    assert any(a["grads"][n].abs().sum() > 0 for n in a["grads"])
    torch.testing.assert_close(a["loss"], b["loss"], rtol=1e-5, atol=1e-6)


def eval_setup(shards: str):
    import timm

    m = load_manifest(shards)
    task = build_task(m)
    torch.manual_seed(3)
    model = timm.create_model("resnet10t", num_classes=task.num_classes, in_chans=3)
    spec = StreamSpec(tuple(split_shards(shards, m, "val")), batch_size=8, image_size=32)
    inputs = DeviceInputs([0.5] * 3, [0.25] * 3, 3, torch.device("cpu"))
    return model, spec, inputs, task


@pytest.fixture(scope="module")
def odd_shards(tmp_path_factory, scratch):
    out = tmp_path_factory.mktemp("odd101")
    pack(
        build_source("synthetic", n=101, image_size=32, seed=5),
        out,
        PackOptions(val_frac=1.0, shard_size=15, min_shards=7),
        workers=1,
        progress=False,
    )
    return out


def test_exact_once_eval_on_two_ranks_matches_one_process(odd_shards, tmp_path):
    dist_workers.run(dist_workers.exact_once_eval, str(odd_shards), 2, str(tmp_path / "p.pt"))
    got = torch.load(tmp_path / "p.pt")
    assert len(got["keys"]) == 101 and len(set(got["keys"])) == 101

    model, spec, inputs, task = eval_setup(str(odd_shards))
    ref = Evaluator(model, DistEnv(), inputs, task, workers=0).predict(spec)  # one process, no group
    order = {k: i for i, k in enumerate(ref.keys)}
    idx = [order[k] for k in got["keys"]]
    np.testing.assert_allclose(got["probs"].numpy(), ref.probs[idx], rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(got["target"].numpy(), ref.target[idx])

    # The task's metrics on the gathered set equal scikit-learn's on the one-process set.
    m = task.metrics(got["target"].numpy(), got["probs"].numpy())
    pred = ref.probs.argmax(1)
    assert m["accuracy"] == pytest.approx(accuracy_score(ref.target, pred))
    assert m["macro_f1"] == pytest.approx(
        f1_score(ref.target, pred, average="macro", labels=range(5), zero_division=0)
    )
    assert m["qwk"] == pytest.approx(
        cohen_kappa_score(ref.target, pred, weights="quadratic", labels=range(5))
    )
    assert m["auroc_ovr"]["mild"] == pytest.approx(roc_auc_score(ref.target == 1, ref.probs[:, 1]))
    assert m["n"] == 101 and np.sum(m["confusion_matrix"]) == 101
