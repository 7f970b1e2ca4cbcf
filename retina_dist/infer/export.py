"""``retina-dist export``: the run's model as TorchScript or ONNX, with normalisation, temperature
and the output activation inside, so a deployment feeds resized 0-255 pixels and reads calibrated
probabilities. The exported file is checked against PyTorch on fresh inputs at another batch size,
and a model card is written beside it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from retina_dist import atomic
from retina_dist.infer.model_card import card_markdown, model_card
from retina_dist.infer.predictor import Predictor
from retina_dist.tasks import Task

TOLERANCE = 1e-4  # max abs difference in probability between the export and PyTorch


class ExportError(RuntimeError):
    pass


class Deployable(nn.Module):
    """float pixels 0..255, B x C x H x W (B x V x C x H x W) -> calibrated probabilities."""

    def __init__(
        self, model: nn.Module, scale: torch.Tensor, shift: torch.Tensor, temperature: float, task: Task
    ):
        super().__init__()
        self.model, self.task = model, task
        self.register_buffer("scale", scale.detach().clone().cpu())
        self.register_buffer("shift", shift.detach().clone().cpu())
        self.register_buffer("inv_t", torch.tensor(1.0 / temperature))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale, shift, inv_t = self.scale, self.shift, self.inv_t
        assert isinstance(scale, torch.Tensor) and isinstance(shift, torch.Tensor)
        return self.task.probabilities(self.model(x * scale + shift) * inv_t)


def _example(p: Predictor, batch: int, seed: int) -> torch.Tensor:
    """Synthetic retinas through the run's preprocessing: noise would saturate the softmax and make
    any export look exact."""
    from retina_dist.data.synthetic import generate

    n = p.task.num_classes
    samples = [
        p.prepare(
            [
                generate(
                    "oct" if v == "oct" else "fundus",
                    seed,
                    i * len(p.views) + j,
                    2 * p.image_size,
                    i % min(n, 4),
                ).image
                for j, v in enumerate(p.views)
            ]
        )
        for i in range(batch)
    ]
    return torch.from_numpy(np.stack(samples).astype(np.float32))


def deployable(p: Predictor) -> Deployable:
    # 1 x C x 1 x 1 broadcasts over B x V x C x H x W too. Temperature on the logits is what
    # calibration.apply_temperature does to the probabilities.
    return Deployable(p.model.cpu().float(), p.inputs.scale, p.inputs.shift, p.temperature, p.task).eval()


class EnsembleDeployable(nn.Module):
    """The members' Deployables (each its own normalisation and temperature) on the same pixels,
    combined as ``retina-dist ensemble`` combines them: the weighted mean of the calibrated
    probabilities, or of their logits (log-probabilities; log-odds for multi-label) mapped back."""

    def __init__(self, members: list[Deployable], weights: list[float], how: str, task: Task):
        super().__init__()
        self.members, self.how, self.task = nn.ModuleList(members), how, task
        self.register_buffer("w", torch.tensor(weights, dtype=torch.float32) / sum(weights))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.w
        assert isinstance(w, torch.Tensor)
        probs = torch.stack([m(x) for m in self.members])  # members x B x classes
        if self.how == "probs":
            return torch.einsum("m,mbc->bc", w, probs)
        p = probs.clamp(1e-7, 1 - 1e-7)
        z = torch.einsum("m,mbc->bc", w, torch.log(p / (1 - p)) if self.task.multilabel else torch.log(p))
        return self.task.probabilities(z)


def export(run_dir: str | Path, fmt: str, out: str | Path | None = None) -> dict[str, Any]:
    if fmt not in ("torchscript", "onnx"):
        raise ValueError(f"export format {fmt!r}: expected torchscript or onnx")
    p = Predictor(run_dir, device="cpu", tta=False)
    out = Path(out) if out else p.run.export_dir / ("model.pt" if fmt == "torchscript" else "model.onnx")
    check = _write(deployable(p), p, fmt, out)
    card = model_card(p, {"format": fmt, "file": out.name, "verification": check})
    atomic.write_json(out.with_name("model_card.json"), card)
    atomic.write_text(out.with_name("MODEL_CARD.md"), card_markdown(card))
    return {"file": str(out), **check}


def export_ensemble(folder: str | Path, fmt: str, out: str | Path | None = None) -> dict[str, Any]:
    """An ensemble folder (``retina-dist ensemble --out``) as one file: every member inside, with
    the ensemble's weights and rule. Members must take the same input (views, channels, size)."""
    from retina_dist.config import ConfigError

    if fmt not in ("torchscript", "onnx"):
        raise ValueError(f"export format {fmt!r}: expected torchscript or onnx")
    folder = Path(folder)
    record_path = folder / "ensemble.json"
    if not record_path.exists():
        raise ConfigError(f"{folder}: no ensemble.json; run `retina-dist ensemble --out {folder}` first")
    record = json.loads(record_path.read_text())
    members = [Predictor(m["run"], device="cpu", tta=False) for m in record["members"]]
    first = members[0]
    for m in members[1:]:
        got = (m.views, m.in_chans, m.image_size, m.max_side)
        want = (first.views, first.in_chans, first.image_size, first.max_side)
        if got != want:
            raise ConfigError(
                f"{m.run_dir} takes {got} (views, channels, size, stored side) but {first.run_dir} "
                f"takes {want}: one exported file has one input; export the members one by one"
            )
    module = EnsembleDeployable(
        [deployable(m) for m in members],
        [m["weight"] for m in record["members"]],
        record["combine"],
        first.task,
    ).eval()
    out = Path(out) if out else folder / "export" / ("model.pt" if fmt == "torchscript" else "model.onnx")
    check = _write(module, first, fmt, out)
    card = model_card(
        first,
        {
            "name": f"ensemble of {len(members)}: " + ", ".join(m.run_dir.name for m in members),
            "format": fmt,
            "file": out.name,
            "verification": check,
            "ensemble": record,
        },
    )
    card["metrics"] = {record["split"]: {"n": None, **record["ensemble"]}}
    card["calibration"] = {
        "temperature": [m.temperature for m in members],
        "fitted_on": first.calibrated_on,
    }
    atomic.write_json(out.with_name("model_card.json"), card)
    atomic.write_text(out.with_name("MODEL_CARD.md"), card_markdown(card))
    return {"file": str(out), **check}


def _write(module: nn.Module, p: Predictor, fmt: str, out: Path) -> dict[str, Any]:
    """``module`` traced on ``p``'s preprocessed examples into ``out`` (atomically), then checked
    against PyTorch on other examples at another batch size."""
    out.parent.mkdir(parents=True, exist_ok=True)
    example = _example(p, 2, 0)
    tmp = out.with_name(out.name + ".tmp")
    with torch.no_grad():
        if fmt == "torchscript":
            torch.jit.save(torch.jit.trace(module, example), str(tmp))
        else:
            # The TorchScript-based exporter: it needs only the onnx package (the dynamo one also
            # needs onnxscript) and handles every timm family we ship.
            torch.onnx.export(
                module,
                (example,),
                str(tmp),
                input_names=["image"],
                output_names=["probabilities"],
                dynamic_axes={"image": {0: "batch"}, "probabilities": {0: "batch"}},
                opset_version=17,
                dynamo=False,
            )
    tmp.replace(out)
    check = _verify(module, out, fmt, _example(p, 3, 1))
    if check["max_abs_diff"] > TOLERANCE:
        raise ExportError(
            f"{out}: outputs differ from PyTorch by {check['max_abs_diff']:.2e} (> {TOLERANCE:g}); "
            "the export is not usable as is"
        )
    return check


@torch.no_grad()
def _verify(module: nn.Module, path: Path, fmt: str, x: torch.Tensor) -> dict[str, Any]:
    ref = module(x).numpy()
    if fmt == "torchscript":
        got = torch.jit.load(str(path), map_location="cpu")(x).numpy()
        runtime = f"torch.jit {torch.__version__}"
    else:
        import onnx
        import onnxruntime as ort

        onnx.checker.check_model(str(path))
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        got = sess.run(None, {"image": x.numpy()})[0]
        runtime = f"onnxruntime {ort.__version__}"
    return {
        "runtime": runtime,
        "batch": int(x.shape[0]),
        "max_abs_diff": float(np.abs(ref - got).max()),
        "tolerance": TOLERANCE,
    }


def load_card(folder: str | Path) -> dict[str, Any]:
    return json.loads((Path(folder) / "model_card.json").read_text())
