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

TOLERANCE = 1e-4  # max abs difference in probability between the export and PyTorch


class ExportError(RuntimeError):
    pass


class Deployable(nn.Module):
    """float pixels 0..255, B x C x H x W (B x V x C x H x W) -> calibrated probabilities."""

    def __init__(
        self, model: nn.Module, scale: torch.Tensor, shift: torch.Tensor, temperature: float, multilabel: bool
    ):
        super().__init__()
        self.model, self.multilabel = model, multilabel
        self.register_buffer("scale", scale.detach().clone().cpu())
        self.register_buffer("shift", shift.detach().clone().cpu())
        self.register_buffer("inv_t", torch.tensor(1.0 / temperature))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale, shift, inv_t = self.scale, self.shift, self.inv_t
        assert isinstance(scale, torch.Tensor) and isinstance(shift, torch.Tensor)
        logits = self.model(x * scale + shift) * inv_t
        return torch.sigmoid(logits) if self.multilabel else torch.softmax(logits, dim=1)


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
    return Deployable(
        p.model.cpu().float(), p.inputs.scale, p.inputs.shift, p.temperature, p.task.multilabel
    ).eval()


def export(run_dir: str | Path, fmt: str, out: str | Path | None = None) -> dict[str, Any]:
    if fmt not in ("torchscript", "onnx"):
        raise ValueError(f"export format {fmt!r}: expected torchscript or onnx")
    p = Predictor(run_dir, device="cpu", tta=False)
    out = Path(out) if out else p.run.export_dir / ("model.pt" if fmt == "torchscript" else "model.onnx")
    out.parent.mkdir(parents=True, exist_ok=True)
    module = deployable(p)
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
    card = model_card(p, {"format": fmt, "file": out.name, "verification": check})
    atomic.write_json(out.with_name("model_card.json"), card)
    atomic.write_text(out.with_name("MODEL_CARD.md"), card_markdown(card))
    return {"file": str(out), **check}


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
