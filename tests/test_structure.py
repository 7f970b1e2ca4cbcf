"""What the structure guarantees: later commands never touch what a training wrote; the Trainer's own
loop accumulates exactly; the stream's output is pinned so the data path can be moved safely."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from retina_dist.data.codec import encode
from retina_dist.run.checkpoints import Checkpointer, load
from tests.conftest import TINY, run_cli


def _hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _event_counts(tb: Path) -> dict[str, int]:
    acc = EventAccumulator(str(tb), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    tags = acc.Tags()
    counts = {f"scalar:{t}": len(acc.Scalars(t)) for t in tags["scalars"]}
    counts.update({f"image:{t}": len(acc.Images(t)) for t in tags["images"]})
    return counts


def _scalars(tb: Path, tag: str) -> list[tuple[float, float]]:
    acc = EventAccumulator(str(tb))
    acc.Reload()
    return [(float(e.step), e.value) for e in acc.Scalars(tag)]


def test_eval_cam_export_predict_leave_everything_the_training_wrote_as_it_was(shards, tmp_path):
    run_dir = tmp_path / "r"
    run_cli(
        "train",
        "--run-dir",
        str(run_dir),
        f"data.shards={shards}",
        *TINY,
        "train.epochs=2",
        "eval.splits=[val]",
    )
    files, events = _hashes(run_dir), _event_counts(run_dir / "tb")
    assert "config.yaml" in files and "metrics.json" in files and "calibration.json" in files
    assert events["scalar:val/accuracy"] == 2 and events["image:val/roc"] == 2

    run_cli("eval", "--run-dir", str(run_dir), "--split", "val", "--split", "train")
    run_cli("eval", "--run-dir", str(run_dir), "--split", "train", "--nproc", "2")
    run_cli("cam", "--run-dir", str(run_dir), "--select", "all", "--limit", "6")
    run_cli("export", "--run", str(run_dir), "--format", "torchscript")
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.png").write_bytes(encode(np.full((48, 48, 3), 90, np.uint8), ".png"))
    run_cli("predict", "--run", str(run_dir), str(images), "--out", str(tmp_path / "preds.csv"), "--cam")

    after = _hashes(run_dir)
    changed = [f for f, h in files.items() if after.get(f) != h]
    assert not changed, f"later commands rewrote or removed {changed}"
    added = {f.split("/")[0] for f in after.keys() - files.keys()}
    assert added <= {"evals", "cam", "tb", "export"}, added  # tb: new event files beside the training's
    counts = _event_counts(run_dir / "tb")
    assert {t: counts[t] for t in events} == events  # no training scalar or image purged or repeated
    step = json.loads((run_dir / "metrics.json").read_text())["val"]["step"]
    assert counts[f"scalar:eval-train-step-{step:08d}/accuracy"] == 2  # two evals of train, appended
    assert counts[f"scalar:eval-val-step-{step:08d}/accuracy"] == 1
    assert (run_dir / "cam" / "val" / "summary.json").exists()


def test_fit_with_accumulation_equals_a_twice_larger_batch(shards, tmp_path):
    """The Trainer's own loop (not a copy of it): batch 8 x accum 2 and batch 16 x accum 1 read the same
    samples in the same order (one reader, no augmentation) and end at the same weights."""
    common = [
        f"data.shards={shards}",
        "model.name=convnext_atto",  # LayerNorm: nothing depends on the micro-batch size
        "data.image_size=32",
        "data.workers=0",
        "data.augment=false",
        "train.epochs=1",
        "train.max_steps=5",
        "eval.every_epochs=0",
        "eval.splits=[]",
        "cam.enabled=false",
        "log.progress=off",
        "train.log_every=1",
    ]
    run_cli("train", "--run-dir", str(tmp_path / "a"), *common, "train.batch_size=8", "train.accum_steps=2")
    run_cli("train", "--run-dir", str(tmp_path / "b"), *common, "train.batch_size=16", "train.accum_steps=1")
    a, b = (load(Checkpointer(tmp_path / r / "checkpoints").latest()) for r in "ab")
    assert a["state"]["step"] == b["state"]["step"] == 5
    assert a["model"].keys() == b["model"].keys()
    for name, value in a["model"].items():
        torch.testing.assert_close(value, b["model"][name], rtol=0, atol=2e-4, msg=name)
    steps = {int(s["step"]) for s in a["optimizer"]["state"].values()}
    assert steps == {5}, steps  # five AdamW updates, on every parameter
    # AdamW hides a wrongly scaled gradient in the weights; the logged loss and grad norm do not.
    for tag in ("train/loss", "train/grad_norm"):
        got, want = (_scalars(tmp_path / r / "tb", tag) for r in "ab")
        assert [s for s, _ in got] == [1, 2, 3, 4, 5]
        torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-4, atol=1e-6, msg=tag)
