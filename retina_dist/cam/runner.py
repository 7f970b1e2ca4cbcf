"""The distributed CAM pass: every rank explains the selected samples of its own share of the
exact-once evaluation stream; rank 0 gathers, checks each selected sample was rendered exactly once,
and writes ``cam/<split>/index.{csv,html}``, the localisation scores (``cam/<split>/summary.json``) and
TensorBoard (appended to).

Single-image models use pytorch-grad-cam (Grad-CAM, Grad-CAM++, XGrad-CAM, LayerCAM, EigenCAM) on
the family's default layer (ViT through a token -> grid reshape). The dual-eye and fusion models run
both eyes / both modalities through encoders inside one graph, which the library's one-input hooks
cannot split, and fusion encoders are frozen under no_grad: they get gradient-free EigenCAM on their
encoder per eye / modality, and the dual-eye model also shows its cross-attention between the eyes.
"""

from __future__ import annotations

import csv
import logging
import math
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from retina_dist import atomic, dist
from retina_dist.cam import localisation, render
from retina_dist.cam.targets import target_layer, vit_reshape
from retina_dist.config import ConfigError
from retina_dist.data.stream import make_loader
from retina_dist.data.stream.feeder import DeviceInputs
from retina_dist.engine.evaluate import check_exact_once
from retina_dist.engine.specs import eval_spec
from retina_dist.models import DualEyeNet, LateFusionNet
from retina_dist.run import LoadedRun, RunDir, load_run

log = logging.getLogger(__name__)
SUMMARY = "summary.json"  # cam/<split>/summary.json: the pass's method, counts and localisation scores


def cam_methods() -> dict[str, Any]:
    from pytorch_grad_cam import EigenCAM, GradCAM, GradCAMPlusPlus, LayerCAM, XGradCAM

    return {
        "gradcam": GradCAM,
        "gradcam++": GradCAMPlusPlus,
        "xgradcam": XGradCAM,
        "layercam": LayerCAM,
        "eigencam": EigenCAM,
    }


def build_cams(model: torch.nn.Module, method: str, layer_name: str = "") -> tuple[str, list[Any]]:
    """The CAM objects for ``model``: one for a single-image model, one per view (gradient-free
    EigenCAM on each encoder) for the dual-eye and fusion models. Returns the method actually used."""
    methods = cam_methods()
    if isinstance(model, (DualEyeNet, LateFusionNet)):
        encoders = (
            [model.backbone, model.backbone] if isinstance(model, DualEyeNet) else [model.fundus, model.oct]
        )
        return "eigencam", [
            methods["eigencam"](model=e, target_layers=[target_layer(e)], reshape_transform=vit_reshape(e))
            for e in encoders
        ]
    layer = target_layer(model, layer_name)
    return method, [methods[method](model=model, target_layers=[layer], reshape_transform=vit_reshape(model))]


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


def select(preds: dict[str, tuple[Any, np.ndarray]], how: str, limit: int, multilabel: bool) -> list[str]:
    """The same choice on every rank: sorted keys filtered by ``how``, at most ``limit`` (0: all)."""

    def wrong(k: str) -> bool:
        t, p = preds[k]
        return list((p >= 0.5).astype(int)) != list(t) if multilabel else int(p.argmax()) != t

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


def _norm01(a: np.ndarray) -> np.ndarray:
    a = a - a.min()
    return a / a.max() if a.max() > 0 else a


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
    methods = cam_methods()
    if method not in methods:
        raise ConfigError(f"cam method {method!r}: expected one of {', '.join(methods)}")
    run, cfg, task, views = loaded.run, loaded.cfg, loaded.task, loaded.views
    d = cfg.data
    device = dist.device_for(env)
    model = loaded.model.to(device).eval()
    # Gradients must reach the target layer even where training froze it (linear probing); this
    # copy of the weights is the pass's own and is never saved.
    model.requires_grad_(True)
    preds = read_predictions(run.training.predictions(split), task.classes, task.multilabel)
    chosen = set(select(preds, how, limit, task.multilabel))
    spec = eval_spec(cfg, loaded.manifest, task, split, batch_size=16, with_masks=len(views) == 1)
    inputs = DeviceInputs(d.mean, d.std, d.in_chans, device)
    out_dir = run.cam(split)
    if env.is_main and out_dir.exists():  # a fresh set: no overlay from an earlier selection lingers
        shutil.rmtree(out_dir)
    dist.barrier()
    out_dir.mkdir(parents=True, exist_ok=True)

    method, cams = build_cams(model, method, layer_name)
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    rows: list[dict] = []
    started = time.perf_counter()
    for batch in make_loader(spec, env.rank, env.world_size, cfg.data.workers):
        idx = [i for i, k in enumerate(batch["key"]) if k in chosen]
        if not idx:
            continue
        x, _ = inputs(batch)
        x = x[idx]
        raw = batch["image"][idx].numpy()  # uint8, B x C x H x W (or B x V x C x H x W)
        masks = batch["mask"][idx].numpy() if "mask" in batch else None
        for j, i in enumerate(idx):
            key = batch["key"][i]
            target, probs = preds[key]
            true, pred = (
                _names(target, task.classes, task.multilabel),
                _names(
                    (probs >= 0.5).astype(int) if task.multilabel else int(probs.argmax()),
                    task.classes,
                    task.multilabel,
                ),
            )
            if len(views) > 1:
                rows.append(_multi_view(model, cams, x[j : j + 1], raw[j], key, true, pred, out_dir, views))
                continue
            image = raw[j].transpose(1, 2, 0) if raw[j].shape[0] == 3 else raw[j][0]
            for c in _explain_classes(target, probs, task.multilabel):
                heat = cams[0](input_tensor=x[j : j + 1], targets=[ClassifierOutputTarget(c)])[0]
                suffix = task.classes[c] if task.multilabel else ""
                name = render.file_name(key, true, pred, method, suffix)
                render.write_png(out_dir / name, render.overlay(image, heat))
                row = {"key": key, "file": name, "true": true, "pred": pred, "class": task.classes[c]}
                if masks is not None and masks[j].any():
                    mask = masks[j]
                    centre = localisation.centre_baseline(mask.shape)
                    row["class"] = _names(target, task.classes, task.multilabel)
                    row.update({f"cam_{k}": v for k, v in localisation.score(heat, mask).items()})
                    row.update({f"centre_{k}": v for k, v in localisation.score(centre, mask).items()})
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
    return _write(rows, task.classes, split, method, run, out_dir, wall, env.world_size)


def _multi_view(model, cams, x, raw, key, true, pred, out_dir, views) -> dict:
    panels = []
    for v, cam in enumerate(cams):
        img = raw[v].transpose(1, 2, 0) if raw[v].shape[0] == 3 else raw[v][0]
        heat = cam(input_tensor=x[:, v], targets=None)[0]
        panels.append(render.overlay(img, heat))
    name = render.file_name(key, true, pred, "eigencam", "-".join(views))
    gap = np.full((panels[0].shape[0], 8, 3), 255, np.uint8)
    render.write_png(out_dir / name, np.concatenate([panels[0], gap, panels[1]], axis=1))
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
            img = raw[target_view].transpose(1, 2, 0)
            att.append(render.overlay(img, _norm01(grid.cpu().numpy())))
        name2 = render.file_name(key, true, pred, "crossattention", "left-on-right_right-on-left")
        render.write_png(out_dir / name2, np.concatenate([att[0], gap, att[1]], axis=1))
        row["attention_file"] = name2
    return row


def _write(rows, classes, split, method, run: RunDir, out_dir, wall, world) -> dict:
    rows.sort(key=lambda r: r["file"])
    fields = sorted({k for r in rows for k in r}, key=lambda k: (k not in ("key", "file", "true", "pred"), k))
    with open(out_dir / "index.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    (out_dir / "index.html").write_text(render.index_html(rows, f"{method} — {split}"))
    scored = [r for r in rows if "cam_energy" in r]
    summary = {
        "method": method,
        "rendered": len(rows),
        "samples": len({r["key"] for r in rows}),
        "ranks": world,
        "images_per_s": len(rows) / wall if wall > 0 else None,
        "localisation": localisation.summarise(scored, classes) if scored else None,
    }
    atomic.write_json(out_dir / SUMMARY, summary)
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

    imgs = [decode((out_dir / r["file"]).read_bytes()) for r in rows[:16]]
    if not imgs:
        return
    h = max(i.shape[0] for i in imgs)
    w = max(i.shape[1] for i in imgs)
    padded = [
        np.pad(i, ((0, h - i.shape[0]), (0, w - i.shape[1]), (0, 0)), constant_values=255) for i in imgs
    ]
    grid = np.concatenate(padded, axis=0)  # one column: overlays are already two panels wide
    with SummaryWriter(str(tb_dir)) as tb:  # appends: no purge, the training's events stay
        tb.add_image(f"{split}/cam_{summary['method']}", grid, step, dataformats="HWC")
        loc = summary["localisation"] or {}
        for k in ("cam_pointing", "cam_energy", "cam_iou", "centre_pointing", "centre_energy"):
            if loc.get(k) is not None:
                tb.add_scalar(f"{split}/cam/{k}", loc[k], step)
        if summary["images_per_s"]:
            tb.add_scalar(f"{split}/cam/images_per_s", summary["images_per_s"], step)
