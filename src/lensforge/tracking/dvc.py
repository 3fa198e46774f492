"""``lensforge init --dvc``: a DVC pipeline (``dvc.yaml``) and its ``params.yaml`` for a user's git repo.

The stages run our own commands and name the files they really write::

    inspect   lensforge data inspect DATA --output runs/inspect.json
    train     lensforge train --config params.yaml     → runs/train/ (bundle, checkpoints, history.csv, eval/)
    evaluate  lensforge evaluate runs/train/bundle DATA → runs/evaluate/ (metrics.json, predictions.csv, plots)
    export    lensforge export runs/train/bundle --to onnx-fp16 → runs/export/

``params.yaml`` holds every :class:`~lensforge.config.TrainConfig` setting, so ``lensforge train
--config params.yaml`` reads it as it is, and the train stage depends on the whole file: changing
any setting re-runs train and what follows it, never inspect. Metrics and plots are listed at the
top level of dvc.yaml (DVC 3), because they lie inside stage output directories, which DVC does
not allow a stage's own metrics to do.
"""

from __future__ import annotations

import os
import shlex
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from lensforge.config import TrainConfig, field_help
from lensforge.errors import ConfigError, LensforgeError

PIPELINE_FILE = "dvc.yaml"
PARAMS_FILE = "params.yaml"
RUN_DIR = "runs/train"
INSPECT_FILE = "runs/inspect.json"
EVAL_DIR = "runs/evaluate"
EXPORT_DIR = "runs/export"
EXPORT_TARGET = "onnx-fp16"  # verified against the fp32 model; int8 needs calibration data and may be refused


@dataclass
class Pipeline:
    """What :func:`init_dvc` wrote: the two files, in the repository root."""

    root: Path
    pipeline: Path
    params: Path


def git_root(start: Path) -> Path | None:
    """The work tree holding ``start``: the nearest directory with a ``.git`` (a directory, or the
    file a worktree or submodule has), or None outside any git repository."""
    for d in (start, *start.parents):
        if (d / ".git").exists():
            return d
    return None


def init_dvc(directory: str | os.PathLike[str] = ".", *, data: str = "data", overwrite: bool = False) -> Pipeline:
    """Write ``dvc.yaml`` and ``params.yaml`` into ``directory`` (inside a git repository).

    data: the dataset path as the stages name it, relative to ``directory`` (where ``dvc repro``
    runs each command). Refuses (ConfigError, nothing written) outside a git repository, and over
    an existing dvc.yaml or params.yaml unless ``overwrite``. Both files are written to temporary
    names first and renamed once both exist, so a failure leaves neither half written.
    """
    root = Path(directory).expanduser()
    if not root.is_dir():
        raise ConfigError(f"{root} is not a directory: run `lensforge init --dvc` in your project's git repository")
    if git_root(root.resolve()) is None:
        raise ConfigError(f"{root.resolve()} is not in a git repository: DVC versions pipelines with git; "
                          "run `git init` there first")
    targets = [root / PIPELINE_FILE, root / PARAMS_FILE]
    existing = [p.name for p in targets if p.exists()]
    if existing and not overwrite:
        raise ConfigError(f"{' and '.join(existing)} already exist{'s' if len(existing) == 1 else ''} in "
                          f"{root.resolve()}; pass --overwrite to replace {'it' if len(existing) == 1 else 'them'}")
    if Path(data).is_absolute() or data.startswith(".."):
        # dvc tracks dependencies inside the repository; a path outside it would not be versioned
        raise ConfigError(f"--data {data}: give the dataset's path inside the repository, relative to {root}")
    texts = {root / PIPELINE_FILE: pipeline_text(data, classify=_is_classification(root / data)),
             root / PARAMS_FILE: params_text(data)}
    _write_all(texts)
    return Pipeline(root, root / PIPELINE_FILE, root / PARAMS_FILE)


def _is_classification(data: Path) -> bool:
    """Whether evaluate's predictions.csv will have ``true,predicted`` columns (single- and
    multi-label classifiers write one row per image; a detector one row per box). Unknown data
    (not there yet) is assumed to be class folders, the common case."""
    if not data.exists():
        return True
    from lensforge.data.formats import DETECT_FORMATS, detect_format

    try:
        return detect_format(data.resolve()) not in DETECT_FORMATS
    except (LensforgeError, OSError):  # data not readable yet: inspect and train will say why when they run
        return True


def params_text(data: str) -> str:
    """Every TrainConfig setting (the one-off actions left out), each with its help as a comment."""
    cfg = TrainConfig(data=data, out=RUN_DIR).to_dict()
    helps = field_help(TrainConfig)
    lines = ["# lensforge settings: `lensforge train --config params.yaml` reads this file, and `dvc repro`",
             "# re-runs train (then evaluate and export) when any of it changes. `lensforge train --help`",
             "# describes each key. data and out are also named in dvc.yaml: change both together.", ""]
    for key, value in cfg.items():
        dumped = yaml.safe_dump({key: value}, default_flow_style=True, width=10_000).strip()[1:-1]  # "key: value"
        lines.append(f"{dumped}  # {helps[key]}" if key in helps else dumped)
    return "\n".join(lines) + "\n"


def pipeline_text(data: str, *, classify: bool = True) -> str:
    doc = pipeline(data, classify=classify)
    header = ("# The lensforge pipeline (written by `lensforge init --dvc`): dvc repro runs what changed,\n"
              "# dvc metrics show / dvc plots show read the evaluation. Settings live in params.yaml.\n")
    return header + yaml.safe_dump(doc, sort_keys=False, width=10_000)


def pipeline(data: str, *, classify: bool = True) -> dict[str, Any]:
    """The dvc.yaml document. ``classify``: a classifier's plots (val loss, the confusion of
    evaluate's predictions.csv), else a detector's (validation mAP per epoch)."""
    q = shlex.quote(data)
    stages = {
        "inspect": {
            # counts, sizes, broken and duplicate images: for people, and a dep of train
            "cmd": f"lensforge data inspect {q} --output {INSPECT_FILE}",
            "deps": [data],
            "outs": [{INSPECT_FILE: {"cache": False}}],
        },
        "train": {
            # --overwrite: dvc removes the outputs it knows before a stage runs, and lensforge only
            # replaces a directory that holds a run
            "cmd": f"lensforge train --config {PARAMS_FILE} --overwrite --quiet",
            "deps": [data, INSPECT_FILE],
            "params": [{PARAMS_FILE: None}],  # the whole file: any setting re-runs train
            "outs": [RUN_DIR],
        },
        "evaluate": {
            "cmd": f"lensforge evaluate {RUN_DIR}/bundle {q} --out {EVAL_DIR}",
            "deps": [f"{RUN_DIR}/bundle", data],
            "outs": [EVAL_DIR],
        },
        "export": {
            "cmd": f"lensforge export {RUN_DIR}/bundle --to {EXPORT_TARGET} --out {EXPORT_DIR} --overwrite",
            "deps": [f"{RUN_DIR}/bundle"],
            "outs": [EXPORT_DIR],
        },
    }
    history = f"{RUN_DIR}/history.csv"  # columns: what the task's training logs (detectors: no val_loss)
    losses = ["train_loss", "val_loss"] if classify else ["train_loss"]
    plots: list[Any] = [{"Loss per epoch": {"template": "linear", "x": "epoch", "y": {history: losses}}}]
    if classify:
        plots.append({"Confusion (test split)": {"template": "confusion", "x": "true",
                                                 "y": {f"{EVAL_DIR}/predictions.csv": "predicted"}}})
    else:
        plots.append({"Validation mAP per epoch": {"template": "linear", "x": "epoch",
                                                   "y": {history: ["val_map", "val_map50"]}}})
    return {"stages": stages, "metrics": [f"{EVAL_DIR}/metrics.json"], "plots": plots}


def _write_all(texts: dict[Path, str]) -> None:
    """Each file to a temporary name beside it, then every rename: a failure while writing
    leaves the directory as it was."""
    temps: list[tuple[Path, Path]] = []
    try:
        for path, text in texts.items():
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
            temps.append((Path(tmp), path))
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
    except OSError as e:
        for tmp, _ in temps:
            tmp.unlink(missing_ok=True)
        raise ConfigError(f"cannot write {PIPELINE_FILE} / {PARAMS_FILE} in {next(iter(texts)).parent}: {e.strerror}") from None
    for tmp, path in temps:
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; these are files to commit and share
        os.replace(tmp, path)
