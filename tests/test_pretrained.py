"""Foundation-model checkpoints in their published layouts (random weights, real key names): each
loads with the right report, a malicious pickle is refused naming its global, the RETFound head
pools the patch tokens, pos_embed is resampled as timm resamples it, and a 224-px checkpoint
fine-tunes at another size with 2 processes and resumes."""

from __future__ import annotations

import argparse
import json
import os

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed

from retina_dist.config import ConfigError, ModelConfig
from retina_dist.models import build_model
from retina_dist.models.pretrained import LoadReport
from tests.conftest import TINY, run_cli

VIT = "vit_tiny_patch16_224"  # RETFound's ViT-L key names at 192 wide


def _encoder(img_size: int = 224, **kw) -> dict[str, torch.Tensor]:
    return timm.create_model(VIT, num_classes=0, img_size=img_size, **kw).state_dict()


def _decoder(dim: int = 128, n: int = 197) -> dict[str, torch.Tensor]:
    """The MAE decoder's tensors, named as RETFound's models_mae names them (2 of its 8 blocks)."""
    out = {
        "mask_token": torch.zeros(1, 1, dim),
        "decoder_pos_embed": torch.zeros(1, n, dim),
        "decoder_embed.weight": torch.randn(dim, 192),
        "decoder_embed.bias": torch.zeros(dim),
        "decoder_norm.weight": torch.ones(dim),
        "decoder_norm.bias": torch.zeros(dim),
        "decoder_pred.weight": torch.randn(16 * 16 * 3, dim),
        "decoder_pred.bias": torch.zeros(16 * 16 * 3),
    }
    for i in range(2):
        out[f"decoder_blocks.{i}.norm1.weight"] = torch.ones(dim)
        out[f"decoder_blocks.{i}.attn.qkv.weight"] = torch.randn(3 * dim, dim)
    return out


def _args() -> argparse.Namespace:
    return argparse.Namespace(model="mae_vit_large_patch16", input_size=224, blr=1.5e-4, norm_pix_loss=True)


@pytest.fixture(scope="module")
def mae_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "RETFound_cfp_weights.pth"
    enc = _encoder()
    torch.save(
        {
            "model": {**enc, **_decoder()},
            "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4}]},
            "epoch": 799,
            "scaler": {"scale": 65536.0},
            "args": _args(),
        },
        path,
    )
    return path, enc


def _build(path, classes=5, size=64, pool="avg", **kw) -> tuple[torch.nn.Module, LoadReport]:
    reports: list[LoadReport] = []
    cfg = ModelConfig(name=VIT, pretrained=str(path), global_pool=pool, **kw)
    return build_model(cfg, classes, 3, size, reports), reports[0]


def test_a_retfound_mae_pretraining_file_loads_its_encoder_and_says_what_it_dropped(mae_file):
    path, enc = mae_file
    model, report = _build(path)
    counts = report.to_dict()["counts"]
    assert "MAE pretraining" in report.layout and "args" in report.layout
    assert report.dropped["pretraining objective (decoder, mask token, DINO heads)"] == sorted(
        _decoder(), key=list(_decoder()).index
    )
    assert report.dropped["final norm (mean-pooled head uses a fresh fc_norm)"] == [
        "norm.weight",
        "norm.bias",
    ]
    assert sorted(report.fresh) == ["fc_norm.bias", "fc_norm.weight", "head.bias", "head.weight"]
    assert counts == {
        "loaded": len(enc) - 2,
        "dropped": len(_decoder()) + 2,
        "fresh": 4,
        "renamed": 0,
        "resampled": 1,
    }
    assert report.resampled == {"pos_embed": {"from": [14, 14], "to": [4, 4]}}
    own = model.state_dict()
    assert torch.equal(own["blocks.3.attn.qkv.weight"], enc["blocks.3.attn.qkv.weight"])
    assert torch.equal(
        own["pos_embed"], resample_abs_pos_embed(enc["pos_embed"], [4, 4], num_prefix_tokens=1)
    )
    assert torch.equal(own["cls_token"], enc["cls_token"])  # kept apart from the resampled grid
    assert own["head.weight"].std() < 1e-4  # RETFound's trunc_normal(std=2e-5) head


def test_the_retfound_head_is_fc_norm_of_the_mean_patch_token(mae_file):
    model, _ = _build(mae_file[0])
    model.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        tokens = model.forward_features(x)  # B x (1 + 16) x 192, the cls token first
        by_hand = model.fc_norm(tokens[:, 1:].mean(dim=1))
        pooled = model.forward_head(tokens, pre_logits=True)
        assert torch.allclose(pooled, by_hand, atol=1e-6)
        assert torch.allclose(model(x), model.head(by_hand), atol=1e-6)
        assert not torch.allclose(pooled, model.fc_norm(tokens.mean(dim=1)), atol=1e-3)  # cls token left out


def test_a_retfound_fine_tuned_file_loads_into_either_head(tmp_path):
    tuned = timm.create_model(VIT, num_classes=5, global_pool="avg").state_dict()
    assert "fc_norm.weight" in tuned and "norm.weight" not in tuned
    path = tmp_path / "checkpoint-best.pth"
    torch.save({"model": tuned, "epoch": 42, "args": _args()}, path)

    model, report = _build(path, size=224)
    assert report.fresh == [] and report.loaded == len(tuned) and "fine-tuned" in report.layout
    assert torch.equal(model.state_dict()["head.weight"], tuned["head.weight"])

    token, report = _build(path, size=224, pool="token")
    assert report.renamed == {"fc_norm.weight": "norm.weight", "fc_norm.bias": "norm.bias"}
    assert torch.equal(token.state_dict()["norm.weight"], tuned["fc_norm.weight"])

    _, report = _build(path, classes=3, size=224)
    assert report.dropped["classifier head of another shape"] == ["head.weight", "head.bias"]
    assert sorted(report.fresh) == ["head.bias", "head.weight"]


def test_dinov2_style_files_load_the_teacher_backbone(tmp_path):
    enc = _encoder(init_values=1e-5)  # layer scale: DINOv2's ls1/ls2.gamma
    assert "blocks.0.ls1.gamma" in enc
    heads = {"dino_head.mlp.0.weight": torch.randn(8, 192), "ibot_head.mlp.0.weight": torch.randn(8, 192)}
    trainer_file = tmp_path / "model_0124999.rank_0.pth"
    torch.save(
        {
            "model": {
                **{f"teacher.backbone.{k}": v for k, v in enc.items()},
                **{f"student.backbone.{k}": v * 0 for k, v in enc.items()},
                **{f"teacher.{k}": v for k, v in heads.items()},
            },
            "iteration": 124999,
        },
        trainer_file,
    )
    released = tmp_path / "RETFound_dinov2_meh.pth"
    torch.save({"teacher": {**{f"backbone.{k}": v for k, v in enc.items()}, **heads}}, released)
    for path in (trainer_file, released):
        cfg = ModelConfig(name=VIT, pretrained=str(path), global_pool="token")
        reports: list[LoadReport] = []
        # timm's ViT with layer scale, as DINOv2 trains it
        model = timm.create_model(VIT, num_classes=4, img_size=224, init_values=1e-5, global_pool="token")
        from retina_dist.models.backbone import load_pretrained

        reports.append(load_pretrained(model, cfg.pretrained))
        report = reports[0]
        assert report.prefix in ("teacher.backbone.", "backbone.")
        assert "DINOv2" in report.layout
        assert torch.equal(model.state_dict()["blocks.1.ls2.gamma"], enc["blocks.1.ls2.gamma"])
        assert sum(len(v) for v in report.dropped.values()) == len(heads) + (
            len(enc) if path == trainer_file else 0
        )


def test_timm_safetensors_and_hf_bin_with_module_prefix(tmp_path):
    published = timm.create_model(VIT, num_classes=1000).state_dict()
    save_file(published, str(tmp_path / "model.safetensors"))
    torch.save({f"module.{k}": v for k, v in published.items()}, tmp_path / "pytorch_model.bin")
    for name in ("model.safetensors", "pytorch_model.bin"):
        model, report = _build(tmp_path / name, size=96, pool="token")
        assert {k: sorted(v) for k, v in report.dropped.items()} == {
            "classifier head of another shape": ["head.bias", "head.weight"]
        }
        assert report.resampled["pos_embed"] == {"from": [14, 14], "to": [6, 6]}
        assert torch.equal(
            model.state_dict()["blocks.0.mlp.fc1.weight"], published["blocks.0.mlp.fc1.weight"]
        )
    assert report.prefix == "module."


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_a_checkpoint_with_a_malicious_global_is_refused_naming_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pth"
    torch.save({"model": _encoder(), "args": _Evil()}, path)
    with pytest.raises(ConfigError, match=r"evil.pth: refused: .*global (posix|os)\.system"):
        _build(path)
    assert not (tmp_path / "pwned").exists()


def test_a_foreign_architecture_is_an_error_listing_keys(tmp_path):
    torch.save(timm.create_model("resnet10t").state_dict(), tmp_path / "r.pth")
    with pytest.raises(ConfigError, match=r"missing \['cls_token'.*unexpected \['conv1"):
        _build(tmp_path / "r.pth")


def test_a_224_checkpoint_fine_tunes_at_another_size_on_two_ranks_and_resumes(mae_file, shards, tmp_path):
    run = tmp_path / "r"
    common = [
        f"data.shards={shards}",
        *TINY,
        f"model.name={VIT}",
        f"model.pretrained={mae_file[0]}",
        "model.global_pool=avg",
        "data.image_size=48",
        "train.epochs=2",
    ]
    run_cli("train", "--run-dir", str(run), "--nproc", "2", *common, "train.max_steps=3")
    report = json.loads((run / "pretrained_report.json").read_text())["loads"][0]
    assert report["resampled"] == {"pos_embed": {"from": [14, 14], "to": [3, 3]}}
    assert report["counts"]["fresh"] == 4
    run_cli("train", "--run-dir", str(run), "--nproc", "2", *common)
    metrics = json.loads((run / "metrics.json").read_text())["val"]
    assert metrics["n"] > 0 and "accuracy" in metrics
    assert (
        "resumed from" in (run / "train.log").read_text() and ", step 3 (" in (run / "train.log").read_text()
    )
