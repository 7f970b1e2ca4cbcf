"""Every listed layout version of every dataset, written by `synth`, packed from folder and archive,
streamed; and the bad inputs each get a clear error or a count, never a crash."""

from __future__ import annotations

import csv
import io
import json
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest

from retina_dist.data.manifest import DataError, Manifest, load_manifest, split_shards, verify
from retina_dist.data.pack import PackOptions, pack
from retina_dist.data.sources import build_source
from retina_dist.data.sources.archive import resolve_src
from retina_dist.data.sources.common import read_xlsx
from retina_dist.data.stream import StreamSpec, make_loader
from retina_dist.data.synthetic.layouts import synth
from tests.conftest import run_cli

OPTS = PackOptions(shard_size=16, min_shards=2, max_side=56, seed=3)


def _pack(dataset: str, src: Path, out: Path, **opts) -> Manifest:
    source = build_source(dataset, src=resolve_src(src, out.parent / f"{out.name}-x"), **opts)
    return pack(source, out, OPTS, workers=1, progress=False)


def _records(out: Path) -> dict[str, dict]:
    """key -> the sample's json, read straight from the tar shards."""
    recs = {}
    for shard in sorted(out.glob("*.tar")):
        with tarfile.open(shard) as tf:
            for m in tf.getmembers():
                if m.name.endswith(".json"):
                    rec = json.loads(tf.extractfile(m).read())
                    recs[rec["key"]] = rec
    return recs


def _stream_one(out: Path, m: Manifest) -> dict:
    spec = StreamSpec(
        tuple(split_shards(out, m, "train")),
        batch_size=4,
        image_size=32,
        train=True,
        views=tuple(m.views),
        multilabel=m.task["type"] == "multilabel",
    )
    return next(iter(make_loader(spec, 0, 1, 0, num_batches=1)))


def _disjoint(m: Manifest) -> None:
    assert m.patient_overlap and all(v == 0 for v in m.patient_overlap.values()), m.patient_overlap


LAYOUTS = [
    ("aptos", "kaggle", 24, {}),
    ("kermany", "kaggle", 30, {}),
    ("kermany", "mendeley-v2", 30, {}),
    ("kermany", "mendeley-v3", 30, {}),
    ("octmnist", "medmnist", 32, {}),
    ("odir", "official", 16, {}),
    ("odir", "oia-odir", 16, {}),
    ("odir", "kaggle", 16, {}),
    ("odir", "kaggle-full_df", 16, {}),
    ("rfmid", "original", 24, {"columns": 47}),
    ("rfmid", "kaggle", 24, {"columns": 30}),
    ("rfmid", "dataport", 24, {"columns": 47}),
]


@pytest.mark.parametrize(
    ("dataset", "version", "n", "extra"), LAYOUTS, ids=[f"{d}-{v}" for d, v, _, _ in LAYOUTS]
)
def test_every_layout_version_packs_and_streams(dataset, version, n, extra, tmp_path):
    src = synth(dataset, tmp_path / "src", n=n, size=48, seed=1, version=version, **extra)
    m = _pack(dataset, src, tmp_path / "shards")
    total = sum(s.count for s in m.splits.values())
    assert total == n and m.source_report.get("version", version).startswith(version)
    assert m.source_report.get("missing_image", 0) == 0
    _disjoint(m)
    assert verify(tmp_path / "shards")["train"]["count"] == m.splits["train"].count
    batch = _stream_one(tmp_path / "shards", m)
    views = {"odir": 2}.get(dataset, 1)
    classes = len(m.task["classes"])
    assert batch["image"].shape == ((4, 2, 3, 32, 32) if views == 2 else (4, 3, 32, 32))
    assert batch["target"].shape == ((4, classes) if m.task["type"] == "multilabel" else (4,))
    if dataset in ("kermany", "octmnist", "rfmid"):
        assert {"train", "test"} <= set(m.splits)  # official test split kept
    if dataset == "rfmid":
        assert classes == 29 and m.source_report["csv_columns"] == extra["columns"]


def test_kermany_groups_patients_by_the_integer_across_classes(tmp_path):
    src = synth("kermany", tmp_path / "src", n=60, size=48, seed=2, version="mendeley-v2")
    m = _pack("kermany", src, tmp_path / "shards")
    recs = _records(tmp_path / "shards")
    where: dict[str, set] = {}
    classes: dict[str, set] = {}
    for split in m.splits:
        for shard in m.splits[split].shards:
            with tarfile.open(tmp_path / "shards" / shard.name) as tf:
                for name in tf.getnames():
                    if name.endswith(".json"):
                        rec = recs[name[: -len(".json")]]
                        where.setdefault(rec["patient"], set()).add(split)
                        classes.setdefault(rec["patient"], set()).add(rec["label"])
    assert any(len(c) > 1 for c in classes.values())  # an id under two class folders, as in the real set
    # packer-made splits (train/val) never share a patient; an official test split may, and is reported
    assert all(len(s - {"test"}) == 1 for s in where.values() if s - {"test"})
    assert "test&train" in m.patient_overlap
    assert m.source_report["version"] == "mendeley-v2" and "val" in m.splits


def test_odir_cataract_in_one_eye_is_a_patient_level_label(tmp_path):
    src = synth("odir", tmp_path / "src", n=40, size=48, seed=4, version="official")
    rows = read_xlsx(next(src.glob("*.xlsx")), ["ID"])
    one_eye = [
        r
        for r in rows
        if ("cataract" in r["Left-Diagnostic Keywords"]) != ("cataract" in r["Right-Diagnostic Keywords"])
    ]
    assert one_eye, "fixture should hold a one-eyed cataract"
    both = [str(r[f"{e}-Diagnostic Keywords"]) for r in rows for e in ("Left", "Right")]
    assert any("，" in k for k in both)  # the full-width comma ODIR separates keywords with
    _pack("odir", src, tmp_path / "shards")
    recs = _records(tmp_path / "shards")
    for r in one_eye:
        rec = recs[f"odir/{r['ID']}"]
        assert rec["label"][3] == 1 and rec["label"][0] == 0  # C=1, N=0 for the patient
        eye = "left" if "cataract" in r["Left-Diagnostic Keywords"] else "right"
        assert "cataract" in rec["meta"][f"{eye}_keywords"]


def test_rfmid_47_columns_derive_other_from_the_rare_diseases(tmp_path):
    src = synth("rfmid", tmp_path / "src", n=60, size=48, seed=5, version="original", columns=47)
    csv_path = src / "Training_Set" / "RFMiD_Training_Labels.csv"
    assert csv_path.read_bytes()[:3] == b"\xef\xbb\xbf"  # the BOM one copy has
    with open(csv_path, encoding="utf-8-sig") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows[0]) == 47
    rare = list(rows[0])[-18:]  # the 18 rare conditions close the 47-column header, CWS ... CL
    assert rare[0] == "CWS" and rare[-1] == "CL"
    with_rare = [r for r in rows if any(r[c] == "1" for c in rare)]
    without = [r for r in rows if not any(r[c] == "1" for c in rare)]
    assert with_rare and without
    _pack("rfmid", src, tmp_path / "shards")
    recs = _records(tmp_path / "shards")
    assert recs[f"rfmid/train/{with_rare[0]['ID']}"]["label"][-1] == 1  # OTHER
    assert recs[f"rfmid/train/{without[0]['ID']}"]["label"][-1] == 0
    r = rows[0]
    assert recs[f"rfmid/train/{r['ID']}"]["label"][:3] == [
        int(r["Disease_Risk"]),
        int(r["DR"]),
        int(r["ARMD"]),
    ]


def _strip_paths(m: Manifest) -> dict:
    m = json.loads(json.dumps(m.to_dict()))
    m["options"]["source"].pop("src", None)
    m["options"]["source"].pop("oct_src", None)
    return m


@pytest.mark.parametrize(
    ("dataset", "version", "kind"), [("kermany", "mendeley-v2", "tar.gz"), ("aptos", "kaggle", "zip")]
)
def test_archive_and_folder_give_identical_manifests(dataset, version, kind, tmp_path):
    folder = synth(dataset, tmp_path / "src", n=20, size=48, seed=6, version=version)
    archive = synth(dataset, tmp_path / "src2", n=20, size=48, seed=6, version=version, archive=kind)
    assert archive.name.endswith(kind)
    a = _pack(dataset, folder, tmp_path / "a")
    b = _pack(dataset, archive, tmp_path / "b")
    assert _strip_paths(a) == _strip_paths(b)


def test_fusion_pairs_are_virtual_class_aligned_and_patient_split(tmp_path):
    fundus = synth("aptos", tmp_path / "aptos", n=30, size=48, seed=7)
    oct_ = synth("kermany", tmp_path / "oct", n=40, size=48, seed=7, version="kaggle")
    source = build_source("fusion", src=fundus, oct_src=oct_, seed=0)
    m = pack(source, tmp_path / "shards", OPTS, workers=1, progress=False)
    assert m.task == {"type": "binary", "classes": ["normal", "disease"]}
    assert "virtual pairs" in m.source_report["caveat"] and m.views == ("fundus", "oct")
    _disjoint(m)
    recs = _records(tmp_path / "shards").values()
    assert all(r["meta"]["virtual_pair"] for r in recs)
    for r in recs:  # aligned on normal vs disease
        oct_cls = r["meta"]["oct_key"].split("/")[-1].split("-")[0]
        assert r["label"] == int(oct_cls != "NORMAL")
    assert len({r["meta"]["fundus_key"] for r in recs}) == len(recs)  # each fundus image used once


def test_cli_synth_archive_then_pack(tmp_path):
    out = run_cli(
        "synth",
        "odir",
        "--out",
        str(tmp_path / "odir"),
        "--n",
        "12",
        "--size",
        "48",
        "--version",
        "kaggle",
        "--archive",
        "zip",
    ).stdout.strip()
    proc = run_cli(
        "pack", "odir", "--src", out, "--out", str(tmp_path / "shards"), "--workers", "2", "--max-side", "64"
    )
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert sum(s["count"] for s in summary.values()) == 12
    assert load_manifest(tmp_path / "shards").source_report["version"] == "kaggle"


# -- bad input ----------------------------------------------------------------------------------
def test_missing_column_names_the_file_and_the_column(tmp_path):
    src = synth("aptos", tmp_path / "src", n=8, size=48)
    (src / "train.csv").write_text((src / "train.csv").read_text().replace("diagnosis", "grade"))
    with pytest.raises(DataError, match=r"train\.csv: missing column 'diagnosis'"):
        _pack("aptos", src, tmp_path / "shards")


def test_unreadable_xlsx_and_csv_name_the_file(tmp_path):
    src = synth("odir", tmp_path / "odir", n=6, size=48, version="official")
    xlsx = next(src.glob("*.xlsx"))
    xlsx.write_bytes(b"PK\x03\x04 not really a workbook")
    with pytest.raises(DataError, match=r"V2\.xlsx: cannot read as \.xlsx"):
        _pack("odir", src, tmp_path / "s1")
    src = synth("aptos", tmp_path / "aptos", n=6, size=48)
    (src / "train.csv").write_bytes(b"\xff\xfe\x00bad\x00")
    with pytest.raises(DataError, match=r"train\.csv: cannot read as CSV"):
        _pack("aptos", src, tmp_path / "s2")


def test_corrupt_and_truncated_images_are_skipped_and_listed(tmp_path):
    src = synth("aptos", tmp_path / "src", n=20, size=48)
    images = sorted((src / "train_images").iterdir())
    images[0].write_bytes(images[0].read_bytes()[:200])  # truncated
    images[1].write_bytes(b"not an image")
    source = build_source("aptos", src=src)
    m = pack(
        source,
        tmp_path / "shards",
        PackOptions(min_shards=1, max_corrupt_frac=0.2),
        workers=1,
        progress=False,
    )
    skipped = [s for sp in m.splits.values() for s in sp.skipped]
    assert sorted(s["key"] for s in skipped) == sorted(f"aptos/{p.stem}" for p in images[:2])
    assert all("cannot be decoded" in s["reason"] for s in skipped)
    assert sum(sp.count for sp in m.splits.values()) == 18


def test_rows_without_images_and_images_without_rows_are_counted(tmp_path):
    src = synth("rfmid", tmp_path / "src", n=24, size=48, version="kaggle", columns=30)
    folder = src / "Training_Set" / "Training_Set" / "Training"
    (folder / "3.png").unlink()
    (folder / "999.png").write_bytes((folder / "4.png").read_bytes())
    m = _pack("rfmid", src, tmp_path / "shards")
    rep = m.source_report
    assert rep["missing_image"] == 1 and rep["missing_image_examples"] == ["Training/3.png"]
    assert rep["unlabeled_image"] == 1 and rep["unlabeled_image_examples"] == ["Training/999.png"]


def test_duplicate_keys_are_an_error(tmp_path):
    src = synth("rfmid", tmp_path / "src", n=24, size=48, version="original")
    path = src / "Evaluation_Set" / "RFMiD_Validation_Labels.csv"
    lines = path.read_text().splitlines()
    path.write_text("\n".join([*lines, lines[1]]) + "\n")
    with pytest.raises(DataError, match=r"duplicate sample keys, e\.g\. rfmid/val/1"):
        _pack("rfmid", src, tmp_path / "shards")


def test_unknown_layout_says_where_it_looked(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"looked for 'OCT2017 /train' \(Kaggle, trailing space\)"):
        _pack("kermany", tmp_path / "empty", tmp_path / "shards")


def _evil_zip(path: Path, name: str) -> None:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("train.csv", "id_code,diagnosis\n")
        zf.writestr(name, "pwned")


@pytest.mark.parametrize("name", ["../evil.txt", "/tmp/retina-dist-evil.txt", "a/../../evil.txt"])
def test_zip_members_escaping_the_target_are_refused(name, tmp_path):
    _evil_zip(tmp_path / "aptos.zip", name)
    with pytest.raises(DataError, match="refusing to extract"):
        resolve_src(tmp_path / "aptos.zip", tmp_path / "x" / "y")
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "x" / "evil.txt").exists()
    assert not Path("/tmp/retina-dist-evil.txt").exists()
    assert not (tmp_path / "x" / "y" / "aptos").exists()


def test_tar_links_pointing_outside_are_refused(tmp_path):
    with tarfile.open(tmp_path / "k.tar.gz", "w:gz") as tf:
        data = b"x"
        info = tarfile.TarInfo("OCT2017/train/CNV/CNV-1-1.jpeg")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("OCT2017/train/CNV/CNV-1-2.jpeg")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tf.addfile(link)
    with pytest.raises(DataError, match=r"is a link to '/etc/passwd'; refusing"):
        resolve_src(tmp_path / "k.tar.gz", tmp_path / "x")
    assert not (tmp_path / "x" / "k").exists()


def test_octmnist_npz_is_read_with_numpy_and_checked(tmp_path):
    src = synth("octmnist", tmp_path / "src", n=16, size=28)
    with np.load(src / "octmnist.npz") as z:
        assert z["train_images"].ndim == 3 and z["train_labels"].shape[1] == 1
        arrays = {k: z[k] for k in z.files if k != "val_labels"}
    (tmp_path / "bad").mkdir()
    np.savez(tmp_path / "bad" / "octmnist.npz", **arrays)
    with pytest.raises(DataError, match=r"octmnist\.npz: missing array val_labels"):
        _pack("octmnist", tmp_path / "bad", tmp_path / "shards")
