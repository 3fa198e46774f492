"""Fine-tuning with Lightning: the module, its schedule, and ``fit``."""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from lensforge.config import TrainConfig
from lensforge.errors import TrainingInterrupted
from lensforge.hardware import allowed_cpus, contention_warning, cpu_sample, has_native_bf16
from lensforge.tracking.loggers import active as active_tracker
from lensforge.training.distributed import SameData, data_digest, loader_order, trainer_settings, whole_set, world_size
from lensforge.ui import LINE_EVERY_FRACTION, Reporter

log = logging.getLogger(__name__)


def choose_precision(requested: str) -> str:
    """Lightning precision string. "auto": mixed precision on a GPU; fp32 on a CPU, even one
    with native bf16: there bf16 autocast (with float32 depthwise convolutions, see
    :func:`depthwise_in_float32`) trains Lite0 1.5x faster than fp32 + channels_last, but on
    real Fashion-MNIST its held-out accuracy was lower in 4 of 5 seeds (by 1.1 points on
    average; plain bf16: lower in 7 of 8, by 2.2), so it is opt-in (``precision: bf16``).
    Emulated bf16 (no AMX/AVX512-BF16) is ~10x slower still."""
    if requested == "32":
        return "32-true"
    if requested == "bf16":
        if not torch.cuda.is_available() and not has_native_bf16():
            log.warning("this CPU has no native bf16 (AMX / AVX512-BF16): bf16 training is emulated, "
                        "about 10x slower than fp32")
        return "bf16-mixed"
    if torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "32-true"


class _Float32Conv2d(nn.Conv2d):
    """A Conv2d that leaves autocast: computes in float32 (see :func:`depthwise_in_float32`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_autocast_enabled(x.device.type):
            with torch.autocast(x.device.type, enabled=False):
                return super().forward(x.float())
        return super().forward(x)


def depthwise_in_float32(model: nn.Module, undo: bool = False) -> int:
    """Make ``model``'s depthwise (grouped) convolutions compute in float32 under CPU bf16
    autocast, by swapping their class (weights, state-dict keys and export unchanged); ``undo``
    swaps them back. Returns how many were swapped.

    Measured on an AVX512-BF16 EPYC (2 threads), EfficientNet-Lite0: bf16 depthwise kernels
    are both the slow part and the inaccurate part of bf16 training on a CPU.
    - Train step at 224 px, batch 32, channels_last: fp32 23.2 img/s, bf16 22.9, bf16 with
      float32 depthwise 34.9 (1.51x fp32).
    - Real Fashion-MNIST (1,000 train images, 64 px, 3 epochs, 500 test), 5 seeds, mean test
      accuracy: fp32 0.696, bf16 0.673, bf16 with float32 depthwise 0.684. Keeping batch norm
      (0.672) or the head (0.673) in float32 instead changed nothing.
    """
    old, new = (_Float32Conv2d, nn.Conv2d) if undo else (nn.Conv2d, _Float32Conv2d)
    swapped = 0
    for m in model.modules():
        if type(m) is old and m.groups > 1:
            m.__class__ = new
            swapped += 1
    return swapped


class ClassifierModule(L.LightningModule):
    """Cross-entropy (single-label) or BCE (multi-label) on a :class:`Classifier`; AdamW with
    linear warmup then cosine decay, stepped per batch; the head learns 10x faster than the
    pretrained backbone."""

    train_forward: Callable[[torch.Tensor], torch.Tensor] | None

    def __init__(self, model: nn.Module, multilabel: bool, cfg: TrainConfig, steps_per_epoch: int) -> None:
        super().__init__()
        self.model = model
        self.multilabel = multilabel
        self.cfg = cfg
        self.steps_per_epoch = max(1, steps_per_epoch)
        self.loss_fn: nn.Module = (
            nn.BCEWithLogitsLoss() if multilabel else nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
        )
        self._val_scores: list[torch.Tensor] = []
        self._val_targets: list[torch.Tensor] = []
        # the compiled training forward (cfg.compile), or None: eager. A plain attribute, not a
        # submodule: the compiled wrapper shares the parameters, and registering it would add
        # "_orig_mod." copies of every weight to each checkpoint
        object.__setattr__(self, "train_forward", None)

    def compile_training(self) -> None:
        """Run the training steps through ``torch.compile`` (inductor). Validation, the best
        checkpoint and export keep the eager model: validation runs fp32 outside autocast, which
        would be a second graph to compile for a few batches."""
        object.__setattr__(self, "train_forward", torch.compile(self.model, dynamic=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], _: int) -> torch.Tensor:
        x, y = batch
        model = self.train_forward if self.train_forward is not None else self.model
        loss = self.loss_fn(model(x.contiguous(memory_format=torch.channels_last)), y)
        # sync_dist: under DDP the epoch's figure is the mean over every process (no-op alone)
        self.log("train_loss", loss, on_step=False, on_epoch=True, batch_size=len(x), sync_dist=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], _: int) -> None:
        x, y = batch
        # in fp32 even when training runs under bf16 autocast: the val figure picks the best
        # checkpoint and is shown beside the bundle's (fp32 ONNX on the same val images); in
        # bf16 the two disagreed (issue 12: 0.890 in the epoch table, 0.880 in the summary)
        with torch.autocast(device_type=x.device.type, enabled=False):
            logits = self.model(x.float().contiguous(memory_format=torch.channels_last)).float()
        self.log("val_loss", self.loss_fn(logits, y), on_step=False, on_epoch=True, batch_size=len(x), sync_dist=True)
        scores = torch.sigmoid(logits) if self.multilabel else torch.softmax(logits, -1)
        self._val_scores.append(scores.cpu())
        self._val_targets.append(y.cpu())

    def on_validation_epoch_end(self) -> None:
        if not self._val_scores:
            return
        scores = torch.cat(self._val_scores).numpy()
        y = torch.cat(self._val_targets).numpy()
        self._val_scores.clear()
        self._val_targets.clear()
        loader = self.trainer.val_dataloaders
        # under DDP this process scored one padded shard: metrics are of the whole set, each image once
        rows = whole_set(loader_order(loader), list(zip(scores, y)), len(loader.dataset))
        scores, y = np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows])
        for k, v in quick_metrics(y, scores, self.multilabel).items():
            self.log(k, v, prog_bar=True)

    def configure_optimizers(self) -> Any:
        head = list(self.model.head.parameters())
        head_ids = {id(p) for p in head}
        backbone = [p for p in self.model.parameters() if id(p) not in head_ids]
        opt = torch.optim.AdamW(
            [{"params": backbone, "lr": self.cfg.lr}, {"params": head, "lr": self.cfg.lr * 10}],
            weight_decay=self.cfg.weight_decay,
        )
        return warmup_cosine(opt, self.cfg, steps_per_epoch(self, self.steps_per_epoch))


def steps_per_epoch(module: L.LightningModule, fallback: int) -> int:
    """Optimiser steps per epoch of *this* process's training loader, as the Trainer shards it
    (under DDP each process steps through 1/N of the data, so the schedule must count its
    batches, not the whole loader's); ``fallback`` outside a Trainer."""
    trainer = module._trainer
    if trainer is None:
        return fallback
    trainer.estimated_stepping_batches  # noqa: B018 -- makes Lightning set up the sharded training loader
    n = trainer.num_training_batches
    return max(1, int(n)) if n != float("inf") else fallback


def warmup_cosine(opt: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int) -> dict[str, Any]:
    """Lightning's optimiser config: linear warmup over ``cfg.warmup_epochs``, then cosine
    decay to 0 at the last step (``max_steps`` when set), stepped per batch."""
    total = cfg.epochs * steps_per_epoch
    if cfg.max_steps > 0:
        total = min(total, cfg.max_steps)
    warmup = min(int(cfg.warmup_epochs * steps_per_epoch), total // 2)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def quick_metrics(y: np.ndarray, scores: np.ndarray, multilabel: bool) -> dict[str, float]:
    """The per-epoch validation numbers (the full report comes from evaluate)."""
    from sklearn.metrics import average_precision_score, f1_score

    if multilabel:
        has_pos = y.sum(0) > 0
        ap = [average_precision_score(y[:, j], scores[:, j]) for j in np.flatnonzero(has_pos)]
        return {
            "val_map": float(np.mean(ap)) if ap else 0.0,
            "val_f1": float(f1_score(y, scores >= 0.5, average="micro", zero_division=0)),
        }
    pred = scores.argmax(1)
    return {
        "val_acc": float((pred == y).mean()),
        "val_f1": float(f1_score(y, pred, average="macro", zero_division=0)),
    }


class EpochReport(Callback):
    """Drives the reporter: progress per training epoch (a bar, or a line every 10 % / 30 s
    where nobody watches a terminal), then ``epoch(row)`` with the epoch's numbers, its speed
    and the time left. Lightning calls ``on_train_epoch_end`` after that epoch's validation,
    so the row holds this epoch's validation metrics.

    ``batch_size`` and ``dataset_size`` (of the training loader) turn batches into images, so
    rates are images per second whatever the batch size."""

    def __init__(self, reporter: Reporter, monitor: str, batch_size: int = 1, dataset_size: int = 0,
                 drop_last: bool = True) -> None:
        self.reporter = reporter
        self.monitor = monitor
        self.batch_size, self.dataset_size, self.drop_last = max(1, batch_size), dataset_size, drop_last
        self.best: float | None = None
        self.history: list[dict[str, Any]] = []
        self._bar: contextlib.ExitStack | None = None
        self._advance: Callable[[int], None] = lambda n=1: None
        self._epoch_start = self._train_end = 0.0
        self._images = self._batches = 0
        self._epoch_seconds: list[tuple[float, int]] = []  # (wall seconds, batches) of the epochs run here

    def planned_batches(self, trainer: L.Trainer) -> int:
        """Training batches this epoch will run: the loader's, or fewer where ``max_steps`` ends it."""
        total = int(trainer.num_training_batches) if trainer.num_training_batches != float("inf") else 0
        if trainer.max_steps > 0:
            total = min(total, max(0, trainer.max_steps - trainer.global_step))
        return total

    def on_train_epoch_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._bar = contextlib.ExitStack()
        batches = self.planned_batches(trainer)
        images = batches * self.batch_size * trainer.world_size
        if not self.drop_last and self.dataset_size:
            images = min(images, self.dataset_size)
        self._advance = self._bar.enter_context(self.reporter.track(
            f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs}", images, unit="img", every=LINE_EVERY_FRACTION))
        self._epoch_start = self._train_end = time.perf_counter()
        self._images = self._batches = 0

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        n = batch_images(batch, self.batch_size) * trainer.world_size  # every process trains on as many
        self._images += n
        self._batches += 1
        self._train_end = time.perf_counter()
        self._advance(n)

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        now = time.perf_counter()
        m = {k: float(v) for k, v in trainer.callback_metrics.items()}
        row: dict[str, Any] = {"epoch": trainer.current_epoch + 1, "epochs": trainer.max_epochs, **m}
        cur = m.get(self.monitor)
        row["best"] = cur is not None and (self.best is None or cur > self.best)
        if row["best"]:
            self.best = cur
        if self._epoch_start:
            train_s = self._train_end - self._epoch_start
            row["seconds"] = round(now - self._epoch_start, 3)  # training and validation
            row["img_per_s"] = round(self._images / train_s, 2) if train_s > 0 else None
            self._epoch_seconds.append((now - self._epoch_start, max(1, self._batches)))
        # else: an epoch resumed from a checkpoint saved in its middle (Ctrl-C) ends without
        # starting here, as Lightning skips its remaining batches: no timing, not one from
        # perf_counter's zero (it showed "0.0 img/s  3h46m  ETA 11h19m")
        self._epoch_start = 0.0
        self.history.append(row)
        self.reporter.epoch({**row, "eta_s": self.eta(trainer)})

    def eta(self, trainer: L.Trainer) -> float | None:
        """Seconds the remaining epochs take at this run's pace (validation included), capped by
        ``max_steps``; an upper bound where early stopping ends the run sooner; None after the last."""
        seconds = sum(s for s, _ in self._epoch_seconds)
        batches = sum(b for _, b in self._epoch_seconds)
        per_epoch = int(trainer.num_training_batches) if trainer.num_training_batches != float("inf") else 0
        if not batches or not per_epoch:
            return None
        remaining = (trainer.max_epochs - trainer.current_epoch - 1) * per_epoch
        if trainer.max_steps > 0:
            remaining = min(remaining, max(0, trainer.max_steps - trainer.global_step))
        return remaining * seconds / batches if remaining else None  # None: nothing left to estimate

    # saved in checkpoints, so a resumed run keeps the epochs before the interruption
    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history, "best": self.best}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = list(state.get("history", []))
        self.best = state.get("best")

    @classmethod
    def history_in(cls, checkpoint: dict[str, Any]) -> list[dict[str, Any]]:
        """The epochs a Lightning checkpoint (as ``torch.load`` returns it) records: what
        :meth:`state_dict` saved under this callback's state key; [] if none."""
        state = checkpoint.get("callbacks", {}).get(cls.__qualname__, {})
        return list(state.get("history", []))

    def on_exception(self, trainer: L.Trainer, module: L.LightningModule, exception: BaseException) -> None:
        if self._bar is not None:
            self._bar.close()


def batch_images(batch: Any, default: int) -> int:
    """Images in a training batch: classifiers' (images, targets) tensors and detectors' (list
    of images, list of targets) alike; ``default`` for anything else."""
    if isinstance(batch, (tuple, list)) and batch and hasattr(batch[0], "__len__"):
        return len(batch[0])
    return default


class CpuContention(Callback):
    """Warns once (through the reporter) when other processes take the cores training asked
    for: measured over the first :data:`WINDOW_S` seconds of batches after the first (which
    includes one-off set-up), from this process's and the system's CPU time."""

    WINDOW_S = 3.0  # long enough for /proc/stat's 10 ms ticks to be precise, short enough to warn early

    def __init__(self, reporter: Reporter) -> None:
        self.reporter = reporter
        self._start: tuple[float, float, float | None] | None = None
        self._batches = 0
        self._done = False

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, *args: Any) -> None:
        if self._done:
            return
        if self._start is None:
            self._start = cpu_sample()
            return
        self._batches += 1
        now = cpu_sample()
        if now[0] - self._start[0] < self.WINDOW_S:
            return
        self._done = True
        warning = contention_warning(self._start, now, torch.get_num_threads(), allowed_cpus(),
                                     f"the first {self._batches} timed batches")
        if warning:
            self.reporter.warn_once("cpu", warning)


class SaveOnInterrupt(Callback):
    """Ctrl-C leaves ``last.ckpt`` to resume from."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_exception(self, trainer: L.Trainer, module: L.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, KeyboardInterrupt):
            return
        if trainer.world_size == 1:
            trainer.save_checkpoint(str(self.path))
        elif trainer.is_global_zero:
            # trainer.save_checkpoint ends in a barrier that the other processes, interrupted
            # too (or killed by Lightning's launcher), never reach: rank 0 writes alone
            state = trainer._checkpoint_connector.dump_checkpoint()
            trainer.strategy.checkpoint_io.save_checkpoint(state, str(self.path))


def interrupted_message(cfg: TrainConfig, run_dir: Path, epoch: int, history: list[dict[str, Any]]) -> str:
    """What Ctrl-C leaves: the checkpoint to resume from and, once an epoch has finished, the
    command that makes a bundle of the best one without training further."""
    text = (f"training interrupted in epoch {epoch}; checkpoint saved to {run_dir / 'checkpoints' / 'last.ckpt'}. "
            f"Resume with: lensforge train {cfg.data} --out {run_dir} --resume")
    best = [r for r in history if r.get("best")]
    if history:
        what = (f"the best so far (epoch {best[-1]['epoch']}, {_monitored(best[-1])})"
                if best and finish_checkpoint(run_dir) == run_dir / "checkpoints" / "best.ckpt"
                else "the last checkpoint")
        text += f". Or write a bundle from {what} without training further: lensforge train {cfg.data} --out {run_dir} --finish"
    return text


def finish_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint ``--finish`` makes a bundle of: the best so far (by the monitored
    validation metric), else the last (a run stopped before its first validation)."""
    for name in ("best.ckpt", "last.ckpt"):
        if (run_dir / "checkpoints" / name).is_file():
            return run_dir / "checkpoints" / name
    return None


def _monitored(row: dict[str, Any]) -> str:
    keys = [k for k in ("val_acc", "val_map") if k in row]
    return f"{keys[0]} {row[keys[0]]:.4f}" if keys else "best validation"


def _sized(dataset: Any) -> int:
    try:
        return len(dataset)
    except TypeError:  # an iterable dataset
        return 0


@contextlib.contextmanager
def _sigint_kept() -> Iterator[None]:
    """Lightning ignores SIGINT after a Ctrl-C (so a second one cannot cut its shutdown short)
    and never restores it: a Python session that called ``lensforge.train`` could then no
    longer be interrupted. Put the handler back once fit returns or fails."""
    if threading.current_thread() is not threading.main_thread():  # signal handlers belong to the main thread
        yield
        return
    handler = signal.getsignal(signal.SIGINT)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, handler)


@dataclass
class FitResult:
    best_checkpoint: Path | None
    history: list[dict[str, Any]]
    precision: str
    epochs_run: int


def fit(
    module: L.LightningModule,
    train_loader: torch.utils.data.DataLoader,
    val_loader: torch.utils.data.DataLoader | None,
    cfg: TrainConfig,
    run_dir: Path,
    reporter: Reporter | None = None,
    resume_from: Path | None = None,
    *,
    monitor: str,
    precision: str | None = None,
    channels_last: bool = False,
) -> tuple[L.LightningModule, FitResult]:
    """Fine-tune ``module.model`` in place; returns the module holding the *best* weights.

    Every task shares this: checkpoints, early stopping on ``monitor`` (a validation metric,
    higher is better), resume, Ctrl-C, progress, logs. ``channels_last``: train in that memory
    layout (convolutional classifiers; measured faster on AVX2 too, 37 vs 31 img/s at 128 px),
    returned to the default layout afterwards for export.
    """
    model = module.model
    precision = precision or choose_precision(cfg.precision)
    float_depthwise = precision == "bf16-mixed" and not torch.cuda.is_available()
    # whatever ends the fit (an error, Ctrl-C), the model leaves it as it came: default memory
    # layout, plain Conv2d classes, no compiled forward; it may still be exported or trained again
    try:
        if channels_last:
            model.to(memory_format=torch.channels_last)
        ckpt_dir = run_dir / "checkpoints"
        checkpoint = ModelCheckpoint(dirpath=ckpt_dir, filename="best", monitor=monitor, mode="max", save_last=True,
                                     enable_version_counter=False)
        reporter = reporter or Reporter()
        epochs = EpochReport(reporter, monitor, batch_size=train_loader.batch_size or 1,
                             dataset_size=_sized(train_loader.dataset), drop_last=train_loader.drop_last)
        callbacks: list[Callback] = [checkpoint, SaveOnInterrupt(ckpt_dir / "last.ckpt"), epochs, CpuContention(reporter)]
        if world_size(cfg) > 1:
            callbacks.append(SameData(data_digest(train_loader.dataset, val_loader.dataset if val_loader else None)))
        if val_loader is not None and cfg.patience > 0:
            # checked after validation: a max_steps stop mid-epoch ends the epoch without one
            callbacks.append(EarlyStopping(monitor=monitor, mode="max", patience=cfg.patience, check_on_train_epoch_end=False))
        if float_depthwise:
            depthwise_in_float32(model)
        if cfg.compile and isinstance(module, ClassifierModule):  # detectors' varying image sizes would recompile
            module.compile_training()
        tracker = active_tracker()
        trainer = L.Trainer(
            **trainer_settings(cfg),  # one process, or DDP (README "Scaling out")
            max_epochs=cfg.epochs,
            max_steps=cfg.max_steps,
            precision=precision,  # type: ignore[arg-type]
            callbacks=callbacks,
            # run_dir/logs/version_N/metrics.csv (a resume adds a version), then the --track loggers
            logger=[CSVLogger(str(run_dir), name="logs"), *(tracker.lightning_loggers() if tracker else [])],
            default_root_dir=str(run_dir),
            enable_model_summary=False,
            enable_progress_bar=False,  # EpochReport draws progress through the reporter
            num_sanity_val_steps=0,
            log_every_n_steps=max(1, min(50, len(train_loader))),
            limit_val_batches=1.0 if val_loader is not None else 0,
        )
        try:
            with _sigint_kept():
                trainer.fit(module, train_loader, val_loader, ckpt_path=str(resume_from) if resume_from else None)
        except SystemExit:
            # Lightning turns Ctrl-C into a graceful shutdown then exit(1); SaveOnInterrupt kept a checkpoint
            if trainer.interrupted:
                raise TrainingInterrupted(interrupted_message(cfg, run_dir, trainer.current_epoch + 1, epochs.history)) from None
            raise
        best = Path(checkpoint.best_model_path) if checkpoint.best_model_path else None
        if best is not None and best.is_file():
            state = torch.load(best, map_location="cpu", weights_only=True)["state_dict"]
            module.load_state_dict(state)
    finally:
        model.to(memory_format=torch.contiguous_format)
        if float_depthwise:
            depthwise_in_float32(model, undo=True)
        if isinstance(module, ClassifierModule):
            object.__setattr__(module, "train_forward", None)  # frees the compiled graphs; export runs eager
    return module, FitResult(best, epochs.history, precision, trainer.current_epoch)
