"""Patient-level results: the aggregation rules on sets built so that image- and patient-level answers
differ (a real 2-process run is recomputed by hand in tests/test_train.py)."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import accuracy_score

from retina_dist.engine.patients import aggregate
from retina_dist.tasks import Task

TWO = Task("multiclass", ("healthy", "dr"))
LABELS = Task("multilabel", ("D", "G", "C"))


def test_mean_and_max_rules_on_a_set_where_patient_and_image_answers_differ():
    # Patient a: one image leans wrong, one is confidently right -> images 1/2 right, patient right.
    # Patient b: one image, right. Patient c: both images barely wrong on average under max.
    patients = ["a", "a", "b", "c", "c"]
    target = np.array([1, 1, 0, 0, 0])
    probs = np.array([[0.6, 0.4], [0.1, 0.9], [0.8, 0.2], [0.45, 0.55], [0.9, 0.1]])
    image_acc = accuracy_score(target, probs.argmax(1))
    mean = aggregate(patients, target, probs, TWO, "mean")
    assert mean is not None and mean.patients == ["a", "b", "c"] and list(mean.images) == [2, 1, 2]
    np.testing.assert_allclose(mean.probs, [[0.35, 0.65], [0.8, 0.2], [0.675, 0.325]])
    assert image_acc == pytest.approx(0.6) and accuracy_score(mean.target, mean.probs.argmax(1)) == 1.0
    peak = aggregate(patients, target, probs, TWO, "max")
    np.testing.assert_allclose(peak.probs[0], np.array([0.6, 0.9]) / 1.5)  # renormalised per-class max
    np.testing.assert_allclose(peak.probs.sum(1), 1.0)
    assert aggregate(patients, target, probs, TWO, "none") is None
    assert aggregate(["a", "b", "c", "d", "e"], target, probs, TWO, "mean") is None  # one image each


def test_patient_labels_any_image_for_multi_label_and_the_worse_of_a_tie():
    patients = ["p", "p", "q", "q", "q"]
    target = np.array([[1, 0, 0], [0, 0, 1], [0, 0, 0], [0, 1, 0], [0, 0, 0]])
    pp = aggregate(patients, target, np.full((5, 3), 0.5), LABELS, "max")
    assert pp.target.tolist() == [[1, 0, 1], [0, 1, 0]]
    grades = Task("multiclass", tuple("01234"))
    pp = aggregate(["x", "x", "y", "y", "y"], np.array([1, 3, 2, 2, 0]), np.full((5, 5), 0.2), grades, "mean")
    assert pp.target.tolist() == [3, 2]  # a tie goes to the worse grade; else the majority
