"""The one bundle writer: export → verify against torch → score val/test with the Predictor →
tune thresholds on val → metrics → ``lensforge.json``, all inside a temporary directory that
becomes ``bundle/`` only when complete. Every task goes through it (see :mod:`lensforge.tasks`)."""

from __future__ import annotations

import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from lensforge import __version__
from lensforge.config import TrainConfig
from lensforge.data.records import Dataset, Record
from lensforge.data.split import save_split
from lensforge.errors import ExportError
from lensforge.metrics.base import Metrics
from lensforge.runtime.bundle import (
    MODEL_FILE,
    SPLIT_FILE,
    WEIGHTS_FILE,
    atomic_directory,
    write_meta,
)
from lensforge.runtime.explain import EXPLAIN_FILE
from lensforge.runtime.predictor import Predictor
from lensforge.tasks import Built, Parity, Scored, Task, TrainData
from lensforge.tracking.loggers import tracking_record
from lensforge.ui import Reporter


@dataclass
class Written:
    """What the bundle writer measured: the export's parity, metrics per split, and the
    Predictor's results per split (at the tuned thresholds), for the report."""

    parity: Parity
    metrics: dict[str, Metrics]
    scored: dict[str, Scored]


def write_bundle(
    task: Task, built: Built, data: TrainData, ds: Dataset, splits: dict[str, list[Record]], cfg: TrainConfig,
    bundle_dir: Path, ui: Reporter, history: list[dict[str, Any]],
) -> Written:
    """Export, verify, score, tune and measure ``built.model``; write the bundle atomically."""
    built.model.eval()
    with atomic_directory(bundle_dir, overwrite=True) as tmp:
        ui.step("Exporting to ONNX and checking it against torch")
        parity = task.export(built, data, splits, cfg, tmp / MODEL_FILE)
        explain = _export_explain(task, built, tmp, ui)
        save_file({k: v.contiguous() for k, v in built.model.state_dict().items()}, str(tmp / WEIGHTS_FILE))
        save_split(splits, ds, tmp / SPLIT_FILE, seed=cfg.seed)
        meta: dict[str, Any] = {
            "task": task.name,
            "classes": ds.classes,
            "input": built.spec.to_dict(),
            "model": {"file": MODEL_FILE, **task.model_meta(built, cfg, ds.classes)},
            **task.initial_meta(),
            "parity": parity.record,
            **({"explain": explain} if explain else {}),
            **run_meta(ds, splits, cfg, history),
        }
        write_meta(tmp, meta)
        predictor = Predictor(tmp)
        scored: dict[str, Scored] = {}
        for name in ("val", "test"):
            if splits[name]:
                with ui.track(f"Scoring {name} split with ONNX Runtime", len(splits[name])) as advance:
                    scored[name] = task.score(predictor, splits[name], advance)
                if scored[name].failed:
                    ui.warn(f"{len(scored[name].failed)} {name} image(s) could not be read and are not in the "
                            f"{name} metrics")
        meta.update(task.tune(scored.get("val"), ds.classes, cfg, ui))
        metrics = {name: task.metrics(s, ds.classes, meta) for name, s in scored.items()}
        meta["metrics"] = {name: m.numbers() for name, m in metrics.items()}
        write_meta(tmp, meta)
    return Written(parity, metrics, {name: task.at_threshold(s, meta) for name, s in scored.items()})


def _export_explain(task: Task, built: Built, directory: Path, ui: Reporter) -> dict[str, Any] | None:
    """The explain graph, when the task has one; a failure costs the explanations, not the bundle
    (``lensforge export BUNDLE --to explain`` can add it later)."""

    try:
        return task.export_explain(built, directory / EXPLAIN_FILE)
    except ExportError as e:
        (directory / EXPLAIN_FILE).unlink(missing_ok=True)
        ui.warn(f"no explain graph in the bundle ({e}); the Predictor will not explain with CAM")
        return None


def versions() -> dict[str, str]:
    """The versions that made a run (saved with its config and in its bundle)."""
    import lightning
    import onnxruntime
    import timm

    return {
        "lensforge": __version__, "python": platform.python_version(), "torch": str(torch.__version__),
        "timm": str(timm.__version__), "lightning": str(lightning.__version__), "onnxruntime": str(onnxruntime.__version__),
    }


def run_meta(ds: Dataset, splits: dict[str, list[Record]], cfg: TrainConfig, history: list[dict[str, Any]]) -> dict[str, Any]:
    """What every bundle's lensforge.json records about the run that made it."""
    return {
        # source: what the user gave (a COCO JSON or data.yaml may have any name; root is its folder)
        "data": {"root": str(ds.root.resolve()), "source": str(Path(cfg.data).resolve()), "format": ds.fmt,
                 "split_file": SPLIT_FILE,
                 "counts": {k: len(v) for k, v in splits.items()}, "notes": ds.notes},
        "training": {"epochs_run": len(history), "history": history},
        "versions": versions(),
        "config": cfg.to_dict(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        # the MLflow run that made it (--track mlflow): evaluate and export log into that run
        **tracking_record(),
    }
