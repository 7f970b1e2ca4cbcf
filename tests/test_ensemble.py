"""``retina-dist ensemble``: three runs of one task (three seeds), evaluated exactly once on 2 ranks,
their calibrated probabilities averaged — checked against the members' own predictions by hand."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from retina_dist.calibration import apply_temperature
from retina_dist.data.manifest import load_manifest
from tests.conftest import TINY, run_cli


@pytest.fixture(scope="module")
def members(shards, tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("members")
    runs = []
    for seed in (0, 1, 2):
        run_dir = root / f"seed{seed}"
        run_cli(
            "train",
            "--run-dir",
            str(run_dir),
            f"data.shards={shards}",
            *TINY,
            "train.epochs=3",
            f"train.seed={seed}",
            "optim.lr=3e-3",
            "eval.splits=[val]",
        )
        runs.append(run_dir)
    return runs


def _read(path: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    probs = np.array([[float(v) for k, v in r.items() if k.startswith("prob_")] for r in rows])
    return [r["key"] for r in rows], np.array([int(r["target"]) for r in rows]), probs


def _calibrated(run_dir: Path) -> np.ndarray:
    _, _, probs = _read(run_dir / "predictions" / "val.csv")
    t = json.loads((run_dir / "calibration.json").read_text())["temperature"]
    return apply_temperature(probs, t, False)


def _hashes(root: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()}


def test_an_ensemble_averages_calibrated_members_exactly_once(members, shards, tmp_path):
    before = {str(r): _hashes(r) for r in members}
    out = tmp_path / "ens"
    runs = [str(r) for r in members]
    proc = run_cli("ensemble", "--runs", *runs, "--split", "val", "--out", str(out), "--nproc", "2")
    keys, target, probs = _read(out / "predictions" / "val.csv")
    val = load_manifest(shards).splits["val"]
    assert len(keys) == len(set(keys)) == val.count  # exactly once over 2 ranks, for each member
    want = np.mean([_calibrated(r) for r in members], axis=0)
    np.testing.assert_allclose(probs, want, atol=2e-5)  # members' CSVs carry 6 decimals
    metrics = json.loads((out / "metrics.json").read_text())["val"]
    assert metrics["accuracy"] == pytest.approx(float((want.argmax(1) == target).mean()), abs=1e-9)
    record = json.loads((out / "ensemble.json").read_text())
    assert [m["run"] for m in record["members"]] == runs
    best = max(m["metrics"]["macro_auroc"] for m in record["members"])
    print(
        "val macro AUROC: members",
        [round(m["metrics"]["macro_auroc"], 4) for m in record["members"]],
        "ensemble",
        round(record["ensemble"]["macro_auroc"], 4),
        "(best member",
        round(best, 4),
        ")",
    )
    card = (out / "model_card.md").read_text()
    assert card.count("| ") >= 5 and all(r in card for r in runs) and "| ensemble |" in card
    assert (out / "figures" / "val_roc.png").exists() and json.loads(proc.stdout.strip().splitlines()[-1])
    assert {str(r): _hashes(r) for r in members} == before  # no member was written to

    # All the weight on one member: the ensemble is that member, calibrated.
    one = tmp_path / "one"
    run_cli("ensemble", "--runs", *runs, "--weights", "0", "1", "0", "--split", "val", "--out", str(one))
    np.testing.assert_allclose(_read(one / "predictions" / "val.csv")[2], _calibrated(members[1]), atol=2e-5)
    # Logits: the normalised weighted geometric mean of the calibrated probabilities.
    geo = tmp_path / "geo"
    run_cli("ensemble", "--runs", *runs, "--combine", "logits", "--split", "val", "--out", str(geo))
    g = np.exp(np.mean([np.log(np.clip(_calibrated(r), 1e-7, 1)) for r in members], axis=0))
    got = _read(geo / "predictions" / "val.csv")[2]
    np.testing.assert_allclose(got, g / g.sum(1, keepdims=True), atol=5e-5)


def test_bad_weights_are_a_clear_error(members, tmp_path):
    runs = [str(r) for r in members]
    out = tmp_path / "e"
    proc = run_cli("ensemble", "--runs", *runs, "--weights", "1", "2", "--out", str(out), check=False)
    assert proc.returncode == 2 and "one non-negative weight per run (3)" in proc.stderr
    assert not out.exists()


def test_an_ensemble_exports_as_one_onnx_file_that_answers_as_the_ensemble(members, tmp_path):
    import onnxruntime as ort

    from retina_dist.infer.predictor import Predictor

    runs = [str(r) for r in members]
    out = tmp_path / "ens"
    run_cli("ensemble", "--runs", *runs, "--weights", "1", "2", "1", "--split", "val", "--out", str(out))
    proc = run_cli("export", "--ensemble", str(out), "--format", "onnx")
    report = json.loads(proc.stdout)
    onnx_file = out / "export" / "model.onnx"
    assert report["file"] == str(onnx_file) and report["max_abs_diff"] <= 1e-4
    # The file on the members' own preprocessed pixels equals their calibrated, weighted mean.
    preds = [Predictor(r) for r in runs]
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (80, 90, 3), dtype=np.uint8) for _ in range(3)]
    batch = np.stack([preds[0].prepare([im]) for im in images])
    want = np.tensordot(np.array([1, 2, 1]) / 4, np.stack([p.probabilities(batch) for p in preds]), axes=1)
    sess = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"image": batch.astype(np.float32)})[0]
    np.testing.assert_allclose(got, want, atol=1e-4)
    card = json.loads((out / "export" / "model_card.json").read_text())
    assert [m["run"] for m in card["ensemble"]["members"]] == runs and len(
        card["calibration"]["temperature"]
    ) == 3
    md = (out / "export" / "MODEL_CARD.md").read_text()
    assert all(r in md for r in runs) and "weight 2" in md
