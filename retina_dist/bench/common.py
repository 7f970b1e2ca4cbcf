"""Timing helpers and the table every bench subcommand prints."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any


def rate(items: Iterable[Any], count: Any, n: int, warmup: int = 1) -> float:
    """Items per second over ``n`` items after ``warmup`` (worker start-up is not what we measure)."""
    it = iter(items)
    for _ in range(warmup):
        next(it)
    done, start = 0, time.perf_counter()
    for _ in range(n):
        done += count(next(it))
    return done / (time.perf_counter() - start)


def cycle(make: Any) -> Iterator[Any]:
    while True:
        yield from make()


def worker_counts() -> list[int]:
    cores = os.cpu_count() or 1
    return sorted({1, *range(2, cores + 1, max(1, cores // 4))} | {cores})


def spawn_ranks(target: Callable[..., None], world: int, *args: Any) -> list[Any]:
    """Run ``target(rank, world, port, *args, out)`` in ``world`` fresh spawned processes, which meet
    on a free port of 127.0.0.1 and each ``out.put((rank, value))``; the values in rank order."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = mp.get_context("spawn").Queue()
    mp.start_processes(target, args=(world, port, *args, out), nprocs=world, start_method="spawn", join=True)
    got = dict(out.get() for _ in range(world))
    return [got[r] for r in range(world)]


def table(title: str, header: list[str], rows: Iterable[list[Any]]) -> str:
    rows = [[f"{v:.1f}" if isinstance(v, float) else str(v) for v in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths, strict=True))  # noqa: E731
    return "\n".join([title, line(header), line(["-" * w for w in widths]), *map(line, rows)])


def write(result: dict[str, Any], out: str | Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    return out
