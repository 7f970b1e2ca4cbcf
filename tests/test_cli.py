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


def test_eval_command_reevaluates_a_run(shards, tmp_path):
    run_dir = tmp_path / "r"
    run_cli("train", "--run-dir", str(run_dir), f"data.shards={shards}", *TINY, "train.epochs=1")
    before = json.loads((run_dir / "metrics.json").read_text())["val"]
    (run_dir / "metrics.json").unlink()
    run_cli("eval", "--run-dir", str(run_dir), "--nproc", "2")
    after = json.loads((run_dir / "metrics.json").read_text())["val"]
    assert after["n"] == before["n"] and after["accuracy"] == before["accuracy"]
