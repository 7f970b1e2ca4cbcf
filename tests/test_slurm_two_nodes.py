"""`sbatch --nodes=2` against a real two-node SLURM cluster on this machine: a second slurmctld and two
slurmd (`slurmd -N n1`, `slurmd -N n2`, each on its own port, Debian's build allows it), with their
own slurm.conf, started here next to the one-node cluster of .ci/slurm-up.sh (sharing its munge).

The node names do not resolve as host names, so the job is told the rendezvous host
(MASTER_ADDR=127.0.0.1), as a site whose node names are not host names would do."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from retina_dist.data.manifest import load_manifest
from retina_dist.run.checkpoints import Checkpointer
from tests.conftest import TINY
from tests.test_slurm import _tail, sbatch, wait_done


def _ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@pytest.fixture(scope="module")
def two_nodes():
    """A two-node cluster's slurm.conf path; the daemons stop at the end of the module. It needs
    SLURM's binaries, a running munged and root (as .ci/slurm-up.sh), not the one-node cluster's
    node, which another module's job may still hold."""
    if shutil.which("slurmctld") is None or subprocess.run(["pgrep", "-x", "munged"]).returncode:
        if os.environ.get("RETINA_DIST_REQUIRE_SLURM"):
            pytest.fail(
                "RETINA_DIST_REQUIRE_SLURM is set but slurmctld or munged is missing (.ci/slurm-up.sh)"
            )
        pytest.skip("no SLURM here; `sudo bash .ci/slurm-up.sh` installs it and starts munge")
    if os.geteuid() != 0:
        pytest.skip("starting slurmctld/slurmd needs root (as .ci/slurm-up.sh does)")
    root = Path(tempfile.mkdtemp(prefix="retina-dist-slurm2-"))  # under /tmp: the slurm user can enter it
    ctld, n1, n2 = _ports(3)
    base = Path("/etc/slurm/slurm.conf").read_text().splitlines()
    drop = ("ClusterName", "NodeName", "PartitionName", "StateSaveLocation", "SlurmdSpoolDir", "JobCompLoc")
    drop += ("SlurmctldPidFile", "SlurmdPidFile", "SlurmctldLogFile", "SlurmdLogFile", "SlurmctldPort")
    kept = [line for line in base if not line.startswith(drop)]
    conf = root / "slurm.conf"
    conf.write_text(
        "\n".join(
            [
                *kept,
                "ClusterName=twonodes",
                f"SlurmctldPort={ctld}",
                f"StateSaveLocation={root}/ctld",
                f"SlurmdSpoolDir={root}/spool-%n",
                f"SlurmctldPidFile={root}/ctld.pid",
                f"SlurmdPidFile={root}/slurmd-%n.pid",
                f"SlurmctldLogFile={root}/ctld.log",
                f"SlurmdLogFile={root}/slurmd-%n.log",
                f"JobCompLoc={root}/jobcomp.log",
                f"NodeName=n1 NodeHostname={socket.gethostname()} NodeAddr=127.0.0.1 Port={n1} CPUs=1 "
                "RealMemory=4000 State=UNKNOWN",
                f"NodeName=n2 NodeHostname={socket.gethostname()} NodeAddr=127.0.0.1 Port={n2} CPUs=1 "
                "RealMemory=4000 State=UNKNOWN",
                "PartitionName=two Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP",
                "",
            ]
        )
    )
    for sub in ("ctld", "spool-n1", "spool-n2"):
        (root / sub).mkdir()
    shutil.chown(root, "slurm")
    shutil.chown(root / "ctld", "slurm")
    root.chmod(0o755)
    env = {**os.environ, "SLURM_CONF": str(conf)}
    subprocess.run(["slurmctld", "-f", str(conf), "-c"], check=True, timeout=30)
    for node in ("n1", "n2"):
        subprocess.run(["slurmd", "-f", str(conf), "-N", node], check=True, timeout=30)
    deadline = time.monotonic() + 60
    states = ""
    while time.monotonic() < deadline:
        states = subprocess.run(
            ["sinfo", "-h", "-N", "-o", "%N %T"], env=env, capture_output=True, text=True, timeout=30
        ).stdout
        if states.count("idle") == 2:
            break
        time.sleep(0.5)
    try:
        assert states.count("idle") == 2, f"two-node cluster not idle: {states}\n" + "".join(
            _tail(root / f) for f in ("ctld.log", "slurmd-n1.log", "slurmd-n2.log")
        )
        yield conf
    finally:
        subprocess.run(["scontrol", "shutdown"], env=env, timeout=30)
        time.sleep(1)
        shutil.rmtree(root, ignore_errors=True)


def test_sbatch_two_nodes_trains_one_rank_per_node_evaluates_once_and_resumes(
    two_nodes, shards, tmp_path, monkeypatch
):
    monkeypatch.setenv("SLURM_CONF", str(two_nodes))  # sbatch, scontrol and the job see this cluster
    run_root = tmp_path / "runs"
    run_root.mkdir()
    args = [
        "--nodes=2",
        "--ntasks-per-node=1",
        f"--output={run_root}/%x-%j.out",
        "slurm/synthetic.sh",
        f"data.shards={shards}",
        *TINY,
        "train.epochs=2",
        "optim.lr=3e-3",
    ]
    env = {"RUN_ROOT": str(run_root), "MASTER_ADDR": "127.0.0.1"}
    job = sbatch(*args, env=env)
    log = run_root / f"synthetic-{job}.out"
    assert wait_done(job, log) == "COMPLETED", _tail(log)
    text = log.read_text()
    assert f"job {job} restart 0 on n[1-2]: 2 tasks" in text, _tail(log)
    run_dir = run_root / f"synthetic-{job}"
    train_log = (run_dir / "train.log").read_text()
    assert "2 ranks (slurm)" in train_log
    metrics = json.loads((run_dir / "metrics.json").read_text())["val"]
    assert metrics["n"] == load_manifest(shards).splits["val"].count  # each sample once, over the two nodes
    steps = metrics["step"]
    ck = Checkpointer(run_dir / "checkpoints")
    assert ck.latest(verify=True).name == f"step-{steps:08d}.pt"
    assert len(list((run_dir / "checkpoints").glob("step-*.pt"))) == 2  # keep_last 2: one file per save

    # The same run folder, two more epochs, on both nodes again: resumed from latest by both ranks.
    again = sbatch(*args[:-2], "train.epochs=4", "optim.lr=3e-3", env={**env, "RUN_DIR": str(run_dir)})
    log2 = run_root / f"synthetic-{again}.out"
    assert wait_done(again, log2) == "COMPLETED", _tail(log2)
    assert "resumed from step-" in (run_dir / "train.log").read_text()
    assert json.loads((run_dir / "metrics.json").read_text())["val"]["step"] == 2 * steps
