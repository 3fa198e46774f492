"""``evaluate(bundle, data)``: the bundle's Predictor over a held-out split → metrics, plots
and per-image predictions, for every task (the task scores, measures and reports; see
:mod:`lensforge.tasks`). No torch: an exported model is evaluated as it will be served."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from lensforge.data.formats import read_dataset
from lensforge.data.records import Record
from lensforge.errors import DataError
from lensforge.heldout import align_classes, choose_records
from lensforge.metrics.base import Metrics
from lensforge.report import REPORT_FILE, write_quietly
from lensforge.runtime.bundle import Bundle, load_bundle
from lensforge.runtime.predictor import Predictor
from lensforge.tasks import get_task
from lensforge.ui import Reporter

log = logging.getLogger(__name__)


@dataclass
class EvalResult:
    task: str  # "classify", "multilabel" or "detect"
    metrics: Metrics
    out_dir: Path | None
    split: str  # which images were evaluated, in words
    failed: int  # images that could not be decoded
    plots: list[Path]


def score_records(
    predictor: Predictor, records: Sequence[Record], progress: Callable[[int], None] | None = None,
) -> tuple[list[Record], np.ndarray, np.ndarray, list[tuple[Record, str]]]:
    """A classifier's Predictor over records, as arrays: (scored records, targets — class
    indices (N,) or 0/1 (N, C) —, scores float32 (N, C), (record, reason) failures). What the
    export checks compare formats with."""
    task = get_task(predictor.task)
    scored = task.score(predictor, records, progress)
    y, s = task.arrays(scored, len(predictor.classes))  # type: ignore[attr-defined]
    return scored.records, y, s, scored.failed


def metric_points(src: Bundle, y: np.ndarray, scores: np.ndarray) -> float | None:
    """A classifier's compared metric (accuracy, or mAP for multi-label) in points, 0-100,
    from arrays (see :func:`score_records`); None when undefined (no positives)."""
    if not len(scores):
        return None
    task = get_task(src.task)
    value = task.array_metrics(y, scores, src.classes, src.meta).get(task.compare_key)  # type: ignore[attr-defined]
    return None if value is None else round(100 * float(value), 2)


def headline_metric(src: Bundle) -> str:
    """The metric formats of this bundle are compared by (accuracy, mAP, or mAP50 for detectors)."""
    return get_task(src.task).compare_key


def evaluate(
    bundle: str | Path | Bundle,
    data: str | Path,
    *,
    out_dir: str | Path | None = None,
    split: str | None = None,
    reporter: Reporter | None = None,
    predictor: Predictor | None = None,
    allow_outside_root: bool = False,
) -> EvalResult:
    """Evaluate a bundle on a dataset; writes metrics.json, predictions.csv and PNG plots to
    ``out_dir`` (default: ``<run dir>/eval`` beside the bundle, or ``<bundle>/eval``).
    allow_outside_root: read images the data names outside its folder (refused by default)."""
    ui = reporter or Reporter()
    b = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
    task = get_task(b.task)
    # a classifier's data must have one label per image
    ds = read_dataset(data, task=b.task, outside_root="allow" if allow_outside_root else "refuse")
    records, described = choose_records(b, ds, split)
    records = align_classes(b, ds, records)
    pred = predictor or Predictor(b)
    ui.step(f"Evaluating {b.path} on {len(records)} images: {described}")
    out = Path(out_dir) if out_dir else default_eval_dir(b)
    with ui.track("Predicting", len(records)) as advance:
        scored = task.score(pred, records, advance)
    if scored.failed:
        first, why = scored.failed[0]
        ui.warn(f"{len(scored.failed)} image(s) could not be read and were left out, e.g. {first.path}: {why}")
    if not scored.records:
        raise DataError("no image could be evaluated")
    metrics = task.metrics(scored, b.classes, b.meta).with_source(described)
    written = task.write_report(out, b, task.at_threshold(scored, b.meta), metrics)
    # the run's report.html when eval/ is the run's own; else inside the --out folder
    in_run = out.resolve() == (b.path.parent / "eval").resolve() and (b.path.parent / "config.yaml").is_file()
    write_quietly(b.path, ui, out=None if in_run else out / REPORT_FILE, eval_dir=out, records=scored.records)
    return EvalResult(b.task, metrics, out, described, len(scored.failed), written)


def default_eval_dir(b: Bundle) -> Path:
    """``<run>/eval`` for a bundle inside a run directory, else ``<bundle>/eval``."""
    return b.path.parent / "eval" if (b.path.parent / "config.yaml").is_file() else b.path / "eval"
