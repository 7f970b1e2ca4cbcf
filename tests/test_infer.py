"""Using a trained run: predict on folders and zips (a corrupt and a foreign file among them), the
same pixels as the shard stream, exported models that agree with PyTorch, and the model card."""

from __future__ import annotations

import csv
import json
import re
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import TINY, png_bomb, run_cli, with_png_chunk

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, scratch) -> Path:
    run_dir = tmp_path_factory.mktemp("infer") / "run"
    run_cli(
        "run",
        "--smoke",
        "--run-dir",
        str(run_dir),
        *TINY,
        "data.image_size=48",
        "cam.enabled=false",
        "train.epochs=2",
    )
    return run_dir


@pytest.fixture(scope="module")
def images(tmp_path_factory, scratch) -> Path:
    """APTOS-layout PNGs at 3x the model's input, a truncated PNG and a text file among them."""
    from retina_dist.data.synthetic.layouts import synth

    src = synth("aptos", tmp_path_factory.mktemp("aptos") / "src", n=12, size=144, seed=3)
    folder = src / "train_images"
    first = sorted(folder.glob("*.png"))[0]
    (folder / "broken.png").write_bytes(first.read_bytes()[:300])
    (folder / "notes.txt").write_text("not an image")
    return folder


def _read(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_predict_folder_and_zip_skips_corrupt_and_foreign_files(trained, images, tmp_path):
    archive = tmp_path / "batch.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for f in sorted(images.iterdir()):
            zf.write(f, f"inner/{f.name}")
    out = tmp_path / "preds.csv"
    proc = run_cli(
        "predict",
        "--run",
        str(trained),
        str(images),
        str(archive),
        "--out",
        str(out),
        "--cam",
        "--batch",
        "5",
    )
    good = sorted(p.name for p in images.glob("*.png") if p.name != "broken.png")
    rows = _read(out)
    assert len(rows) == 2 * len(good) == 24
    names = [r["name"] for r in rows]
    assert [Path(n).name for n in names[:12]] == good and all(
        n.startswith(f"{archive}:inner/") for n in names[12:]
    )
    skipped = {
        (Path(r["name"].split(":")[-1]).name, r["reason"].split(" (")[0])
        for r in _read(out.with_name("preds.skipped.csv"))
    }
    assert skipped == {("broken.png", "cannot be decoded"), ("notes.txt", "not an image file type")}
    assert (
        len(_read(out.with_name("preds.skipped.csv"))) == 4
    )  # each bad file once from the folder, once from the zip
    assert "skipped 4" in proc.stderr and "predicted 24" in proc.stdout
    classes = json.loads((trained / "manifest.json").read_text())["task"]["classes"]
    probs = np.array([[float(r[f"prob_{c}"]) for c in classes] for r in rows])
    np.testing.assert_allclose(probs.sum(1), 1, atol=1e-5)
    np.testing.assert_allclose(probs[:12], probs[12:], atol=1e-6)  # the same bytes from a zip or a folder
    assert [r["predicted"] for r in rows] == [classes[i] for i in probs.argmax(1)]
    cams = [Path(r["cam"]) for r in rows]
    assert all(c.exists() and c.stat().st_size > 500 for c in cams) and len(set(cams)) == 24


def test_predict_explains_each_image_by_the_method_asked_on_the_image_as_stored(trained, images, tmp_path):
    from retina_dist.cam.render import MIN_PANEL
    from retina_dist.data.codec import decode

    pictures = {}
    for method in ("ig", "gradcam"):
        out = tmp_path / f"{method}.csv"
        run_cli("predict", "--run", str(trained), str(images), "--out", str(out), "--explain", method)
        rows = _read(out)
        assert len(rows) == 12 and all(Path(r["cam"]).parent == tmp_path / f"{method}_cam" for r in rows)
        pictures[method] = decode(Path(rows[0]["cam"]).read_bytes())
    k = -(-MIN_PANEL // 144)  # the images are 144 px (the model saw 48): image | overlay, enlarged k x
    for pic in pictures.values():
        assert pic.shape[0] > 144 * k and pic.shape[1] > 2 * 144 * k
    assert pictures["ig"].shape == pictures["gradcam"].shape
    assert np.abs(pictures["ig"].astype(int) - pictures["gradcam"].astype(int)).mean() > 1  # other maps
    proc = run_cli("predict", "--run", str(trained), str(images), "--explain", "shap", check=False)
    assert proc.returncode == 2 and "--explain 'shap'" in proc.stderr and "ig" in proc.stderr


def test_predict_sees_the_pixels_the_stream_sees_and_applies_the_temperature(trained, images, tmp_path):
    from retina_dist import calibration
    from retina_dist.data.codec import decode
    from retina_dist.data.manifest import load_manifest, split_shards
    from retina_dist.data.pack import PackOptions, pack
    from retina_dist.data.sources import build_source
    from retina_dist.data.stream import StreamSpec, make_loader
    from retina_dist.infer.predictor import Predictor

    p = Predictor(trained, tta=False)
    out = tmp_path / "shards"
    pack(
        build_source("aptos", src=images.parent),
        out,
        PackOptions(val_frac=0.0, min_shards=1),
        workers=1,
        progress=False,
    )
    spec = StreamSpec(tuple(split_shards(out, load_manifest(out), "train")), 4, p.image_size, p.in_chans)
    seen = 0
    for batch in make_loader(spec, 0, 1, 0):
        for key, streamed in zip(batch["key"], batch["image"].numpy(), strict=True):
            mine = p.prepare([decode((images / f"{key.split('/')[-1]}.png").read_bytes())])
            np.testing.assert_array_equal(mine, streamed)  # no train/inference skew, to the pixel
            seen += 1
    assert seen == 12
    x = np.stack([p.prepare([decode(f.read_bytes())]) for f in sorted(images.glob("*.png"))[1:4]])
    assert p.temperature != 1.0  # fitted on val by the run
    with torch.no_grad():
        xin = p.inputs.images(torch.from_numpy(x))
        raw = torch.softmax(p.model(xin), 1).numpy()
    np.testing.assert_allclose(
        p.probabilities(x), calibration.apply_temperature(raw, p.temperature, False), atol=1e-6
    )


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_export_matches_pytorch_and_writes_a_model_card(trained, images, tmp_path, fmt):
    from retina_dist.data.codec import decode
    from retina_dist.infer.predictor import Predictor

    out = tmp_path / ("m.onnx" if fmt == "onnx" else "m.pt")
    proc = run_cli("export", "--run", str(trained), "--format", fmt, "--out", str(out))
    report = json.loads(proc.stdout[proc.stdout.index("{") :])
    assert report["max_abs_diff"] <= 1e-4 and report["batch"] == 3
    p = Predictor(trained, tta=False)
    x = np.stack([p.prepare([decode(f.read_bytes())]) for f in sorted(images.glob("*.png"))[:5]])
    expected = p.probabilities(x)
    if fmt == "onnx":
        import onnxruntime as ort

        got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(
            None, {"image": x.astype(np.float32)}
        )[0]
    else:
        got = torch.jit.load(str(out))(torch.from_numpy(x).float()).detach().numpy()
    assert got.shape == (5, 5)
    np.testing.assert_allclose(got, expected, atol=1e-4)  # batch 5: another size than the export's
    card = json.loads((tmp_path / "model_card.json").read_text())
    assert card["classes"] == list(p.task.classes) and card["file"] == out.name
    assert card["calibration"]["fitted_on"] == "val" and card["calibration"]["temperature"] == p.temperature
    assert card["metrics"]["val"]["n"] == json.loads((trained / "metrics.json").read_text())["val"]["n"]
    assert any("synthetic" in c for c in card["caveats"])
    assert "## Caveats" in (tmp_path / "MODEL_CARD.md").read_text()


def test_predict_pairs_for_a_two_view_model(tmp_path):
    from retina_dist.infer.inputs import collect

    for name in ("p1_left.jpg", "p1_right.jpg", "p2_LEFT.png", "p2_right.png", "p3_left.jpg", "scan.jpg"):
        (tmp_path / name).write_bytes(b"x")
    samples, skipped = collect([str(tmp_path)], ("left", "right"))
    assert [(Path(s.name).name, [Path(v.name).name for v in s.views]) for s in samples] == [
        ("p1", ["p1_left.jpg", "p1_right.jpg"]),
        ("p2", ["p2_LEFT.png", "p2_right.png"]),
    ]
    assert sorted((Path(s.name).name, s.reason.split(" ")[0]) for s in skipped) == [
        ("p3_left.jpg", "no"),
        ("scan.jpg", "name"),
    ]
    explicit, _ = collect(
        [], ("left", "right"), ([str(tmp_path / "p1_left.jpg")], [str(tmp_path / "p2_right.png")])
    )
    assert [Path(v.name).name for v in explicit[0].views] == ["p1_left.jpg", "p2_right.png"]
    with pytest.raises(ValueError, match="pairs must match"):
        collect([], ("left", "right"), ([str(tmp_path / "p1_left.jpg")], []))


HOSTILE_NAMES = ["a b.png", "ü ñ 眼底.png", "new\nline.png", "<img src=x onerror=alert(1)>.png"]


def test_predict_handles_hostile_names_bombs_and_huge_metadata(trained, images, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    png = sorted(images.glob("*.png"))[1].read_bytes()
    for name in HOSTILE_NAMES:
        (folder / name).write_bytes(png)
    (folder / "bomb.png").write_bytes(png_bomb(20000, 20000))
    rng = np.random.default_rng(0)
    icc = b"x\0\0" + zlib.compress(rng.bytes(4 << 20), 1)  # a 4 MB (incompressible) ICC profile
    exif = b"MM\0*" + rng.bytes(2 << 20)
    (folder / "icc.png").write_bytes(with_png_chunk(png, b"iCCP", icc))
    (folder / "exif.png").write_bytes(with_png_chunk(png, b"eXIf", exif))
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("../../escaped.png", png)
        zf.writestr("/abs/escaped.png", png)
    out = tmp_path / "out" / "preds.csv"
    out.parent.mkdir()
    before = set(tmp_path.rglob("*"))
    run_cli("predict", "--run", str(trained), str(folder), str(archive), "--out", str(out), "--cam")

    rows = {Path(r["name"]).name if ":" not in r["name"] else r["name"]: r for r in _read(out)}
    for name in [*HOSTILE_NAMES, "icc.png", "exif.png"]:  # every name read back exactly, CSV-quoted
        assert name in rows, (name, sorted(rows))
    probs = {n: [v for k, v in r.items() if k.startswith("prob_")] for n, r in rows.items()}
    assert probs["icc.png"] == probs["exif.png"] == probs["a b.png"]  # metadata changes no pixel
    assert f"{archive}:../../escaped.png" in rows and f"{archive}:/abs/escaped.png" in rows
    skipped = {Path(r["name"]).name: r["reason"] for r in _read(out.with_name("preds.skipped.csv"))}
    assert list(skipped) == ["bomb.png"] and "decompression bomb" in skipped["bomb.png"]
    # CAM files only in <out>_cam, with names made safe; nothing written anywhere else.
    new = set(tmp_path.rglob("*")) - before
    cam_dir = out.with_name("preds_cam")
    assert {p for p in new if p.parent != cam_dir} == {cam_dir, out, out.with_name("preds.skipped.csv")}
    assert all(re.fullmatch(r"\d{6}_[A-Za-z0-9.+-]+\.png", p.name) for p in new if p.parent == cam_dir)
    assert not (tmp_path / "escaped.png").exists() and not Path("/abs").exists()
