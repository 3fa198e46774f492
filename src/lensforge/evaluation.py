"""``evaluate(bundle, data)``: the bundle's Predictor over a held-out split → metrics, plots
and per-image predictions. No torch: an exported model is evaluated as it will be served."""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from lensforge.data.records import Dataset, Record, targets
from lensforge.errors import DataError
from lensforge.runtime.bundle import SPLIT_FILE, Bundle, load_bundle
from lensforge.runtime.predictor import Predictor
from lensforge.runtime.results import DEFAULT_THRESHOLD, DetectionResult
from lensforge.ui import Reporter

log = logging.getLogger(__name__)


@dataclass
class EvalResult:
    task: str  # "classify", "multilabel" or "detect"
    metrics: dict[str, Any]
    out_dir: Path | None
    split: str  # which images were evaluated, in words
    failed: int  # images that could not be decoded
    plots: list[Path]


def score_records(
    predictor: Predictor, records: Sequence[Record], num_classes: int, multilabel: bool,
    progress: Callable[[int], None] | None = None,
) -> tuple[list[Record], np.ndarray, np.ndarray, list[tuple[Record, str]]]:
    """Run the Predictor over records. Returns (scored records, targets, scores (N, C), failures).

    targets: (N,) class indices, or (N, C) 0/1 for multi-label.
    """
    done, results, failed = predict_records(predictor, records, 32, progress)
    s = np.stack([r.scores for r in results]) if results else np.zeros((0, num_classes), np.float32)
    return done, targets(done, num_classes, multilabel), s, failed


def predict_records(
    predictor: Predictor, records: Sequence[Record], batch_size: int, progress: Callable[[int], None] | None = None,
) -> tuple[list[Record], list[Any], list[tuple[Record, str]]]:
    """The Predictor over records' images, in order: (records that decoded, their results,
    (record, reason) for the ones that did not)."""
    done: list[Record] = []
    results: list[Any] = []
    failed: list[tuple[Record, str]] = []
    for r, (_, res) in zip(records, predictor.predict_many([str(r.path) for r in records], batch_size=batch_size)):
        if progress:
            progress(1)
        if isinstance(res, Exception):
            failed.append((r, str(res)))
            continue
        done.append(r)
        results.append(res)
    return done, results, failed


def compute_metrics(
    y: np.ndarray, scores: np.ndarray, classes: list[str], multilabel: bool, thresholds: Sequence[float] | None
) -> dict[str, Any]:
    from lensforge.metrics.classification import multilabel_metrics, single_label_metrics

    if multilabel:
        th = np.asarray(thresholds if thresholds is not None else [DEFAULT_THRESHOLD] * len(classes), np.float32)
        return multilabel_metrics(y, scores, th, classes)
    return single_label_metrics(y, scores, classes)


def choose_records(bundle: Bundle, ds: Dataset, split: str | None) -> tuple[list[Record], str]:
    """Which images to evaluate on, and how to describe the choice.

    The training data itself → its saved held-out split (never the training images);
    another pre-split dataset → its test (else val) split; anything else → every image.
    """
    same_data = Path(bundle.meta.get("data", {}).get("root", "")).resolve() == ds.root.resolve()
    if split == "all":
        return list(ds.records), "all images"
    if same_data and (bundle.path / SPLIT_FILE).is_file() and _shares_images(bundle.path / SPLIT_FILE, ds):
        from lensforge.data.split import load_split

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
    from lensforge.data.formats import read_dataset

    ui = reporter or Reporter()
    b = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
    multilabel = b.task == "multilabel"
    # a classifier's data must have one label per image
    ds = read_dataset(data, task=b.task, outside_root="allow" if allow_outside_root else "refuse")
    records, described = choose_records(b, ds, split)
    records = align_classes(b, ds, records)
    pred = predictor or Predictor(b)
    ui.step(f"Evaluating {b.path} on {len(records)} images: {described}")
    out = Path(out_dir) if out_dir else default_eval_dir(b)
    if b.task == "detect":
        return _evaluate_detector(b, pred, records, described, out, ui)
    with ui.track("Predicting", len(records)) as advance:
        done, y, s, failed = score_records(pred, records, len(b.classes), multilabel, advance)
    if failed:
        ui.warn(f"{len(failed)} image(s) could not be read and were left out, e.g. {failed[0][0].path}: {failed[0][1]}")
    if not done:
        raise DataError("no image could be evaluated")
    metrics = compute_metrics(y, s, b.classes, multilabel, None if b.thresholds is None else list(b.thresholds))
    metrics["evaluated_on"] = described
    written = write_report(out, b, done, y, s, metrics)
    return EvalResult(b.task, metrics, out, described, len(failed), written)


def score_detections(
    predictor: Predictor, records: Sequence[Record], progress: Callable[[int], None] | None = None,
) -> tuple[list[Record], list[DetectionResult], list[tuple[Record, str]]]:
    """Run a detector's Predictor over records: (scored records, their results — every
    detection, low scores included —, failures (record, reason))."""
    return predict_records(predictor, records, 8, progress)


def _evaluate_detector(b: Bundle, pred: Predictor, records: list[Record], described: str, out: Path,
                       ui: Reporter) -> EvalResult:
    from lensforge.metrics.detection import detection_metrics

    with ui.track("Detecting", len(records)) as advance:
        done, results, failed = score_detections(pred, records, advance)
    if failed:
        ui.warn(f"{len(failed)} image(s) could not be read and were left out, e.g. {failed[0][0].path}: {failed[0][1]}")
    if not done:
        raise DataError("no image could be evaluated")
    beta = float(b.meta.get("threshold_tuning", {}).get("beta", 2.0))
    metrics = detection_metrics(done, results, b.classes, b.score_threshold, beta=beta)
    metrics["evaluated_on"] = described
    written = write_detection_report(out, done, results, metrics)
    return EvalResult(b.task, metrics, out, described, len(failed), written)


def write_detection_report(out: Path, records: Sequence[Record], results: Sequence[DetectionResult],
                           metrics: dict[str, Any]) -> list[Path]:
    """metrics.json, predictions.csv (one row per detection at or above the threshold) and the
    plots: PR curves, per-class AP, F-beta against the threshold, and a grid of images with
    ground truth beside predictions."""
    from lensforge.metrics import detection_plots as dp

    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    threshold = float(metrics["threshold"])
    with (out / "predictions.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "score", "x1", "y1", "x2", "y2"])
        for r, res in zip(records, results):
            kept = res.above(threshold)
            for label, score, box in zip(kept.labels, kept.scores, kept.boxes):
                w.writerow([str(r.path), label, f"{score:.5f}", *(f"{v:.1f}" for v in box)])
    written = [
        dp.plot_detection_pr_curves(metrics, out / "pr_curves.png"),
        dp.plot_ap_bars(metrics, out / "per_class_ap.png"),
        dp.plot_fbeta_curve(metrics, out / "fbeta_threshold.png"),
        dp.plot_detection_grid(records, results, out / "examples.png", threshold=threshold),
    ]
    return [Path(p) for p in written]


def default_eval_dir(b: Bundle) -> Path:
    """``<run>/eval`` for a bundle inside a run directory, else ``<bundle>/eval``."""
    return b.path.parent / "eval" if (b.path.parent / "config.yaml").is_file() else b.path / "eval"


def write_report(
    out: Path, b: Bundle, records: list[Record], y: np.ndarray, s: np.ndarray, metrics: dict[str, Any]
) -> list[Path]:
    """metrics.json, predictions.csv and the plots (confusion matrix or PR curves, per-class
    bars) into ``out``; returns the plot paths."""
    from lensforge.metrics import plots

    multilabel = b.task == "multilabel"
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    _write_predictions(out / "predictions.csv", records, y, s, b, multilabel)
    if multilabel:
        written = [plots.plot_pr_curves(y, s, b.classes, out / "pr_curves.png", thresholds=b.thresholds)]
    else:
        written = [plots.plot_confusion_matrix(np.asarray(metrics["confusion_matrix"]), b.classes, out / "confusion_matrix.png")]
    written.append(plots.plot_per_class_bars(metrics["per_class"], out / "per_class.png", metric="f1"))
    return [Path(p) for p in written]


def _write_predictions(path: Path, records: list[Record], y: np.ndarray, s: np.ndarray, b: Bundle, multilabel: bool) -> None:
    classes = b.classes
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        if multilabel:
            th = b.thresholds if b.thresholds is not None else np.full(len(classes), DEFAULT_THRESHOLD)
            w.writerow(["path", "true", "predicted", *classes])
            for r, yt, sc in zip(records, y, s):
                w.writerow([str(r.path), ";".join(classes[j] for j in np.flatnonzero(yt)),
                            ";".join(classes[j] for j in np.flatnonzero(sc >= th)), *[f"{v:.5f}" for v in sc]])
        else:
            w.writerow(["path", "true", "predicted", "score", "correct"])
            for r, yt, sc in zip(records, y, s):
                k = int(sc.argmax())
                w.writerow([str(r.path), classes[int(yt)], classes[k], f"{sc[k]:.5f}", int(k == int(yt))])


def saved_splits(src: Bundle) -> tuple[dict[str, list[Record]] | None, Any]:
    """The bundle's saved split mapped onto its training data (labels re-indexed to the
    bundle's classes), or (None, None) without a split.json."""
    from lensforge.data.formats import read_dataset
    from lensforge.data.split import load_split

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


def headline_metric(src: Bundle) -> str:
    """The one number a bundle is judged by: accuracy, mAP for multi-label, COCO mAP for detectors."""
    return {"multilabel": "mAP", "detect": "map"}.get(src.task, "accuracy")


def metric_points(src: Bundle, y: np.ndarray, scores: np.ndarray) -> float | None:
    """Accuracy (or mAP for multi-label) in points, 0-100; None when undefined (no positives)."""
    if not len(scores):
        return None
    th = None if src.thresholds is None else list(src.thresholds)
    value = compute_metrics(y, scores, src.classes, src.task == "multilabel", th).get(headline_metric(src))
    return None if value is None else round(100 * float(value), 2)
