"""The trackers of one training run as Lightning loggers (imports lightning: training only)."""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import logging
import os
import shutil
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import Logger

from lensforge.errors import ConfigError
from lensforge.hardware import describe
from lensforge.runtime.bundle import META_FILE, SPLIT_FILE
from lensforge.runtime.cache import cache_root
from lensforge.runtime.remote import quick_http_defaults
from lensforge.tracking import TRACKING_FILE, mlflow_uri, project_name
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
        self.registered: dict[str, str] = {}  # {"name", "version"} once --register has registered the bundle

    def start(self) -> None:
        for name in self.names:
            guarded = Guarded(name, self.reporter)
            inner = guarded.call("start", lambda name=name: make_logger(name, self.run_dir, self.params))  # type: ignore[misc]
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
        facts = run_facts(run_dir, bundle_dir, self.params.get("data"))
        for g in self.loggers:
            if not g.ok:
                continue
            if g.name == "wandb":  # the summary holds W&B's final numbers: its history keeps one row per log call of the fit
                g.call("summary", lambda g=g: g.inner.experiment.summary.update(final))
            else:
                g.log_metrics(final, step=None)
            g.call("facts", lambda g=g: _log_facts(g, facts))
            if g.name == "mlflow":
                g.call("artifacts", lambda g=g: _mlflow_artifacts(g.inner, run_dir, bundle_dir))
                if self.params.get("register"):
                    version = g.call("register", lambda g=g: _register(g.inner, str(self.params["register"])))
                    if version is not None:
                        self.registered = {"name": str(self.params["register"]), "version": str(version)}
                        self.reporter.step(f"Registered the bundle as models:/{self.registered['name']}/{version}")
                        self._record()

    def close(self, status: str) -> None:
        for g in self.loggers:
            if g.ok:
                g.finalize(status)
                if g.name == "wandb":
                    g.call("finish", lambda g=g: _finish_wandb(g.inner.experiment, 0 if status == "success" else 1))

    def mlflow_run(self) -> dict[str, str]:
        """``{"tracking_uri", "experiment_id", "run_id"}`` of the MLflow run ({} without one): what the
        bundle records so that ``evaluate`` and ``export`` log into the run that made it."""
        for g in self.loggers:  # also after it failed: the run exists, a later evaluate may reach it
            if g.name == "mlflow" and g.inner is not None:
                return {"tracking_uri": str(g.inner._tracking_uri), "experiment_id": str(g.inner.experiment_id),
                        "run_id": str(g.inner.run_id)}
        return {}

    def _record(self) -> None:
        """RUN/tracking.json: where this run went, so a person (or a later evaluate) finds it."""
        doc: dict[str, Any] = {}
        for g in self.loggers:
            if g.name == "mlflow" and g.ok:
                doc["mlflow"] = {**self.mlflow_run(), **({"registered": self.registered} if self.registered else {})}
            elif g.name == "tensorboard" and g.ok:
                doc["tensorboard"] = {"log_dir": str(Path(g.inner.log_dir))}
            elif g.name == "wandb" and g.ok:
                run = g.inner.experiment
                doc["wandb"] = {"run_id": run.id, "project": run.project, "dir": str(run.dir)}
        if doc:
            (self.run_dir / TRACKING_FILE).write_text(json.dumps(doc, indent=2) + "\n")


def make_logger(name: str, run_dir: Path, params: Mapping[str, Any]) -> Any:
    if name == "tensorboard":
        from lightning.pytorch.loggers import TensorBoardLogger

        # version "tensorboard": RUN/logs/tensorboard/, beside the CSV logger's version_N folders
        # (a "version_N" of its own would race the CSV logger for the next number)
        return TensorBoardLogger(str(run_dir), name="logs", version="tensorboard", default_hp_metric=False)
    if name == "mlflow":
        from lightning.pytorch.loggers import MLFlowLogger

        quick_http_defaults()  # a server gone mid-run costs seconds of retries, not minutes (runtime/remote.py)
        local = not os.environ.get("MLFLOW_TRACKING_URI")
        if local and not (run_dir / "mlruns.db").exists():
            _copy_empty_store(run_dir / "mlruns.db")
        logger = MLFlowLogger(
            experiment_name=project_name("MLFLOW_EXPERIMENT_NAME", params), run_name=run_dir.resolve().name,
            tracking_uri=mlflow_uri(run_dir),
            artifact_location=(run_dir / "mlartifacts").resolve().as_uri() if local else None,
            tags={"lensforge.run_dir": str(run_dir.resolve())},
        )
        logger.experiment  # noqa: B018 -- creates the experiment and run now, so a bad store fails before the fit
        _ = logger.run_id
        return logger
    if name == "wandb":
        from lightning.pytorch.loggers import WandbLogger

        # WANDB_DIR when the user set it (wandb's own setting; our explicit dir would override it), else the run
        save_dir = Path(os.environ.get("WANDB_DIR") or run_dir)
        (save_dir / "wandb").mkdir(parents=True, exist_ok=True)
        wb = WandbLogger(project=project_name("WANDB_PROJECT", params), name=run_dir.resolve().name,
                         save_dir=str(save_dir))
        wb.experiment  # noqa: B018
        return wb
    raise ConfigError(f"unknown tracker {name!r}")


def _finish_wandb(run: Any, exit_code: int) -> None:
    """Finish the W&B run, and return once wandb's service has written all of it.

    ``run.finish()`` returns when the service (wandb-core, a separate process) has *handled* the
    exit record, not when it is on disk: the service keeps the run's transaction log (the
    ``.wandb`` file, all an offline run has) in a 32 KiB block buffer that it writes out when it
    closes the run's stream, asynchronously after ``finish``. Read right after training, an
    offline run lacked its final config, summary and exit records. ``wandb.teardown()`` waits
    for the service to shut down, closing every stream; wandb starts a new one for the next run.
    It would also finish any other run this process has open, so with one open it is skipped
    (that run's session then completes the log when it ends)."""
    import wandb
    from wandb.sdk import wandb_setup

    run.finish(exit_code=exit_code)
    setup = getattr(wandb_setup, "_singleton", None)  # None: the service is gone already
    if setup is None:
        return
    if getattr(setup, "most_recent_active_run", None) is not None:
        log.info("another W&B run is open in this process: W&B writes the end of run %s when it closes", run.id)
        return
    try:
        wandb.teardown()
    except SystemExit as e:  # wandb exits the process when its service failed; here that is a tracker failure
        raise RuntimeError(f"wandb's service ended with exit code {e.code}") from None


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
    if (bundle_dir / META_FILE).is_file():  # the whole bundle: runs:/RUN_ID/bundle loads it (and --register points at it)
        client.log_artifacts(run_id, str(bundle_dir), "bundle")
    for png in sorted(run_dir.glob("*.png")):
        client.log_artifact(run_id, str(png), "plots")
    if (run_dir / "eval").is_dir():
        for path in sorted((run_dir / "eval").iterdir()):
            if path.suffix in (".png", ".json") and path.is_file():
                client.log_artifact(run_id, str(path), "eval")
    for name in ("config.yaml",):
        if (run_dir / name).is_file():
            client.log_artifact(run_id, str(run_dir / name))


def _register(logger: Any, name: str) -> str:
    """Register the run's ``bundle`` artifact as a new version of model ``name`` (made when new);
    returns the version. ``lensforge predict models:/NAME/VERSION`` loads it."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    uri = str(logger._tracking_uri)
    client = MlflowClient(tracking_uri=uri, registry_uri=os.environ.get("MLFLOW_REGISTRY_URI") or uri)
    try:
        client.create_registered_model(name)
    except MlflowException as e:
        if getattr(e, "error_code", "") != "RESOURCE_ALREADY_EXISTS":
            raise
    version = client.create_model_version(name, source=f"runs:/{logger.run_id}/bundle", run_id=logger.run_id)
    return str(version.version)


def git_commit(*places: str | os.PathLike[str] | None) -> dict[str, str]:
    """``{"git.commit", "git.dir"}`` of the first of ``places`` (the data, then the working
    directory) inside a git work tree; {} when none is, or git is missing or slow."""
    for place in places:
        if not place:
            continue
        where = Path(place)
        where = where if where.is_dir() else where.parent
        try:
            done = subprocess.run(["git", "-C", str(where), "rev-parse", "HEAD", "--show-toplevel"],
                                  capture_output=True, text=True, timeout=5, check=False)
        except (OSError, subprocess.SubprocessError):  # no git, or a hung network file system
            return {}
        lines = done.stdout.split()
        if done.returncode == 0 and len(lines) == 2:
            return {"git.commit": lines[0], "git.dir": lines[1]}
    return {}


def run_facts(run_dir: Path, bundle_dir: Path, data: Any) -> dict[str, str]:
    """What the run was made from, as flat strings: images per split, the split's hash (sha256
    of ``split.json``: two runs on the same split share it), the versions, the CPU (and GPU),
    and the git commit of the user's project."""
    facts: dict[str, str] = {}
    try:
        meta = json.loads((bundle_dir / META_FILE).read_text())
    except (OSError, ValueError):
        meta = {}
    for split, n in (meta.get("data", {}).get("counts") or {}).items():
        facts[f"data.count.{split}"] = str(n)
    if meta.get("data", {}).get("format"):
        facts["data.format"] = str(meta["data"]["format"])
    split_file = bundle_dir / SPLIT_FILE if (bundle_dir / SPLIT_FILE).is_file() else run_dir / SPLIT_FILE
    if split_file.is_file():
        facts["data.split_sha256"] = hashlib.sha256(split_file.read_bytes()).hexdigest()
    facts.update({f"version.{k}": str(v) for k, v in (meta.get("versions") or {}).items()})
    facts["machine.cpu"] = describe()
    facts["machine.gpu"] = _gpu()
    facts.update(git_commit(data, os.getcwd()))
    return facts


def _gpu() -> str:
    import torch  # loaded already: the run trained with it

    if torch.cuda.is_available():
        return ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    return "none"


def _log_facts(g: Guarded, facts: Mapping[str, str]) -> None:
    """MLflow: tags (``lensforge.*``, and MLflow's own git-commit tag); W&B: the run's config;
    TensorBoard: one text summary."""
    if g.name == "mlflow":
        from mlflow.entities import RunTag

        tags = [RunTag(f"lensforge.{k}", v) for k, v in facts.items()]
        if "git.commit" in facts:
            tags.append(RunTag("mlflow.source.git.commit", facts["git.commit"]))
        g.inner.experiment.log_batch(g.inner.run_id, tags=tags)
    elif g.name == "wandb":
        g.inner.experiment.config.update(dict(facts), allow_val_change=True)
    elif g.name == "tensorboard":
        table = "\n".join(f"| {k} | {v} |" for k, v in facts.items())
        g.inner.experiment.add_text("lensforge/facts", "| fact | value |\n|---|---|\n" + table)


def tracking_record() -> dict[str, Any]:
    """For the bundle's ``lensforge.json``: ``{"tracking": {"mlflow": {...}}}`` naming the MLflow
    run of the training run in progress, or {} without one."""
    tracker = active()
    run = tracker.mlflow_run() if tracker is not None else {}
    return {"tracking": {"mlflow": run}} if run else {}


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
