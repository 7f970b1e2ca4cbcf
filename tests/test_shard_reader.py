import io
import tarfile

import pytest
from webdataset.tariterators import tarfile_samples

from retina_dist.data.manifest import DataError, load_manifest, split_shards
from retina_dist.data.stream.shard_reader import read_samples


def _shard_paths(shards):
    m = load_manifest(shards)
    return [p for split in ("train", "val") for p, _ in split_shards(shards, m, split)]


def test_reads_the_samples_webdataset_reads(shards):
    """Packed shards read the same, key for key and byte for byte, as through webdataset."""
    paths = _shard_paths(shards)
    ours = list(read_samples(paths))
    theirs = [
        {k: v for k, v in s.items() if not k.startswith("__local")}
        for s in tarfile_samples([{"url": p} for p in paths])
    ]
    assert len(ours) == len(theirs) > 10 and ours == theirs
    assert {"__key__", "__url__", "json"} <= set(ours[0])


def _tar(tmp_path, members, fmt=tarfile.USTAR_FORMAT):
    path = tmp_path / "s.tar"
    with tarfile.open(path, "w", format=fmt) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_long_names_use_the_ustar_prefix(tmp_path):
    name = "d" * 120 + "/k1.img.jpg"  # over 100 bytes: tarfile splits it into prefix + name
    path = _tar(tmp_path, [(name, b"x" * 700), ("d/k1.json", b"{}"), ("d/k2.json", b"[]")])
    got = list(read_samples([str(path)]))
    assert [(s["__key__"], sorted(k for k in s if not k.startswith("__"))) for s in got] == [
        ("d" * 120 + "/k1", ["img.jpg"]),
        ("d/k1", ["json"]),
        ("d/k2", ["json"]),
    ]
    assert got[0]["img.jpg"] == b"x" * 700


def test_truncated_shard_is_named_with_the_offset(tmp_path):
    path = _tar(tmp_path, [("a.json", b"{}"), ("b.img.jpg", b"y" * 2000)])
    data = path.read_bytes()
    path.write_bytes(data[:1700])  # inside b.img.jpg, whose header is at byte 1024
    with pytest.raises(DataError, match=r"s\.tar: truncated in member 'b\.img\.jpg' \(header at byte 1024\)"):
        list(read_samples([str(path)]))
    path.write_bytes(data[: 1024 + 512 + 2048])  # no end-of-archive marker
    with pytest.raises(DataError, match=r"s\.tar: truncated at byte 3584"):
        list(read_samples([str(path)]))


def test_damaged_header_and_foreign_members_are_refused(tmp_path):
    path = _tar(tmp_path, [("a.json", b"{}"), ("b.json", b"[]")])
    data = bytearray(path.read_bytes())
    data[1024 + 10] ^= 0x01  # one bit of the second member's name
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"header checksum mismatch at byte 1024"):
        list(read_samples([str(path)]))
    path = _tar(tmp_path, [("a.json", b"{}")])
    with tarfile.open(path, "a") as tar:
        link = tarfile.TarInfo("b.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    with pytest.raises(DataError, match=r"member of type b'2' at byte 1024.*never followed"):
        list(read_samples([str(path)]))
    with pytest.raises(DataError, match=r"missing\.tar: cannot be opened"):
        list(read_samples([str(tmp_path / "missing.tar")]))
