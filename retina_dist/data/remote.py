"""Where shards live: a local folder, an ``http(s)://`` URL base or a ``pipe:`` command, as
webdataset accepts them. A remote shard is fetched whole before it is read, so a failed transfer is
retried from its first byte (bounded, with exponential backoff) and a sample is never half-read;
then the error names the URL. ``pipe:CMD`` runs CMD split by ``shlex`` without a shell: a pipeline
or redirection belongs in a script.

Retries: ``RETINA_DIST_FETCH_RETRIES`` (default 5 attempts in all) and
``RETINA_DIST_FETCH_BACKOFF_S`` (default 1 s, doubled per attempt, at most 30 s)."""

from __future__ import annotations

import io
import logging
import os
import shlex
import subprocess
import time
import urllib.error
import urllib.request
from http.client import HTTPException
from pathlib import Path
from typing import IO

from retina_dist.data.errors import DataError

log = logging.getLogger(__name__)

_SCHEMES = ("http://", "https://", "pipe:")
TIMEOUT_S = 60.0


def is_remote(location: str | Path) -> bool:
    return str(location).startswith(_SCHEMES)


def join(base: str | Path, name: str) -> str:
    """A shard's location: ``name`` itself when it is already a URL or an absolute path."""
    if is_remote(name) or os.path.isabs(name):
        return name
    if is_remote(base):
        return f"{str(base).rstrip('/')}/{name}"
    return str(Path(base) / name)


def open_shard(location: str) -> IO[bytes]:
    """A readable binary file for a shard, local or remote."""
    if not is_remote(location):
        try:
            return open(location, "rb", buffering=1 << 20)
        except OSError as err:
            raise DataError(f"{location}: cannot be opened: {err.strerror}") from err
    return io.BytesIO(fetch(location))


def fetch(location: str) -> bytes:
    """The whole body of a URL or a pipe command's output, retried on transient failures."""
    attempts = max(1, int(os.environ.get("RETINA_DIST_FETCH_RETRIES", "5")))
    backoff = float(os.environ.get("RETINA_DIST_FETCH_BACKOFF_S", "1"))
    last = ""
    for attempt in range(attempts):
        try:
            return _pipe(location[5:]) if location.startswith("pipe:") else _http(location)
        except _Permanent as err:
            raise DataError(f"{location}: {err}") from None
        except (OSError, HTTPException, _Transient) as err:
            last = f"{type(err).__name__}: {err}"
        if attempt + 1 < attempts:
            wait = min(backoff * 2**attempt, 30.0)
            log.warning("%s: %s; retry %d/%d in %.1f s", location, last, attempt + 1, attempts - 1, wait)
            time.sleep(wait)
    raise DataError(f"{location}: failed after {attempts} attempts ({last})")


class _Permanent(Exception):
    """A failure a retry cannot mend (404, 403, a malformed command)."""


class _Transient(Exception):
    pass


def _http(url: str) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as resp:
            body = resp.read()
            expected = resp.headers.get("Content-Length")
    except urllib.error.HTTPError as err:
        if 400 <= err.code < 500 and err.code not in (408, 425, 429):
            raise _Permanent(f"HTTP {err.code} {err.reason}") from None
        raise _Transient(f"HTTP {err.code} {err.reason}") from None
    if expected is not None and len(body) != int(expected):
        raise _Transient(f"short read: {len(body)} of {expected} bytes")
    return body


def _pipe(command: str) -> bytes:
    argv = shlex.split(command)
    if not argv:
        raise _Permanent("empty pipe: command")
    try:
        done = subprocess.run(argv, capture_output=True, timeout=TIMEOUT_S * 10, check=False)
    except FileNotFoundError:
        raise _Permanent(f"no such program {argv[0]!r}") from None
    except subprocess.TimeoutExpired as err:
        raise _Transient(f"{argv[0]} timed out") from err
    if done.returncode != 0:
        tail = done.stderr.decode("utf-8", "replace").strip().splitlines()[-1:] or [""]
        raise _Transient(f"{argv[0]} exited {done.returncode}: {tail[0]}")
    return done.stdout
