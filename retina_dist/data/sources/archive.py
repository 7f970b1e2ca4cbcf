"""A dataset exactly as downloaded (.zip, .tar, .tar.gz/.tgz) -> a folder, extracted safely.

Every member is checked before anything is written: an absolute name, a ``..`` component, a link,
or a device file refuses the whole archive with an error naming the archive and the member, so
nothing can land outside the target. Tar extraction also runs under ``filter="data"``.
An extraction is reused when its marker records the same archive size and mtime.
"""

from __future__ import annotations

import json
import shutil
import stat
import tarfile
import zipfile
from pathlib import Path, PurePosixPath

from retina_dist.data.manifest import DataError

ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz")
MARKER = ".retina-dist-extracted.json"


def is_archive(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(ARCHIVE_SUFFIXES)


def _check_name(archive: Path, name: str) -> None:
    p = PurePosixPath(name.replace("\\", "/"))
    if p.is_absolute() or name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        raise DataError(f"{archive}: member {name!r} has an absolute path; refusing to extract")
    if ".." in p.parts:
        raise DataError(f"{archive}: member {name!r} climbs out of the target with '..'; refusing to extract")


def _check_zip(archive: Path, zf: zipfile.ZipFile) -> None:
    for info in zf.infolist():
        _check_name(archive, info.filename)
        mode = info.external_attr >> 16
        if stat.S_ISLNK(mode):
            raise DataError(f"{archive}: member {info.filename!r} is a symbolic link; refusing to extract")


def _check_tar(archive: Path, tf: tarfile.TarFile) -> None:
    for m in tf.getmembers():
        _check_name(archive, m.name)
        if m.issym() or m.islnk():
            raise DataError(f"{archive}: member {m.name!r} is a link to {m.linkname!r}; refusing to extract")
        if not (m.isfile() or m.isdir()):
            raise DataError(
                f"{archive}: member {m.name!r} is not a regular file or folder; refusing to extract"
            )


def extract(archive: Path, target: Path) -> Path:
    """Extract ``archive`` into ``target`` (created) and return ``target``."""
    archive = Path(archive)
    st = archive.stat()
    stamp = {"archive": archive.name, "size": st.st_size, "mtime": st.st_mtime}
    marker = target / MARKER
    if marker.exists() and json.loads(marker.read_text()) == stamp:
        return target
    if target.exists():
        shutil.rmtree(target)
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        if archive.name.lower().endswith(".zip"):
            try:
                zf = zipfile.ZipFile(archive)
            except zipfile.BadZipFile as err:
                raise DataError(f"{archive}: not a readable zip archive ({err})") from err
            with zf:
                _check_zip(archive, zf)
                zf.extractall(partial)
        else:
            try:
                tf = tarfile.open(archive)
            except tarfile.TarError as err:
                raise DataError(f"{archive}: not a readable tar archive ({err})") from err
            with tf:
                _check_tar(archive, tf)
                tf.extractall(partial, filter="data")
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    partial.rename(target)
    (target / MARKER).write_text(json.dumps(stamp))
    return target


def resolve_src(src: str | Path, extract_dir: str | Path) -> Path:
    """``src`` if it is a folder; else the folder its archive was extracted to (under ``extract_dir``)."""
    src = Path(src).expanduser()
    if src.is_dir():
        return src
    if not src.exists():
        raise DataError(f"{src}: no such file or folder")
    if is_archive(src):
        stem = src.name
        for suffix in ARCHIVE_SUFFIXES:
            if stem.lower().endswith(suffix):
                stem = stem[: -len(suffix)]
                break
        return extract(src, Path(extract_dir) / stem)
    raise DataError(f"{src}: neither a folder nor an archive ({', '.join(ARCHIVE_SUFFIXES)})")
