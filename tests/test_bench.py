"""`retina-dist bench` runs every subcommand at a tiny size and writes well-formed JSON with positive
figures. No speed is asserted here: speeds are what the command reports."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import run_cli


def _positive(obj, path=""):
    if isinstance(obj, dict):
        for k, v in obj.items():
            _positive(v, f"{path}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            _positive(v, f"{path}[{i}]")
    elif isinstance(obj, float):
        assert obj > 0, f"{path} = {obj}"


def test_bench_all_at_tiny_size(tmp_path):
    proc = run_cli(
        "bench",
        "all",
        "--out",
        str(tmp_path),
        "--n",
        "12",
        "--height",
        "80",
        "--image-size",
        "48",
        "--batch",
        "4",
        "--batches",
        "2",
        "--steps",
        "2",
        "--model",
        "resnet10t",
        "--workers",
        "1",
        "2",
        timeout=900,
    )
    for title in ("bench data", "bench step", "bench eval", "bench pack"):
        assert title in proc.stdout
    data = json.loads((tmp_path / "data.json").read_text())
    assert [r["workers"] for r in data["rows"]] == [1, 2]
    for r in data["rows"]:
        assert r["stream_over_baseline"] == r["stream_img_s"] / r["baseline_img_s"]
        peer = {name: r[f"{name}_img_s"] for name in ("timm", "webdataset", "torchvision")}
        assert r["best_peer"] == max(peer, key=peer.get)
        assert r["stream_over_best_peer"] == r["stream_img_s"] / peer[r["best_peer"]]
        assert (
            r["device_augment_stream_over_bare_decode"]
            == r["stream_device_augment_img_s"] / r["bare_decode_img_s"]
        )
    assert f"augmentation on the device ({data['device']})" in proc.stdout
    step = json.loads((tmp_path / "step.json").read_text())
    assert step["toolkit_over_bare"] == step["toolkit_img_s"] / step["bare_img_s"]
    assert step["scaling_efficiency_2"] == step["two_ranks_img_s"] / (2 * step["one_rank_img_s"])
    # resnet10t: 2.19 GFLOP at 224 px, so about 2.19 x (48/224)^2 = 0.10 at 48 px
    assert 0.08 < step["forward_gflop_per_image"] < 0.14
    expected = step["toolkit_img_s"] * 3 * step["forward_gflop_per_image"] / 1e3
    assert abs(step["achieved_tflop_s"] - expected) < 1e-9 * max(1.0, expected)
    evaluation = json.loads((tmp_path / "eval.json").read_text())
    packing = json.loads((tmp_path / "pack.json").read_text())
    assert evaluation["n"] == 48 and {r["processes"] for r in packing["rows"]} >= {1}
    for res in (data, step, evaluation, packing):
        _positive(res)


def test_bench_step_channels_last_applies_to_both_loops(tmp_path):
    proc = run_cli(
        "bench",
        "step",
        "--out",
        str(tmp_path),
        "--image-size",
        "32",
        "--batch",
        "4",
        "--steps",
        "2",
        "--model",
        "resnet10t",
        "--channels-last",
        timeout=600,
    )
    assert "channels_last" in proc.stdout
    step = json.loads((tmp_path / "step.json").read_text())
    assert step["channels_last"] is True and step["compile"] is False
    _positive(step)
    assert step["toolkit_over_bare"] == step["toolkit_img_s"] / step["bare_img_s"]


def test_peer_loaders_read_the_stream_s_bytes_and_batch_at_the_same_size(shards, tmp_path):
    from retina_dist.bench import peers
    from retina_dist.data.manifest import load_manifest, split_shards
    from retina_dist.data.sample_format import image_member
    from retina_dist.data.stream.shard_reader import read_samples

    paths = [p for p, _ in split_shards(shards, load_manifest(shards), "train")]
    tree = peers.export_tree(paths, tmp_path / "tree")
    files = {f.stem: f.read_bytes() for f in tree.rglob("*") if f.is_file()}
    samples = list(read_samples(paths))
    assert len(files) == len(samples)
    for sample in samples:  # the same bytes, unchanged
        assert files[sample["__key__"].replace("/", "_")] == sample[image_member(sample, "img", True)]
    for name in peers.PEERS:
        batch = next(peers.loader(name, paths, tree, 40, 6, 1))[0]
        assert tuple(batch.shape) == (6, 3, 40, 40), name
        assert batch.dtype == (torch.float32 if name == "timm" else torch.uint8), name  # timm: normalised


def test_bench_scale_at_1k_packs_streams_and_evaluates_kermany_sized_images(tmp_path):
    """The CI size of `bench scale`: 1,000 Kermany-layout B-scans of 496 rows; the 10k and 84k rows
    of the README come from the same command run by hand."""
    from retina_dist.data.manifest import load_manifest

    proc = run_cli(
        "bench",
        "scale",
        "--out",
        str(tmp_path),
        "--sizes",
        "1000",
        "--image-size",
        "64",
        "--batch",
        "32",
        timeout=900,
    )
    assert "bench scale" in proc.stdout
    res = json.loads((tmp_path / "scale.json").read_text())
    (row,) = res["rows"]
    shards = tmp_path / "work" / "scale" / "shards-1000"
    m = load_manifest(shards)
    assert row["n"] == 1000 == sum(s.count for s in m.splits.values())
    # one epoch: whole batches of 32, no image twice (the remainder goes to the next epoch)
    assert row["train_images"] == m.splits["train"].count // 32 * 32
    assert row["test_images"] == m.splits["test"].count  # exact-once evaluation, asserted inside too
    assert row["shards"] == len(list(shards.glob("*.tar"))) and row["manifest_kib"] > 1
    assert abs(row["pack_speedup"] - row["pack_img_s"] / row["pack_1core_img_s"]) < 1e-9
    # Kermany's widths at its 496 rows (512, 768 or 1024 px), grey, stored at the default max side 512
    from retina_dist.data.codec import decode
    from retina_dist.data.sample_format import image_member
    from retina_dist.data.stream.shard_reader import read_samples

    shapes = set()
    for sample in read_samples([str(p) for p in sorted(shards.glob("*.tar"))[:3]]):
        img = decode(sample[image_member(sample, "img", True)], sample["__key__"])
        assert img.ndim == 2
        shapes.add(img.shape)
    assert shapes <= {(496, 512), (331, 512), (248, 512)} and (496, 512) in shapes
    _positive(res)


def test_bench_step_memory_per_strategy_counts_what_each_rank_holds(tmp_path):
    args = ["--image-size", "32", "--batch", "2", "--steps", "1", "--model", "convnext_atto"]
    proc = run_cli("bench", "step", "--out", str(tmp_path), *args, "--strategies", "ddp", "fsdp")
    assert "memory per rank: convnext_atto" in proc.stdout
    res = json.loads((tmp_path / "step-memory.json").read_text())
    ddp, fsdp = res["rows"]
    assert (ddp["strategy"], fsdp["strategy"]) == ("ddp", "fsdp")
    # Between steps a DDP rank keeps fp32 weights and AdamW's two moments, whole: 12 bytes a parameter;
    # FSDP's rank keeps its half of each (a few padding rows apart).
    assert ddp["held_state_mib_per_rank"] == pytest.approx(ddp["params_m"] * 1e6 * 12 / 2**20, rel=1e-4)
    assert fsdp["held_over_ddp"] == pytest.approx(0.5, abs=0.01)
    assert fsdp["held_over_ddp"] == fsdp["held_state_mib_per_rank"] / ddp["held_state_mib_per_rank"]
    for r in res["rows"]:
        assert r["peak_mib_per_rank"] > 0 and r["step_s"] > 0
