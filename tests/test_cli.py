import json
import shutil

from tests.conftest import TINY, run_cli


def test_pack_and_verify_commands(tmp_path):
    out = tmp_path / "s"
    proc = run_cli(
        "pack", "synthetic", "--out", str(out), "--n", "40", "--image-size", "32", "--workers", "2"
    )
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["train"]["count"] + summary["val"]["count"] == 40
    report = json.loads(run_cli("verify", str(out)).stdout)
    assert report["train"]["count"] == summary["train"]["count"]


def test_missing_shard_is_a_clear_error(shards, tmp_path):
    copy = tmp_path / "s"
    shutil.copytree(shards, copy)
    (copy / "train-000002.tar").unlink()
    proc = run_cli("train", "--run-dir", str(tmp_path / "r"), f"data.shards={copy}", *TINY, check=False)
    assert proc.returncode == 2
    assert "train-000002.tar: shard listed in the manifest is missing" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_unpacked_dataset_and_empty_split_are_clear_errors(shards, tmp_path):
    proc = run_cli("train", "--run-dir", str(tmp_path / "r"), f"data.shards={tmp_path / 'none'}", check=False)
    assert proc.returncode == 2 and "no manifest" in proc.stderr
    proc = run_cli(
        "train",
        "--run-dir",
        str(tmp_path / "r"),
        f"data.shards={shards}",
        "data.train_split=test",
        check=False,
    )
    assert proc.returncode == 2 and "no split 'test'" in proc.stderr


def test_eval_command_reevaluates_a_run_apart_from_its_training(shards, tmp_path):
    run_dir = tmp_path / "r"
    run_cli("train", "--run-dir", str(run_dir), f"data.shards={shards}", *TINY, "train.epochs=1")
    trained = json.loads((run_dir / "metrics.json").read_text())["val"]
    run_cli("eval", "--run-dir", str(run_dir), "--nproc", "2")
    (latest,) = [p.name for p in (run_dir / "evals").iterdir()]
    assert latest == f"val-step-{trained['step']:08d}"
    again = json.loads((run_dir / "evals" / latest / "metrics.json").read_text())["val"]
    assert again["n"] == trained["n"] and again["accuracy"] == trained["accuracy"]
    assert again["temperature"] == trained["temperature"]  # the run's calibration, applied, not refitted
    assert (run_dir / "evals" / latest / "predictions" / "val.csv").exists()
    assert (run_dir / "evals" / latest / "figures" / "val_roc.png").exists()


def test_prepare_checks_every_split_before_any_rank_starts(shards, tmp_path):
    ok = run_cli("prepare", "--run-dir", str(tmp_path / "r"), f"data.shards={shards}")
    assert ok.stdout.strip() == str(tmp_path / "r") and (tmp_path / "r").is_dir()
    bad = run_cli("prepare", f"data.shards={shards}", "eval.splits=[val,test]", check=False)
    assert bad.returncode == 2 and "no split 'test'" in bad.stderr


def test_torchrun_helper_starts_one_rank_per_process(shards, tmp_path):
    import os
    import subprocess
    import sys

    from tests.conftest import REPO

    env = {**os.environ, "NPROC": "2", "RETINA_DIST_PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            "bash",
            "launch/torchrun.sh",
            "--run-dir",
            str(tmp_path / "r"),
            f"data.shards={shards}",
            *TINY,
            "train.epochs=1",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 ranks (torchrun)" in (tmp_path / "r" / "train.log").read_text()
    assert json.loads((tmp_path / "r" / "metrics.json").read_text())["val"]["n"] > 0
