import pytest

from retina_dist.config import ConfigError, load_config
from tests.conftest import run_cli


def test_preset_and_overrides_merge_with_types():
    cfg = load_config("synthetic", ["train.epochs=3", "optim.lr=0.01", "eval.splits=[val,test]"])
    assert cfg.train.epochs == 3 and cfg.optim.lr == 0.01 and cfg.eval.splits == ["val", "test"]
    assert cfg.data.dataset == "synthetic"


@pytest.mark.parametrize(
    "override,needle",
    [
        ("train.epohcs=3", "unknown config key 'train.epohcs'"),
        ("model.nme=x", "unknown config key 'model.nme'"),
        ("train.epochs=many", "config key 'train.epochs'"),
        ("train.amp=fp8", "config key 'train.amp'"),
        ("train.batch_size=0", "train.batch_size"),
        ("epochs", "expected KEY=VALUE"),
    ],
)
def test_bad_config_names_the_key(override, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(")):
        load_config("synthetic", [override])


def test_unknown_preset_lists_known():
    with pytest.raises(ConfigError, match="known: .*synthetic"):
        load_config("no-such-preset")


def test_cli_rejects_unknown_key_before_starting_processes(tmp_path):
    proc = run_cli("run", "--nproc", "2", "--run-dir", str(tmp_path / "r"), "train.nope=1", check=False)
    assert proc.returncode == 2
    assert "unknown config key 'train.nope'" in proc.stderr
    assert not (tmp_path / "r").exists()  # nothing started, nothing written


def test_smoke_layer_shrinks_the_run():
    cfg = load_config("synthetic", smoke=True)
    assert cfg.train.epochs <= 2 and cfg.data.n <= 500 and cfg.data.image_size <= 64
