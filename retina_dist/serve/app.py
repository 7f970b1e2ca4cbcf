"""The FastAPI app behind ``retina-dist serve``: one page (plain HTML/JS, no build step), the model
card's facts at ``/api/info`` and a prediction with its CAM overlay at ``/api/predict``.

Uploads are read in memory up to a byte limit, sniffed by their first bytes (not their name),
decoded, and checked for size; every refusal is a JSON ``{"error": ...}`` the page shows as is.
Nothing is written to disk here (large multipart parts may be spooled by Starlette to the system
temp folder, and only there)."""

from __future__ import annotations

import base64
import threading
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.datastructures import UploadFile  # what Request.form() yields (FastAPI's is a subclass)

from retina_dist.cam import render
from retina_dist.cam.explainers import LABELS
from retina_dist.data.codec import CorruptImage, decode, encode
from retina_dist.data.preprocess import as_packed
from retina_dist.infer.model_card import model_card
from retina_dist.infer.predictor import Predictor

MAGIC = {
    b"\xff\xd8\xff": "jpeg",
    b"\x89PNG\r\n\x1a\n": "png",
    b"II*\x00": "tiff",
    b"MM\x00*": "tiff",
    b"BM": "bmp",
}
MIN_SIDE, MAX_SIDE = 32, 8192


class UploadRejected(ValueError):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def sniff(data: bytes) -> str | None:
    return next((kind for magic, kind in MAGIC.items() if data.startswith(magic)), None)


async def _read_limited(upload: UploadFile, limit: int) -> bytes:
    chunks, total = [], 0
    while chunk := await upload.read(1 << 20):
        total += len(chunk)
        if total > limit:
            raise UploadRejected(
                413, f"{upload.filename}: larger than the {limit // (1 << 20)} MiB upload limit"
            )
        chunks.append(chunk)
    return b"".join(chunks)


def validate(data: bytes, name: str) -> Any:
    if not data:
        raise UploadRejected(400, f"{name}: empty file")
    kind = sniff(data)
    if kind is None:
        raise UploadRejected(415, f"{name}: not a JPEG, PNG, TIFF or BMP image")
    try:
        image = decode(data, name)
    except CorruptImage as err:
        raise UploadRejected(422, f"{err} (looks like {kind} but is damaged)") from None
    h, w = image.shape[:2]
    if min(h, w) < MIN_SIDE or max(h, w) > MAX_SIDE:
        raise UploadRejected(
            422, f"{name}: {w} x {h} px; expected sides between {MIN_SIDE} and {MAX_SIDE} px"
        )
    return image


def create_app(predictor: Predictor, max_upload_bytes: int = 20 << 20) -> FastAPI:
    app = FastAPI(title="retina-dist", docs_url=None, redoc_url=None)
    card = model_card(predictor)
    lock = threading.Lock()  # one model, one forward at a time; CAM hooks are not re-entrant
    page = resources.files("retina_dist.serve").joinpath("static/index.html").read_text()

    @app.get("/", response_class=HTMLResponse)
    def index() -> str:
        return page

    @app.get("/api/info")
    def info() -> dict[str, Any]:
        return {
            "name": card["name"],
            "views": list(predictor.views),
            "classes": card["classes"],
            "task": card["task"],
            "decision": card["decision"],
            "caveats": card["caveats"],
            "metrics": card["metrics"],
            "max_upload_mib": max_upload_bytes / (1 << 20),
        }

    @app.post("/api/predict")
    async def predict(request: Request) -> JSONResponse:
        try:
            declared = int(request.headers.get("content-length") or 0)
            if declared > max_upload_bytes * len(predictor.views) + (64 << 10):
                # Read (and drop) a body of moderate excess first: a client still sending it would
                # otherwise get a broken pipe, not this message (seen in CI with a 2 MB upload).
                if declared <= 4 * max_upload_bytes * len(predictor.views):
                    async for _ in request.stream():
                        pass
                raise UploadRejected(413, f"upload of {declared} bytes is over the limit")
            form = await request.form(max_files=len(predictor.views), max_fields=len(predictor.views))
            images = []
            for view in predictor.views:
                upload = form.get(view)
                if not isinstance(upload, UploadFile) or not upload.filename:
                    raise UploadRejected(400, f"no '{view}' image in the upload")
                data = await _read_limited(upload, max_upload_bytes)
                images.append(validate(data, upload.filename))
        except UploadRejected as err:
            return JSONResponse({"error": str(err)}, status_code=err.status)
        with lock:
            sample = predictor.prepare(images)
            result = predictor.results(sample[None])[0]
            shown = [as_packed(im, predictor.max_side) for im in images]
            overlay = predictor.explanation(sample, result, shown)
        png = base64.b64encode(encode(overlay, ".png")).decode()
        probs = {c: round(float(p), 6) for c, p in zip(predictor.task.classes, result.probs, strict=True)}
        return JSONResponse(
            {
                "predicted": result.predicted,
                "probabilities": probs,
                "overlay": f"data:image/png;base64,{png}",
                "overlay_caption": render.safe("-".join(predictor.views))
                + f" | {LABELS.get(predictor.cfg.cam.method, 'CAM')} of "
                + ", ".join(result.predicted or ["top class"]),
            }
        )

    return app
