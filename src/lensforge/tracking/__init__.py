"""Experiment tracking: ``--track tensorboard,mlflow,wandb`` through Lightning's own loggers.

The CSV log (``RUN/logs/version_N/metrics.csv``) is always written; each tracker named in
``TrainConfig.track`` adds a Lightning logger beside it for the fit, and receives the resolved
config, the per-epoch metrics (Lightning logs them), the final validation/test metrics and, for
MLflow, the bundle's ``lensforge.json`` and the run's plots as artifacts.

Where each one writes:

- ``tensorboard``: event files in ``RUN/logs/tensorboard/`` (``tensorboard --logdir RUN/logs``).
- ``mlflow``: ``MLFLOW_TRACKING_URI`` when set, else a sqlite store beside the run
  (``RUN/mlruns.db``, artifacts in ``RUN/mlartifacts``); the run id is kept in ``RUN/tracking.json``.
- ``wandb``: ``WANDB_DIR/wandb`` when ``WANDB_DIR`` is set, else ``RUN/wandb``; ``WANDB_MODE=offline``
  works without an account (the run is then its ``offline-run-*/run-<id>.wandb`` log; ``wandb sync``
  uploads it later). Training returns only once W&B's service has written the whole run.

The MLflow experiment / W&B project: ``MLFLOW_EXPERIMENT_NAME`` / ``WANDB_PROJECT`` when set (a
session's setting, as a sweep agent or CI job sets it, wins over the file), else the config's
``project`` (a seed-style ``config.yaml`` key, kept in ``TrainConfig.extra``), else ``lensforge``.

A tracker that is not installed, or an MLflow server that does not answer, is a ConfigError
before training starts; one that fails during the run warns once and is dropped, and training
goes on to write its bundle.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lensforge.errors import ConfigError
from lensforge.runtime.remote import check_reachable

log = logging.getLogger(__name__)

TRACKERS = ("tensorboard", "mlflow", "wandb")
# the module each tracker imports, and the pip package that provides it
PACKAGES = {"tensorboard": ("tensorboard", "tensorboard"), "mlflow": ("mlflow", "mlflow"), "wandb": ("wandb", "wandb")}
TRACKING_FILE = "tracking.json"  # RUN/tracking.json: where each tracker put this run (MLflow's run id)
EXPERIMENT = "lensforge"  # MLflow experiment / W&B project unless the env or the config names one (project_name)


def parse_track(value: str | list[str] | tuple[str, ...] | None) -> list[str]:
    """``"mlflow, tensorboard"`` or ``["mlflow", "tensorboard"]`` → the tracker names, in order,
    without repeats; an unknown name is a ConfigError."""
    if not value:
        return []
    parts = value.split(",") if isinstance(value, str) else list(value)
    names: list[str] = []
    for part in parts:
        name = str(part).strip().lower()
        if not name:
            continue
        if name not in TRACKERS:
            raise ConfigError(f"unknown tracker {part!r} in track; choose from {', '.join(TRACKERS)} (comma-separated)")
        if name not in names:
            names.append(name)
    return names


def project_name(env_var: str, params: Mapping[str, Any]) -> str:
    """The MLflow experiment or W&B project of a run: ``env_var`` (``MLFLOW_EXPERIMENT_NAME`` /
    ``WANDB_PROJECT``) when set, else ``params["extra"]["project"]`` (the resolved config's
    seed-style ``project``), else :data:`EXPERIMENT`."""
    extra = params.get("extra")
    project = extra.get("project") if isinstance(extra, Mapping) else None
    return os.environ.get(env_var) or (str(project) if project else EXPERIMENT)


def mlflow_uri(run_dir: Path) -> str:
    """``MLFLOW_TRACKING_URI`` when set, else the sqlite store beside the run."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(run_dir / 'mlruns.db').resolve()}"


def check_trackers(names: list[str]) -> None:
    """Before anything is written: each tracker's package is importable and a remote MLflow
    server answers. Raises one ConfigError naming the package or the URI."""
    for name in names:
        module, package = PACKAGES[name]
        if importlib.util.find_spec(module) is None:
            raise ConfigError(f"--track {name} needs the {package} package: pip install {package} "
                              "(or pip install 'lensforge[track]')")
    if "mlflow" in names:  # a server that is down fails here, not mid-run
        check_reachable(os.environ.get("MLFLOW_TRACKING_URI", ""))


# modules a tracker's set-up imports: ~3 s of CPU for MLflow (and SQLAlchemy for its store)
PREWARM = {"mlflow": ("mlflow", "mlflow.tracking", "mlflow.store.tracking.sqlalchemy_store",
                      "lightning.pytorch.loggers.mlflow"),
           "tensorboard": ("tensorboard", "lightning.pytorch.loggers.tensorboard"),
           "wandb": ("wandb", "lightning.pytorch.loggers.wandb")}


def prewarm(names: list[str]) -> threading.Thread | None:
    """Import the trackers' modules in a background thread while the dataset is read and the
    model built, so the run does not wait for them serially. Failures are left for the
    tracker's own set-up to report (once, through its guard)."""
    modules = [m for name in names for m in PREWARM.get(name, ())]
    if not modules:
        return None

    def run() -> None:
        for module in modules:
            try:
                importlib.import_module(module)
            except Exception:  # reported by the tracker that needs it
                log.debug("prewarming %s failed", module, exc_info=True)

    thread = threading.Thread(target=run, name="lensforge-tracking-import", daemon=True)
    thread.start()
    return thread
