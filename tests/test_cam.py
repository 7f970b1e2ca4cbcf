"""CAM pass: maps for every model type, localisation scores on known cases, exact-once rendering over
2 ranks, lesion localisation of a trained model vs a centre prior, pictures on disk and in TensorBoard."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from pytorch_grad_cam import EigenCAM, GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from retina_dist.cam import localisation
from retina_dist.cam.runner import select
from retina_dist.cam.targets import target_layer, vit_reshape
from retina_dist.models import DualEyeNet, LateFusionNet
from retina_dist.models.backbone import create
from tests.conftest import run_cli

PNG = b"\x89PNG\r\n\x1a\n"


def test_localisation_scores_on_hand_made_cases():
    mask = np.zeros((32, 32), np.uint8)
    mask[8:16, 20:28] = 1
    inside = mask.astype(np.float32)
    assert localisation.score(inside, mask) == {"pointing": 1.0, "energy": 1.0, "iou": 1.0}
    outside = np.zeros((32, 32), np.float32)
    outside[24:30, 2:8] = 1.0
    assert localisation.score(outside, mask) == {"pointing": 0.0, "energy": 0.0, "iou": 0.0}
    half = inside.copy()
    half[24:32, 0:8] = 1.0  # as much energy outside as inside
    assert localisation.energy_in_mask(half, mask) == pytest.approx(0.5)
    centre = localisation.centre_baseline((32, 32))
    assert centre.argmax() in (15 * 32 + 15, 15 * 32 + 16, 16 * 32 + 15, 16 * 32 + 16)


@pytest.mark.parametrize("name", ["resnet10t", "convnext_atto", "tf_efficientnet_b0", "vit_tiny_patch16_224"])
def test_gradcam_maps_for_cnns_and_vit(name):
    torch.manual_seed(0)
    size = 224 if "vit" in name else 64
    model = create(name, 3, 3).eval()
    cam = GradCAM(model=model, target_layers=[target_layer(model)], reshape_transform=vit_reshape(model))
    out = cam(input_tensor=torch.randn(2, 3, size, size), targets=[ClassifierOutputTarget(1)] * 2)
    assert out.shape == (2, size, size) and out.min() >= 0 and out.max() <= 1 + 1e-6


def test_eigencam_per_eye_and_per_modality():
    torch.manual_seed(0)
    dual = DualEyeNet(create("convnext_atto", 0, 3), 8, 32, 4).eval()
    fusion = LateFusionNet(create("resnet10t", 0, 3), create("resnet10t", 0, 3), 2).eval()
    x = torch.randn(2, 2, 3, 64, 64)
    for encoder in (dual.backbone, fusion.fundus, fusion.oct):
        cam = EigenCAM(model=encoder, target_layers=[target_layer(encoder)])
        for view in (0, 1):
            out = cam(input_tensor=x[:, view], targets=None)
            assert out.shape == (2, 64, 64) and 0 <= out.min() and out.max() <= 1 + 1e-6


def test_selection_is_deterministic_and_filters():
    preds = {f"k{i}": (i % 3, np.eye(3)[(i + (i % 2)) % 3]) for i in range(12)}
    errors = select(preds, "errors", 0, False)
    assert errors == sorted(k for k, (t, p) in preds.items() if p.argmax() != t)
    assert select(preds, "per-class:1", 0, False) == ["k0", "k1", "k11"]  # sorted keys, first of each class
    assert select(preds, "all", 5, False) == sorted(preds)[:5]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, scratch):
    root = tmp_path_factory.mktemp("cam")
    run_cli(
        "pack",
        "synthetic",
        "--out",
        str(root / "shards"),
        "--n",
        "600",
        "--image-size",
        "128",
        "--workers",
        "2",
        "--seed",
        "1",
    )
    run = root / "run"
    run_cli(
        "train",
        "--nproc",
        "2",
        f"run_dir={run}",
        f"data.shards={root / 'shards'}",
        "model.name=resnet10t",
        "data.image_size=96",
        "train.epochs=6",
        "optim.lr=3e-3",
        "train.batch_size=16",
        "data.workers=1",
        "log.progress=lines",
    )
    return run


def _index(run):
    with open(run / "cam" / "val" / "index.csv") as fh:
        return list(csv.DictReader(fh))


def test_each_selected_sample_is_rendered_once_across_two_ranks(trained):
    run_cli(
        "cam",
        "--run-dir",
        str(trained),
        "--nproc",
        "2",
        "--select",
        "all",
        "--limit",
        "13",
        "--target-layer",
        "layer3",
    )
    two = _index(trained)
    assert len(two) == 13 and len({r["key"] for r in two}) == 13  # odd count, split over 2 ranks
    for r in two:
        assert (trained / "cam" / "val" / r["file"]).read_bytes()[:8] == PNG
        assert r["file"].endswith("_gradcam.png") and "_true" in r["file"] and "_pred" in r["file"]
    run_cli("cam", "--run-dir", str(trained), "--select", "all", "--limit", "13", "--target-layer", "layer3")
    one = _index(trained)
    assert [r["file"] for r in one] == [r["file"] for r in two]  # 1 rank renders the same set
    assert "<img" in (trained / "cam" / "val" / "index.html").read_text()


def test_trained_model_points_at_lesions_better_than_a_centre_prior(trained):
    run_cli(
        "cam",
        "--run-dir",
        str(trained),
        "--nproc",
        "2",
        "--select",
        "all",
        "--limit",
        "60",
        "--target-layer",
        "layer3",
    )
    loc = json.loads((trained / "cam" / "val" / "summary.json").read_text())["localisation"]
    assert loc["n"] >= 30
    # Measured here: pointing 0.21 vs 0.06 and energy in lesions 0.096 vs 0.069.
    assert loc["cam_pointing"] >= loc["centre_pointing"] + 0.08, loc
    assert loc["cam_energy"] >= 1.15 * loc["centre_energy"], loc
    assert set(loc["per_class"]) <= {"mild", "moderate", "severe", "proliferative"}

    acc = EventAccumulator(str(trained / "tb"), size_guidance={"images": 0})
    acc.Reload()
    assert "val/cam_gradcam" in acc.Tags()["images"]
    assert acc.Images("val/cam_gradcam")[-1].encoded_image_string[:8] == PNG
    assert "val/cam/cam_pointing" in acc.Tags()["scalars"]
