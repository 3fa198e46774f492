"""The config.yaml our users already have (a Lightning + W&B script's: dataset path, batch size,
epochs, learning rate, project / run names, checkpoint dir) is read by ``lensforge train --config``."""

from __future__ import annotations

from pathlib import Path

import pytest

from lensforge.cli import main
from lensforge.cli.options import build_parser
from lensforge.cli.commands import train_config
from lensforge.config import TrainConfig
from lensforge.errors import ConfigError

SEED = """\
dataset_path: data/roboflow
batch_size: 4
epochs: 12
learning_rate: 1e-4    # YAML reads this as a string (no dot): still a number to us
project: damage-detector
run_name: fasterrcnn-v2
checkpoint_dir: checkpoints
num_workers: 2
"""


def load(tmp_path: Path, text: str) -> TrainConfig:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return TrainConfig.load(path)


def test_a_seed_config_maps_to_our_settings(tmp_path: Path) -> None:
    cfg = load(tmp_path, SEED).validate()
    assert (cfg.data, cfg.batch_size, cfg.epochs, cfg.lr, cfg.workers) == ("data/roboflow", 4, 12, 1e-4, 2)
    # checkpoints go where the old script put them; trackers name the run after its directory
    assert Path(cfg.out) == Path("checkpoints/fasterrcnn-v2")
    assert cfg.extra == {"project": "damage-detector"}


@pytest.mark.parametrize(("text", "out"), [
    ("data_dir: d\ncheckpoint_dir: ckpt\n", "ckpt"),
    ("dataset: d\nrun_name: exp1\n", "runs/exp1"),
    ("data: d\n", None),
])
def test_run_directory_from_checkpoint_dir_and_run_name(tmp_path: Path, text: str, out: str | None) -> None:
    cfg = load(tmp_path, text)
    assert cfg.data == "d" and (cfg.out if cfg.out is None else Path(cfg.out)) == (out if out is None else Path(out))


@pytest.mark.parametrize(("text", "message"), [
    ("data: d\nlearning_rat: 0.1\n", "unknown config keys: learning_rat (did you mean learning_rate?)"),
    ("data: d\nbatchsize: 8\nepoch: 3\n", "batchsize (did you mean batch_size?), epoch (did you mean epochs?)"),
    ("data: d\nwandb_entity: me\n", "unknown config keys: wandb_entity; valid keys:"),
    ("data: d\ndata_dir: e\n", "'data' and 'data_dir' both set data; keep one"),
    ("data: d\nout: o\nrun_name: r\n", "out and run_name both set the run directory"),
    ("data: d\nlearning_rate: fast\n", "lr must be a number, got 'fast'"),
    ("data: d\nproject: [a, b]\n", "project must be a name"),
])
def test_bad_seed_keys_are_named(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match="config.yaml: " + ".*" + message.replace("(", r"\(").replace(")", r"\)").replace("?", r"\?")):
        load(tmp_path, text)


def test_unknown_key_is_one_line_exit_2_from_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("dataset_path: d\nlearning_rat: 0.1\n")
    assert main(["train", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "learning_rat (did you mean learning_rate?)" in err


def test_train_without_data_takes_the_config_files_and_options_still_win(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(SEED)
    args = build_parser().parse_args(["train", "--config", str(path), "--epochs", "3"])
    cfg = train_config(args)
    assert (cfg.data, cfg.epochs, cfg.batch_size) == ("data/roboflow", 3, 4)
    args = build_parser().parse_args(["train", "other/", "--config", str(path)])
    assert train_config(args).data == "other/"


@pytest.mark.parametrize(("argv", "message"), [
    (["train"], "no data given"),
    (["train", "--config", "{tmp}/run/config.yaml"], "config file not found"),  # a run dir that is not a run
    (["train", "--finish", "--out", "{tmp}/run", "--config", "{tmp}/cfg.yaml"], "is not a lensforge run directory"),
    (["report", "{tmp}/run"], "is not a lensforge run directory"),
])
def test_not_a_run_is_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str) -> None:
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("not a run")
    (tmp_path / "cfg.yaml").write_text(f"data: {tmp_path}\n")
    code = main([a.format(tmp=tmp_path) for a in argv])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1, err
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["notes.txt"]  # nothing written into it
