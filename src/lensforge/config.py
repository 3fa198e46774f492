"""The run configuration: one typed dataclass, loadable from YAML, overridable from the CLI,
saved resolved next to the run."""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import inspect
import io
import os
import textwrap
import tokenize
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from lensforge.data.records import TASKS
from lensforge.errors import ConfigError
from lensforge.tracking import parse_track

ACTIONS = ("overwrite", "resume", "finish")  # flags for one invocation, never saved with a run
HEADS = ("linear", "mlp")
PRECISIONS = ("auto", "32", "bf16")
ACCELERATORS = ("auto", "cpu", "gpu")
# Settings whose good value depends on the task are None here; ``resolve`` fills them from the
# task's ``defaults`` (lensforge.tasks) once the task is known.
_RANGE_HINTS = {
    "lr": "> 0", "weight_decay": ">= 0", "warmup_epochs": ">= 0", "label_smoothing": "in [0, 1)", "dropout": "in [0, 1)",
    "beta": "> 0; 1 = F1, 2 = F2", "workers": ">= 0", "patience": ">= 0, 0 = off", "probe_c": "> 0, or empty to choose on validation", "max_parity": "> 0",
    "max_steps": "-1 for no limit, or >= 1", "threads": ">= 1, or empty for every core",
    "devices": ">= 1", "num_nodes": ">= 1",
}


@dataclass
class TrainConfig:
    """Every setting of a training run.

    Each field's comment is its ``lensforge train --help`` text (see :func:`field_help`): the
    comment right after the field, continued by comment lines directly below it. Fields whose
    default is None take their task's default (``lensforge.tasks``) in :meth:`resolve`.
    """

    data: str = ""  # dataset directory or CSV file
    task: str | None = None  # default: what the data says
    format: str | None = None  # default: auto-detect
    out: str | None = None  # run directory (default: runs/<data>-<task>)
    allow_outside_root: bool = False  # read images that the data names outside its folder (CSV rows, COCO file_name,
    # YOLO lists, symlinks); refused by default
    backbone: str = "efficientnet_lite0"  # classifiers: efficientnet_lite0 (offline weights), resnet50, vit_b16,
    # dino_vits16, or any timm name; detectors: lite0_fpn (= efficientnet_lite0, offline ImageNet backbone),
    # fasterrcnn_resnet50_fpn, fasterrcnn_resnet50_fpn_v2, fasterrcnn_mobilenet_v3_large_fpn (COCO weights from the hub)
    pretrained: bool = True  # off: random init (tests, or training from scratch)
    weights: str | None = None  # weights file (.safetensors, or a state dict read with weights_only=True): a backbone
    # for classifiers, a whole detector checkpoint (e.g. COCO Faster R-CNN saved to disk) for detectors
    head: str = "linear"  # classifier head
    probe: bool = False  # logistic regression on frozen features instead of fine-tuning
    image_size: int | None = None  # classifiers: model input side; detectors: shorter image side (pixels)
    epochs: int = 10  # maximum epochs
    batch_size: int | None = None  # images per step
    lr: float | None = None  # learning rate (a classifier's new head uses 10x)
    weight_decay: float | None = None  # AdamW weight decay
    warmup_epochs: float = 1.0  # epochs of linear learning-rate warm-up before the cosine decay
    label_smoothing: float = 0.0  # single-label only
    dropout: float = 0.2  # in a classifier's head, before its last layer
    patience: int = 5  # early stopping patience in epochs, 0 = off
    beta: float | None = None  # multi-label thresholds / the detection score threshold maximise F-beta on validation
    # (1 = F1, 2 = F2: recall matters more when looking for objects)
    test_fraction: float = 0.2  # of all images, when the data is not pre-split
    val_fraction: float = 0.2  # of the rest
    seed: int = 0  # split and training seed
    workers: int = 0  # data-loader processes; 0 decodes in the main process
    threads: int | None = None  # torch intra-op threads (default: every core this process may use)
    precision: str = "auto"  # auto = mixed precision on a GPU, fp32 on a CPU (bf16 there is faster with AMX/AVX512-BF16 but scored lower)
    compile: bool = False  # classifiers: train through torch.compile (inductor). On CPU it compiles for minutes before
    # the first step and no steady per-step gain was measured (bench/train_step.py), so it is off by default
    devices: int = 1  # training processes on this machine (one per GPU, or CPU processes); more than one in all
    # trains with DDP, launched by Lightning itself (README "Scaling out")
    num_nodes: int = 1  # machines taking part; start the same command on each (torchrun or SLURM, README "Scaling out")
    strategy: str = "auto"  # how the processes share the work: ddp (auto = ddp when devices x num-nodes > 1), or
    # ddp_find_unused_parameters_true for models with parameters a step leaves unused
    accelerator: str = "auto"  # cpu, gpu, or auto (gpu where CUDA is available); CPU processes talk over gloo, GPUs nccl
    max_steps: int = -1  # stop after N optimiser steps (smoke tests); -1: no limit
    probe_c: float | None = None  # the probe's inverse L2 strength; None = the best of a grid on validation
    max_parity: float = 1e-3  # export fails if ONNX and torch scores differ more than this
    track: str = ""  # also log the run to these trackers, comma-separated: tensorboard, mlflow, wandb (the CSV log
    # is always written; mlflow uses MLFLOW_TRACKING_URI, else a sqlite store in the run directory)
    register: str = ""  # register the bundle in the MLflow model registry under this name (with --track mlflow);
    # then: lensforge predict models:/NAME/VERSION
    overwrite: bool = False  # replace an existing run directory
    resume: bool = False  # continue the run in --out from its last checkpoint
    finish: bool = False  # write the bundle of the run in --out from its best checkpoint so far (else its last),
    # without training further: what an interrupted run leaves usable
    extra: dict[str, Any] = field(default_factory=dict)  # free-form notes saved with the run

    def validate(self) -> "TrainConfig":
        for key in ("data", "out", "weights"):  # Path objects from Python callers are welcome
            if isinstance(getattr(self, key), os.PathLike):
                setattr(self, key, os.fspath(getattr(self, key)))
        if isinstance(self.track, (list, tuple)):  # Python callers and YAML may list the trackers
            self.track = ",".join(str(t) for t in self.track)
        for f in fields(self):
            _check_type(f.name, getattr(self, f.name))
        if not self.data:
            raise ConfigError("no data given: pass a dataset directory or CSV file")
        if self.task is not None and self.task not in TASKS:
            raise ConfigError(f"task must be one of {', '.join(TASKS)}, got {self.task!r}")
        if self.head not in HEADS:
            raise ConfigError(f"head must be 'linear' or 'mlp', got {self.head!r}")
        parse_track(self.track)  # an unknown tracker is named before anything is written
        if self.register and "mlflow" not in parse_track(self.track):
            raise ConfigError(f"--register {self.register} registers the bundle in MLflow's model registry: "
                              "add --track mlflow")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be auto, 32 or bf16, got {self.precision!r}")
        if self.accelerator not in ACCELERATORS:
            raise ConfigError(f"accelerator must be auto, cpu or gpu, got {self.accelerator!r}")
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
            "workers": self.workers >= 0, "patience": self.patience >= 0, "probe_c": self.probe_c is None or self.probe_c > 0,
            "max_parity": self.max_parity > 0, "max_steps": self.max_steps == -1 or self.max_steps > 0,
            "threads": self.threads is None or self.threads >= 1,
            "devices": self.devices >= 1, "num_nodes": self.num_nodes >= 1,
        }
        for name, ok in ranges.items():
            if not ok:
                raise ConfigError(f"{name} = {getattr(self, name)!r} is out of range ({_RANGE_HINTS[name]})")
        return self

    def resolve(self, task: str) -> "TrainConfig":
        """Fill the task-dependent settings left as None from ``get_task(task).defaults`` once
        the task is known; the saved config then records the values actually used."""
        from lensforge.tasks import get_task  # tasks import onnxruntime: not for every config read

        for key, value in get_task(task).defaults.items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        return self

    def to_dict(self) -> dict[str, Any]:
        """The settings that shape a model; the one-off actions (overwrite, resume) are left
        out so a saved config never replays them."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in ACTIONS}

    def save(self, path: Path, **meta: Any) -> None:
        doc = {"config": self.to_dict(), **meta}
        path.write_text(yaml.safe_dump(doc, sort_keys=False))

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> "TrainConfig":
        """A config from a mapping: our own keys, a saved run's ``config.yaml`` (its ``config:``
        section), or a seed-style file's keys (:data:`SEED_KEYS`). ``source`` names the file in errors."""
        d = d.get("config", d) if isinstance(d.get("config"), dict) else d  # a saved run config as well as a plain one
        d = _from_seed_keys(d, source)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known, key=str)
        if unknown:
            raise ConfigError(f"{source}: {_unknown_keys(unknown, known)}")
        for key in _FLOAT_FIELDS & set(d):
            d[key] = _float_text(key, d[key], source)
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
        return cls.from_dict(d, source=str(p)).override(**overrides)

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
_FLOAT_FIELDS = {name for name, hint in _FIELD_TYPES.items() if hint.startswith("float")}

# The keys of the config.yaml our users already have (a Lightning + W&B training script's file:
# dataset path, batch size, epochs, learning rate, project / run names, checkpoint dir) -> our
# field. batch_size and epochs are already ours; project, run_name and checkpoint_dir are mapped
# in :func:`_from_seed_keys`.
SEED_KEYS = {
    "data_dir": "data", "dataset": "data", "dataset_dir": "data", "dataset_path": "data", "data_path": "data",
    "learning_rate": "lr", "num_epochs": "epochs", "max_epochs": "epochs", "num_workers": "workers",
    "img_size": "image_size",
}
SEED_NAMES = ("project", "run_name", "checkpoint_dir")


def _from_seed_keys(d: dict[str, Any], source: str) -> dict[str, Any]:
    """``d`` with seed-style keys renamed to ours. The run directory is ``checkpoint_dir/run_name``
    (either alone: ``checkpoint_dir``, or ``runs/run_name``), so checkpoints land where the old
    script put them and the trackers name the run ``run_name`` (they name it after the run
    directory); ``project`` is kept in ``extra``, where the trackers take it as the MLflow experiment /
    W&B project (``MLFLOW_EXPERIMENT_NAME`` / ``WANDB_PROJECT`` win when set: ``tracking.project_name``).
    Two keys for one setting is an error."""
    out: dict[str, Any] = {}
    named_by: dict[str, str] = {}
    for key, value in d.items():
        if key in SEED_NAMES:
            continue
        ours = SEED_KEYS.get(key, key)
        if ours in named_by:
            raise ConfigError(f"{source}: {named_by[ours]!r} and {key!r} both set {ours}; keep one")
        named_by[ours] = key
        out[ours] = value
    names = {k: d[k] for k in SEED_NAMES if d.get(k) is not None}
    for key, value in names.items():
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{source}: {key} must be a name, got {value!r}")
    if "checkpoint_dir" in names or "run_name" in names:
        if "out" in out:
            which = " and ".join(k for k in ("checkpoint_dir", "run_name") if k in names)
            raise ConfigError(f"{source}: out and {which} both set the run directory; keep one")
        out["out"] = str(Path(names.get("checkpoint_dir", "runs")) / names.get("run_name", ""))
    if "project" in names:
        extra = out.get("extra") or {}
        out["extra"] = {**extra, "project": names["project"]} if isinstance(extra, dict) else extra
    return out


def _unknown_keys(unknown: list[Any], known: set[str]) -> str:
    """"unknown config keys: learning_rat (did you mean learning_rate?)", then the valid keys."""
    vocabulary = sorted(known | set(SEED_KEYS) | set(SEED_NAMES))
    named = []
    for key in unknown:
        close = difflib.get_close_matches(str(key), vocabulary, n=1, cutoff=0.6)
        named.append(f"{key}" + (f" (did you mean {close[0]}?)" if close else ""))
    return (f"unknown config keys: {', '.join(named)}; valid keys: "
            f"{', '.join(sorted(known - set(ACTIONS)))}, or the seed-style {', '.join(sorted([*SEED_KEYS, *SEED_NAMES]))}")


def _float_text(key: str, value: Any, source: str) -> Any:
    """YAML reads ``1e-4`` (no dot) as a string; a float setting takes it as the number it says."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{source}: {key} must be a number, got {value!r}") from None
    return value


@functools.cache
def field_help(cls: type = TrainConfig) -> dict[str, str]:
    """{field name: its comment} of a dataclass written like :class:`TrainConfig`: the comment
    after the field on its line, continued by comment-only lines right below it.

    The comments are the documentation a reader of this file sees; reading them here makes them
    the ``--help`` text too, so the two never drift apart. A field without a trailing comment gets
    no entry (the CLI's tests require one for every field)."""
    source = textwrap.dedent(inspect.getsource(cls))
    comments: dict[int, tuple[str, bool]] = {}  # line -> (text, the line holds only the comment)
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = (tok.string.lstrip("#").strip(), tok.line.lstrip().startswith("#"))
    helps: dict[str, str] = {}
    for node in ast.parse(source).body[0].body:  # type: ignore[attr-defined]
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        lines = range(node.lineno, (node.end_lineno or node.lineno) + 1)
        parts = [comments[n][0] for n in lines if n in comments and not comments[n][1]]
        if not parts:
            continue
        below = lines[-1] + 1
        while below in comments and comments[below][1]:  # continuation lines
            parts.append(comments[below][0])
            below += 1
        helps[node.target.id] = " ".join(parts)
    return helps

