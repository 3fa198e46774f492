"""Detection metrics: COCO box mAP/mAR, and precision / recall / F-beta at IoU 0.5 over every
score threshold, with the threshold that maximises F-beta.

Inputs are the package's two currencies: ground truth as :class:`~lensforge.data.records.Record`
(``boxes`` xyxy float pixels, ``labels`` class index per box, ``crowd`` flags) and predictions
as :class:`~lensforge.runtime.results.DetectionResult` (every detection the model returned,
low scores included), one result per record, in the same order, boxes in the same pixels.

- COCO numbers come from faster-coco-eval (a C++ port of pycocotools' evaluate/accumulate,
  several times faster; ``tests/test_detection_metrics.py`` checks every number against
  pycocotools to 1e-6). Category ids are class index + 1, image ids the record index.
- F-beta uses COCO's matching at one IoU (per image and class, detections by descending score,
  each takes the best-IoU unmatched non-crowd box with IoU >= ``iou``; a detection that only
  overlaps a crowd box is ignored, neither right nor wrong; crowd boxes are never missed), then
  sweeps the score threshold over every distinct score. Numpy only, vectorised over images.

Every dict returned is JSON-ready (plain ``float``/``int``/``list``/``None``): it is what
``lensforge evaluate`` and training write into ``metrics.json`` and the bundle, and what
:mod:`lensforge.metrics.detection_plots` draws.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from lensforge.data.records import Record
from lensforge.errors import DataError
from lensforge.metrics.base import Metrics
from lensforge.metrics.fbeta import FALLBACK_THRESHOLD, best_ties, f_beta
from lensforge.runtime.results import DetectionResult

log = logging.getLogger(__name__)

# COCO's summary rows: (key, AP (True) or AR, IoU (None = mean over .50:.95), area, maxDets).
_COCO_STATS: tuple[tuple[str, bool, float | None, str, int], ...] = (
    ("map", True, None, "all", 100),
    ("map50", True, 0.5, "all", 100),
    ("map75", True, 0.75, "all", 100),
    ("map_small", True, None, "small", 100),
    ("map_medium", True, None, "medium", 100),
    ("map_large", True, None, "large", 100),
    ("mar1", False, None, "all", 1),
    ("mar10", False, None, "all", 10),
    ("mar100", False, None, "all", 100),
)
_AREAS = ("all", "small", "medium", "large")  # COCO's area-range order in eval arrays
_MAX_DETS = (1, 10, 100)

# Candidate (detection, box) pairs are built a chunk of detections at a time, so a crowded split
# (hundreds of boxes and detections per image) never needs more than about this many pairs.
_PAIRS_PER_CHUNK = 1_000_000  # ~100 MB of temporaries

# The F-beta curve stored in metrics.json is sampled at up to this many thresholds (the exact
# curve has one point per distinct score: half a million for 5,000 images x 100 detections).
CURVE_POINTS = 201


# -- input checks ---------------------------------------------------------------------------

def _check_inputs(
    records: Sequence[Record], results: Sequence[DetectionResult], classes: Sequence[str] | None
) -> tuple[str, ...]:
    """The class names after checking that records and results belong together."""
    if len(records) != len(results):
        raise ValueError(
            f"need one DetectionResult per record: {len(records)} records but {len(results)} results"
        )
    if not records:
        raise ValueError("no images to evaluate: records and results are empty")
    for i, res in enumerate(results):
        if not isinstance(res, DetectionResult):
            raise TypeError(f"results[{i}] must be a DetectionResult, got {type(res).__name__}")
    names = tuple(classes) if classes is not None else results[0].classes
    if not names:
        raise ValueError("classes is empty: detection metrics need at least one class")
    for i, res in enumerate(results):
        if res.classes != names:
            raise DataError(
                f"results[{i}] has the model's classes {list(res.classes)} but the evaluation uses "
                f"{list(names)}: evaluate the model on a dataset with the same classes, in the same order"
            )
        if len(res) and not (np.isfinite(res.boxes).all() and np.isfinite(res.scores).all()):
            raise ValueError(f"results[{i}] has a NaN or infinite box coordinate or score")
    for i, rec in enumerate(records):
        if rec.labels and (min(rec.labels) < 0 or max(rec.labels) >= len(names)):
            raise DataError(
                f"{rec.path}: box labels {min(rec.labels)}..{max(rec.labels)} are outside the "
                f"{len(names)} classes [0, {len(names)}); check that the dataset's class list "
                f"matches the model's ({', '.join(names)})"
            )
        if len(rec.labels) != len(rec.boxes):
            raise DataError(
                f"{rec.path}: {len(rec.labels)} labels but {len(rec.boxes)} boxes; a detection "
                "record needs one box per label (is this a classification dataset?)"
            )
    return names


def _check_iou(iou: float) -> None:
    if not 0 < iou <= 1:
        raise ValueError(f"iou must be in (0, 1], got {iou}")


def _check_beta_iou(beta: float, iou: float) -> None:
    if not beta > 0:
        raise ValueError(f"beta must be positive, got {beta} (2 weighs recall twice as much as precision)")
    _check_iou(iou)


# -- flat arrays over all images ----------------------------------------------------------------

def _flatten_gt(records: Sequence[Record]) -> tuple[np.ndarray, ...]:
    """Every ground truth box: image index int64 (G,), class int64 (G,), xyxy float64 (G, 4)
    (from the records' float32), crowd bool (G,); record order, then box order."""
    counts = np.array([len(r.boxes) for r in records], dtype=np.int64)
    img = np.repeat(np.arange(len(records), dtype=np.int64), counts)
    if counts.sum() == 0:
        return img, np.zeros(0, np.int64), np.zeros((0, 4)), np.zeros(0, bool)
    boxes = np.concatenate([r.box_array() for r in records]).astype(np.float64)
    labels = np.concatenate([np.asarray(r.labels, dtype=np.int64) for r in records])
    crowd = np.concatenate([r.crowd_array() for r in records])
    return img, labels, boxes, crowd


def _flatten_dt(results: Sequence[DetectionResult]) -> tuple[np.ndarray, ...]:
    """Every detection: image index int64 (D,), class int64 (D,), xyxy float64 (D, 4),
    score float32 (D,); result order, then the result's own order."""
    counts = np.array([len(r) for r in results], dtype=np.int64)
    img = np.repeat(np.arange(len(results), dtype=np.int64), counts)
    boxes = np.concatenate([r.boxes for r in results]).astype(np.float64)
    scores = np.concatenate([r.scores for r in results])
    cls = np.concatenate([r.class_ids for r in results])
    return img, cls, boxes, scores


# -- COCO mAP via faster-coco-eval -----------------------------------------------------------

def _xywh(boxes: np.ndarray) -> np.ndarray:
    return np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)


def _coco_datasets(
    records: Sequence[Record], results: Sequence[DetectionResult], classes: Sequence[str]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Ground truth and detections as two COCO dataset dicts (what ``COCO(dict)`` takes).

    The detections get what pycocotools' ``loadRes`` would add (ids from 1 in order, ``area``
    = w * h, ``iscrowd`` 0), built here directly from flat arrays: half a million dicts cost
    seconds, so each is made once, without loadRes' copy and dummy polygon.
    """
    images = [{"id": i, "width": int(w), "height": int(h)}
              for i, (w, h) in enumerate(rec.size or res.image_size or (0, 0) for rec, res in zip(records, results))]
    categories = [{"id": k + 1, "name": name} for k, name in enumerate(classes)]
    img, labels, boxes, crowd = _flatten_gt(records)
    xywh = _xywh(boxes)
    gt_anns = [{"id": k, "image_id": i, "category_id": c + 1, "bbox": b, "area": b[2] * b[3], "iscrowd": z}
               for k, i, c, b, z in zip(range(1, img.size + 1), img.tolist(), labels.tolist(), xywh.tolist(),
                                         crowd.astype(int).tolist())]
    d_img, d_cls, d_boxes, scores = _flatten_dt(results)
    d_xywh = _xywh(d_boxes)
    dt_anns = [{"id": k, "image_id": i, "category_id": c + 1, "bbox": b, "score": s, "area": b[2] * b[3],
                "iscrowd": 0}
               for k, i, c, b, s in zip(range(1, d_img.size + 1), d_img.tolist(), d_cls.tolist(), d_xywh.tolist(),
                                        scores.tolist())]
    return ({"images": images, "annotations": gt_anns, "categories": categories},
            {"images": images, "annotations": dt_anns, "categories": categories})


def to_coco(
    records: Sequence[Record], results: Sequence[DetectionResult], classes: Sequence[str]
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The ground truth as a COCO dataset dict and the detections as a COCO results list
    (``[{"image_id", "category_id", "bbox", "score"}]``, what ``COCO.loadRes`` takes).

    Image ids are record indices (0-based), category ids class index + 1, boxes
    ``[x, y, w, h]`` in pixels, ``area = w * h`` and ``iscrowd`` from ``Record.crowd``.
    Image width/height come from ``record.size``, else the result's ``image_size``, else 0
    (box evaluation never reads them). Annotation ids start at 1 (COCO reads 0 as "unmatched").
    """
    gt, dt = _coco_datasets(records, results, classes)
    keys = ("image_id", "category_id", "bbox", "score")
    return gt, [{k: a[k] for k in keys} for a in dt["annotations"]]


def _mean_valid(values: np.ndarray) -> float | None:
    """COCO's summary: the mean over entries > -1; None where there is none (-1 in COCO)."""
    valid = values[values > -1]
    return float(valid.mean()) if valid.size else None


def coco_metrics(
    records: Sequence[Record], results: Sequence[DetectionResult], classes: Sequence[str]
) -> dict[str, Any]:
    """COCO box metrics (pycocotools' numbers, computed by faster-coco-eval).

    records / results: one per image, same order; results hold every detection (mAP needs the
    low scores too). classes: the C class names (``DetectionResult.classes`` must equal them).

    Returns a JSON-ready dict: ``map`` (AP@[.50:.95]), ``map50``, ``map75``, ``map_small``,
    ``map_medium``, ``map_large`` (area < 32², < 96², above), ``mar1``, ``mar10``, ``mar100``
    (AR with at most 1/10/100 detections per image), ``per_class_ap`` and ``per_class_ap50``
    ({class: AP}), and ``pr_curve``: ``{"iou": 0.5, "recall": 101 recall points 0..1,
    "precision": {class: 101 interpolated precisions}}`` (COCO's ``eval["precision"]`` at IoU
    0.5, all areas, 100 detections). A value COCO reports as -1 (no ground truth box of that
    size or class) is None; so is the curve of a class without ground truth.
    """
    # Imported here: it comes with the train extra, while the F-beta functions below need
    # only numpy and work in a serving install too.
    try:
        from faster_coco_eval import COCO, COCOeval_faster
    except ImportError as exc:
        raise ImportError("COCO mAP needs faster-coco-eval: pip install 'lensforge[train]'") from exc

    names = _check_inputs(records, results, classes)
    gt, dt = _coco_datasets(records, results, names)
    coco_gt = COCO(gt, print_function=log.debug)
    coco_dt = COCO(dt, print_function=log.debug)
    ev = COCOeval_faster(coco_gt, coco_dt, iouType="bbox", print_function=log.debug)
    # Evaluate every class, those without a ground truth box included (COCO takes the ids
    # from the dataset's categories, which list them all): their AP is -1, i.e. None.
    ev.params.imgIds = list(range(len(records)))
    ev.params.catIds = list(range(1, len(names) + 1))
    ev.evaluate()
    ev.accumulate()
    precision = np.asarray(ev.eval["precision"])  # [T=10 IoUs, R=101 recalls, K, A=4 areas, M=3 maxDets]
    recall = np.asarray(ev.eval["recall"])  # [T, K, A, M]
    iou_thrs = np.asarray(ev.params.iouThrs)

    out: dict[str, Any] = {}
    for key, is_ap, iou, area, max_dets in _COCO_STATS:
        a, m = _AREAS.index(area), _MAX_DETS.index(max_dets)
        t = slice(None) if iou is None else np.flatnonzero(np.isclose(iou_thrs, iou))
        out[key] = _mean_valid(precision[t, :, :, a, m] if is_ap else recall[t, :, a, m])
    all_100 = precision[:, :, :, 0, -1]  # [T, R, K]
    out["per_class_ap"] = {name: _mean_valid(all_100[:, :, k]) for k, name in enumerate(names)}
    out["per_class_ap50"] = {name: _mean_valid(all_100[0, :, k]) for k, name in enumerate(names)}
    out["pr_curve"] = {
        "iou": float(iou_thrs[0]),
        "recall": np.asarray(ev.params.recThrs, dtype=float).tolist(),
        "precision": {name: (all_100[0, :, k].tolist() if (all_100[0, :, k] > -1).any() else None)
                      for k, name in enumerate(names)},
    }
    return out


# -- matching at one IoU, vectorised over images ----------------------------------------------

@dataclass(frozen=True)
class Matches:
    """Every detection's fate at one IoU threshold, flattened over the images.

    scores: float32 (D,); class_ids: int64 (D,); image_ids: int64 (D,) record index.
    tp: bool (D,), matched to a non-crowd ground truth box of its class.
    ignored: bool (D,), not matched but overlapping a crowd box: neither TP nor FP.
    n_gt: int64 (C,) non-crowd ground truth boxes per class (what recall divides by).
    """

    scores: np.ndarray
    class_ids: np.ndarray
    image_ids: np.ndarray
    tp: np.ndarray
    ignored: np.ndarray
    n_gt: np.ndarray


def _pairs(dt_key: np.ndarray, gt_key: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every (detection, box) index pair with the same key; both key arrays sorted ascending."""
    lo = np.searchsorted(gt_key, dt_key, side="left")
    n = np.searchsorted(gt_key, dt_key, side="right") - lo
    di = np.repeat(np.arange(dt_key.size), n)
    # offsets 0..n-1 within each detection's run of boxes
    starts = np.repeat(np.cumsum(n) - n, n)
    gi = np.repeat(lo, n) + np.arange(di.size) - starts
    return di, gi


def _overlap(d: np.ndarray, g: np.ndarray, crowd: bool) -> np.ndarray:
    """IoU of paired xyxy boxes (P, 4) as pycocotools computes it; for crowd boxes the union
    is the detection's own area (the fraction of the detection inside the crowd region)."""
    iw = np.minimum(d[:, 2], g[:, 2]) - np.maximum(d[:, 0], g[:, 0])
    ih = np.minimum(d[:, 3], g[:, 3]) - np.maximum(d[:, 1], g[:, 1])
    inter = np.clip(iw, 0, None) * np.clip(ih, 0, None)
    area_d = (d[:, 2] - d[:, 0]) * (d[:, 3] - d[:, 1])
    union = area_d if crowd else area_d + (g[:, 2] - g[:, 0]) * (g[:, 3] - g[:, 1]) - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def _candidates(
    dt_key: np.ndarray, dt_box: np.ndarray, gt_key: np.ndarray, gt_box: np.ndarray, iou: float, crowd: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(detection, box, IoU) for every same-key pair reaching ``iou``, built in chunks of
    detections so the dense pair list stays bounded."""
    if not dt_key.size or not gt_key.size:
        empty = np.zeros(0, np.int64)
        return empty, empty, np.zeros(0)
    per_dt = np.searchsorted(gt_key, dt_key, side="right") - np.searchsorted(gt_key, dt_key, side="left")
    cum = np.cumsum(per_dt)
    out_d, out_g, out_v = [], [], []
    start = 0
    threshold = min(iou, 1 - 1e-10)  # as COCO: an IoU of exactly 1 still matches at iou=1
    while start < dt_key.size:
        base = cum[start - 1] if start else 0
        stop = max(int(np.searchsorted(cum, base + _PAIRS_PER_CHUNK, side="right")), start + 1)
        di, gi = _pairs(dt_key[start:stop], gt_key)
        di += start
        v = _overlap(dt_box[di], gt_box[gi], crowd)
        keep = v >= threshold
        out_d.append(di[keep])
        out_g.append(gi[keep])
        out_v.append(v[keep])
        start = stop
    return np.concatenate(out_d), np.concatenate(out_g), np.concatenate(out_v)


def match_detections(
    records: Sequence[Record], results: Sequence[DetectionResult], iou: float = 0.5
) -> Matches:
    """COCO's greedy matching at one IoU threshold, for all images at once.

    Per image and class, detections go by descending score (ties: original order); each takes
    the unmatched non-crowd box of its class with the highest IoU >= ``iou`` (ties: the later
    box, as pycocotools). A detection left unmatched that covers a crowd box by >= ``iou``
    (intersection over the detection's area) is ignored. Unlike COCO's AP there is no cap of
    100 detections per image: a threshold applies to every detection.

    Sequential within an image, so it runs in rounds: round r places the r-th best detection
    of every (image, class) group at once, over the sparse list of pairs that reach ``iou``.
    """
    _check_inputs(records, results, None)
    _check_iou(iou)
    n_classes = len(results[0].classes)
    gt_img, gt_cls, gt_box, gt_crowd = _flatten_gt(records)
    dt_img, dt_cls, dt_box, scores = _flatten_dt(results)
    n_gt = np.bincount(gt_cls[~gt_crowd], minlength=n_classes).astype(np.int64)

    # Group key (image, class); detections sorted by key then descending score (stable).
    dt_order = np.lexsort((-scores, dt_img * n_classes + dt_cls))
    d_key = (dt_img * n_classes + dt_cls)[dt_order]
    d_box = dt_box[dt_order]
    # rank of each detection inside its group: 0 for the best
    first = np.flatnonzero(np.r_[True, d_key[1:] != d_key[:-1]]) if d_key.size else np.zeros(0, np.int64)
    group_size = np.diff(np.r_[first, d_key.size])
    rank = np.arange(d_key.size) - np.repeat(first, group_size)

    gt_key = gt_img * n_classes + gt_cls
    tp_sorted = np.zeros(d_key.size, dtype=bool)
    ignored_sorted = np.zeros(d_key.size, dtype=bool)

    plain = np.flatnonzero(~gt_crowd)
    plain = plain[np.argsort(gt_key[plain], kind="stable")]  # record order kept within a group
    di, gi, v = _candidates(d_key, d_box, gt_key[plain], gt_box[plain], iou, crowd=False)
    if di.size:
        # Within each detection: ascending IoU, then ascending box index, so the last pair
        # still free is COCO's choice (highest IoU, ties to the later box). Rounds by rank.
        order = np.lexsort((gi, v, di, rank[di]))
        di, gi = di[order], gi[order]
        round_start = np.searchsorted(rank[di], np.arange(rank[di][-1] + 2))
        taken = np.zeros(plain.size, dtype=bool)
        for r in range(round_start.size - 1):
            lo, hi = round_start[r], round_start[r + 1]
            if lo == hi:
                continue
            free = np.flatnonzero(~taken[gi[lo:hi]]) + lo
            if not free.size:
                continue
            d_free = di[free]
            last = np.r_[d_free[1:] != d_free[:-1], True]  # last free pair of each detection
            tp_sorted[d_free[last]] = True
            taken[gi[free[last]]] = True

    crowd_idx = np.flatnonzero(gt_crowd)
    if crowd_idx.size:
        crowd_idx = crowd_idx[np.argsort(gt_key[crowd_idx], kind="stable")]
        open_d = np.flatnonzero(~tp_sorted)
        cdi, _, _ = _candidates(d_key[open_d], d_box[open_d], gt_key[crowd_idx], gt_box[crowd_idx],
                                iou, crowd=True)
        ignored_sorted[open_d[cdi]] = True

    tp = np.empty_like(tp_sorted)
    ignored = np.empty_like(ignored_sorted)
    tp[dt_order] = tp_sorted
    ignored[dt_order] = ignored_sorted
    return Matches(scores=scores, class_ids=dt_cls, image_ids=dt_img, tp=tp, ignored=ignored, n_gt=n_gt)


# -- F-beta over thresholds --------------------------------------------------------------------

def _curve(m: Matches, beta: float) -> dict[str, np.ndarray]:
    keep = ~m.ignored
    s = m.scores[keep]
    order = np.argsort(-s, kind="stable")
    s, tp = s[order], m.tp[keep][order]
    cum_tp = np.cumsum(tp)
    cum_fp = np.cumsum(~tp)
    # the operating point of threshold t predicts every score >= t: the last of each run of equal scores
    ends = np.flatnonzero(np.r_[s[1:] != s[:-1], True]) if s.size else np.zeros(0, np.int64)
    tps, fps = cum_tp[ends].astype(np.int64), cum_fp[ends].astype(np.int64)
    n_gt = int(m.n_gt.sum())
    precision = tps / np.maximum(tps + fps, 1)
    recall = tps / n_gt if n_gt else np.zeros(tps.shape)
    return {"thresholds": s[ends], "precision": precision, "recall": recall,
            "fbeta": f_beta(precision, recall, beta), "tp": tps, "fp": fps, "fn": n_gt - tps}


def fbeta_curve(
    records: Sequence[Record], results: Sequence[DetectionResult], beta: float = 2.0, iou: float = 0.5
) -> dict[str, np.ndarray]:
    """Precision, recall and F-beta of all classes together at every distinct score.

    Returns numpy arrays, one entry per threshold: ``thresholds`` float32 (T,), descending
    (the distinct detection scores; predicting ``score >= thresholds[i]`` gives point i),
    ``precision``, ``recall``, ``fbeta`` float64 (T,) and the counts ``tp``, ``fp``, ``fn``
    int64 (T,). Ignored detections (on crowd boxes) are not counted; recall divides by the
    non-crowd ground truth boxes and is 0 when there is none. Empty arrays without detections.
    """
    _check_beta_iou(beta, iou)
    return _curve(match_detections(records, results, iou), beta)


def _at(m: Matches, threshold: float, beta: float) -> dict[str, Any]:
    if not np.isfinite(threshold):
        raise ValueError(f"threshold must be a finite score, got {threshold}")
    hit = (m.scores >= np.float32(threshold)) & ~m.ignored
    tp = int((hit & m.tp).sum())
    fp = int((hit & ~m.tp).sum())
    n_gt = int(m.n_gt.sum())
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / n_gt if n_gt else 0.0
    fb = float(f_beta(np.array([precision]), np.array([recall]), beta)[0])
    return {"threshold": float(threshold), "precision": precision, "recall": recall, "fbeta": fb,
            "tp": tp, "fp": fp, "fn": n_gt - tp}


def at_threshold(
    records: Sequence[Record], results: Sequence[DetectionResult], threshold: float, beta: float = 2.0,
    iou: float = 0.5,
) -> dict[str, Any]:
    """All classes together at one threshold (``score >= threshold``, compared in float32 as
    :meth:`DetectionResult.above`): ``{"threshold", "precision", "recall", "fbeta", "tp",
    "fp", "fn"}``. An undefined precision or recall (nothing predicted, no ground truth) is 0."""
    _check_beta_iou(beta, iou)
    return _at(match_detections(records, results, iou), threshold, beta)


def _best(curve: dict[str, np.ndarray], m: Matches, beta: float) -> tuple[float, dict[str, Any]]:
    fb = curve["fbeta"]
    if not fb.size or fb.max() <= 0:
        # No detection, no ground truth, or no true positive: every threshold scores 0 and
        # none says anything about new data; keep the untuned default.
        return FALLBACK_THRESHOLD, _at(m, FALLBACK_THRESHOLD, beta)
    # Ties go to the highest threshold: the same F-beta with fewer detections shown.
    best = int(best_ties(fb)[0])  # thresholds descend: the first tie is the highest
    threshold = float(curve["thresholds"][best])
    return threshold, _at(m, threshold, beta)


def best_threshold(
    records: Sequence[Record], results: Sequence[DetectionResult], beta: float = 2.0, iou: float = 0.5
) -> tuple[float, dict[str, Any]]:
    """The score threshold that maximises F-beta on these (validation) data, and its
    :func:`at_threshold` dict. The threshold is one of the detection scores (float32-exact),
    so ``score >= threshold`` reproduces the operating point. Ties go to the highest
    threshold; where F-beta is 0 at every threshold (no detection, no ground truth, no true
    positive) it is ``FALLBACK_THRESHOLD`` (0.5)."""
    _check_beta_iou(beta, iou)
    m = match_detections(records, results, iou)
    return _best(_curve(m, beta), m, beta)


def sample_curve(curve: dict[str, np.ndarray], points: int = CURVE_POINTS,
                 keep: float | None = None) -> dict[str, list[float]]:
    """The exact curve (one point per distinct score) at up to ``points`` thresholds evenly
    spaced between the highest and lowest score, plus the point at ``keep``; plain lists,
    thresholds descending. Each sampled point is an exact point of the curve."""
    th = curve["thresholds"]
    if th.size > points:
        grid = np.linspace(float(th[0]), float(th[-1]), points)
        if keep is not None:
            grid = np.r_[grid, keep]
        # the point of threshold t: the last (lowest) distinct score that is still >= t
        idx = np.searchsorted(-th, -grid.astype(np.float32), side="right") - 1
        idx = np.unique(np.clip(idx, 0, th.size - 1))
    else:
        idx = np.arange(th.size)
    return {k: curve[k][idx].astype(float).tolist() for k in ("thresholds", "precision", "recall", "fbeta")}


# -- everything at once ------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)  # equality is the mapping's: equal to a dict of the same JSON
class DetectionMetrics(Metrics):
    """A detector's numbers (see :func:`detection_metrics`); judged by COCO mAP@[.5:.95]."""

    HEADLINE: ClassVar[str] = "map"

    n: int  # images
    map: float | None
    map50: float | None
    map75: float | None
    map_small: float | None
    map_medium: float | None
    map_large: float | None
    mar1: float | None
    mar10: float | None
    mar100: float | None
    per_class_ap: dict[str, float | None]
    per_class_ap50: dict[str, float | None]
    pr_curve: dict[str, Any]
    n_gt: int  # non-crowd boxes
    n_detections: int
    beta: float
    iou: float
    threshold: float  # the operating threshold reported (the bundle's tuned one)
    at_threshold: dict[str, Any]
    best: dict[str, Any]  # the best F-beta operating point on these data
    fbeta_curve: dict[str, list[float]]
    per_class: list[dict[str, Any]]
    evaluated_on: str | None = None


def detection_metrics(
    records: Sequence[Record], results: Sequence[DetectionResult], classes: Sequence[str],
    threshold: float, beta: float = 2.0, iou: float = 0.5,
) -> DetectionMetrics:
    """Every detection number: what ``metrics.json`` and the bundle hold (``to_dict()``).

    threshold: the operating threshold to report (the bundle's tuned one, or
        ``best_threshold(...)[0]`` on this split).

    Keys: ``n`` (images), ``n_gt`` (non-crowd boxes), ``n_detections``; the
    :func:`coco_metrics` keys (``map`` ... ``mar100``, ``per_class_ap``, ``per_class_ap50``,
    ``pr_curve``); ``beta``, ``iou``; ``at_threshold`` (the :func:`at_threshold` dict at
    ``threshold``), ``best`` (:func:`best_threshold`'s dict on these data);
    ``fbeta_curve`` (:func:`sample_curve` of the F-beta curve); ``per_class``: one row per
    class with ``class``, ``support`` (non-crowd boxes), ``precision``, ``recall``, ``fbeta``,
    ``tp``, ``fp``, ``fn`` at ``threshold``, ``ap`` and ``ap50``; precision, recall, F-beta and
    the APs are None for a class with no ground-truth box here (``support`` 0: "n/a").
    """
    _check_beta_iou(beta, iou)
    names = _check_inputs(records, results, classes)
    out: dict[str, Any] = {"n": len(records)}
    out.update(coco_metrics(records, results, names))
    m = match_detections(records, results, iou)
    curve = _curve(m, beta)
    best_t, best = _best(curve, m, beta)
    out.update({
        "n_gt": int(m.n_gt.sum()),
        "n_detections": int(m.scores.size),
        "beta": float(beta),
        "iou": float(iou),
        "threshold": float(threshold),
        "at_threshold": _at(m, threshold, beta),
        "best": best,
        "fbeta_curve": sample_curve(curve, keep=best_t),
    })

    hit = (m.scores >= np.float32(threshold)) & ~m.ignored
    n = len(names)
    tp = np.bincount(m.class_ids[hit & m.tp], minlength=n)
    fp = np.bincount(m.class_ids[hit & ~m.tp], minlength=n)
    precision = np.divide(tp, tp + fp, out=np.zeros(n), where=tp + fp > 0)
    recall = np.divide(tp, m.n_gt, out=np.zeros(n), where=m.n_gt > 0)
    fb = f_beta(precision, recall, beta)

    def known(values: np.ndarray, k: int) -> float | None:
        # a class with no ground truth in these images has no recall, and a precision of 0 there
        # would only say "no true boxes to find" (its false positives are in ``fp``): n/a, not 0.000
        return float(values[k]) if m.n_gt[k] > 0 else None

    out["per_class"] = [
        {"class": name, "support": int(m.n_gt[k]), "precision": known(precision, k),
         "recall": known(recall, k), "fbeta": known(fb, k), "tp": int(tp[k]), "fp": int(fp[k]),
         "fn": int(m.n_gt[k] - tp[k]), "ap": out["per_class_ap"][name], "ap50": out["per_class_ap50"][name]}
        for k, name in enumerate(names)
    ]
    return DetectionMetrics(**out)
