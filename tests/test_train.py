"""Whole runs through the CLI under torchrun (2 gloo processes), read back from the run folder."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, roc_auc_score
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from retina_dist.calibration import apply_temperature
from retina_dist.data.manifest import load_manifest, split_shards
from retina_dist.data.stream.shard_reader import read_samples
from retina_dist.run.checkpoints import Checkpointer, load
from tests.conftest import TINY, run_cli


def _scalars(run_dir, tag):
    acc = EventAccumulator(str(run_dir / "tb"))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


@pytest.fixture(scope="module")
def trained(shards, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run") / "r"
    proc = run_cli(
        "train",
        "--nproc",
        "2",
        "--run-dir",
        str(run_dir),
        f"data.shards={shards}",
        *TINY,
        "train.epochs=6",
        "data.image_size=48",
        "optim.lr=3e-3",
        "data.augment_on=device",  # the canvas + grid_sample path must learn too (auto picks it on CUDA)
    )
    return run_dir, proc


def test_two_process_training_learns_and_writes_the_run_folder(trained, shards):
    run_dir, proc = trained
    assert "2 ranks (torchrun)" in proc.stderr
    loss = [v for _, v in _scalars(run_dir, "train/loss")]
    assert len(loss) >= 6
    assert sum(loss[-3:]) / 3 < 0.8 * sum(loss[:3]) / 3  # the loss falls

    metrics = json.loads((run_dir / "metrics.json").read_text())["val"]
    n_val = load_manifest(shards).splits["val"].count
    assert metrics["n"] == n_val
    assert metrics["accuracy"] > 0.35  # 5 balanced classes: chance is 0.2
    with open(run_dir / "predictions" / "val.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == n_val and len({r["key"] for r in rows}) == n_val
    assert list(rows[0])[:2] == ["key", "target"]
    assert abs(sum(float(v) for k, v in rows[0].items() if k.startswith("prob_")) - 1) < 1e-4
    for name in (
        "val_confusion.png",
        "val_confusion_norm.png",
        "val_roc.png",
        "val_pr.png",
        "val_reliability.png",
        "val_f1.png",
    ):
        assert (run_dir / "figures" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (run_dir / "config.yaml").exists() and (run_dir / "train.log").exists()


def test_tensorboard_events_hold_the_logged_scalars_and_figures(trained):
    run_dir, _ = trained
    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"images": 0})
    acc.Reload()
    tags = acc.Tags()
    for tag in ("train/loss", "train/lr", "train/img_per_s", "train/grad_norm", "val/accuracy", "val/qwk"):
        assert tag in tags["scalars"], tag
    assert all(v > 0 for _, v in _scalars(run_dir, "train/img_per_s"))
    lr = [v for _, v in _scalars(run_dir, "train/lr")]
    assert max(lr) <= 3e-3 + 1e-9 and lr[-1] < max(lr)  # warmup then cosine decay
    assert "val/confusion" in tags["images"] and "val/roc" in tags["images"]
    assert "val/reliability" in tags["images"] and "val/pr" in tags["images"]
    steps = [s for s, _ in _scalars(run_dir, "val/accuracy")]
    assert len(steps) == 6 and steps == sorted(steps)


def test_checkpoints_keep_last_k_best_and_latest(trained):
    run_dir, _ = trained
    ck = run_dir / "checkpoints"
    steps = sorted(p.name for p in ck.glob("step-*.pt"))
    assert len(steps) == 2  # keep_last=2
    assert (ck / "latest").read_text().strip() == steps[-1]
    state = load(ck / steps[-1])
    assert state["state"]["epoch"] == 6 and state["world_size"] == 2
    assert {"model", "optimizer", "scheduler", "rng", "config"} <= set(state)
    assert len(state["rng"]) == 2 and state["config"]["train"]["epochs"] == 6
    assert (ck / "best.pt").exists()


def _final_weights(run_dir):
    return load(Checkpointer(run_dir / "checkpoints").latest())["model"]


def test_stop_and_resume_equals_uninterrupted_run(shards, tmp_path):
    common = [
        "--nproc",
        "2",
        f"data.shards={shards}",
        *TINY,
        "train.epochs=2",
        "data.workers=2",
        "train.deterministic=true",
        "optim.lr=3e-3",
    ]
    run_cli("train", "--run-dir", str(tmp_path / "full"), *common)
    # ~259 train samples / (2 ranks x 16) = 8 steps an epoch: stop mid-epoch 0, then resume. The cut
    # run writes its checkpoints in the background (train.async_save), the full one synchronously:
    # the same state either way. (Synchronous resumes: tests/test_faults.py.)
    cut = [*common, "train.async_save=true"]
    proc = run_cli("train", "--run-dir", str(tmp_path / "cut"), *cut, "train.max_steps=3")
    assert "the step waited" in proc.stderr
    assert (
        load(Checkpointer(tmp_path / "cut" / "checkpoints").latest(verify=True))["state"]["batches_done"] == 3
    )
    proc = run_cli("train", "--run-dir", str(tmp_path / "cut"), *cut)
    assert "at epoch 0, step 3 (3 batches into the epoch)" in proc.stderr
    full, cut = _final_weights(tmp_path / "full"), _final_weights(tmp_path / "cut")
    for k in full:
        torch.testing.assert_close(cut[k], full[k], rtol=1e-5, atol=1e-6, msg=k)
    # The resumed run continued the same TensorBoard run: no step logged twice.
    steps = [s for s, _ in _scalars(tmp_path / "cut", "train/loss")]
    assert steps == sorted(set(steps))
    assert json.loads((tmp_path / "cut" / "metrics.json").read_text())["val"]["accuracy"] == pytest.approx(
        json.loads((tmp_path / "full" / "metrics.json").read_text())["val"]["accuracy"]
    )


_SAVER = """
import sys, torch
from retina_dist.run.checkpoints import Checkpointer
ck = Checkpointer(sys.argv[1])
ck.save({"w": torch.ones(4), "step": 1}, step=1)
print("first saved", flush=True)
ck.save({"w": torch.zeros(150_000_000), "step": 2}, step=2)  # ~600 MB: slow enough to be killed mid-write
print("second saved", flush=True)
"""


_BACKGROUND_SAVER = """
import sys, time, torch
from pathlib import Path
from retina_dist.run.checkpoints import BackgroundSaver, Checkpointer, cpu_copy, save_file
ck = Checkpointer(sys.argv[1])
ck.save({"w": torch.ones(4), "step": 1}, step=1)
print("first saved", flush=True)
state = cpu_copy({"w": torch.zeros(150_000_000), "step": 2})
path = Path(sys.argv[1]) / "step-00000002.pt"
BackgroundSaver().submit(lambda: (save_file(state, path), ck.commit(path)))
while True:  # training goes on while the second save is written
    time.sleep(0.01)
"""


@pytest.mark.parametrize("script", [_SAVER, _BACKGROUND_SAVER], ids=["sync", "background"])
def test_checkpoint_killed_mid_save_leaves_previous_loadable(tmp_path, script):
    proc = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "first saved"
    deadline = time.time() + 60
    while not list(tmp_path.glob(".step-00000002.pt.*.tmp")):
        assert time.time() < deadline and proc.poll() is None, "the second save never started"
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    ck = Checkpointer(tmp_path)
    assert ck.latest().name == "step-00000001.pt"
    state = ck.load_latest()
    assert state["step"] == 1 and torch.equal(state["w"], torch.ones(4))
    ck.save({"step": 3}, step=3)  # the next save clears the debris
    assert not list(tmp_path.glob(".*.tmp"))


def test_a_background_save_writes_the_state_as_it_was_and_raises_its_error_at_the_next_wait(tmp_path):
    from retina_dist.run.checkpoints import BackgroundSaver, cpu_copy, save_file

    w = torch.arange(6.0)
    state = cpu_copy({"model": {"w": w}, "rng": [torch.tensor([1, 2])], "step": 4})
    w.add_(100)  # the next step changes the weights: the snapshot does not move
    saver = BackgroundSaver()
    saver.submit(lambda: save_file(state, tmp_path / "a.pt"))
    saver.wait()
    got = load(tmp_path / "a.pt")
    assert torch.equal(got["model"]["w"], torch.arange(6.0)) and got["step"] == 4
    saver.submit(lambda: save_file(state, tmp_path / "missing" / "b.pt"))
    with pytest.raises(OSError):
        saver.wait()
    saver.wait()  # raised once, then clear


def test_a_two_process_run_reports_patients_as_recomputed_by_hand(trained, shards):
    run_dir, _ = trained
    val = load_manifest(shards).splits["val"]
    assert val.patients < val.count  # synthetic patients have 1-3 images
    patient_of = {
        s["__key__"]: json.loads(s["json"])["patient"]
        for s in read_samples([p for p, _ in split_shards(shards, load_manifest(shards), "val")])
    }
    with open(run_dir / "predictions" / "val.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    classes = [c.removeprefix("prob_") for c in rows[0] if c.startswith("prob_")]
    probs = np.array([[float(r[f"prob_{c}"]) for c in classes] for r in rows])
    temperature = json.loads((run_dir / "calibration.json").read_text())["temperature"]
    probs = apply_temperature(probs, temperature, False)
    by_patient: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        by_patient.setdefault(patient_of[r["key"]], []).append(i)
    names = sorted(by_patient)
    mean = np.stack([probs[by_patient[n]].mean(0) for n in names])
    labels = []
    for n in names:  # the label most of the patient's images carry, a tie to the higher class
        counts = np.bincount([int(rows[i]["target"]) for i in by_patient[n]], minlength=len(classes))
        labels.append(int(np.flatnonzero(counts == counts.max())[-1]))

    metrics = json.loads((run_dir / "metrics.json").read_text())
    got = metrics["val_patients"]
    assert got["n"] == val.patients == len(names) and got["images"] == val.count
    assert got["accuracy"] == pytest.approx(accuracy_score(labels, mean.argmax(1)), abs=1e-9)
    assert got["macro_auroc"] == pytest.approx(
        roc_auc_score(labels, mean, multi_class="ovr", average="macro", labels=range(len(classes))), abs=1e-4
    )
    with open(run_dir / "predictions" / "val_patients.csv", newline="") as fh:
        written = list(csv.DictReader(fh))
    assert [r["patient"] for r in written] == names and sum(int(r["images"]) for r in written) == val.count
    assert (run_dir / "figures" / "val_patients_roc.png").stat().st_size > 5000
    acc = EventAccumulator(str(run_dir / "tb"))
    acc.Reload()
    assert acc.Scalars("val_patients/accuracy")[-1].value == pytest.approx(got["accuracy"])
