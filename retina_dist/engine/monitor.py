"""What a person watches: TensorBoard scalars, a progress bar (or plain lines), the run log.

Only rank 0 writes; other ranks keep warnings in the shared log stream.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tqdm import tqdm

log = logging.getLogger("retina_dist")


def setup_logging(log_file: Path | None, rank: int) -> None:
    level = logging.INFO if rank == 0 else logging.WARNING
    fmt = logging.Formatter(f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    root = logging.getLogger()
    root.setLevel(level)
    for h in list(root.handlers):
        root.removeHandler(h)
    stream = logging.StreamHandler(sys.stderr)
    stream.setFormatter(fmt)
    root.addHandler(stream)
    if log_file is not None and rank == 0:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(log_file)
        fh.setFormatter(fmt)
        root.addHandler(fh)


class Monitor:
    def __init__(
        self,
        tb_dir: Path | None,
        is_main: bool,
        total_steps: int,
        start_step: int,
        progress: str = "auto",
        log_every: int = 10,
        purge: bool = True,
    ) -> None:
        """``tb_dir`` None: no TensorBoard. ``purge`` (training only) drops the events logged past
        ``start_step`` by an earlier attempt, so a requeued run never repeats a step; a later command
        appends and never purges."""
        self.is_main, self.log_every = is_main, log_every
        self.writer = None
        if is_main and tb_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(tb_dir), purge_step=(start_step or None) if purge else None)
        bar = progress == "bar" or (progress == "auto" and sys.stderr.isatty())
        self.lines = progress == "lines" or (progress == "auto" and not bar)
        self.bar = tqdm(
            total=total_steps,
            initial=start_step,
            unit="step",
            dynamic_ncols=True,
            disable=not (is_main and bar),
        )
        self.total = total_steps
        self._t, self._images, self._t0, self._s0 = time.perf_counter(), 0, time.perf_counter(), start_step

    def step(
        self,
        step: int,
        epoch: int,
        images: int,
        loss_fn: Callable[[], float],
        lr: float,
        grad_norm_fn: Callable[[], float],
    ) -> bool:
        """Record one optimizer step; True at a log step (on every rank). ``loss_fn``/``grad_norm_fn``
        are called only then, so the hot loop does not wait on the device every step."""
        self._images += images
        if self.is_main:
            self.bar.update(1)
        if step % self.log_every and step != self.total:
            return False
        if not self.is_main:
            return True
        now = time.perf_counter()
        ips = self._images / max(now - self._t, 1e-9)
        self._t, self._images = now, 0
        loss, gnorm = loss_fn(), grad_norm_fn()
        self.bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{ips:.0f}", lr=f"{lr:.2e}")
        if self.writer:
            self.writer.add_scalar("train/loss", loss, step)
            self.writer.add_scalar("train/lr", lr, step)
            self.writer.add_scalar("train/img_per_s", ips, step)
            self.writer.add_scalar("train/grad_norm", gnorm, step)
        if self.lines:
            done = step - self._s0
            eta = (now - self._t0) / max(done, 1) * (self.total - step)
            log.info(
                "epoch %d step %d/%d loss %.4f lr %.2e %.0f img/s eta %s",
                epoch,
                step,
                self.total,
                loss,
                lr,
                ips,
                time.strftime("%H:%M:%S", time.gmtime(eta)),
            )
        return True

    def scalars(self, prefix: str, values: dict[str, Any], step: int) -> None:
        if not self.writer:
            return
        for k, v in values.items():
            if isinstance(v, int | float) and not isinstance(v, bool):
                self.writer.add_scalar(f"{prefix}/{k}", v, step)
        self.writer.flush()

    def figure(self, tag: str, fig: Any, step: int) -> None:
        if self.writer:
            self.writer.add_figure(tag, fig, step, close=False)

    def close(self) -> None:
        self.bar.close()
        if self.writer:
            self.writer.close()
