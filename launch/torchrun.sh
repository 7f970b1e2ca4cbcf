#!/usr/bin/env bash
# A multi-GPU workstation: one process per GPU through torchrun (standalone rendezvous).
#   bash launch/torchrun.sh --preset kermany_resnet18 [KEY=VALUE ...]
#   NPROC=2 bash launch/torchrun.sh --preset synthetic --smoke      # CPU: any process count, gloo
# `retina-dist run --nproc N` does the same from Python (and packs a synthetic set first).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${RETINA_DIST_PYTHON:-.venv/bin/python}
[ -x "$PYTHON" ] || PYTHON=$(command -v python3)
if [ -z "${NPROC:-}" ]; then
    NPROC=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
    [ "$NPROC" -gt 0 ] || NPROC=1
fi
"$PYTHON" -m retina_dist prepare "$@" >/dev/null
exec "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node="$NPROC" -m retina_dist train "$@"
