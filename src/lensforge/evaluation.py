"""``evaluate(bundle, data)``: the bundle's Predictor over a held-out split → metrics, plots
and per-image predictions, for every task (the task scores, measures and reports; see
:mod:`lensforge.tasks`). No torch: an exported model is evaluated as it will be served."""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from lensforge.data.formats import read_dataset
from lensforge.data.records import Dataset, Record
from lensforge.data.split import load_split
from lensforge.errors import DataError
from lensforge.metrics.base import Metrics
from lensforge.runtime.bundle import SPLIT_FILE, Bundle, load_bundle
from lensforge.runtime.predictor import Predictor
from lensforge.report import REPORT_FILE, write_quietly
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


def choose_records(bundle: Bundle, ds: Dataset, split: str | None) -> tuple[list[Record], str]:
    """Which images to evaluate on, and how to describe the choice.

    The training data itself → its saved held-out split (never the training images);
    another pre-split dataset → its test (else val) split; anything else → every image.
    """
    same_data = Path(bundle.meta.get("data", {}).get("root", "")).resolve() == ds.root.resolve()
    if split == "all":
        return list(ds.records), "all images"
    if same_data and (bundle.path / SPLIT_FILE).is_file() and _shares_images(bundle.path / SPLIT_FILE, ds):
        saved = load_split(bundle.path / SPLIT_FILE, ds)
        name = split or ("test" if saved["test"] else "val")
        if not saved.get(name):
            raise DataError(f"the saved split has no {name!r} images; choose --split val/test/all")
        return saved[name], f"the {name} split saved at training time"
    if ds.presplit:
        name = split or ("test" if any(r.split == "test" for r in ds.records) else "val")
        recs = [r for r in ds.records if r.split == name]
        if not recs:
            raise DataError(f"{ds.root} has no {name!r} split")
        return recs, f"the {name} folder"
    if split not in (None, "all"):
        raise DataError(f"{ds.root} is neither the training data nor split into folders: there is no {split!r} split; "
                        "leave out --split to evaluate every image")
    return list(ds.records), "all images (this data was not used for training)"


def _shares_images(split_file: Path, ds: Dataset) -> bool:
    """Whether any image of the saved split is in ``ds``. One root can hold several datasets
    (COCO 2017: annotations/instances_train2017.json and instances_val2017.json; YOLO: two
    YAMLs in one folder): evaluating on the other one is new data, not the training data
    changed, so it must not be mapped onto the saved split."""
    try:
        payload = json.loads(split_file.read_text(encoding="utf-8"))
        saved = {rel for rels in payload["splits"].values() for rel in rels}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return True  # load_split says what is wrong with the file
    return any(ds.relpath(r) in saved for r in ds.records)


def align_classes(bundle: Bundle, ds: Dataset, records: list[Record]) -> list[Record]:
    """Re-index labels from the dataset's class list to the bundle's."""
    index = {c: i for i, c in enumerate(bundle.classes)}
    unknown = sorted(set(ds.classes) - set(index))
    used = {ds.classes[i] for r in records for i in r.labels}
    if unknown and used & set(unknown):
        raise DataError(
            f"the data has classes the model does not know: {', '.join(sorted(used & set(unknown))[:5])}; "
            f"the model knows {', '.join(bundle.classes[:10])}"
        )
    return [dataclasses.replace(r, labels=tuple(index[ds.classes[i]] for i in r.labels)) for r in records]


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


def saved_splits(src: Bundle) -> tuple[dict[str, list[Record]] | None, Any]:
    """The bundle's saved split mapped onto its training data (labels re-indexed to the
    bundle's classes), or (None, None) without a split.json."""
    data = src.meta.get("data", {})
    if not (src.path / SPLIT_FILE).is_file() or not data.get("root"):
        return None, None
    source = data.get("source") if data.get("source") and Path(data["source"]).exists() else data["root"]
    ds = read_dataset(source, fmt=data.get("format"), task=src.task)
    splits = load_split(src.path / SPLIT_FILE, ds)
    return {k: align_classes(src, ds, v) for k, v in splits.items()}, ds


def held_out(src: Bundle, order: tuple[str, ...]) -> tuple[list[Record], str | None]:
    """The first non-empty split of ``order`` from the bundle's saved split; ([], None) when
    there is none or the data it names is gone (logged)."""
    try:
        splits, _ = saved_splits(src)
    except DataError as e:
        log.warning("the held-out images of %s cannot be read: %s", src.path, e)
        return [], None
    for name in order:
        if splits and splits.get(name):
            return splits[name], name
    return [], None
