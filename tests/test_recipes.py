"""Whole 2-process training runs per task type beyond plain multiclass (tests/test_train.py has that):
the ODIR dual-eye multi-label recipe, and fundus+OCT late fusion over encoders from two earlier runs.
Shards come from `synth` layouts packed by `retina-dist pack`, as a user would."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from tests.conftest import run_cli

RUN = ["--nproc", "2", "--smoke", "log.progress=lines", "data.image_size=64", "optim.lr=3e-3"]


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _metrics(run_dir):
    return json.loads((run_dir / "metrics.json").read_text())["val"]


@pytest.fixture(scope="module")
def data(tmp_path_factory, scratch):
    root = tmp_path_factory.mktemp("recipes")
    for name, n, version in (
        ("odir", 360, "official"),
        ("aptos", 300, "kaggle"),
        ("kermany", 300, "mendeley-v2"),
    ):
        run_cli(
            "synth",
            name,
            "--out",
            str(root / name),
            "--n",
            str(n),
            "--size",
            "64",
            "--seed",
            "2",
            "--version",
            version,
        )
    for name in ("odir", "aptos", "kermany"):
        run_cli(
            "pack",
            name,
            "--src",
            str(root / name),
            "--out",
            str(root / f"sh-{name}"),
            "--max-side",
            "80",
            "--workers",
            "2",
        )
    for name in ("fusion", "fusion_multiclass"):
        run_cli(
            "pack",
            name,
            "--src",
            str(root / "aptos"),
            "--oct-src",
            str(root / "kermany"),
            "--out",
            str(root / f"sh-{name}"),
            "--max-side",
            "80",
            "--workers",
            "2",
        )
    return root


@pytest.fixture(scope="module")
def encoders(data) -> tuple[Path, Path]:
    """The fundus (APTOS grades) and OCT (Kermany classes) runs that fusion freezes."""
    common = ["train.epochs=4", "eval.splits=[val]"]
    for preset, name in (("aptos_effnet_b0", "aptos"), ("kermany_resnet18", "kermany")):
        run_cli(
            "train",
            "--preset",
            preset,
            *RUN,
            f"run_dir={data / f'run-{name}'}",
            f"data.shards={data / f'sh-{name}'}",
            *common,
        )
    return data / "run-aptos", data / "run-kermany"


def test_dual_eye_multilabel_run_learns_the_visible_labels(data):
    run = data / "run-odir"
    proc = run_cli(
        "train",
        "--preset",
        "odir_dual_convnext_s384",
        *RUN,
        f"run_dir={run}",
        f"data.shards={data / 'sh-odir'}",
        "train.epochs=6",
        "optim.backbone_lr_mult=1",
    )
    assert "2 ranks (torchrun)" in proc.stderr
    m = _metrics(run)
    # The synthetic twin draws DR lesions for D and a veiled, blurred view for C; chance AUROC is 0.5.
    assert (m["auroc"]["D"] + m["auroc"]["C"]) / 2 >= 0.8, m["auroc"]
    assert m["auroc"]["N"] >= 0.6 and m["odir_final"] > 0.4, m
    assert set(m) >= {"mAP", "odir_kappa", "odir_f1", "odir_auc", "odir_final", "ece", "micro_f1", "excluded"}

    # The trained pair model on the dataset's own folder: <id>_left/<id>_right pairs are found, a
    # lone test eye is listed as skipped, decisions follow the calibrated per-class thresholds.
    from retina_dist.infer.predictor import Predictor

    train_dir = data / "odir" / "ODIR-5K_Training_Dataset"
    out = data / "odir-preds.csv"
    proc = run_cli("predict", "--run", str(run), str(data / "odir"), "--out", str(out), "--no-progress")
    with open(out, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == len(list(train_dir.glob("*_left.jpg"))) == 360
    skipped = {Path(r["name"]).name: r["reason"] for r in _rows(out.with_name("odir-preds.skipped.csv"))}
    lone = {p.name for p in (data / "odir" / "ODIR-5K_Testing_Images").glob("*.jpg")}
    assert {n for n, why in skipped.items() if why == "no right image beside it"} == lone
    assert skipped["ODIR-5K_Training_Annotations(Updated)_V2.xlsx"].startswith("not an image file type")
    p = Predictor(run)
    for r in rows:
        probs = [float(r[f"prob_{c}"]) for c in p.task.classes]
        chosen = [c for c, q, t in zip(p.task.classes, probs, p.thresholds, strict=True) if q >= t]
        assert r["predicted"].split(";") == chosen or (not chosen and r["predicted"] == "")
    ids = sorted(q.name.split("_")[0] for q in train_dir.glob("*_left.jpg"))[:2]
    pair_out = data / "pairs.csv"
    run_cli(
        "predict",
        "--run",
        str(run),
        "--left",
        *[str(train_dir / f"{i}_left.jpg") for i in ids],
        "--right",
        *[str(train_dir / f"{i}_right.jpg") for i in ids],
        "--out",
        str(pair_out),
        "--cam",
    )
    by_name = {Path(r["name"]).name: r for r in rows}
    for r in _rows(pair_out):
        same = by_name[r["name"].split("|")[0].rsplit("/", 1)[-1].rsplit("_", 1)[0]]
        for c in p.task.classes:  # batch of 2 here, 32 there: float noise only
            assert abs(float(r[f"prob_{c}"]) - float(same[f"prob_{c}"])) < 1e-5
        assert Path(r["cam"]).stat().st_size > 1000  # left | right EigenCAM panels


def test_late_fusion_over_two_earlier_runs_beats_chance(data, encoders):
    common = ["train.epochs=4", "eval.splits=[val]"]
    run = data / "run-fusion"
    run_cli(
        "train",
        "--preset",
        "fusion_late",
        *RUN,
        f"run_dir={run}",
        f"data.shards={data / 'sh-fusion'}",
        f"model.fundus_encoder={encoders[0]}",
        f"model.oct_encoder={encoders[1]}",
        *common,
    )
    m = _metrics(run)
    assert m["macro_auroc"] >= 0.65, (
        m
    )  # normal vs disease on virtual pairs; chance 0.5 (0.57 with random encoders)
    assert m["balanced_accuracy"] > 0.55, m


def test_multiclass_fusion_predicts_the_dr_grade_and_the_oct_class_jointly(data, encoders):
    """Two heads over the frozen encoders: the DR grade (QWK) and the OCT class (macro AUROC), each
    its own softmax and cross-entropy; predictions, model card and ONNX export carry both."""
    from retina_dist.data.sources.fusion import DR_GRADES
    from retina_dist.data.sources.kermany import CLASSES as OCT_CLASSES

    run = data / "run-fusion-multiclass"
    proc = run_cli(
        "train",
        "--preset",
        "fusion_multiclass",
        *RUN,
        f"run_dir={run}",
        f"data.shards={data / 'sh-fusion_multiclass'}",
        f"model.fundus_encoder={encoders[0]}",
        f"model.oct_encoder={encoders[1]}",
        "train.epochs=6",
        "eval.splits=[val]",
    )
    assert "2 ranks (torchrun)" in proc.stderr
    m = _metrics(run)
    print("multiclass fusion val:", {k: round(v, 3) for k, v in m.items() if k.startswith(("dr_", "oct_"))})
    # Chance: QWK 0, macro AUROC 0.5. The synthetic twins grade DR by lesion count and draw each OCT
    # class's own pathology, so the frozen encoders carry both answers.
    assert m["dr_qwk"] > 0.3 and m["oct_macro_auroc"] > 0.65, m
    assert set(m["heads"]) == {"dr", "oct"} and len(m["heads"]["dr"]["confusion_matrix"]) == 5
    assert (run / "figures" / "val_dr_confusion.png").exists() and (
        run / "figures" / "val_oct_confusion.png"
    ).exists()

    rows = _rows(run / "predictions" / "val.csv")
    dr_cols = [f"prob_dr:{c}" for c in DR_GRADES]
    oct_cols = [f"prob_oct:{c}" for c in OCT_CLASSES]
    for r in rows:  # each head a distribution, each target one-hot within its head
        assert (
            abs(sum(float(r[c]) for c in dr_cols) - 1) < 1e-4
            and abs(sum(float(r[c]) for c in oct_cols) - 1) < 1e-4
        )
        assert (
            sum(int(r[f"true_dr:{c}"]) for c in DR_GRADES)
            == 1
            == sum(int(r[f"true_oct:{c}"]) for c in OCT_CLASSES)
        )
    keys = [r["key"] for r in rows]
    assert (
        len(keys)
        == len(set(keys))
        == json.loads((data / "sh-fusion_multiclass" / "manifest.json").read_text())["splits"]["val"]["count"]
    )

    proc = run_cli("export", "--run", str(run), "--format", "onnx")
    assert json.loads(proc.stdout)["max_abs_diff"] <= 1e-4
    card = (run / "export" / "MODEL_CARD.md").read_text()
    assert "a softmax per head: dr, oct" in card and "paired virtually" in card
    assert "dr_qwk" in card and "oct_macro_auroc" in card
