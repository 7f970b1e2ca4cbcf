"""What a person watches: TensorBoard scalars, a progress bar (or plain lines), the run log.

Only rank 0 writes; other ranks keep warnings in the shared log stream.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

log = logging.getLogger("retina_dist")


def setup_logging(run_dir: Path | None, rank: int) -> None:
    level = logging.INFO if rank == 0 else logging.WARNING
    fmt = logging.Formatter(f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    root = logging.getLogger()
    root.setLevel(level)
    for h in list(root.handlers):
        root.removeHandler(h)
    stream = logging.StreamHandler(sys.stderr)
    stream.setFormatter(fmt)
    root.addHandler(stream)
    if run_dir is not None and rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(run_dir / "train.log")
        fh.setFormatter(fmt)
        root.addHandler(fh)


class Monitor:
    def __init__(
        self,
        run_dir: Path,
        is_main: bool,
        total_steps: int,
        start_step: int,
        tensorboard: bool = True,
        progress: str = "auto",
        log_every: int = 10,
    ) -> None:
        self.is_main, self.log_every = is_main, log_every
        self.writer = None
        if is_main and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops events past the resume point, so a requeued run never repeats a step.
            self.writer = SummaryWriter(str(run_dir / "tb"), purge_step=start_step or None)
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

    def step(self, step: int, epoch: int, images: int, loss_fn, lr: float, grad_norm_fn) -> None:
        """Record one optimizer step. ``loss_fn``/``grad_norm_fn`` are called only when logging,
        so the hot loop does not wait on the device every step."""
        self._images += images
        if not self.is_main:
            return
        self.bar.update(1)
        if step % self.log_every and step != self.total:
            return
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
