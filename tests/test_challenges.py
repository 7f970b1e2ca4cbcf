"""The challenge scores against independent implementations written here from the published text
(INTEROP.md), with numpy only: pairwise ROC AUC, kappa from its definition, average precision as
the step sum over distinct thresholds."""

from __future__ import annotations

import numpy as np
import pytest

from retina_dist import metrics
from retina_dist.data.sources.odir import CLASSES as ODIR
from retina_dist.data.sources.rfmid import CLASSES as RFMID


def auc(y: np.ndarray, p: np.ndarray) -> float:
    """P(score of a positive > score of a negative), ties counting one half."""
    pos, neg = p[y == 1], p[y == 0]
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0) + 0.5 * (diff == 0)).mean())


def kappa(a: np.ndarray, b: np.ndarray) -> float:
    po = np.mean(a == b)
    pe = np.mean(a) * np.mean(b) + np.mean(1 - a) * np.mean(1 - b)
    return float((po - pe) / (1 - pe))


def average_precision(y: np.ndarray, p: np.ndarray) -> float:
    """Sum over distinct thresholds, high to low, of (recall gained) x precision there."""
    total, prev_recall = 0.0, 0.0
    for t in np.unique(p)[::-1]:
        sel = p >= t
        tp = np.sum(y[sel])
        recall, precision = tp / y.sum(), tp / sel.sum()
        total += (recall - prev_recall) * precision
        prev_recall = recall
    return float(total)


def odir_official(y: np.ndarray, p: np.ndarray) -> float:
    t, s = y.ravel(), p.ravel()
    pred = (s > 0.5).astype(int)  # the official `pr > th`
    f1 = np.mean(t == pred)  # micro F1 over both labels of a binary vector is its accuracy
    return (kappa(t, pred) + f1 + auc(t, s)) / 3


def task2(y: np.ndarray, p: np.ndarray, cols: list[int]) -> float:
    aurocs = [auc(y[:, i], p[:, i]) for i in cols]
    aps = [average_precision(y[:, i], p[:, i]) for i in cols]
    return float((np.mean(aurocs) + np.mean(aps)) / 2)


def riadd_official(y: np.ndarray, p: np.ndarray) -> tuple[float, float, float]:
    risk = auc(y[:, 0], p[:, 0])
    cols = [i for i in range(1, y.shape[1]) if 0 < y[:, i].sum() < len(y)]
    ml = task2(y, p, cols)
    return risk, float(ml), float((risk + ml) / 2)


def _cases(n: int, k: int, seed: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    y = (rng.random((n, k)) < 0.3).astype(int)
    informative = np.clip(0.35 * y + 0.65 * rng.random((n, k)), 0, 1)
    tied = np.round(informative * 4) / 4  # many probabilities of exactly 0.5 and other ties
    return {"random": (y, rng.random((n, k))), "informative": (y, informative), "tied": (y, tied)}


@pytest.mark.parametrize("case", ["random", "informative", "tied"])
def test_odir_scores_equal_the_official_definition(case):
    y, p = _cases(90, len(ODIR), 3)[case]
    m = metrics.multilabel(y, p, ODIR)
    t, s = y.ravel(), p.ravel()
    pred = (s > 0.5).astype(int)
    assert m["odir_kappa"] == pytest.approx(kappa(t, pred))
    assert m["odir_f1"] == pytest.approx(np.mean(t == pred))
    assert m["odir_auc"] == pytest.approx(auc(t, s))
    assert m["odir_final"] == pytest.approx(odir_official(y, p))
    assert m["undefined"] == {}
    if case == "tied":  # a `>=` threshold would score these differently
        assert (s == 0.5).sum() > 20
        loose = (s >= 0.5).astype(int)
        assert abs(kappa(t, loose) - m["odir_kappa"]) > 0.01


@pytest.mark.parametrize("case", ["random", "informative", "tied"])
def test_riadd_scores_equal_the_published_definition(case):
    y, p = _cases(120, len(RFMID), 5)[case]
    y[:, 7] = 0  # a disease without a positive: left out of both task-2 means, and said so
    m = metrics.multilabel(y, p, RFMID)
    risk, ml, final = riadd_official(y, p)
    assert m["riadd_risk_auroc"] == pytest.approx(risk)
    assert m["riadd_multilabel"] == pytest.approx(ml)
    assert m["riadd_final"] == pytest.approx(final)
    left_out = m["excluded"]["riadd_multilabel"]
    assert set(left_out) == {"Disease_Risk", RFMID[7]} and "no positive" in left_out[RFMID[7]]
    assert RFMID[7] in m["excluded"]["macro_auroc"] and RFMID[7] in m["excluded"]["mAP"]
    # Disease_Risk is not part of task 2: with it the mean would differ
    cols = [i for i in range(len(RFMID)) if y[:, i].any()]
    with_risk = task2(y, p, cols)
    assert with_risk != pytest.approx(m["riadd_multilabel"], abs=1e-6)


def test_undefined_terms_are_reported_with_their_reason_never_zero():
    y = np.zeros((10, len(ODIR)), dtype=int)
    p = np.random.default_rng(0).random((10, len(ODIR)))
    m = metrics.multilabel(y, p, ODIR)
    assert m["odir_auc"] is None and m["odir_final"] is None
    assert "no positive among 80" in m["undefined"]["odir_auc"]
    assert m["undefined"]["odir_final"] == "odir_auc undefined"
    assert set(m["excluded"]["macro_auroc"]) == set(ODIR) and m["macro_auroc"] is None

    y = np.zeros((12, len(RFMID)), dtype=int)
    y[:, 3] = np.arange(12) % 2  # risk column without a positive; one disease defined
    m = metrics.multilabel(y, np.random.default_rng(1).random((12, len(RFMID))), RFMID)
    assert m["riadd_risk_auroc"] is None and m["riadd_final"] is None
    assert m["riadd_multilabel"] is not None
    assert m["undefined"]["riadd_final"] == "riadd_risk_auroc undefined"


def test_multiclass_records_the_classes_left_out_of_the_macro_auroc():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 3, 50)  # class "d" never occurs
    p = rng.dirichlet(np.ones(4), 50)
    m = metrics.multiclass(y, p, tuple("abcd"))
    assert m["excluded"]["macro_auroc"] == {"d": "no positive among 50"}
    assert m["macro_auroc"] == pytest.approx(np.mean([auc((y == i).astype(int), p[:, i]) for i in range(3)]))
