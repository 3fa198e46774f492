"""The run configuration: one typed dataclass, loadable from YAML, overridable from the CLI,
saved resolved next to the run."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from lensforge.data.records import TASKS
from lensforge.errors import ConfigError

ACTIONS = ("overwrite", "resume")  # flags for one invocation, never saved with a run
# Settings whose good value depends on the task; None in a config means "this table's value".
# Detectors see whole images (not 224-px crops), need a few images per step on a CPU, and
# fine-tune a detection head that SGD-style large learning rates destabilise.
TASK_DEFAULTS: dict[str, dict[str, Any]] = {
    "classify": {"image_size": 224, "batch_size": 32, "lr": 5e-4, "weight_decay": 0.05},
    "multilabel": {"image_size": 224, "batch_size": 32, "lr": 5e-4, "weight_decay": 0.05},
    "detect": {"image_size": 512, "batch_size": 4, "lr": 3e-4, "weight_decay": 1e-4},
}
_RANGE_HINTS = {
    "lr": "> 0", "weight_decay": ">= 0", "warmup_epochs": ">= 0", "label_smoothing": "in [0, 1)", "dropout": "in [0, 1)",
    "beta": "> 0; 1 = F1, 2 = F2", "workers": ">= 0", "patience": ">= 0, 0 = off", "probe_c": "> 0", "max_parity": "> 0",
    "max_steps": "-1 for no limit, or >= 1",
}


@dataclass
class TrainConfig:
    data: str = ""  # dataset directory or CSV file
    task: str | None = None  # classify | multilabel | detect; None = what the data says
    format: str | None = None  # folders | split-folders | csv | coco | roboflow-coco | yolo; None = auto-detect
    out: str | None = None  # run directory; default runs/<data name>-<task>
    allow_outside_root: bool = False  # read images the data names outside its folder (CSV rows, file_name, symlinks)
    backbone: str = "efficientnet_lite0"  # detectors: lite0_fpn (= efficientnet_lite0), fasterrcnn_resnet50_fpn[_v2], ...
    pretrained: bool = True
    weights: str | None = None  # local weights file for the backbone (safetensors / state dict)
    head: str = "linear"  # linear | mlp
    probe: bool = False  # logistic regression on frozen features instead of fine-tuning
    image_size: int | None = None  # classifiers: input side (224); detectors: shorter image side (512); None = TASK_DEFAULTS
    epochs: int = 10
    batch_size: int | None = None  # None = TASK_DEFAULTS (32 classifiers, 4 detectors)
    lr: float | None = None  # backbone learning rate (classifier heads learn 10x faster); None = TASK_DEFAULTS
    weight_decay: float | None = None  # None = TASK_DEFAULTS
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.0
    dropout: float = 0.2
    patience: int = 5  # early stopping: epochs without a better validation metric
    beta: float | None = None  # thresholds maximise F-beta on validation; None = 1 (multi-label), 2 (detection: recall matters more)
    test_fraction: float = 0.2  # of all images, when the data is not pre-split
    val_fraction: float = 0.2  # of the rest
    seed: int = 0
    workers: int = 0  # data-loader processes; 0 decodes in the training process
    precision: str = "auto"  # auto | 32 | bf16 (auto: bf16 only on CPUs with native bf16)
    max_steps: int = -1  # stop after this many optimiser steps (-1: no limit); for smoke tests
    probe_c: float = 1.0  # inverse regularisation strength of the probe's logistic regression
    max_parity: float = 1e-3  # export fails if ONNX and torch scores differ more than this
    overwrite: bool = False
    resume: bool = False
    extra: dict[str, Any] = field(default_factory=dict)  # free-form notes saved with the run

    def validate(self) -> "TrainConfig":
        for key in ("data", "out", "weights"):  # Path objects from Python callers are welcome
            if isinstance(getattr(self, key), os.PathLike):
                setattr(self, key, os.fspath(getattr(self, key)))
        for f in fields(self):
            _check_type(f.name, getattr(self, f.name))
        if not self.data:
            raise ConfigError("no data given: pass a dataset directory or CSV file")
        if self.task is not None and self.task not in TASKS:
            raise ConfigError(f"task must be one of {', '.join(TASKS)}, got {self.task!r}")
        if self.head not in ("linear", "mlp"):
            raise ConfigError(f"head must be 'linear' or 'mlp', got {self.head!r}")
        if self.precision not in ("auto", "32", "bf16"):
            raise ConfigError(f"precision must be auto, 32 or bf16, got {self.precision!r}")
        for name in ("test_fraction", "val_fraction"):
            v = getattr(self, name)
            if not 0.0 <= v < 1.0:
                raise ConfigError(f"{name} must be in [0, 1), got {v}")
        if self.image_size is not None and self.image_size < 32:
            raise ConfigError(f"image_size must be at least 32, got {self.image_size}")
        if self.epochs < 1 or (self.batch_size is not None and self.batch_size < 1):
            raise ConfigError("epochs and batch_size must be at least 1")
        ranges = {
            "lr": self.lr is None or self.lr > 0, "weight_decay": self.weight_decay is None or self.weight_decay >= 0,
            "warmup_epochs": self.warmup_epochs >= 0,
            "label_smoothing": 0 <= self.label_smoothing < 1, "dropout": 0 <= self.dropout < 1,
            "beta": self.beta is None or self.beta > 0,
            "workers": self.workers >= 0, "patience": self.patience >= 0, "probe_c": self.probe_c > 0,
            "max_parity": self.max_parity > 0, "max_steps": self.max_steps == -1 or self.max_steps > 0,
        }
        for name, ok in ranges.items():
            if not ok:
                raise ConfigError(f"{name} = {getattr(self, name)!r} is out of range ({_RANGE_HINTS[name]})")
        return self

    def resolve(self, task: str) -> "TrainConfig":
        """Fill the task-dependent settings left as None (see TASK_DEFAULTS) once the task is
        known; the saved config then records the values actually used."""
        for key, value in TASK_DEFAULTS[task].items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        if self.beta is None:
            self.beta = 2.0 if task == "detect" else 1.0
        return self

    def to_dict(self) -> dict[str, Any]:
        """The settings that shape a model; the one-off actions (overwrite, resume) are left
        out so a saved config never replays them."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in ACTIONS}

    def save(self, path: Path, **meta: Any) -> None:
        doc = {"config": self.to_dict(), **meta}
        path.write_text(yaml.safe_dump(doc, sort_keys=False))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        d = d.get("config", d)  # accept a saved run config as well as a plain one
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise ConfigError(f"unknown config keys: {', '.join(unknown)}; valid keys: {', '.join(known)}")
        return cls(**d)

    @classmethod
    def load(cls, path: str | Path, **overrides: Any) -> "TrainConfig":
        """Read a YAML file, then apply the overrides that are not None."""
        p = Path(path)
        try:
            d = yaml.safe_load(p.read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {p}") from None
        except OSError as e:
            raise ConfigError(f"cannot read config file {p}: {e.strerror}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{p} is not valid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(d, dict):
            raise ConfigError(f"{p} must hold a mapping of config keys")
        return cls.from_dict(d).override(**overrides)

    def override(self, **overrides: Any) -> "TrainConfig":
        known = {f.name for f in fields(self)}
        for k, v in overrides.items():
            if k not in known:
                raise ConfigError(f"unknown config key {k!r}")
            if v is not None:
                setattr(self, k, v)
        return self


def _check_type(name: str, value: Any) -> None:
    """YAML and Python callers can pass anything; say which key has the wrong type."""
    hint = _FIELD_TYPES[name]
    ok = {
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, (int, float)) and not isinstance(value, bool),
        "bool": isinstance(value, bool),
        "str": isinstance(value, str),
        "str | None": value is None or isinstance(value, str),
        "int | None": value is None or (isinstance(value, int) and not isinstance(value, bool)),
        "float | None": value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)),
        "dict[str, Any]": isinstance(value, dict),
    }.get(hint, True)
    if not ok:
        raise ConfigError(f"{name} must be {hint.replace(' | None', ' or empty')}, got {value!r}")


_FIELD_TYPES = {f.name: str(f.type) for f in fields(TrainConfig)}
