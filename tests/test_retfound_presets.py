"""The four RETFound presets, each end to end with --smoke on its synthetic twin (a ViT of RETFound's
key layout at 48 px): the recipe reaches the run (RandAugment and erasing on, blr rule, layer decay,
mean-pooled fc_norm head, the chosen best metric), the linear probe moves only its head, and the
dual-eye ODIR model over the ViT renders its CAM panels."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from retina_dist.run.checkpoints import load
from tests.conftest import run_cli

PRESETS = {
    "retfound_aptos": ("qwk", "macro_auroc"),
    "retfound_kermany": ("macro_auroc", "macro_auroc"),
    "retfound_odir": ("odir_final", "odir_final"),
    "retfound_linear_probe": ("macro_auroc", "macro_auroc"),
}


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_retfound_preset_smoke_runs_the_published_recipe(preset, tmp_path, scratch):
    run = tmp_path / "run"
    run_cli(
        "run", "--preset", preset, "--smoke", "--nproc", "1", "--run-dir", str(run),
        f"data.shards={tmp_path / 'shards'}", "data.n=200", "cam.limit=4",
    )  # fmt: skip
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["model"]["name"] == "vit_tiny_patch16_224" and cfg["model"]["global_pool"] == "avg"
    assert cfg["data"]["randaugment"] == "rand-m9-mstd0.5-inc1" and cfg["data"]["reprob"] == 0.25
    log = (run / "train.log").read_text()
    assert "= blr 0.005 x effective batch 16 / 256" in log
    metric, best = PRESETS[preset]
    metrics = json.loads((run / "metrics.json").read_text())["val"]
    assert metrics["n"] > 0 and metric in metrics and cfg["eval"]["best_metric"] == best

    ckpts = sorted((run / "checkpoints").glob("step-*.pt"))
    first, last = load(ckpts[0])["model"], load(ckpts[-1])["model"]
    prefix = "backbone." if preset == "retfound_odir" else ""
    assert f"{prefix}fc_norm.weight" in last and f"{prefix}norm.weight" not in last
    block = f"{prefix}blocks.11.attn.qkv.weight"
    head = "head.weight"
    if prefix:
        head = next(k for k in last if not k.startswith(prefix) and "weight" in k)
    assert not torch.equal(first[head], last[head])
    if preset == "retfound_linear_probe":
        assert torch.equal(first[block], last[block]) and torch.equal(first["pos_embed"], last["pos_embed"])
    else:
        assert not torch.equal(first[block], last[block])
        groups = load(ckpts[-1])["optimizer"]["param_groups"]
        scales = sorted({round(g["lr"] / max(x["lr"] for x in groups), 6) for g in groups})
        assert scales[0] == pytest.approx(0.65 ** (13 if not prefix else 14), rel=1e-3)

    cam = json.loads((run / "cam" / "val" / "summary.json").read_text())
    assert cam["rendered"] >= 1
    if preset == "retfound_odir":
        rows = (run / "cam" / "val" / "index.csv").read_text()
        assert "crossattention" in rows
