"""``train(config)``: data → split → model → fit (or probe) → ONNX → verified bundle."""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch

from lensforge.config import TrainConfig
from lensforge.data.formats import read_dataset
from lensforge.data.records import Dataset, Record
from lensforge.data.split import load_split, save_split, split_records
from lensforge.errors import ConfigError, DataError, TrainingInterrupted
from lensforge.hardware import cpu_count, describe, load_average, load_warning
from lensforge.metrics.plots import plot_training_curves
from lensforge.report import write_quietly as write_run_report
from lensforge.runtime.bundle import SPLIT_FILE, load_bundle
from lensforge.tasks import Built, Task, TrainData, get_task
from lensforge.tracking import check_trackers, parse_track, prewarm
from lensforge.tracking.loggers import active, tracked
from lensforge.training.bundle import versions, write_bundle
from lensforge.training.distributed import (check_distributed, distributed_meta, is_primary, per_process_samples,
                                            process_rank, scaling_note, threads_per_process, world_size)
from lensforge.training.finetune import EpochReport, finish_checkpoint
from lensforge.ui import Reporter

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    task: str  # "classify", "multilabel" or "detect"
    run_dir: Path
    bundle_dir: Path
    metrics: dict[str, Any]  # {"val": {...}, "test": {...}}
    parity: float  # max |ONNX - torch| score difference on real validation images
    skipped_images: int
    history: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0  # wall time of the whole train() call
    rank: int = 0  # under DDP, this process's; only rank 0 writes (and holds) the bundle and metrics


def default_run_dir(ds_path: Path, task: str, probe: bool) -> Path:
    name = (ds_path.stem if ds_path.is_file() else ds_path.name) or "data"
    return Path("runs") / f"{name}-{task}{'-probe' if probe else ''}"


def is_run_dir(path: Path) -> bool:
    """Whether ``path`` looks like a directory ``train`` made (the only kind --overwrite replaces)."""
    return (path / "config.yaml").is_file() or (path / "bundle" / "lensforge.json").is_file()


def prepare_run_dir(cfg: TrainConfig, run_dir: Path) -> Path | None:
    """Make ``run_dir`` ready. With --overwrite an earlier run is moved aside, not deleted:
    the caller deletes it once the new run has succeeded, or puts it back if it failed.
    Returns the moved-aside run, if any."""
    if cfg.finish:
        if finish_checkpoint(run_dir) is None:
            raise ConfigError(f"nothing to finish: {run_dir / 'checkpoints'} holds no best.ckpt or last.ckpt "
                              "(a --probe run keeps none: train it again)")
        return None
    if cfg.resume:
        if not (run_dir / "checkpoints" / "last.ckpt").is_file():
            raise ConfigError(f"nothing to resume: {run_dir / 'checkpoints' / 'last.ckpt'} does not exist")
        return None
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"--out {run_dir} is a file; choose a directory")
    if run_dir.exists() and any(run_dir.iterdir()):
        if not cfg.overwrite:
            raise ConfigError(f"run directory {run_dir} already exists; pass --overwrite to replace it, --resume to continue it, or --out DIR")
        if not is_run_dir(run_dir):
            raise ConfigError(f"refusing to replace {run_dir}: it is not a lensforge run directory (no config.yaml); choose another --out")
        previous = run_dir.with_name(f".{run_dir.name}.previous-{os.getpid()}")
        os.replace(run_dir, previous)
        run_dir.mkdir(parents=True)
        return previous
    run_dir.mkdir(parents=True, exist_ok=True)
    return None


def make_split(ds: Dataset, cfg: TrainConfig, run_dir: Path, primary: bool = True) -> dict[str, list[Record]]:
    """The run's split: the saved one when resuming, else made from the sorted records and the
    seed, so every DDP process makes the same one (only the primary saves it)."""
    split_file = run_dir / SPLIT_FILE
    if cfg.resume and split_file.is_file():
        return load_split(split_file, ds)
    splits = split_records(ds, test=cfg.test_fraction, val=cfg.val_fraction, seed=cfg.seed)
    if not splits["train"]:
        raise DataError(f"no training images left after splitting {ds.root}; add images or lower --split")
    if primary:
        save_split(splits, ds, split_file, seed=cfg.seed)
    return splits


def train(cfg: TrainConfig | None = None, reporter: Reporter | None = None, **overrides: Any) -> TrainResult:
    """Train a model for the data's task and write its run directory and bundle.

    ``lensforge.train(data="images/", epochs=5)`` works as well as passing a TrainConfig.
    ``finish=True`` (with ``out``) trains nothing: it writes the bundle of that run from its
    best checkpoint so far, e.g. after Ctrl-C. Returns where everything went and the
    validation/test metrics.
    """
    t0 = time.perf_counter()
    # a copy: the caller's config is never changed (a loop over datasets must not inherit a task)
    cfg = dataclasses.replace(cfg or TrainConfig()).override(**overrides).validate()
    if cfg.finish:
        cfg = finishing_config(cfg)
    check_distributed(cfg)  # an unknown strategy, more processes than cores: before any work
    primary = is_primary(cfg)
    # the other DDP processes say nothing (rank 0 reports for all) and write nothing
    ui = (reporter or Reporter()) if primary else _Silent()
    trackers = parse_track(cfg.track) if primary else []
    check_trackers(trackers)  # a tracker not installed or a server not answering: before anything is written
    prewarm(trackers)  # their imports (~3 s for MLflow) overlap reading the data and building the model
    torch.set_num_threads(threads_per_process(cfg) if world_size(cfg) > 1 else cfg.threads or cpu_count())
    cfg.threads = cfg.threads or torch.get_num_threads()  # resolved before the trackers log the config (as config.yaml has it)

    ds = read_dataset(cfg.data, fmt=cfg.format, task=cfg.task,
                      outside_root="allow" if cfg.allow_outside_root else "refuse")
    cfg.task = ds.task
    cfg.resolve(ds.task)
    task = get_task(ds.task)
    task.check_config(cfg)
    L.seed_everything(cfg.seed, verbose=False)
    # the model (name, weights file) is checked before anything is written, so a typo
    # leaves no run directory behind
    built = task.build(cfg, ds)
    run_dir = Path(cfg.out) if cfg.out else default_run_dir(Path(cfg.data), ds.task, cfg.probe)
    if not primary:  # rank 0 prepares and owns the run directory
        if cfg.resume or cfg.finish:
            prepare_run_dir(cfg, run_dir)  # checks only: the checkpoint must be readable here too
        return _train_in(run_dir, cfg, ds, task, built, ui, primary=False)
    fresh = not run_dir.exists()
    previous = prepare_run_dir(cfg, run_dir)
    try:
        with tracked(trackers, run_dir, ui, cfg.to_dict()):  # the resolved config as the trackers' params
            result = _train_in(run_dir, cfg, ds, task, built, ui)
    except TrainingInterrupted:
        _discard(previous)  # the new run is resumable, and replacing the old one was asked for
        raise
    except BaseException:
        if previous is not None:  # put the earlier run back as it was
            shutil.rmtree(run_dir, ignore_errors=True)
            os.replace(previous, run_dir)
        elif fresh and not (run_dir / "checkpoints").is_dir():  # nothing worth keeping
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    _discard(previous)
    result.seconds = time.perf_counter() - t0
    return result


# what ``finish`` takes from the caller: where the data and run are now, and this machine's
# settings; everything that shapes the model comes from the run's config.yaml
FINISH_KEEPS = ("data", "out", "allow_outside_root", "threads", "workers", "devices", "num_nodes", "strategy", "accelerator")


def finishing_config(cfg: TrainConfig) -> TrainConfig:
    """The config ``finish`` writes a bundle with: the run's own (``--out``/config.yaml: its
    task, backbone, input size, split seed...), so the bundle describes the model the
    checkpoint holds, with :data:`FINISH_KEEPS` from ``cfg``; resume semantics (the saved split)."""
    if not cfg.out:
        raise ConfigError("--finish needs --out: the run directory whose checkpoint becomes the bundle")
    saved = Path(cfg.out) / "config.yaml"
    if Path(cfg.out).is_dir() and not saved.is_file() and finish_checkpoint(Path(cfg.out)) is None:  # before reading data
        raise ConfigError(f"{cfg.out} is not a lensforge run directory (no config.yaml, no checkpoints/): "
                          "--finish needs the --out of a `lensforge train` that was interrupted")
    run_cfg = TrainConfig.load(saved) if saved.is_file() else dataclasses.replace(cfg)  # none: prepare_run_dir says so
    run_cfg.override(**{k: getattr(cfg, k) for k in FINISH_KEEPS})
    run_cfg.finish = run_cfg.resume = True
    return run_cfg.validate()


def _discard(path: Path | None) -> None:
    if path is not None:
        shutil.rmtree(path, ignore_errors=True)


def _train_in(run_dir: Path, cfg: TrainConfig, ds: Dataset, task: Task, built: Built, ui: Reporter,
              primary: bool = True) -> TrainResult:
    """Split, decode, fit, then write the verified bundle and the held-out report (under DDP,
    every process fits; only the primary writes)."""
    if cfg.resume:
        task.check_resume(run_dir, cfg, ds.classes)
    meta = {"distributed": distributed_meta(cfg)} if world_size(cfg) > 1 else {}
    # the thread count used, not "every core": CPU float sums (and bf16 rounding after them) depend
    # on it, so `lensforge train --config RUN/config.yaml` elsewhere repeats the run only with it
    cfg.threads = cfg.threads or torch.get_num_threads()

    def save_config() -> None:  # the classes too: a resumed run must rebuild the same head
        if primary:
            cfg.save(run_dir / "config.yaml", versions=versions(), machine=describe(), classes=list(ds.classes), **meta)

    save_config()
    splits = make_split(ds, cfg, run_dir, primary)
    ui.step(task.describe(ds, splits, cfg))
    if meta and not cfg.finish:
        ui.step(scaling_note(cfg))
    if not cfg.finish:
        warning = load_warning(load_average(), os.cpu_count() or 1, torch.get_num_threads(), cpu_count())
        if warning:
            ui.warn_once("cpu", warning)
    data = task.load(splits, built, cfg, ds, ui)
    if data.skipped:
        ui.warn(f"skipped {data.skipped} unreadable image(s); `lensforge data inspect {cfg.data}` lists them")
    if not len(data.train):
        raise DataError("no readable training images")
    data.train_loader, data.val_loader = loaders(data, cfg)
    history = load_finish_checkpoint(built, run_dir, ui) if cfg.finish else task.fit(built, data, cfg, ds, run_dir, ui)
    if not primary:  # trained its share; the bundle, plots, report and tracking are rank 0's
        return TrainResult(task.name, run_dir, run_dir / "bundle", {}, float("nan"), data.skipped, history,
                           rank=process_rank(cfg))
    save_config()  # again: fitting may resolve settings (the probe's C), and the run must record what it used
    write_history(history, run_dir)

    bundle_dir = run_dir / "bundle"
    written = write_bundle(task, built, data, ds, splits, cfg, bundle_dir, ui, history)
    held_out = "test" if "test" in written.scored else "val" if "val" in written.scored else None
    if held_out:
        metrics = written.metrics[held_out].with_source(f"the {held_out} split saved at training time")
        task.write_report(run_dir / "eval", load_bundle(bundle_dir), written.scored[held_out], metrics)
        write_run_report(run_dir, ui, records=written.scored[held_out].records)  # report.html, before the tracker logs the plots
    tracker = active()
    if tracker is not None:  # the final numbers and (MLflow) the bundle's lensforge.json and plots
        tracker.log_results(written.metrics, run_dir, bundle_dir)
    return TrainResult(task.name, run_dir, bundle_dir, written.metrics, written.parity.figure, data.skipped, history)


def load_finish_checkpoint(built: Built, run_dir: Path, ui: Reporter) -> list[dict[str, Any]]:
    """Load :func:`finish_checkpoint`'s weights into ``built.model``; returns the epochs the run
    had finished (from ``last.ckpt``, which is newer than ``best.ckpt``), for the bundle."""
    path = finish_checkpoint(run_dir)
    if path is None:  # prepare_run_dir checked; the directory changed since
        raise ConfigError(f"nothing to finish: {run_dir / 'checkpoints'} holds no checkpoint")
    state = torch.load(path, map_location="cpu", weights_only=True)  # never unpickle arbitrary objects
    # every task's LightningModule holds its network as ``self.model``
    weights = {k.removeprefix("model."): v for k, v in state["state_dict"].items() if k.startswith("model.")}
    try:
        built.model.load_state_dict(weights)
    except RuntimeError as e:
        raise ConfigError(f"{path} does not fit the model this run's config builds: {str(e).splitlines()[0]}") from None
    last = run_dir / "checkpoints" / "last.ckpt"
    history = EpochReport.history_in(torch.load(last, map_location="cpu", weights_only=True) if last.is_file() else state)
    best = [r["epoch"] for r in history if r.get("best")]
    which = f"the best checkpoint (epoch {best[-1]})" if path.name == "best.ckpt" and best else f"{path.name}"
    ui.step(f"Writing the bundle from {which} of {len(history)} finished epoch(s), without training further")
    return history


def loaders(data: TrainData, cfg: TrainConfig) -> tuple[torch.utils.data.DataLoader, torch.utils.data.DataLoader | None]:
    """The training loader (shuffled by the run's seed; a last short batch dropped when there
    is more than one) and the validation loader (None without validation images)."""
    workers = {"num_workers": cfg.workers, "persistent_workers": cfg.workers > 0, "collate_fn": data.collate}
    # under DDP each process gets its shard (Lightning swaps in a DistributedSampler): drop the
    # short batch only where a shard holds more than one
    shard = per_process_samples(len(data.train), world_size(cfg))
    train = torch.utils.data.DataLoader(
        data.train, batch_size=cfg.batch_size, shuffle=True, drop_last=shard > cfg.batch_size,
        generator=torch.Generator().manual_seed(cfg.seed), **workers)
    val = torch.utils.data.DataLoader(data.val, batch_size=cfg.batch_size, **workers) if len(data.val) else None
    return train, val


def write_history(history: list[dict[str, Any]], run_dir: Path) -> None:
    """``history.csv``, one row per epoch (what ``dvc plots`` and spreadsheets read; a probe's has
    its header alone), and ``training_curves.png`` from the same rows (nothing for a probe or a
    run stopped before its first epoch)."""
    curves = [{"epoch": r["epoch"], **{k: v for k, v in r.items() if k.startswith(("train_", "val_"))}} for r in history]
    columns = ["epoch", *sorted({k for row in curves for k in row} - {"epoch"})]
    with (run_dir / "history.csv").open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows(curves)
    if any(len(row) > 1 for row in curves):
        plot_training_curves(curves, run_dir / "training_curves.png")


class _Silent(Reporter):
    """The reporter of a DDP process other than rank 0: progress, steps and warnings are said once, by rank 0."""

    def step(self, message: str) -> None:
        pass

    def warn(self, message: str) -> None:
        pass

    @contextlib.contextmanager
    def track(self, description: str, total: int, *, unit: str = "img",
              every: float | None = None) -> Iterator[Callable[[int], None]]:
        yield lambda n=1: None

    def epoch(self, row: dict[str, Any]) -> None:
        pass
