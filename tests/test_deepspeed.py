"""Real DeepSpeed (CPU accelerator, gloo, 2 processes) behind the same Strategy as DDP."""

from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from retina_dist.run.checkpoints import Checkpointer, consolidate, load_deepspeed
from tests import dist_workers
from tests.conftest import TWO_RANKS, check_consolidated_evaluates_as_trained, run_cli


def _params(tmp_path, name, *args):
    return dist_workers.strategy_params(tmp_path / f"{name}.pt", *args)


def test_ddp_zero_0_1_2_and_fsdp_reach_the_same_parameters(tmp_path, scratch):
    ddp = _params(tmp_path, "ddp", "ddp", 0, 8, 1, 3)
    for strategy, stage in (("deepspeed", 0), ("deepspeed", 1), ("deepspeed", 2), ("fsdp", 0)):
        got = _params(tmp_path, f"{strategy}{stage}", strategy, stage, 8, 1, 3)
        assert got.keys() == ddp.keys()
        for k in ddp:
            torch.testing.assert_close(got[k], ddp[k], rtol=1e-4, atol=2e-5, msg=f"{strategy} {stage}: {k}")


def test_deepspeed_accumulation_4x2_equals_8x1(tmp_path, scratch):
    a = _params(tmp_path, "a", "deepspeed", 2, 8, 1, 2)
    b = _params(tmp_path, "b", "deepspeed", 2, 4, 2, 2)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=2e-5, msg=k)


DS = [*TWO_RANKS, "train.strategy=deepspeed"]


@pytest.fixture(scope="module")
def zero2_run(shards, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("ds") / "full"
    run_cli("train", "--run-dir", str(run_dir), f"data.shards={shards}", *DS, "deepspeed.zero_stage=2")
    return run_dir


def test_zero2_run_learns_and_checkpoints_as_folders(zero2_run):
    acc = EventAccumulator(str(zero2_run / "tb"))
    acc.Reload()
    loss = [e.value for e in acc.Scalars("train/loss")]
    assert np.mean(loss[-2:]) < np.mean(loss[:2])
    latest = Checkpointer(zero2_run / "checkpoints").latest()
    assert latest.is_dir() and latest.name == "step-00000016"
    assert len(list(latest.rglob("*optim_states.pt"))) == 2  # one ZeRO partition per rank
    # Joined from the ranks' fp32 partitions, the weights are those of the module DeepSpeed saved whole
    # (fp32 training): the partition layout is read right.
    full = consolidate(latest)
    module = load_deepspeed(latest / "mp_rank_00_model_states.pt")["module"]
    assert full.keys() == module.keys()
    for k in module:
        torch.testing.assert_close(full[k], module[k], rtol=0, atol=0, msg=k)


class _Payload:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['TMPDIR']}/pwned",))


def test_a_zero_checkpoint_is_read_weights_only_and_a_planted_pickle_refused(zero2_run, tmp_path):
    folder = tmp_path / "step"
    shutil.copytree(Checkpointer(zero2_run / "checkpoints").latest(), folder)
    torch.save({"optimizer_state_dict": _Payload()}, folder / "zero_pp_rank_1_mp_rank_00_optim_states.pt")
    with pytest.raises(pickle.UnpicklingError, match="os.system|posix.system"):
        consolidate(folder)
    assert not (Path(os.environ["TMPDIR"]) / "pwned").exists()


def test_zero1_interrupted_and_resumed_equals_uninterrupted(shards, tmp_path):
    common = ["--run-dir", str(tmp_path / "cut"), f"data.shards={shards}", *DS, "deepspeed.zero_stage=1"]
    run_cli("train", *common, "train.max_steps=10")  # 8 steps an epoch: stops inside the second
    proc = run_cli("train", *common)
    assert "at epoch 1, step 10 (2 batches into the epoch)" in proc.stderr
    run_cli(
        "train", "--run-dir", str(tmp_path / "full"), f"data.shards={shards}", *DS, "deepspeed.zero_stage=1"
    )
    cut = consolidate(Checkpointer(tmp_path / "cut" / "checkpoints").latest())
    full = consolidate(Checkpointer(tmp_path / "full" / "checkpoints").latest())
    for k in full:
        torch.testing.assert_close(cut[k], full[k], rtol=1e-5, atol=1e-6, msg=k)


def test_resume_on_another_world_size_is_refused_clearly(zero2_run, shards):
    proc = run_cli(
        "train",
        "--run-dir",
        str(zero2_run),
        f"data.shards={shards}",
        *DS[2:],
        "train.epochs=3",
        "deepspeed.zero_stage=2",
        check=False,
    )
    assert proc.returncode != 0
    assert "a ZeRO checkpoint of 2 ranks cannot be resumed on 1" in proc.stderr


def test_consolidated_weights_load_into_plain_timm_and_predict_the_same(zero2_run, tmp_path):
    check_consolidated_evaluates_as_trained(zero2_run, tmp_path)


@pytest.mark.parametrize("strategy,stage", [("ddp", 0), ("deepspeed", 1), ("deepspeed", 2), ("fsdp", 0)])
def test_strategy_state_dict_round_trip_continues_the_same_run(tmp_path, scratch, strategy, stage):
    """Strategy.state_dict / load_state_dict (the protocol both strategies satisfy): a strategy
    restored from another's state and stepped on the same data lands on the same parameters."""
    out = tmp_path / "rt.pt"
    dist_workers.run(dist_workers.strategy_roundtrip, strategy, stage, str(out))
    got = torch.load(out)
    assert got["lr"][0] == got["lr"][1]
    for name, value in got["a"].items():
        torch.testing.assert_close(value, got["b"][name], rtol=0, atol=1e-6, msg=name)
