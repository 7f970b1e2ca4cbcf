"""FSDP2 (fully_shard, gloo, 2 real processes) behind the same Strategy and step as DDP (the state
dict round trip is checked beside the other strategies' in test_deepspeed.py)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import timm
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from retina_dist.run import sharded
from retina_dist.run.checkpoints import Checkpointer
from tests import dist_workers
from tests.conftest import TWO_RANKS, check_consolidated_evaluates_as_trained, run_cli
from tests.dist_workers import strategy_params

FSDP = [*TWO_RANKS, "train.strategy=fsdp"]


def test_fsdp_accumulating_4x2_reaches_ddps_parameters_at_8x1(tmp_path, scratch):
    """Without accumulation FSDP and DDP are compared in test_deepspeed.py, beside ZeRO 0-2."""
    ddp = strategy_params(tmp_path / "ddp.pt", "ddp", 0, 8, 1, 3)
    accumulated = strategy_params(tmp_path / "fsdp4x2.pt", "fsdp", 0, 4, 2, 3)
    assert accumulated.keys() == ddp.keys()
    for k in ddp:
        torch.testing.assert_close(accumulated[k], ddp[k], rtol=1e-4, atol=2e-5, msg=k)


@pytest.fixture(scope="module")
def fsdp_run(shards, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("fsdp") / "full"
    run_cli("train", "--run-dir", str(run_dir), f"data.shards={shards}", *FSDP)
    return run_dir


def test_fsdp_run_learns_evaluates_once_and_saves_each_ranks_shard(fsdp_run, shards):
    acc = EventAccumulator(str(fsdp_run / "tb"))
    acc.Reload()
    loss = [e.value for e in acc.Scalars("train/loss")]
    assert np.mean(loss[-2:]) < np.mean(loss[:2])
    manifest = json.loads((shards / "manifest.json").read_text())
    metrics = json.loads((fsdp_run / "metrics.json").read_text())
    assert metrics["val"]["n"] == manifest["splits"]["val"]["count"]

    latest = Checkpointer(fsdp_run / "checkpoints").latest(verify=True)
    assert latest.is_dir() and latest.name == "step-00000016"
    meta = sharded.read_meta(latest)
    assert meta["world_size"] == 2
    ranks = [torch.load(sharded.rank_file(latest, r), weights_only=True) for r in range(2)]
    full = sharded.consolidate(latest)
    # Each rank holds its dim-0 half of every weight, and AdamW's moments for that half only.
    for key, shape in meta["shapes"].items():
        halves = [r["model"][key] for r in ranks]
        assert [h.shape[0] for h in halves] == [len(c) for c in torch.arange(shape[0]).chunk(2)], key
        assert list(full[key].shape) == shape
    sizes = [sum(v.numel() for s in r["optimizer"]["state"].values() for v in s.values()) for r in ranks]
    total = sum(full[k].numel() for k in meta["shapes"])
    assert abs(sizes[0] - total) / total < 0.05 and abs(sizes[1] - total) / total < 0.05  # 2 moments x half


def test_fsdp_interrupted_and_resumed_equals_uninterrupted(fsdp_run, shards, tmp_path):
    common = ["--run-dir", str(tmp_path / "cut"), f"data.shards={shards}", *FSDP]
    run_cli("train", *common, "train.max_steps=10")  # 8 steps an epoch: stops inside the second
    proc = run_cli("train", *common)
    assert "at epoch 1, step 10 (2 batches into the epoch)" in proc.stderr
    cut = sharded.consolidate(Checkpointer(tmp_path / "cut" / "checkpoints").latest())
    full = sharded.consolidate(Checkpointer(fsdp_run / "checkpoints").latest())
    assert cut.keys() == full.keys()
    for k in full:
        torch.testing.assert_close(cut[k], full[k], rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.parametrize("world", [1, 3])
def test_a_two_rank_fsdp_checkpoint_resumes_on_another_world_size_exactly(tmp_path, scratch, world):
    """Weights and AdamW moments cut anew for 1 rank and for 3 (uneven pieces) are the saved ones."""
    folder = tmp_path / "ckpt" / "step-00000002"
    dist_workers.run(dist_workers.fsdp_reshard, str(folder), "save", str(tmp_path / "saved.pt"))
    assert sorted(p.name for p in folder.iterdir()) == ["rank-00000.pt", "rank-00001.pt", sharded.META]
    dist_workers.run(dist_workers.fsdp_reshard, str(folder), "load", str(tmp_path / "loaded.pt"), world=world)
    saved, loaded = torch.load(tmp_path / "saved.pt"), torch.load(tmp_path / "loaded.pt")
    assert loaded["extra"] == "extra" and loaded["lr"] == saved["lr"]
    assert saved["moments"].keys() == loaded["moments"].keys() and len(saved["moments"]) > 0
    for kind in ("params", "moments"):
        for k, v in saved[kind].items():
            torch.testing.assert_close(loaded[kind][k], v, rtol=0, atol=0, msg=f"{kind} {k}")


def test_fsdp_run_resumes_on_one_rank(fsdp_run, shards, tmp_path):
    shutil.copytree(fsdp_run, tmp_path / "run")
    args = ["--run-dir", str(tmp_path / "run"), f"data.shards={shards}", *FSDP[2:], "train.epochs=3"]
    proc = run_cli("train", *args)
    assert "resumed from step-00000016 at epoch 2, step 16" in proc.stderr
    latest = Checkpointer(tmp_path / "run" / "checkpoints").latest(verify=True)
    assert latest.name == "step-00000032" and sharded.read_meta(latest)["world_size"] == 1


def test_fsdp_run_consolidates_into_plain_timm_and_evaluates_as_trained(fsdp_run, tmp_path):
    plain = check_consolidated_evaluates_as_trained(fsdp_run, tmp_path)
    timm.create_model("resnet10t", num_classes=plain["fc.weight"].shape[0]).load_state_dict(plain)
