"""TrainConfig: YAML + overrides, types and ranges checked with errors that name the key."""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

import pytest

from lensforge.config import TrainConfig, field_help
from lensforge.errors import ConfigError
from lensforge.tasks import get_task


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


def test_every_field_has_help() -> None:
    # the field comments are `lensforge train --help`: a field without one is an undocumented option
    helps = field_help(TrainConfig)
    assert [f.name for f in fields(TrainConfig) if not helps.get(f.name)] == []
    assert helps["backbone"].endswith("(COCO weights from the hub)")  # continuation lines are joined
    assert "fasterrcnn_mobilenet_v3_large_fpn" in helps["backbone"]


def test_field_help_reads_trailing_and_continued_comments_only() -> None:
    @dataclass
    class Example:
        a: int = 1  # first
        # second
        b: int = 2
        # not b's: b has no comment of its own
        c: str = "x"  # one line

    assert field_help(Example) == {"a": "first second", "c": "one line"}


@pytest.mark.parametrize("task", ["classify", "multilabel", "detect"])
def test_resolve_takes_the_task_defaults(task: str) -> None:
    defaults = get_task(task).defaults
    cfg = TrainConfig(data="x").resolve(task)
    assert {k: getattr(cfg, k) for k in defaults} == defaults
    assert TrainConfig(data="x", batch_size=7, beta=3.0).resolve(task).batch_size == 7  # a value given stays


def test_task_defaults_differ_where_the_help_says() -> None:
    assert get_task("detect").defaults["image_size"] == 512 and get_task("classify").defaults["image_size"] == 224
    assert get_task("detect").defaults["beta"] == 2.0 and get_task("multilabel").defaults["beta"] == 1.0
