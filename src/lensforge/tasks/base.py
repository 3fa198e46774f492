"""The task seam: what differs between single-label, multi-label and detection, behind one
small interface that every stage asks.

Training (:mod:`lensforge.training.run`), the bundle writer
(:mod:`lensforge.training.bundle`), evaluation (:mod:`lensforge.evaluation`), the
Predictor, export and bench are written once and ask the bundle's or the data's task:

- ``defaults``: the config values that depend on the task (image size, batch, learning rate);
- ``build``: the torch model and its input spec, before anything is written;
- ``load`` / ``fit``: decoded training data, then fine-tuning (or the linear probe);
- ``export`` / ``model_meta``: the ONNX graph, checked against torch, and what the bundle records;
- ``score`` / ``tune`` / ``metrics`` / ``write_report``: the Predictor over records, the
  thresholds tuned on validation, the typed metrics, and the ``eval/`` files;
- the Predictor runs the task's graph with the runner :data:`lensforge.runtime.runners.RUNNERS`
  names for it (the runtime sits below the tasks and does not import them).

Task modules import torch, Lightning and scikit-learn inside the methods that need them: the
serving install (onnxruntime, numpy, Pillow) reads bundles of every task and has none of them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from lensforge.data.records import Dataset, Record

if TYPE_CHECKING:  # annotations only: importing them would pull torch into a serving install
    from lensforge.config import TrainConfig
    from lensforge.metrics.base import Metrics
    from lensforge.runtime.bundle import Bundle
    from lensforge.runtime.predictor import Predictor
    from lensforge.ui import Reporter

Progress = Callable[[int], None]


@dataclass
class Scored:
    """A Predictor's results over records, in order: the records that decoded, their results
    (every score / every detection, low ones included), and (record, reason) for the rest."""

    records: list[Record]
    results: list[Any]
    failed: list[tuple[Record, str]] = field(default_factory=list)


@dataclass
class Built:
    """A task's torch model and its input spec (``InputSpec`` or ``DetectSpec``); made before
    any file is written, so a wrong name leaves nothing behind."""

    model: Any  # torch.nn.Module
    spec: Any  # InputSpec | DetectSpec: preprocessing that travels in the bundle


@dataclass
class TrainData:
    """Decoded training data: the train and validation sets (torch Datasets; validation may be
    empty), how many images could not be read, and how items form a batch (None: stacked).
    The pipeline makes the loaders (``train_loader``, ``val_loader``) once the sets are known
    to be usable."""

    train: Any
    val: Any
    skipped: int = 0
    collate: Callable[[list[Any]], Any] | None = None
    train_loader: Any = None
    val_loader: Any = None


@dataclass
class Parity:
    """How far the exported graph is from torch: one number for summaries, the record for the bundle."""

    figure: float
    record: dict[str, Any]


class Task(ABC):
    """One task's answers to every stage. Subclasses are stateless; one instance per task."""

    name: ClassVar[str]
    defaults: ClassVar[dict[str, Any]]  # TrainConfig values that depend on the task
    score_batch: ClassVar[int] = 32  # images per Predictor call when scoring a split
    compare_key: ClassVar[str]  # the metric (JSON key) formats and exports are compared by
    compare_label: ClassVar[str]  # ... and its name in tables
    torch_needs: ClassVar[tuple[str, ...]] = ("torch", "timm")  # what :meth:`torch_model` imports

    # -- before training -------------------------------------------------------------------

    def check_config(self, cfg: TrainConfig) -> None:
        """Refuse options that do not fit this task (one clear ConfigError)."""

    @abstractmethod
    def build(self, cfg: TrainConfig, ds: Dataset) -> Built:
        """The model ``cfg`` asks for, with its input spec."""

    @abstractmethod
    def torch_model(self, bundle: Bundle) -> Any:
        """The bundle's graph rebuilt in torch from ``weights.safetensors`` (no download), in
        eval mode, taking what the ONNX graph takes: bench's eager row and export parity."""

    @abstractmethod
    def torch_call(self, model: Any, batch: Any) -> Any:
        """Run :meth:`torch_model` on what the runner's ``run_many`` takes in one call (a
        stacked batch, or one prepared image) and return numpy outputs in the runner's form."""

    def describe(self, ds: Dataset, splits: dict[str, list[Record]], cfg: TrainConfig) -> str:
        """The one-line summary of the data and split that training prints."""
        return (f"{ds.fmt} data, {self.name}: {len(ds.classes)} classes, {len(ds.records)} images → "
                f"train {len(splits['train'])} / val {len(splits['val'])} / test {len(splits['test'])} (seed {cfg.seed})")

    def check_resume(self, run_dir: Path, cfg: TrainConfig, classes: Sequence[str]) -> None:
        """Refuse to resume a run whose checkpoint cannot continue with these settings."""

    # -- training --------------------------------------------------------------------------

    @abstractmethod
    def load(self, splits: dict[str, list[Record]], built: Built, cfg: TrainConfig, ds: Dataset,
             ui: Reporter) -> TrainData:
        """Decode the train and val splits once (unreadable images counted, not fatal)."""

    @abstractmethod
    def fit(self, built: Built, data: TrainData, cfg: TrainConfig, ds: Dataset, run_dir: Path,
            ui: Reporter) -> list[dict[str, Any]]:
        """Train ``built.model`` in place; returns the per-epoch history (empty for a probe)."""

    # -- the bundle ------------------------------------------------------------------------

    @abstractmethod
    def export(self, built: Built, data: TrainData, splits: dict[str, list[Record]], cfg: TrainConfig,
               path: Path) -> Parity:
        """Write ``built.model`` as ONNX to ``path`` and check it against torch on real images."""

    @abstractmethod
    def model_meta(self, built: Built, cfg: TrainConfig, classes: Sequence[str]) -> dict[str, Any]:
        """The bundle's ``model`` entry (file, inputs, outputs, backbone, ...)."""

    def export_explain(self, built: Built, path: Path) -> dict[str, Any] | None:
        """Write the graph the torch-free Predictor explains with (``explain.onnx``) to ``path``,
        checked against torch; returns the bundle's ``explain`` entry, or None when this task or
        model has none (nothing written)."""
        return None

    def initial_meta(self) -> dict[str, Any]:
        """Decision thresholds before tuning (recorded even when there is nothing to tune on)."""
        return {}

    # -- scoring: training's bundle writer and ``evaluate`` alike ---------------------------

    def score(self, predictor: Predictor, records: Sequence[Record], progress: Progress | None = None) -> Scored:
        """The Predictor over records' images, in order."""
        done: list[Record] = []
        results: list[Any] = []
        failed: list[tuple[Record, str]] = []
        paths = [str(r.path) for r in records]
        for r, (_, res) in zip(records, predictor.predict_many(paths, batch_size=self.score_batch)):
            if progress:
                progress(1)
            if isinstance(res, Exception):
                failed.append((r, str(res)))
            else:
                done.append(r)
                results.append(res)
        return Scored(done, results, failed)

    def tune(self, val: Scored | None, classes: Sequence[str], cfg: TrainConfig, ui: Reporter) -> dict[str, Any]:
        """Bundle entries chosen on the validation split (thresholds); {} when nothing is tuned."""
        return {}

    def at_threshold(self, scored: Scored, meta: dict[str, Any]) -> Scored:
        """``scored`` as it should be shown at the bundle's tuned thresholds (detectors carry theirs)."""
        return scored

    @abstractmethod
    def metrics(self, scored: Scored, classes: Sequence[str], meta: dict[str, Any]) -> Metrics:
        """The task's typed metrics of ``scored`` at the thresholds ``meta`` records."""

    @abstractmethod
    def write_report(self, out: Path, bundle: Bundle, scored: Scored, metrics: Metrics) -> list[Path]:
        """``metrics.json``, ``predictions.csv`` and the plots into ``out``; returns the plots."""

    def points(self, bundle: Bundle, scored: Scored) -> float | None:
        """``compare_key`` on ``scored`` in points (0-100); None when undefined (no image, no
        positive). What export checks (fp16 / int8 drops) and bench compare formats by."""
        if not scored.records:
            return None
        value = self.metrics(scored, bundle.classes, bundle.meta).get(self.compare_key)
        return None if value is None else round(100 * float(value), 2)
