"""TrainConfig: YAML + overrides, types and ranges checked with errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from lensforge.config import TrainConfig
from lensforge.errors import ConfigError


def test_yaml_then_overrides(tmp_path: Path) -> None:
    p = tmp_path / "run.yaml"
    p.write_text("data: photos\nepochs: 3\nlr: 0.001\n")
    cfg = TrainConfig.load(p, epochs=7, lr=None).validate()
    assert (cfg.data, cfg.epochs, cfg.lr) == ("photos", 7, 0.001)


def test_saved_config_round_trips_without_one_off_flags(tmp_path: Path) -> None:
    cfg = TrainConfig(data="photos", overwrite=True, resume=True, epochs=4)
    cfg.save(tmp_path / "config.yaml", versions={"lensforge": "x"})
    again = TrainConfig.load(tmp_path / "config.yaml")
    assert again.epochs == 4 and again.data == "photos"
    assert again.overwrite is False and again.resume is False  # never replayed from a saved run


def test_paths_are_accepted(tmp_path: Path) -> None:
    assert TrainConfig(data=tmp_path).validate().data == str(tmp_path)


@pytest.mark.parametrize(
    ("yaml_text", "message"),
    [
        ("data: x\nepochs: ten\n", "epochs must be int"),
        ("data: x\nimage_size: 224.5\n", "image_size must be int"),
        ("data: x\npretrained: 'no'\n", "pretrained must be bool"),
        ("data: x\nbeta: 0\n", "beta = 0 is out of range"),
        ("data: x\ndropout: 1.5\n", "dropout = 1.5 is out of range"),
        ("data: x\nlr: -1\n", "lr = -1 is out of range"),
        ("data: x\nmax_steps: 0\n", "max_steps = 0 is out of range"),
        ("data: x\ntask: segment\n", "task must be one of"),
        ("data: x\nepochz: 3\n", "unknown config keys: epochz"),
        ("- just\n- a list\n", "must hold a mapping"),
        ("data: [unclosed\n", "is not valid YAML"),
        ("epochs: 3\n", "no data given"),
    ],
)
def test_bad_configs_name_the_key(tmp_path: Path, yaml_text: str, message: str) -> None:
    p = tmp_path / "run.yaml"
    p.write_text(yaml_text)
    with pytest.raises(ConfigError, match=message):
        TrainConfig.load(p).validate()


def test_missing_or_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        TrainConfig.load(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="cannot read"):
        TrainConfig.load(tmp_path)  # a directory
