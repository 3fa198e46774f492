"""The trackers of one training run as Lightning loggers (imports lightning: training only)."""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import os
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import Logger

from lensforge.errors import ConfigError
from lensforge.runtime.cache import cache_root
from lensforge.tracking import EXPERIMENT, TRACKING_FILE, mlflow_uri
from lensforge.ui import Reporter

log = logging.getLogger(__name__)


class Tracker:
    """The trackers of one training run: their Lightning loggers (made once, used by the fit and
    for the final numbers), each behind a guard that turns a failure into one warning."""

    def __init__(self, names: list[str], run_dir: Path, reporter: Reporter, params: Mapping[str, Any]) -> None:
        self.names = names
        self.run_dir = run_dir
        self.reporter = reporter
        self.params = dict(params)
        self.loggers: list[Guarded] = []
        self.failed = False

    def start(self) -> None:
        for name in self.names:
            guarded = Guarded(name, self.reporter)
            inner = guarded.call("start", lambda name=name: _make_logger(name, self.run_dir))  # type: ignore[misc]
            if inner is None:
                continue
            guarded.inner = inner
            guarded.log_hyperparams(self.params)
            self.loggers.append(guarded)
        self._record()

    def lightning_loggers(self) -> list[Any]:
        """The loggers for ``L.Trainer(logger=[csv, *these])``: only those still working."""
        return [g for g in self.loggers if g.ok]

    def log_results(self, metrics: Mapping[str, Any], run_dir: Path, bundle_dir: Path) -> None:
        """The final metrics (``{"val": Metrics, "test": Metrics}``; each split's typed numbers,
        headline first, as ``test/accuracy`` ...) and, for MLflow, the bundle's ``lensforge.json``
        and the run's plots as artifacts."""
        final: dict[str, float] = {}
        for split, m in metrics.items():
            final.update({f"{split}/{k}": float(v) for k, v in m.numbers().items()})
        for g in self.loggers:
            if not g.ok:
                continue
            g.log_metrics(final, step=None)
            if g.name == "mlflow":
                g.call("artifacts", lambda g=g: _mlflow_artifacts(g.inner, run_dir, bundle_dir))
            elif g.name == "wandb":
                g.call("summary", lambda g=g: g.inner.experiment.summary.update(final))

    def close(self, status: str) -> None:
        for g in self.loggers:
            if g.ok:
                g.finalize(status)
                if g.name == "wandb":
                    g.call("finish", lambda g=g: g.inner.experiment.finish(exit_code=0 if status == "success" else 1))

    def _record(self) -> None:
        """RUN/tracking.json: where this run went, so a person (or a later evaluate) finds it."""
        doc: dict[str, Any] = {}
        for g in self.loggers:
            if g.name == "mlflow" and g.ok:
                doc["mlflow"] = {"tracking_uri": g.inner._tracking_uri, "experiment_id": g.inner.experiment_id,
                                 "run_id": g.inner.run_id}
            elif g.name == "tensorboard" and g.ok:
                doc["tensorboard"] = {"log_dir": str(Path(g.inner.log_dir))}
            elif g.name == "wandb" and g.ok:
                run = g.inner.experiment
                doc["wandb"] = {"run_id": run.id, "project": run.project, "dir": str(run.dir)}
        if doc:
            (self.run_dir / TRACKING_FILE).write_text(json.dumps(doc, indent=2) + "\n")


def _make_logger(name: str, run_dir: Path) -> Any:
    if name == "tensorboard":
        from lightning.pytorch.loggers import TensorBoardLogger

        # version "tensorboard": RUN/logs/tensorboard/, beside the CSV logger's version_N folders
        # (a "version_N" of its own would race the CSV logger for the next number)
        return TensorBoardLogger(str(run_dir), name="logs", version="tensorboard", default_hp_metric=False)
    if name == "mlflow":
        from lightning.pytorch.loggers import MLFlowLogger

        local = not os.environ.get("MLFLOW_TRACKING_URI")
        if local and not (run_dir / "mlruns.db").exists():
            _copy_empty_store(run_dir / "mlruns.db")
        logger = MLFlowLogger(
            experiment_name=os.environ.get("MLFLOW_EXPERIMENT_NAME", EXPERIMENT), run_name=run_dir.resolve().name,
            tracking_uri=mlflow_uri(run_dir),
            artifact_location=(run_dir / "mlartifacts").resolve().as_uri() if local else None,
            tags={"lensforge.run_dir": str(run_dir.resolve())},
        )
        logger.experiment  # noqa: B018 -- creates the experiment and run now, so a bad store fails before the fit
        _ = logger.run_id
        return logger
    if name == "wandb":
        from lightning.pytorch.loggers import WandbLogger

        (run_dir / "wandb").mkdir(exist_ok=True)
        logger = WandbLogger(project=os.environ.get("WANDB_PROJECT", EXPERIMENT), name=run_dir.resolve().name,
                             save_dir=str(run_dir))
        logger.experiment  # noqa: B018
        return logger
    raise ConfigError(f"unknown tracker {name!r}")


def _copy_empty_store(path: Path) -> None:
    """Start ``path`` as a copy of an empty, migrated MLflow sqlite store kept in the user cache
    (one per MLflow version). Creating a store runs MLflow's schema migrations: 6.4 s of a
    20-step run here, against milliseconds for the copy. No cache (read-only home): MLflow
    creates the store itself, as before."""
    import mlflow
    from mlflow.tracking import MlflowClient


    template = cache_root() / f"mlflow-empty-{mlflow.__version__}.db"
    try:
        if not template.is_file():
            template.parent.mkdir(parents=True, exist_ok=True)
            staging = template.with_name(f".{template.name}.{os.getpid()}")
            staging.unlink(missing_ok=True)
            # creates and migrates it; sqlite commits to the file itself (no WAL), and MLflow's
            # cached store for this one-off URI is never used again
            MlflowClient(tracking_uri=f"sqlite:///{staging}").search_experiments()
            os.replace(staging, template)  # atomic: a concurrent run sees the whole file or none
        shutil.copyfile(template, path)
    except OSError as e:
        log.debug("no cached empty MLflow store (%s); MLflow creates one", e)
        path.unlink(missing_ok=True)


def _mlflow_artifacts(logger: Any, run_dir: Path, bundle_dir: Path) -> None:
    client, run_id = logger.experiment, logger.run_id
    meta = bundle_dir / "lensforge.json"
    if meta.is_file():
        client.log_artifact(run_id, str(meta), "bundle")
    for png in sorted(run_dir.glob("*.png")):
        client.log_artifact(run_id, str(png), "plots")
    if (run_dir / "eval").is_dir():
        for path in sorted((run_dir / "eval").iterdir()):
            if path.suffix in (".png", ".json") and path.is_file():
                client.log_artifact(run_id, str(path), "eval")
    for name in ("config.yaml",):
        if (run_dir / name).is_file():
            client.log_artifact(run_id, str(run_dir / name))


# The Guarded logger: a Lightning Logger that forwards to the real one and, on its first
# exception, warns once and stops forwarding -- a tracking server that goes away mid-run must
# not cost the run (nothing lost: the CSV log and the bundle are still written).

class Guarded(Logger):
    def __init__(self, name: str, reporter: Reporter) -> None:
        super().__init__()
        self._name = name
        self.reporter = reporter
        self.inner: Any = None
        self.ok = True

    def call(self, what: str, fn: Any) -> Any:
        if not self.ok:
            return None
        try:
            return fn()
        except Exception as e:  # any failure of a third-party tracker: warn, drop it, keep training
            self.ok = False
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            self.reporter.warn_once(f"track-{self._name}",
                                    f"{self._name} tracking failed ({what}: {first[:300]}); "
                                    "training goes on without it (the CSV log and the bundle are kept)")
            log.debug("%s tracker failed", self._name, exc_info=True)
            return None

    @property
    def name(self) -> str:
        return self._name

    @property
    def version(self) -> Any:
        return getattr(self.inner, "version", None) if self.ok else None

    @property
    def save_dir(self) -> str | None:
        return getattr(self.inner, "save_dir", None)

    @property
    def log_dir(self) -> str | None:
        return getattr(self.inner, "log_dir", None)

    @property
    def experiment(self) -> Any:
        return self.inner.experiment

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.call("log_metrics", lambda: self.inner.log_metrics(metrics, step))

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        self.call("log_hyperparams", lambda: self.inner.log_hyperparams(params, *args, **kwargs))

    def log_graph(self, model: Any, input_array: Any = None) -> None:
        pass  # graphs are not logged (TensorBoard's would trace the model on every fit)

    def save(self) -> None:
        self.call("save", lambda: self.inner.save())

    def finalize(self, status: str) -> None:
        self.call("finalize", lambda: self.inner.finalize(status))

    def after_save_checkpoint(self, checkpoint_callback: Any) -> None:
        self.call("checkpoint", lambda: self.inner.after_save_checkpoint(checkpoint_callback))


_ACTIVE: contextvars.ContextVar[Tracker | None] = contextvars.ContextVar("lensforge_tracker", default=None)


def active() -> Tracker | None:
    """The tracker of the training run in progress in this context (None without ``--track``):
    how ``finetune.fit`` finds the loggers without every task passing them through."""
    return _ACTIVE.get()


@contextlib.contextmanager
def tracked(names: list[str], run_dir: Path, reporter: Reporter, params: Mapping[str, Any]) -> Iterator[Tracker | None]:
    """Start the trackers for one run, make them :func:`active`, and close them with the run's
    status ("success", or "failed" when the body raises)."""
    if not names:
        yield None
        return
    tracker = Tracker(names, run_dir, reporter, params)
    tracker.start()
    token = _ACTIVE.set(tracker)
    status = "failed"
    try:
        yield tracker
        status = "success"
    finally:
        _ACTIVE.reset(token)
        tracker.close(status)
