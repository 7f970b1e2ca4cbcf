"""The fine-tuning recipe's parts: layer-wise lr decay groups, no decay on pos_embed / cls_token,
the base-lr rule, mixup / cutmix targets (multi-class, multi-label, dual-eye pairs), and EMA
weights checkpointed, resumed and evaluated beside the raw ones, best.pt by a chosen metric."""

from __future__ import annotations

import json

import pytest
import timm
import torch

from retina_dist.config import ModelConfig, OptimConfig
from retina_dist.engine.mix import build_mix
from retina_dist.engine.optim import build_optimizer, effective_lr
from retina_dist.models import build_model
from retina_dist.tasks import Task
from tests.conftest import TINY, run_cli


def _lrs(opt: torch.optim.Optimizer, model: torch.nn.Module) -> dict[str, tuple[float, float]]:
    by_id = {id(p): (g["lr"], g["weight_decay"]) for g in opt.param_groups for p in g["params"]}
    return {n: by_id[id(p)] for n, p in model.named_parameters()}


def test_layer_decay_gives_block_k_from_the_top_lr_times_decay_to_the_k():
    model = timm.create_model("vit_tiny_patch16_224", num_classes=5)
    lr, decay = 1e-3, 0.65
    got = _lrs(build_optimizer(model, lr, 0.05, layer_decay=decay), model)
    depth = len(model.blocks)  # 12: patch embedding is layer 0, blocks 1..12, the head 13
    assert got["head.weight"] == (pytest.approx(lr), 0.05)
    for i in range(depth):
        assert got[f"blocks.{i}.attn.qkv.weight"][0] == pytest.approx(lr * decay ** (depth - i))
    assert got["patch_embed.proj.weight"][0] == pytest.approx(lr * decay ** (depth + 1))
    assert got["pos_embed"] == (pytest.approx(lr * decay ** (depth + 1)), 0.0)
    assert got["cls_token"][1] == 0.0 and got["blocks.3.norm1.weight"][1] == 0.0

    convnext = timm.create_model("convnext_atto", num_classes=5)
    c = _lrs(build_optimizer(convnext, lr, 0.05, layer_decay=decay), convnext)
    stages = [c[f"stages.{i}.blocks.0.conv_dw.weight"][0] for i in range(4)]
    assert stages == sorted(stages) and c["head.fc.weight"][0] == pytest.approx(lr)
    assert c["stem.0.weight"][0] < stages[0]


def test_layer_decay_on_a_dual_eye_net_decays_its_backbone_only():
    cfg = ModelConfig(name="vit_tiny_patch16_224", arch="dual_eye", embed_dim=32, heads=2)
    model = build_model(cfg, 8, 3, 64)
    got = _lrs(build_optimizer(model, 1e-3, 0.05, layer_decay=0.5), model)
    assert got["backbone.blocks.11.mlp.fc1.weight"][0] == pytest.approx(1e-3 * 0.5)
    fusion = [v[0] for n, v in got.items() if not n.startswith("backbone.")]
    assert fusion and all(v == pytest.approx(1e-3) for v in fusion)


def test_pos_embed_and_cls_token_are_not_decayed_without_layer_decay_either():
    model = timm.create_model("vit_tiny_patch16_224", num_classes=5)
    got = _lrs(build_optimizer(model, 1e-3, 0.05), model)
    assert got["pos_embed"][1] == got["cls_token"][1] == 0.0 and got["blocks.0.mlp.fc1.weight"][1] == 0.05


def test_base_lr_scales_with_the_effective_batch():
    assert effective_lr(OptimConfig(lr=1.0, blr=5e-3), 16 * 2 * 4) == pytest.approx(5e-3 * 128 / 256)
    assert effective_lr(OptimConfig(lr=3e-4), 512) == 3e-4


def test_mixup_targets_multiclass_and_multilabel():
    torch.manual_seed(0)
    classes = tuple("abcde")
    mix = build_mix(OptimConfig(mixup=0.8, cutmix=1.0, label_smoothing=0.1), Task("multiclass", classes), 32)
    x, y = torch.rand(8, 3, 32, 32), torch.randint(0, 5, (8,))
    xm, t = mix(x.clone(), y)
    assert t.shape == (8, 5) and torch.all((t >= 0) & (t <= 1))
    assert torch.allclose(t.sum(1), torch.ones(8))
    assert torch.all(t.min(1).values >= 0.1 / 5 - 1e-6)  # smoothing reaches every class

    ml = build_mix(OptimConfig(mixup=0.8, label_smoothing=0.1), Task("multilabel", tuple("NDGCAHMO")), 32)
    y = (torch.rand(8, 8) < 0.3).float()
    xm, t = ml(x.clone(), y)
    lam = float(((xm - x.flip(0)) / (x - x.flip(0)))[0, 0, 0, 0])  # the batch's one mixup lambda
    smooth = y * 0.9 + 0.05
    assert torch.all((t >= 0) & (t <= 1))
    assert torch.allclose(t, lam * smooth + (1 - lam) * smooth.flip(0), atol=1e-4)


def test_cutmix_mixes_dual_eye_pairs_as_pairs():
    torch.manual_seed(1)
    mix = build_mix(OptimConfig(cutmix=1.0), Task("multilabel", tuple("NDGCAHMO")), 32)
    x = torch.rand(4, 2, 3, 32, 32)
    y = (torch.rand(4, 8) < 0.3).float()
    xm, _ = mix(x.clone(), y)
    changed = (xm != x).any(dim=2)  # B x eye x H x W
    assert changed.any() and torch.equal(changed[:, 0], changed[:, 1])  # the same box in both eyes
    assert torch.equal(xm[changed[:, :, None].expand_as(xm)], x.flip(0)[changed[:, :, None].expand_as(xm)])


def test_ema_is_checkpointed_resumed_and_evaluated_beside_the_raw_weights(shards, tmp_path):
    run = tmp_path / "r"
    args = [
        f"data.shards={shards}",
        *TINY,
        "train.epochs=2",
        "train.ema_decay=0.9",
        "eval.best_metric=macro_f1",
    ]
    run_cli("train", "--run-dir", str(run), *args, "train.max_steps=4")
    first = torch.load(run / "checkpoints" / "step-00000004.pt", weights_only=True)
    assert "ema" in first
    run_cli("train", "--run-dir", str(run), *args)
    log = (run / "train.log").read_text()
    assert "resumed from step-00000004.pt" in log and "holds no EMA weights" not in log
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["val_ema"]["n"] == metrics["val"]["n"]
    assert metrics["val_ema"]["macro_auroc"] != metrics["val"]["macro_auroc"]
    assert (run / "predictions" / "val_ema.csv").exists()
    last = torch.load(sorted((run / "checkpoints").glob("step-*.pt"))[-1], weights_only=True)
    raw, ema = last["model"], last["ema"]
    assert raw.keys() == ema.keys() and any(not torch.equal(raw[k], ema[k]) for k in raw)

    bad = run_cli(
        "train", "--run-dir", str(tmp_path / "b"), *args[:-1], "eval.best_metric=qwk_typo", check=False
    )
    assert bad.returncode != 0 and "eval.best_metric 'qwk_typo'" in bad.stderr
