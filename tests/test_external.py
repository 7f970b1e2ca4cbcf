"""External validation: a run trained on the synthetic DR-grade set, evaluated exactly once on an
RFMiD-layout set through a declared label map (grade >= 1 <-> RFMiD DR) and on an APTOS-layout set of
the same classes; the results live apart from the training's, and the model card lists them."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from retina_dist.config import ConfigError
from retina_dist.data.manifest import load_manifest, split_shards
from retina_dist.data.pack import PackOptions, pack
from retina_dist.data.sample_format import label
from retina_dist.data.sources import build_source
from retina_dist.data.stream.shard_reader import read_samples
from retina_dist.data.synthetic.layouts import synth
from retina_dist.engine.evaluate import Predictions
from retina_dist.engine.external import map_predictions, read_label_map
from retina_dist.tasks import Task
from tests.conftest import TINY, run_cli

GRADES = Task("multiclass", ("no_dr", "mild", "moderate", "severe", "proliferative"))
DR_MAP = """classes:
  DR:
    run: [mild, moderate, severe, proliferative]
    other: [DR]
negative: "*"
"""


@pytest.fixture(scope="module")
def run_dir(shards, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ext") / "run"
    run_cli(
        "train", "--run-dir", str(out), f"data.shards={shards}", *TINY, "train.epochs=2", "eval.splits=[val]"
    )
    return out


def _packed(tmp_path_factory, dataset: str, n: int) -> Path:
    root = tmp_path_factory.mktemp(dataset)
    src = synth(dataset, root / "src", n=n, size=96, seed=5)
    pack(
        build_source(dataset, src=src), root / "shards", PackOptions(max_side=512), workers=1, progress=False
    )
    return root / "shards"


@pytest.fixture(scope="module")
def rfmid(tmp_path_factory) -> Path:
    return _packed(tmp_path_factory, "rfmid", 120)


def _hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in root.rglob("*")
        if p.is_file() and p.relative_to(root).parts[0] != "evals"
    }


def test_a_run_is_validated_on_another_dataset_through_a_label_map(run_dir, rfmid, tmp_path):
    mapping = tmp_path / "dr.yaml"
    mapping.write_text(DR_MAP)
    before = _hashes(run_dir)
    run_cli(
        "eval",
        "--run-dir",
        str(run_dir),
        "--shards",
        str(rfmid),
        "--label-map",
        str(mapping),
        "--split",
        "test",
        "--nproc",
        "2",
    )
    out = run_dir / "evals" / "external-shards-test"
    record = json.loads((out / "external.json").read_text())
    test = load_manifest(rfmid).splits["test"]
    assert (
        record["n"] == test.count and record["common_task"] == "multilabel" and record["dataset"] == "rfmid"
    )
    with open(out / "predictions" / "test.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len({r["key"] for r in rows}) == len(rows) == test.count  # exactly once over 2 ranks
    classes = tuple(load_manifest(rfmid).task["classes"])
    labels = {  # each sample's own RFMiD labels, read from the shards
        s["__key__"]: label(json.loads(s["json"])["label"], classes, True)[classes.index("DR")]
        for s in read_samples([p for p, _ in split_shards(rfmid, load_manifest(rfmid), "test")])
    }
    assert [int(r["true_DR"]) for r in rows] == [int(labels[r["key"]]) for r in rows]
    y, p = [int(r["true_DR"]) for r in rows], [float(r["prob_DR"]) for r in rows]
    assert 0 < sum(y) < len(y)  # the seeded twin's test split has DR and no-DR eyes
    assert record["metrics"]["macro_auroc"] == pytest.approx(roc_auc_score(y, p), abs=1e-4)
    assert _hashes(run_dir) == before  # the training's files, TensorBoard included, as they were

    from retina_dist.infer.model_card import card_markdown, model_card
    from retina_dist.infer.predictor import Predictor

    card = card_markdown(model_card(Predictor(run_dir)))
    assert "## External validation" in card
    assert "DR = run mild+moderate+severe+proliferative vs rfmid DR" in card


def test_labels_a_map_does_not_know_or_does_not_place_are_named(run_dir, rfmid, tmp_path):
    other = Task("multilabel", tuple(load_manifest(rfmid).task["classes"]))
    bad = tmp_path / "bad.yaml"
    bad.write_text("classes:\n  DR: {run: [mild, moderat], other: [DR, DRR]}\nnegative: '*'\n")
    with pytest.raises(ConfigError, match=r"run class 'moderat', other class 'DRR' not among the classes"):
        read_label_map(bad, GRADES, other)
    partial = tmp_path / "partial.yaml"
    partial.write_text("classes:\n  DR: {run: [mild], other: [DR]}\nnegative: [Disease_Risk]\n")
    with pytest.raises(ConfigError, match=r"classes \['ARMD', 'MH'.*are in no common class"):
        read_label_map(partial, GRADES, other)
    proc = run_cli(
        "eval", "--run-dir", str(run_dir), "--shards", str(rfmid), "--label-map", str(bad), check=False
    )
    assert proc.returncode == 2 and "other class 'DRR'" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_cli("eval", "--run-dir", str(run_dir), "--shards", str(rfmid), check=False)
    assert proc.returncode == 2 and "pass --label-map" in proc.stderr


def test_mapped_probabilities_sum_a_multiclass_run_and_a_partition_stays_multiclass(tmp_path):
    octs = Task("multiclass", ("CNV", "DME", "DRUSEN", "NORMAL"))
    mnist = Task("multiclass", ("0", "1", "2", "3"))
    path = tmp_path / "oct.yaml"
    path.write_text(
        "classes:\n  cnv: {run: [CNV], other: ['0']}\n  dme: {run: [DME], other: ['1']}\n"
        "  drusen: {run: [DRUSEN], other: ['2']}\n  normal: {run: [NORMAL], other: ['3']}\n"
    )
    lm = read_label_map(path, octs, mnist)
    assert lm.exclusive and lm.task.type == "multiclass"
    probs = np.array([[0.7, 0.1, 0.1, 0.1], [0.1, 0.2, 0.3, 0.4]])
    mapped = map_predictions(Predictions(["a", "b"], np.array([0, 3]), probs), lm, octs, mnist)
    assert mapped.target.tolist() == [0, 3] and np.allclose(mapped.probs, probs)
    dr = tmp_path / "dr.yaml"
    dr.write_text(
        "classes:\n  DR: {run: [mild, moderate, severe, proliferative], other: ['1', '2', '3', '4']}\n"
        "negative: ['0']\n"
    )
    aptos = Task("multiclass", ("0", "1", "2", "3", "4"))
    lm = read_label_map(dr, GRADES, aptos)
    assert not lm.exclusive  # one common class from five: a binary (multi-label) score
    grade_probs = np.array([[0.5, 0.2, 0.1, 0.1, 0.1], [0.9, 0.1, 0.0, 0.0, 0.0]])
    mapped = map_predictions(Predictions(["a", "b"], np.array([2, 0]), grade_probs), lm, GRADES, aptos)
    assert mapped.target.tolist() == [[1], [0]] and np.allclose(mapped.probs[:, 0], [0.5, 0.1])
