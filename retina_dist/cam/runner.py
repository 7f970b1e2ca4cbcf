"""The distributed CAM pass: every rank explains the selected samples of its own share of the
exact-once evaluation stream; rank 0 gathers, checks each selected sample was rendered exactly once,
and writes ``cam/<split>/index.{csv,html}``, the localisation scores (``cam/<split>/summary.json``) and
TensorBoard (appended to).

The methods are ``explainers.METHODS`` (the CAM family, Integrated Gradients, attention rollout).
Each map is computed at the network input, then drawn and scored on the stored image (the pack's
own pixels and lesion mask, up to 512 px): the same pointing / energy / IoU and the same centre prior
at the resolution a clinician looks at. The dual-eye model also shows its cross-attention.
"""

from __future__ import annotations

import csv
import logging
import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from retina_dist import atomic, dist
from retina_dist.cam import localisation, render
from retina_dist.cam.explainers import Explainer, norm01
from retina_dist.cam.stored import Stored, StoredReader, to_stored
from retina_dist.config import ConfigError
from retina_dist.data.stream import make_loader
from retina_dist.data.stream.feeder import DeviceInputs
from retina_dist.engine.evaluate import check_exact_once
from retina_dist.engine.specs import eval_spec
from retina_dist.models import DualEyeNet
from retina_dist.run import LoadedRun, RunDir, load_run
from retina_dist.tasks import Task

log = logging.getLogger(__name__)
SUMMARY = "summary.json"  # cam/<split>/summary.json: the pass's method, counts and localisation scores


def read_predictions(
    path: Path, classes: tuple[str, ...], multilabel: bool
) -> dict[str, tuple[Any, np.ndarray]]:
    if not path.exists():
        raise ConfigError(f"{path}: no predictions to choose CAM samples from; evaluate the run first")
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    out = {}
    for r in rows:
        probs = np.array([float(r[f"prob_{c}"]) for c in classes])
        target = [int(r[f"true_{c}"]) for c in classes] if multilabel else int(r["target"])
        out[r["key"]] = (target, probs)
    return out


def select(
    preds: dict[str, tuple[Any, np.ndarray]],
    how: str,
    limit: int,
    multilabel: bool,
    decide: Callable[[np.ndarray], Any] | None = None,
) -> list[str]:
    """The same choice on every rank: sorted keys filtered by ``how``, at most ``limit`` (0: all).
    ``multilabel``: targets are 0/1 rows; ``decide``: probabilities -> such a row (default: >= 0.5)."""

    def wrong(k: str) -> bool:
        t, p = preds[k]
        if not multilabel:
            return int(p.argmax()) != t
        return list(decide(p) if decide else (p >= 0.5).astype(int)) != list(t)

    keys = sorted(preds)
    if how == "errors":
        keys = [k for k in keys if wrong(k)]
    elif how == "correct":
        keys = [k for k in keys if not wrong(k)]
    elif how.startswith("per-class:"):
        per = int(how.split(":", 1)[1])
        seen: dict[Any, int] = {}
        chosen = []
        for k in keys:
            t = preds[k][0]
            c = tuple(t) if multilabel else t
            if seen.get(c, 0) < per:
                seen[c] = seen.get(c, 0) + 1
                chosen.append(k)
        keys = chosen
    elif how != "all":
        raise ConfigError(f"cam select {how!r}: expected all | errors | correct | per-class:K")
    return keys[:limit] if limit else keys


def decided(task: Task, probs: np.ndarray) -> Any:
    """The decision as the targets are written: a class index, or a 0/1 row (multi-label at 0.5,
    multi-head one-hot per head)."""
    if task.heads:
        return np.isin(np.array(task.classes), task.decide(probs)).astype(int)
    return (probs >= 0.5).astype(int) if task.multilabel else int(probs.argmax())


def _names(label: Any, classes: tuple[str, ...], multilabel: bool) -> str:
    if multilabel:
        on = [c for c, v in zip(classes, label, strict=True) if v]
        return "+".join(on) or "none"
    return classes[int(label)]


def _explain_classes(target: Any, probs: np.ndarray, multilabel: bool) -> list[int]:
    if not multilabel:
        return [int(probs.argmax())]
    chosen = sorted({i for i, v in enumerate(target) if v} | {i for i, p in enumerate(probs) if p >= 0.5})
    return chosen[:3] or [int(probs.argmax())]


def run_cam(
    run_dir: str | Path, split: str, method: str, limit: int, how: str, layer_name: str = ""
) -> dict | None:
    """The CAM pass over a trained run's ``split``: writes only under ``cam/<split>/`` and appends
    images and scalars to TensorBoard; the training's files are never touched."""
    loaded = load_run(run_dir)
    env = dist.init(loaded.cfg.dist.backend, loaded.cfg.dist.timeout_s)
    try:
        return _run(loaded, env, split, method, limit, how, layer_name)
    finally:
        dist.destroy()


def _run(
    loaded: LoadedRun, env: dist.DistEnv, split: str, method: str, limit: int, how: str, layer_name: str
):
    run, cfg, task, views = loaded.run, loaded.cfg, loaded.task, loaded.views
    d = cfg.data
    device = dist.device_for(env)
    model = loaded.model.to(device).eval()
    # Gradients must reach the target layer even where training froze it (linear probing); this
    # copy of the weights is the pass's own and is never saved.
    model.requires_grad_(True)
    explainer = Explainer(model, method, layer_name)
    vector = task.vector_target
    preds = read_predictions(run.training.predictions(split), task.classes, vector)
    chosen = set(select(preds, how, limit, vector, lambda p: decided(task, p)))
    spec = eval_spec(cfg, loaded.manifest, task, split, batch_size=16)
    inputs = DeviceInputs(d.mean, d.std, d.in_chans, device)
    out_dir = run.cam(split)
    if env.is_main and out_dir.exists():  # a fresh set: no overlay from an earlier selection lingers
        shutil.rmtree(out_dir)
    dist.barrier()
    out_dir.mkdir(parents=True, exist_ok=True)

    reader = StoredReader((path for path, _ in spec.shards), chosen, views)
    rows: list[dict] = []
    started = time.perf_counter()
    for batch in make_loader(spec, env.rank, env.world_size, cfg.data.workers):
        idx = [i for i, k in enumerate(batch["key"]) if k in chosen]
        if not idx:
            continue
        x, _ = inputs(batch)
        stored = reader.get(batch["key"][i] for i in idx)
        for i in idx:
            key = batch["key"][i]
            target, probs = preds[key]
            true, pred = (
                _names(target, task.classes, vector),
                _names(decided(task, probs), task.classes, vector),
            )
            s = stored[key]
            if len(views) > 1:
                rows.append(
                    _multi_view(model, explainer, x[i : i + 1], s, key, true, pred, out_dir, views, d)
                )
                continue
            for c in _explain_classes(target, probs, task.multilabel):
                heat = to_stored(explainer(x[i : i + 1], c)[0], s.views[0].shape[:2], d.image_size)
                suffix = task.classes[c] if task.multilabel else ""
                name = render.file_name(key, true, pred, explainer.method, suffix)
                columns = [
                    (f"{key} ({s.views[0].shape[1]}x{s.views[0].shape[0]})", s.views[0]),
                    (
                        f"{explainer.label}: {task.classes[c]} (p {probs[c]:.2f})",
                        render.overlay(s.views[0], heat),
                    ),
                ]
                row = {"key": key, "file": name, "true": true, "pred": pred, "class": task.classes[c]}
                if s.mask is not None and s.mask.any():
                    columns.append((f"lesion mask (true {true})", render.mask_view(s.views[0], s.mask)))
                    centre = localisation.centre_baseline(s.mask.shape)
                    row["class"] = true
                    row.update({f"cam_{k}": v for k, v in localisation.score(heat, s.mask).items()})
                    row.update({f"centre_{k}": v for k, v in localisation.score(centre, s.mask).items()})
                render.write_png(out_dir / name, render.compose(columns))
                rows.append(row)
    local_s = time.perf_counter() - started
    parts = dist.gather_objects((rows, local_s))
    if not env.is_main:
        return None
    rows = [r for p in parts for r in p[0]]
    wall = max(p[1] for p in parts)
    check_exact_once(sorted({(r["key"]) for r in rows}), len(chosen))  # every chosen sample, once
    seen_files = [r["file"] for r in rows]
    if len(seen_files) != len(set(seen_files)):
        raise RuntimeError("a CAM overlay was rendered twice")
    return _write(rows, task.classes, split, explainer, run, out_dir, wall, env.world_size)


def _multi_view(model, explainer, x, s: Stored, key, true, pred, out_dir, views, d) -> dict:
    columns = []
    heats = explainer(x, 0)
    for v, heat in enumerate(heats):
        img = s.views[v]
        columns += [
            (views[v], img),
            (
                f"{explainer.label} ({views[v]})",
                render.overlay(img, to_stored(heat, img.shape[:2], d.image_size)),
            ),
        ]
    name = render.file_name(key, true, pred, "eigencam", "-".join(views))
    render.write_png(out_dir / name, render.compose(columns))
    row = {"key": key, "file": name, "true": true, "pred": pred, "class": true}
    if isinstance(model, DualEyeNet):  # where each eye looked in the other one
        with torch.no_grad():
            e = model.encode(x)
        att = []
        for weights, target_view in ((e["attn_left_to_right"], 1), (e["attn_right_to_left"], 0)):
            w = weights[0].mean(0)  # mean over the querying eye's tokens -> the other eye's grid
            side = math.isqrt(w.numel())
            w = w[w.numel() - side * side :]  # a ViT backbone's class/register tokens lead: not pixels
            grid = F.interpolate(w.reshape(1, 1, side, side), size=x.shape[-2:], mode="bilinear")[0, 0]
            img = s.views[target_view]
            heat = to_stored(norm01(grid.cpu().numpy()), img.shape[:2], d.image_size)
            other = views[1 - target_view]
            att.append((f"{other} attending on {views[target_view]}", render.overlay(img, heat)))
        name2 = render.file_name(key, true, pred, "crossattention", "left-on-right_right-on-left")
        render.write_png(out_dir / name2, render.compose(att))
        row["attention_file"] = name2
    return row


def _write(rows, classes, split, explainer: Explainer, run: RunDir, out_dir, wall, world) -> dict:
    rows.sort(key=lambda r: r["file"])
    fields = sorted({k for r in rows for k in r}, key=lambda k: (k not in ("key", "file", "true", "pred"), k))
    with open(out_dir / "index.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    scored = [r for r in rows if "cam_energy" in r]
    method = explainer.method
    summary = {
        "method": method,
        "layer": explainer.layer,
        "label": explainer.label,
        "scored_at": "stored image",
        "rendered": len(rows),
        "samples": len({r["key"] for r in rows}),
        "ranks": world,
        "images_per_s": len(rows) / wall if wall > 0 else None,
        "localisation": localisation.summarise(scored, classes) if scored else None,
    }
    atomic.write_json(out_dir / SUMMARY, summary)
    (out_dir / "index.html").write_text(render.index_html(rows, f"{explainer.label} — {split}", summary))
    step = run.read_metrics().get(split, {}).get("step", 0)
    _tensorboard(rows, summary, split, run.tb, out_dir, step)
    log.info(
        "CAM %s on %s: %d overlays in %s (%.1f img/s over %d ranks)%s",
        method,
        split,
        len(rows),
        out_dir,
        summary["images_per_s"] or 0,
        world,
        ""
        if not scored
        else f"; pointing {summary['localisation']['cam_pointing']:.3f} vs centre "
        f"{summary['localisation']['centre_pointing']:.3f}, energy in lesions "
        f"{summary['localisation']['cam_energy']:.3f} vs {summary['localisation']['centre_energy']:.3f}",
    )
    return summary


def _tensorboard(rows, summary, split, tb_dir: Path, out_dir, step) -> None:
    from torch.utils.tensorboard import SummaryWriter

    from retina_dist.data.codec import decode

    imgs = [_fit_height(decode((out_dir / r["file"]).read_bytes()), 384) for r in rows[:8]]
    if not imgs:
        return
    h = max(i.shape[0] for i in imgs)
    w = max(i.shape[1] for i in imgs)
    padded = [
        np.pad(i, ((0, h - i.shape[0]), (0, w - i.shape[1]), (0, 0)), constant_values=255) for i in imgs
    ]
    grid = np.concatenate(padded, axis=0)  # one column: each picture is already three panels wide
    with SummaryWriter(str(tb_dir)) as tb:  # appends: no purge, the training's events stay
        tb.add_image(f"{split}/cam_{summary['method']}", grid, step, dataformats="HWC")
        loc = summary["localisation"] or {}
        for k in ("cam_pointing", "cam_energy", "cam_iou", "centre_pointing", "centre_energy"):
            if loc.get(k) is not None:
                tb.add_scalar(f"{split}/cam/{k}", loc[k], step)
        if summary["images_per_s"]:
            tb.add_scalar(f"{split}/cam/images_per_s", summary["images_per_s"], step)


def _fit_height(img: np.ndarray, h: int) -> np.ndarray:
    """Shrunk to ``h`` rows if taller: eight 512 px triptychs in one TensorBoard image stay viewable."""
    if img.shape[0] <= h:
        return img
    return cv2.resize(img, (round(img.shape[1] * h / img.shape[0]), h), interpolation=cv2.INTER_AREA)
