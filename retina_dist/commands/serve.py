"""``retina-dist serve``: a small web page over a trained run (one upload at a time)."""

from __future__ import annotations

import argparse
import logging

from retina_dist.commands.common import device_name

log = logging.getLogger("retina_dist")
HELP = "a small web page: upload an image, see probabilities and the CAM"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, help="run folder (runs/<name>)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="TCP port")
    p.add_argument("--max-upload-mb", type=float, default=20.0, help="larger uploads are refused (413)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from retina_dist.infer.predictor import Predictor
    from retina_dist.serve.app import create_app

    if args.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("serving on %s: anyone who can reach this address can upload images", args.host)
    app = create_app(Predictor(args.run, device_name(args.device)), int(args.max_upload_mb * (1 << 20)))
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0
