"""Two "nodes" on this machine: two launchers, each with 2 local ranks, meeting through torch's c10d
rendezvous on 127.0.0.1 — the stream deals its shards over all 4 ranks, the evaluation is exact-once
across nodes, the checkpoint is written once and both nodes resume from it."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

from retina_dist.data.manifest import load_manifest
from retina_dist.run.checkpoints import Checkpointer, load
from tests.conftest import REPO, TINY, free_port

TIMEOUT = 300


def _nodes(cmd: list[str], tmp_path: Path, tag: str) -> list[str]:
    """Run ``cmd(node_rank)`` as two launchers at once; their combined output, node by node."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    logs = [tmp_path / f"{tag}-node{r}.log" for r in (0, 1)]
    procs = []
    for r, log in enumerate(logs):
        with log.open("w") as fh:
            argv = [a.replace("{node}", str(r)) for a in cmd]
            procs.append(subprocess.Popen(argv, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT))
    codes = [p.wait(timeout=TIMEOUT) for p in procs]
    texts = [log.read_text() for log in logs]
    assert codes == [0, 0], "\n\n".join(t[-3000:] for t in texts)
    return texts


def test_two_nodes_deal_the_shards_over_all_ranks(shards, tmp_path):
    out = tmp_path / "probe"
    out.mkdir()
    rdzv = f"--rdzv-endpoint=127.0.0.1:{free_port()}"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--node-rank={node}"]
    cmd = [*torchrun, "--nproc-per-node=2", "--rdzv-backend=c10d", rdzv, "--rdzv-id=probe"]
    _nodes([*cmd, str(REPO / "tests" / "node_probe.py"), str(shards), str(out)], tmp_path, "probe")
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(4)]
    assert all(r["world"] == 4 for r in ranks)
    by_node = {n: sorted(r["local_rank"] for r in ranks if r["node"] == n) for n in (0, 1)}
    assert by_node == {0: [0, 1], 1: [0, 1]}  # two nodes of two local ranks, global ranks 0..3
    train = load_manifest(shards).splits["train"]
    per_rank = ranks[0]["batches"] * 16
    for r in ranks:
        assert len(r["keys"]) == per_rank and len(set(r["keys"])) == per_rank  # nothing twice in a rank
    everything = [k for r in ranks for k in r["keys"]]
    assert len(set(everything)) == len(everything) == 4 * per_rank  # nor across ranks and nodes
    assert 4 * per_rank > 0.9 * train.count  # and most of the split is read each epoch
    assert ranks[3]["all_keys"] == everything  # the gather across nodes agrees


def test_two_nodes_train_evaluate_exactly_once_checkpoint_once_and_resume(shards, tmp_path):
    run_dir = tmp_path / "r"
    base = [sys.executable, "-m", "retina_dist", "train", "--nproc", "2", "--nnodes", "2"]
    common = [f"data.shards={shards}", *TINY, "eval.splits=[val]"]

    def train(epochs: int, tag: str) -> list[str]:
        rdzv = ["--rdzv-endpoint", f"127.0.0.1:{free_port()}"]
        where = ["--node-rank", "{node}", *rdzv, "--run-dir", str(run_dir)]
        cmd = [*base, *where, *common, f"train.epochs={epochs}"]
        return _nodes(cmd, tmp_path, tag)

    first = train(1, "first")
    assert "4 ranks (torchrun)" in first[0]
    val = load_manifest(shards).splits["val"]
    with open(run_dir / "predictions" / "val.csv", newline="") as fh:
        keys = [row["key"] for row in csv.DictReader(fh)]
    assert len(keys) == len(set(keys)) == val.count  # every val sample once, over 4 ranks on 2 nodes
    ck = Checkpointer(run_dir / "checkpoints")
    written = sorted(p.name for p in ck.folder.glob("step-*"))
    steps = load(ck.latest(verify=True))["state"]["step"]
    assert written == [f"step-{steps:08d}.pt"]  # one file, written once (by global rank 0)

    second = train(2, "second")
    assert f"resumed from step-{steps:08d}.pt at epoch 1" in second[0]
    state = load(ck.latest(verify=True))["state"]
    # Both nodes resumed: a node that started over would run twice the steps of its peers, and the
    # job would hang in a collective they never join; it ends at exactly two epochs of steps.
    assert state["epoch"] == 2 and state["step"] == 2 * steps
    assert json.loads((run_dir / "metrics.json").read_text())["val"]["step"] == 2 * steps
