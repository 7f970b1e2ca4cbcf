"""Shards both ways: what `pack` writes read by timm's and webdataset's own readers, sample for
sample against our stream; shards webdataset's ShardWriter, img2dataset-style scripts and GNU tar
layouts wrote, indexed and read by our stream (trained on, evaluated exactly once); shards served
over HTTP from a flaky server on 127.0.0.1; shards packed by earlier versions still readable."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import threading
from collections import Counter
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from retina_dist.data.codec import encode
from retina_dist.data.errors import DataError
from retina_dist.data.manifest import INFO, load_manifest, split_shards, verify
from retina_dist.data.pack import PackOptions, pack
from retina_dist.data.sources import build_source
from retina_dist.data.stream import StreamSpec, make_loader
from retina_dist.data.stream.buffers import release
from retina_dist.engine.evaluate import check_exact_once
from tests.conftest import TINY, run_cli

SIZE = 40


@pytest.fixture(scope="module")
def packed(tmp_path_factory, scratch) -> Path:
    out = tmp_path_factory.mktemp("interop") / "s"
    pack(
        build_source("synthetic", n=60, image_size=SIZE, seed=5),
        out,
        PackOptions(shard_size=16, seed=5),
        workers=1,
        progress=False,
    )
    return out


def _stream(shards_dir, split: str, multilabel: bool = False) -> list[tuple[str, object, np.ndarray]]:
    """(key, target, HWC uint8 pixels) in the order our evaluation stream yields them."""
    m = load_manifest(shards_dir)
    spec = StreamSpec(
        tuple(split_shards(shards_dir, m, split)),
        8,
        SIZE,
        train=False,
        multilabel=multilabel,
        label_key=m.label_key,
        classes=tuple(m.task["classes"]),
    )
    out = []
    for batch in make_loader(spec, 0, 1, 0):
        for k, t, x in zip(batch["key"], batch["target"].tolist(), batch["image"].numpy(), strict=True):
            out.append((k, t, x.transpose(1, 2, 0).copy()))
        release(batch)
    return out


def _close(a: np.ndarray, b: np.ndarray) -> None:
    # The same JPEG bytes through PIL and through simplejpeg: both libjpeg-turbo, at most a grey level apart.
    diff = np.abs(a.astype(int) - b.astype(int))
    assert a.shape == b.shape and diff.max() <= 1, (a.shape, b.shape, diff.max())


def test_timm_reads_a_packed_dataset_sample_for_sample(packed):
    from timm.data import create_dataset

    info = json.loads((packed / INFO).read_text())
    manifest = load_manifest(packed)
    assert info["splits"]["train"]["num_samples"] == manifest.splits["train"].count
    assert info["splits"]["val"]["shard_lengths"] == [s.count for s in manifest.splits["val"].shards]
    for split in ("train", "val"):
        ds = create_dataset("wds/synthetic", root=str(packed), split=split, is_training=False, batch_size=1)
        theirs = [(np.asarray(img.convert("RGB")), target) for img, target in ds]
        ours = _stream(packed, split)
        assert len(theirs) == len(ours) == manifest.splits[split].count
        assert [t for _, t in theirs] == [t for _, t, _ in ours]
        for (img, _), (_, _, x) in zip(theirs, ours, strict=True):
            _close(img, x)


def test_a_webdataset_pipeline_reads_packed_shards_sample_for_sample(packed):
    manifest = load_manifest(packed)
    urls = [str(packed / s.name) for s in manifest.splits["train"].shards]
    theirs = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode("rgb8"))
    ours = _stream(packed, "train")
    assert [s["__key__"] for s in theirs] == [k for k, _, _ in ours]
    assert [s["cls"] for s in theirs] == [s["json"]["label"] for s in theirs] == [t for _, t, _ in ours]
    for s, (_, _, x) in zip(theirs, ours, strict=True):
        _close(s["jpg"], x)


def _images(n: int, seed: int) -> tuple[list[bytes], list[int]]:
    rng = np.random.default_rng(seed)
    labels = [int(v) for v in rng.integers(0, 3, n)]
    # Each class its own mean brightness, so a tiny model can learn something from 32 px.
    jpgs = [
        encode(np.clip(rng.normal(60 + 70 * c, 20, (SIZE, SIZE, 3)), 0, 255).astype(np.uint8), ".jpg")
        for c in labels
    ]
    return jpgs, labels


def test_shards_webdataset_wrote_with_pax_headers_are_indexed_trained_on_and_evaluated_once(tmp_path):
    folder = tmp_path / "foreign"
    folder.mkdir()
    truth: dict[str, Counter] = {}
    for split, n, seed in (("train", 96, 1), ("val", 30, 2)):
        jpgs, labels = _images(n, seed)
        truth[split] = Counter(labels)
        with wds.ShardWriter(str(folder / f"{split}-%06d.tar"), maxcount=40, verbose=0) as sink:
            for i, (jpg, c) in enumerate(zip(jpgs, labels, strict=True)):
                # A non-ASCII patient id in the key: Python's tarfile writes it in a pax header.
                key = f"patiënt{i // 2:03d}_{'OD' if i % 2 else 'OS'}"
                sink.write({"__key__": key, "jpg": jpg, "cls": c, "json": {"patient": f"p{i // 2}"}})
    first = sorted(folder.glob("train-*.tar"))[0]
    with tarfile.open(first) as tar:
        assert any(m.pax_headers for m in tar.getmembers())

    done = run_cli(
        "index",
        str(folder),
        "--label-key",
        "cls",
        "--classes",
        "dim,mid,bright",
        "--patient-key",
        "json:patient",
    )
    assert json.loads(done.stdout)["splits"]["train"] == {"count": 96, "shards": 3, "skipped": 0}
    manifest = load_manifest(folder)
    for split in ("train", "val"):
        info = manifest.splits[split]
        assert info.histogram == {name: truth[split][i] for i, name in enumerate(("dim", "mid", "bright"))}
        assert info.patients == {"train": 48, "val": 15}[split]
        for sh in info.shards:
            assert sh.sha256 == hashlib.sha256((folder / sh.name).read_bytes()).hexdigest()
    assert manifest.label_key == "cls" and manifest.patient_key == "json:patient"
    assert verify(folder)["train"] == {"count": 96, "shards": 3}

    theirs = list(
        wds.WebDataset(
            [str(p) for p in sorted(folder.glob("val-*.tar"))], shardshuffle=False, empty_check=False
        ).decode("rgb8")
    )
    ours = _stream(folder, "val")
    assert [(s["__key__"], s["cls"]) for s in theirs] == [(k, t) for k, t, _ in ours]
    assert ours[0][0].startswith("patiënt000")

    run = tmp_path / "r"
    run_cli("train", "--run-dir", str(run), f"data.shards={folder}", *TINY, "train.epochs=2")
    val = json.loads((run / "metrics.json").read_text())["val"]
    assert val["n"] == 30  # every counted sample once
    got = (run / "predictions" / "val.csv").read_text().splitlines()[1:]
    assert sorted(r.split(",")[0] for r in got) == sorted(k for k, _, _ in ours)
    assert [int(r.split(",")[1]) for r in sorted(got)] == [t for _, t in sorted((k, t) for k, t, _ in ours)]


def test_an_img2dataset_style_folder_with_gnu_long_names_and_a_bad_sample(tmp_path):
    folder = tmp_path / "i2d"
    folder.mkdir()
    jpgs, labels = _images(20, 3)
    grades = ["mild", "none", "severe"]
    deep = "x" * 110  # over 100 bytes: GNU tar writes an ././@LongLink member first
    with tarfile.open(folder / "00000.tar", "w", format=tarfile.GNU_FORMAT) as tar:

        def add(name: str, data: bytes) -> None:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tar.addfile(ti, io.BytesIO(data))

        dir_info = tarfile.TarInfo(deep)
        dir_info.type = tarfile.DIRTYPE
        tar.addfile(dir_info)
        for i, (jpg, c) in enumerate(zip(jpgs, labels, strict=True)):
            key = f"{deep}/{i:09d}"
            add(f"{key}.jpg", jpg)
            add(f"{key}.txt", b"a fundus photograph")
            meta = {"url": f"https://example.org/{i}.jpg", "status": "success", "meta": {"grade": grades[c]}}
            if i == 7:
                del meta["meta"]  # a sample without a label: skipped and counted, never a crash
            add(f"{key}.json", json.dumps(meta).encode())

    refused = run_cli("index", str(folder), "--label-key", "json:meta.grade", check=False)
    assert (
        refused.returncode != 0
        and "does not say its split" in refused.stderr
        and "00000.tar" in refused.stderr
    )
    run_cli("index", str(folder), "--label-key", "json:meta.grade", "--split", "val")
    manifest = load_manifest(folder)
    assert manifest.task == {"type": "multiclass", "classes": grades}  # inferred, sorted
    val = manifest.splits["val"]
    assert val.count == 19 and [s["key"] for s in val.skipped] == [f"{deep}/000000007"]
    assert "KeyError" in val.skipped[0]["reason"]

    ours = _stream(folder, "val")
    check_exact_once([k for k, _, _ in ours], val.count)
    want = {f"{deep}/{i:09d}": c for i, c in enumerate(labels) if i != 7}
    assert {k: t for k, t, _ in ours} == want
    with tarfile.open(folder / "00000.tar") as tar:
        first = np.asarray(Image.open(tar.extractfile(f"{deep}/000000000.jpg")).convert("RGB"))
    _close(first, dict((k, x) for k, _, x in ours)[f"{deep}/000000000"])


class _Flaky(SimpleHTTPRequestHandler):
    """Serves a folder; a path in ``failures`` answers 503 that many times before it succeeds."""

    failures: dict[str, int] = {}
    hits: Counter = Counter()

    def do_GET(self):  # noqa: N802 (http.server's name)
        self.hits[self.path] += 1
        if self.failures.get(self.path, 0) > 0:
            self.failures[self.path] -= 1
            self.send_error(503, "busy")
            return
        super().do_GET()

    def log_message(self, *args):
        pass


@pytest.fixture
def server(packed, monkeypatch):
    monkeypatch.setenv("RETINA_DIST_FETCH_BACKOFF_S", "0.01")
    handler = type("H", (_Flaky,), {"failures": {}, "hits": Counter()})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), lambda *a: handler(*a, directory=str(packed)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", handler
    httpd.shutdown()
    httpd.server_close()


def test_remote_shards_are_retried_then_read_like_local_ones(packed, server):
    base, handler = server
    manifest = load_manifest(packed)
    first = manifest.splits["val"].shards[0].name
    handler.failures[f"/{first}"] = 2
    remote_manifest = load_manifest(base)
    assert remote_manifest == manifest
    shards = split_shards(base, remote_manifest, "val")
    assert shards[0][0] == f"{base}/{first}"
    local = _stream(packed, "val")
    remote = _stream(base, "val")
    assert [(k, t) for k, t, _ in remote] == [(k, t) for k, t, _ in local]
    assert all(np.array_equal(a[2], b[2]) for a, b in zip(remote, local, strict=True))
    assert handler.hits[f"/{first}"] == 3  # two 503s, then the shard

    handler.failures[f"/{first}"] = 1
    run = packed.parent / "remote-run"
    run_cli(
        "train",
        "--run-dir",
        str(run),
        f"data.shards={base}",
        *TINY,
        "train.epochs=1",
        env={"RETINA_DIST_FETCH_BACKOFF_S": "0.01"},
    )
    assert json.loads((run / "metrics.json").read_text())["val"]["n"] == manifest.splits["val"].count
    assert handler.hits[f"/{first}"] == 5  # retried once more, in the training's evaluation

    listed = [s.name for s in manifest.splits["train"].shards]
    pattern = f"{base}/train-{{{listed[0][6:12]}..{listed[-1][6:12]}}}.tar"
    done = run_cli(
        "index",
        pattern,
        "--out",
        str(packed.parent / "remote"),
        "--label-key",
        "json:label",
        "--classes",
        ",".join(manifest.task["classes"]),
        "--split",
        "train",
    )
    indexed = load_manifest(packed.parent / "remote")
    assert json.loads(done.stdout)["splits"]["train"]["count"] == manifest.splits["train"].count
    assert [s.sha256 for s in indexed.splits["train"].shards] == [
        s.sha256 for s in manifest.splits["train"].shards
    ]
    assert [s.name for s in indexed.splits["train"].shards] == [f"{base}/{n}" for n in listed]


def test_a_remote_shard_that_fails_is_an_error_naming_its_url(server, monkeypatch):
    base, handler = server
    monkeypatch.setenv("RETINA_DIST_FETCH_RETRIES", "3")
    handler.failures["/train-000000.tar"] = 99
    with pytest.raises(DataError, match=rf"{base}/train-000000.tar: failed after 3 attempts \(.*503"):
        list(_read_all([f"{base}/train-000000.tar"]))
    assert handler.hits["/train-000000.tar"] == 3
    with pytest.raises(DataError, match=rf"{base}/no-such.tar: HTTP 404"):
        list(_read_all([f"{base}/no-such.tar"]))
    assert handler.hits["/no-such.tar"] == 1  # a 404 is not retried


def _read_all(paths):
    from retina_dist.data.stream.shard_reader import read_samples

    return read_samples(paths)


def test_shards_packed_by_earlier_versions_stay_readable_and_verify_says_how_to_repack(packed, tmp_path):
    old = tmp_path / "old"
    old.mkdir()
    manifest = json.loads((packed / "manifest.json").read_text())
    for split in manifest["splits"].values():
        for sh in split["shards"]:
            with (
                tarfile.open(packed / sh["name"]) as src,
                tarfile.open(old / sh["name"], "w", format=tarfile.USTAR_FORMAT) as dst,
            ):
                for m in src.getmembers():
                    key, ext = m.name.split(".", 1)
                    if ext == "cls":
                        continue  # earlier versions wrote no .cls
                    data = src.extractfile(m).read()
                    ti = tarfile.TarInfo(f"{key}.img.jpg" if ext == "jpg" else m.name)
                    ti.size = len(data)
                    dst.addfile(ti, io.BytesIO(data))
            sh["sha256"] = hashlib.sha256((old / sh["name"]).read_bytes()).hexdigest()
    (old / "manifest.json").write_text(json.dumps(manifest))

    assert [(k, t) for k, t, _ in _stream(old, "train")] == [(k, t) for k, t, _ in _stream(packed, "train")]
    report = verify(old)
    assert report["train"]["count"] == manifest["splits"]["train"]["count"]
    assert "img.<ext>" in report["note"] and "pack again" in report["note"]
    assert "note" not in verify(packed)
