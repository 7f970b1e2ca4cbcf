"""Models, losses and metrics at small size: shapes, the dual-eye attention, frozen fusion encoders,
local weight files, and every metric against scikit-learn on the same arrays."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn import metrics as skm

from retina_dist import losses, metrics
from retina_dist.config import ConfigError, ModelConfig, load_config
from retina_dist.engine.optim import build_optimizer
from retina_dist.models import DualEyeNet, LateFusionNet, build_model
from retina_dist.models.backbone import create

PRESETS = [
    "synthetic",
    "aptos_effnet_b0",
    "kermany_resnet18",
    "octmnist_cnn",
    "odir_dual_convnext_s384",
    "rfmid_effnet_b0",
    "fusion_late",
    "fusion_multiclass",
    "oct2017_vit",
]
CLASSES = {
    "synthetic": 5,
    "aptos_effnet_b0": 5,
    "kermany_resnet18": 4,
    "octmnist_cnn": 4,
    "odir_dual_convnext_s384": 8,
    "rfmid_effnet_b0": 29,
    "fusion_late": 2,
    "fusion_multiclass": 9,
    "oct2017_vit": 4,
}


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_model_runs_forward_and_backward(preset):
    cfg = load_config(preset)
    m = cfg.model
    m.fundus_encoder = m.oct_encoder = ""  # no earlier runs here: randomly initialised, frozen
    if m.name == "convnext_small":  # the reference backbone, small stand-in for speed
        m.name = "convnext_atto"
    if m.arch == "late_fusion":
        m.fundus_name = m.oct_name = "resnet10t"
    size = 224 if "vit" in m.name else 28 if m.name == "small_cnn" else 64
    model = build_model(m, CLASSES[preset], cfg.data.in_chans)
    views = 2 if m.arch != "single" else 0
    shape = (2, views, cfg.data.in_chans, size, size) if views else (2, cfg.data.in_chans, size, size)
    out = model(torch.randn(shape))
    assert out.shape == (2, CLASSES[preset])
    out.sum().backward()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None for p in trainable)


def test_reference_dual_eye_backbone_is_convnext_small_size():
    cfg = load_config("odir_dual_convnext_s384")
    backbone = create(cfg.model.name, 0, 3)
    n = sum(p.numel() for p in backbone.parameters())
    assert 49e6 < n < 51e6  # ~50M backbone params, as the reference run


def _dual(seed=0) -> DualEyeNet:
    torch.manual_seed(seed)
    return DualEyeNet(create("convnext_atto", 0, 3), 8, embed_dim=64, heads=8).eval()


def test_each_eye_attends_to_the_other():
    model = _dual()
    x = torch.randn(2, 2, 3, 64, 64)
    base = model.encode(x)
    tokens = base["left"].shape[1]
    assert base["attn_left_to_right"].shape == (2, tokens, tokens)
    assert torch.allclose(base["attn_left_to_right"].sum(-1), torch.ones(2, tokens), atol=1e-5)
    y = x.clone()
    y[:, 1] = torch.randn_like(y[:, 1])  # change the right eye only
    moved = model.encode(y)
    assert torch.allclose(moved["left"], base["left"], atol=1e-5)  # the left eye's own view is unchanged
    assert not torch.allclose(
        moved["left_from_right"], base["left_from_right"], atol=1e-3
    )  # what it sees is not


def test_swapping_eyes_swaps_the_cross_attention_when_projections_match():
    model = _dual()
    model.proj["right"].load_state_dict(model.proj["left"].state_dict())
    x = torch.randn(2, 2, 3, 64, 64)
    a, b = model.encode(x), model.encode(x.flip(1))
    assert torch.allclose(a["left_from_right"], b["right_from_left"], atol=1e-5)
    assert torch.allclose(a["attn_left_to_right"], b["attn_right_to_left"], atol=1e-6)


def test_late_fusion_trains_the_head_and_leaves_the_encoders_alone(tmp_path):
    torch.manual_seed(0)
    fundus = create("resnet10t", 0, 3)
    oct_ = create("resnet10t", 4, 1)
    torch.save({"model": oct_.state_dict()}, tmp_path / "oct.pt")  # a Kermany run's 1-channel checkpoint
    torch.save(fundus.state_dict(), tmp_path / "fundus.pth")
    cfg = ModelConfig(
        arch="late_fusion",
        fundus_name="resnet10t",
        fundus_encoder=str(tmp_path / "fundus.pth"),
        oct_name="resnet10t",
        oct_encoder=str(tmp_path / "oct.pt"),
        embed_dim=32,
    )
    model = build_model(cfg, 2, 3)
    assert isinstance(model, LateFusionNet) and model.oct_in_chans == 1
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = build_optimizer(model, 1e-2, 0.0)
    model.train()
    for _ in range(3):
        loss = torch.nn.functional.cross_entropy(
            model(torch.randn(4, 2, 3, 48, 48)), torch.tensor([0, 1, 0, 1])
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = model.state_dict()
    enc = [k for k in after if k.startswith(("fundus.", "oct."))]
    assert enc and all(torch.equal(before[k], after[k]) for k in enc)  # weights and BN statistics
    assert any(not torch.equal(before[k], after[k]) for k in after if k.startswith("head."))


def test_local_weights_load_with_a_new_head(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(1)
    src = create("resnet10t", 5, 3)
    save_file(src.state_dict(), str(tmp_path / "w.safetensors"))
    torch.save(src.state_dict(), tmp_path / "w.pth")
    for name in ("w.safetensors", "w.pth"):
        model = build_model(ModelConfig(name="resnet10t", pretrained=str(tmp_path / name)), 29, 3)
        assert torch.equal(model.conv1[0].weight, src.conv1[0].weight)
        assert model.fc.weight.shape == (29, 512)  # head re-initialised for the new task


def test_mismatching_weights_file_lists_the_keys(tmp_path):
    torch.save(create("resnet18", 5, 3).state_dict(), tmp_path / "r18.pth")
    with pytest.raises(ConfigError, match=r"r18\.pth: weights do not match ResNet: missing \[") as err:
        build_model(ModelConfig(name="resnet10t", pretrained=str(tmp_path / "r18.pth")), 5, 3)
    assert "shape mismatch ['conv1" in str(err.value) or "conv1" in str(err.value)


def test_backbone_learns_at_a_fraction_of_the_lr():
    model = _dual()
    opt = build_optimizer(model, 5e-5, 2e-5, backbone_lr_mult=0.1)
    backbone = {id(p) for p in model.backbone.parameters()}
    for g in opt.param_groups:
        in_backbone = {id(p) in backbone for p in g["params"]}
        assert len(in_backbone) == 1
        assert g["lr"] == pytest.approx(5e-6 if in_backbone.pop() else 5e-5)


# -- losses -------------------------------------------------------------------------------------
def test_pos_weight_is_negatives_over_positives():
    w = losses.pos_weight_from_histogram({"a": 10, "b": 90, "c": 0}, 100, ("a", "b", "c"))
    assert w.tolist() == pytest.approx([9.0, 10 / 90, 1.0])


def test_focal_losses_match_their_formulas():
    torch.manual_seed(0)
    logits, target = torch.randn(6, 3), torch.randint(0, 2, (6, 3)).float()
    p = torch.sigmoid(logits)
    pt = torch.where(target == 1, p, 1 - p)
    at = torch.where(target == 1, 0.3, 0.7)
    manual = (-at * (1 - pt) ** 2.5 * torch.log(pt)).mean()
    assert losses.sigmoid_focal(logits, target, 0.3, 2.5).item() == pytest.approx(manual.item(), rel=1e-5)
    assert losses.sigmoid_focal(logits, target, 0.5, 0.0).item() == pytest.approx(
        0.5 * torch.nn.functional.binary_cross_entropy_with_logits(logits, target).item(), rel=1e-5
    )
    y = torch.tensor([0, 2, 1, 1, 0, 2])
    pt = torch.softmax(logits, 1)[torch.arange(6), y]
    assert losses.softmax_focal(logits, y, 1.0, 2.0).item() == pytest.approx(
        (-((1 - pt) ** 2) * pt.log()).mean().item(), rel=1e-5
    )


def test_hybrid_loss_is_half_weighted_bce_half_focal():
    from retina_dist.data.manifest import Manifest
    from retina_dist.tasks import build_task

    manifest = Manifest.from_dict(
        {
            "task": {"type": "multilabel", "classes": ["a", "b"]},
            "splits": {"train": {"count": 10, "histogram": {"a": 2, "b": 5}, "shards": []}},
        }
    )
    cfg = load_config("odir_dual_convnext_s384").optim
    task = build_task(manifest, cfg)
    assert task.pos_weight.tolist() == pytest.approx([4.0, 1.0])
    logits, target = torch.randn(5, 2), torch.randint(0, 2, (5, 2)).float()
    bce = torch.nn.functional.binary_cross_entropy_with_logits(
        logits, target, pos_weight=torch.tensor([4.0, 1.0])
    )
    expected = 0.5 * bce + 0.5 * losses.sigmoid_focal(logits, target, 0.3, 2.5)
    assert task.loss(logits, target).item() == pytest.approx(expected.item(), rel=1e-6)


# -- metrics ------------------------------------------------------------------------------------
def test_multilabel_metrics_match_sklearn():
    rng = np.random.default_rng(0)
    classes = ("Disease_Risk", "DR", "MH", "OTHER")
    y = rng.integers(0, 2, size=(60, 4))
    p = np.clip(y * 0.6 + rng.random((60, 4)) * 0.5, 0, 1)
    m = metrics.multilabel(y, p, classes)
    pred = (p > 0.5).astype(int)
    assert m["micro_f1"] == pytest.approx(skm.f1_score(y, pred, average="micro"))
    assert m["macro_f1"] == pytest.approx(skm.f1_score(y, pred, average="macro"))
    assert m["macro_auroc"] == pytest.approx(skm.roc_auc_score(y, p, average="macro"))
    assert m["mAP"] == pytest.approx(skm.average_precision_score(y, p, average="macro"))
    assert m["riadd_risk_auroc"] == pytest.approx(skm.roc_auc_score(y[:, 0], p[:, 0]))
    assert "odir_final" not in m  # not ODIR's label set
    assert m["excluded"]["macro_auroc"] == {} and m["undefined"] == {}


def test_multiclass_metrics_match_sklearn():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 5, 80)
    p = rng.dirichlet(np.ones(5), 80)
    p[np.arange(80), y] += 0.5
    p /= p.sum(1, keepdims=True)
    m = metrics.multiclass(y, p, tuple("abcde"))
    pred = p.argmax(1)
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
    assert m["qwk"] == pytest.approx(skm.cohen_kappa_score(y, pred, weights="quadratic"))
    assert m["macro_auroc"] == pytest.approx(skm.roc_auc_score(y, p, multi_class="ovr"))


def test_expected_calibration_error_on_known_cases():
    conf = np.array([0.9] * 10)
    assert metrics.expected_calibration_error(conf, np.array([1.0] * 9 + [0.0])) == pytest.approx(0.0)
    assert metrics.expected_calibration_error(conf, np.zeros(10)) == pytest.approx(0.9)
    conf = np.array([0.2, 0.2, 0.8, 0.8])
    correct = np.array([0.0, 0.0, 1.0, 1.0])
    assert metrics.expected_calibration_error(conf, correct) == pytest.approx(0.5 * 0.2 + 0.5 * 0.2)


def test_compiled_model_matches_eager_and_keeps_checkpoint_keys():
    torch.manual_seed(0)
    eager = build_model(ModelConfig(name="resnet10t"), 5, 3).eval()
    compiled = build_model(ModelConfig(name="resnet10t", compile=True), 5, 3).eval()
    compiled.load_state_dict(eager.state_dict())  # same keys: no "_orig_mod." prefix
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(compiled(x), eager(x), atol=1e-4)
