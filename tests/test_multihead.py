"""Multi-head tasks (fundus + OCT multiclass fusion): the DR grade and the OCT class as two softmax
heads, one cross-entropy each, summed; metrics per head; calibration, patients and ensembles that
respect the heads; the joint virtual-pair labels as packed."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import cohen_kappa_score, roc_auc_score

from retina_dist import calibration
from retina_dist.data.sources import build_source
from retina_dist.data.sources.fusion import DR_GRADES, HEADS
from retina_dist.data.sources.kermany import CLASSES as OCT_CLASSES
from retina_dist.engine import patients
from retina_dist.engine.ensemble import combine
from retina_dist.models import LateFusionNet
from retina_dist.models.backbone import create
from retina_dist.tasks import Task


def _task(smoothing: float = 0.0) -> Task:
    heads = tuple((h, tuple(c)) for h, c in HEADS.items())
    classes = tuple(f"{h}:{c}" for h, cs in heads for c in cs)
    return Task("multihead", classes, label_smoothing=smoothing, heads=heads)


def _rows(dr: np.ndarray, oc: np.ndarray) -> np.ndarray:
    return np.concatenate([np.eye(5, dtype=int)[dr], np.eye(4, dtype=int)[oc]], axis=1)


def test_loss_is_one_cross_entropy_per_head_summed():
    task = _task()
    torch.manual_seed(0)
    logits = torch.randn(6, 9)
    dr, oc = torch.tensor([0, 1, 2, 3, 4, 2]), torch.tensor([0, 1, 2, 3, 3, 0])
    target = torch.from_numpy(_rows(dr.numpy(), oc.numpy())).float()
    expected = F.cross_entropy(logits[:, :5], dr) + F.cross_entropy(logits[:, 5:], oc)
    assert task.loss(logits, target).item() == pytest.approx(expected.item(), rel=1e-6)
    smoothed = _task(0.1).loss(logits, target)
    ref = F.cross_entropy(logits[:, :5], dr, label_smoothing=0.1) + F.cross_entropy(
        logits[:, 5:], oc, label_smoothing=0.1
    )
    assert smoothed.item() == pytest.approx(ref.item(), rel=1e-6)
    probs = task.probabilities(logits)
    assert torch.allclose(probs[:, :5].sum(1), torch.ones(6)) and torch.allclose(
        probs[:, 5:].sum(1), torch.ones(6)
    )
    assert torch.allclose(probs[:, 5:], torch.softmax(logits[:, 5:], 1))


def test_metrics_per_head_are_sklearn_on_each_head():
    task = _task()
    rng = np.random.default_rng(0)
    dr, oc = rng.integers(0, 5, 200), rng.integers(0, 4, 200)
    logits = rng.normal(size=(200, 9))
    logits[np.arange(200), dr] += 1.5  # informative, not perfect
    logits[np.arange(200), 5 + oc] += 1.0
    probs = task.probabilities(torch.from_numpy(logits)).numpy()
    m = task.metrics(_rows(dr, oc), probs)
    assert m["dr_qwk"] == pytest.approx(cohen_kappa_score(dr, probs[:, :5].argmax(1), weights="quadratic"))
    assert m["oct_macro_auroc"] == pytest.approx(roc_auc_score(oc, probs[:, 5:], multi_class="ovr"))
    assert m["dr_accuracy"] == pytest.approx(np.mean(probs[:, :5].argmax(1) == dr))
    assert set(m["per_class_f1"]) == set(task.classes) and m["n"] == 200
    assert 0.4 < m["dr_qwk"] < 1 and 0.6 < m["oct_macro_auroc"] < 1
    assert m["heads"]["dr"]["confusion_matrix"] and len(m["heads"]["oct"]["confusion_matrix"]) == 4
    assert task.decide(probs[0]) == [
        f"dr:{DR_GRADES[probs[0, :5].argmax()]}",
        f"oct:{OCT_CLASSES[probs[0, 5:].argmax()]}",
    ]


def test_temperature_keeps_each_head_a_distribution_and_is_fitted_over_both():
    task = _task()
    rng = np.random.default_rng(1)
    dr, oc = rng.integers(0, 5, 300), rng.integers(0, 4, 300)
    logits = rng.normal(size=(300, 9)) * 0.5
    logits[np.arange(300), dr] += 3.0  # over-confident: the fitted temperature must exceed 1
    logits[np.arange(300), 5 + oc] += 3.0
    flip = rng.random(300) < 0.3
    logits[flip] = rng.normal(size=(flip.sum(), 9)) * 1.5
    probs = task.probabilities(torch.from_numpy(logits)).numpy()
    t = task.fit_temperature(probs, _rows(dr, oc))
    scaled = task.apply_temperature(probs, t)
    assert np.allclose(scaled[:, :5].sum(1), 1) and np.allclose(scaled[:, 5:].sum(1), 1)
    assert t > 1
    z = torch.from_numpy(logits)
    by_hand = torch.cat([torch.softmax(z[:, :5] / t, 1), torch.softmax(z[:, 5:] / t, 1)], 1).numpy()
    assert np.allclose(scaled, by_hand, atol=1e-4)  # probabilities are clipped at 1e-7 before the log
    nll_t = calibration.nll(scaled, _rows(dr, oc), False, task.groups)
    assert nll_t < calibration.nll(probs, _rows(dr, oc), False, task.groups)


def test_patients_and_ensembles_respect_the_heads():
    task = _task()
    # patient p has three images: the DR grades 2, 2, 4 (majority 2) and OCT 1, 3, 3 (majority 3)
    target = _rows(np.array([2, 2, 4, 0]), np.array([1, 3, 3, 0]))
    rng = np.random.default_rng(2)
    probs = task.probabilities(torch.from_numpy(rng.normal(size=(4, 9)))).numpy()
    pp = patients.aggregate(["p", "p", "p", "q"], target, probs, task, "max")
    assert pp is not None and pp.patients == ["p", "q"]
    assert list(pp.target[0]) == list(_rows(np.array([2]), np.array([3]))[0])
    assert np.allclose(pp.probs[:, :5].sum(1), 1) and np.allclose(pp.probs[:, 5:].sum(1), 1)
    other = task.probabilities(torch.from_numpy(rng.normal(size=(4, 9)))).numpy()
    geo = combine([probs, other], [1, 1], "logits", task)
    assert np.allclose(geo[:, :5].sum(1), 1) and np.allclose(geo[:, 5:].sum(1), 1)
    by_hand = np.sqrt(probs[:, :5] * other[:, :5])
    assert np.allclose(geo[:, :5], by_hand / by_hand.sum(1, keepdims=True), atol=1e-6)


def test_fusion_net_has_one_output_layer_per_head_over_frozen_encoders():
    torch.manual_seed(0)
    net = LateFusionNet(create("resnet10t", 0, 3), create("resnet10t", 0, 3), 9, 32, heads=(5, 4))
    out = net(torch.randn(3, 2, 3, 48, 48))
    assert out.shape == (3, 9) and len(net.outputs) == 2
    assert [o.out_features for o in net.outputs] == [5, 4]
    _task().loss(out, torch.from_numpy(_rows(np.array([0, 1, 4]), np.array([3, 2, 0]))).float()).backward()
    assert all(p.grad is None for p in [*net.fundus.parameters(), *net.oct.parameters()])
    assert all(o.weight.grad is not None for o in net.outputs)
    with pytest.raises(ValueError, match="do not add up"):
        LateFusionNet(create("resnet10t", 0, 3), create("resnet10t", 0, 3), 8, 32, heads=(5, 4))


def test_joint_virtual_pairs_carry_each_image_s_own_label(tmp_path):
    from retina_dist.data.synthetic.layouts import synth

    fundus = synth("aptos", tmp_path / "aptos", 60, 48, 3)
    oct_ = synth("kermany", tmp_path / "kermany", 60, 48, 3)
    source = build_source("fusion_multiclass", src=fundus, oct_src=oct_, seed=0)
    assert source.task.type == "multihead" and source.task.to_dict()["heads"]["oct"] == list(OCT_CLASSES)
    from retina_dist.data.sources.aptos import AptosSource
    from retina_dist.data.sources.kermany import KermanySource

    grade = {it.key: it.label for it in AptosSource(fundus).items()}
    oct_label = {it.key: it.label for it in KermanySource(oct_).items()}
    items = source.items()
    assert items
    for it in items:
        fkey, okey = it.ref[2], it.ref[3]
        assert it.label == list(_rows(np.array([grade[fkey]]), np.array([oct_label[okey]]))[0])
        # paired by normal vs disease, as the binary fusion set
        assert (grade[fkey] > 0) == (OCT_CLASSES[oct_label[okey]] != "NORMAL")
