"""Detection metrics and plots: COCO numbers equal pycocotools', F-beta by hand, edge cases,
input checks, and the plot files."""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from sklearn import metrics as skm

from lensforge.data.records import Record
from lensforge.errors import DataError
from lensforge.metrics import detection as det
from lensforge.metrics import detection_plots as dplots
from lensforge.metrics.detection import (
    at_threshold,
    best_threshold,
    coco_metrics,
    detection_metrics,
    fbeta_curve,
    match_detections,
    sample_curve,
    to_coco,
)
from lensforge.metrics.fbeta import best_ties, f_beta
from lensforge.runtime.results import DetectionResult

CLASSES = ("person", "car", "bicycle", "dog")
STAT_KEYS = ("map", "map50", "map75", "map_small", "map_medium", "map_large", "mar1", "mar10", "mar100")


# -- generated data ------------------------------------------------------------------------

def make_split(
    n_images: int, seed: int, classes: tuple[str, ...] = CLASSES, *, gt_classes: int | None = None,
    crowd_rate: float = 0.08, with_dets: bool = True, with_gt: bool = True,
) -> tuple[list[Record], list[DetectionResult]]:
    """Random boxes with sides log-uniform over 6..300 px (small, medium and large all occur),
    some crowd; every 7th image has no box, every 11th no detection. Detections are 0-2
    noisy copies of each box (15% with a wrong class) plus 0-3 random false positives.
    gt_classes: only the first k classes get boxes (the others have no ground truth)."""
    rng = np.random.default_rng(seed)
    k_gt = gt_classes or len(classes)
    records, results = [], []
    for i in range(n_images):
        w, h = int(rng.integers(200, 800)), int(rng.integers(200, 800))
        n = 0 if (i % 7 == 3 or not with_gt) else int(rng.integers(1, 9))
        side = np.exp(rng.uniform(np.log(6), np.log(300), (n, 2)))
        side = np.minimum(side, [w - 1, h - 1])
        xy = rng.uniform(0, 1, (n, 2)) * ([w, h] - side)
        boxes = np.concatenate([xy, xy + side], axis=1).astype(np.float32)
        labels = rng.integers(0, k_gt, n)
        crowd = rng.random(n) < crowd_rate
        records.append(Record(Path(f"/val/{i:04d}.jpg"), tuple(labels.tolist()),
                              boxes=tuple(map(tuple, boxes.tolist())), crowd=tuple(crowd.tolist()), size=(w, h)))
        db, ds, dc = [], [], []
        if with_dets and i % 11 != 5:
            for b, lab, s in zip(boxes, labels, side):
                for _ in range(int(rng.integers(0, 3))):
                    nb = b + rng.normal(0, 0.08, 4) * np.tile(s, 2)
                    db.append(nb)
                    dc.append(lab if rng.random() < 0.85 else rng.integers(0, len(classes)))
            for _ in range(int(rng.integers(0, 4))):
                s, x, y = rng.uniform(5, 250), rng.uniform(0, w - 5), rng.uniform(0, h - 5)
                db.append([x, y, x + s, y + s])
                dc.append(rng.integers(0, len(classes)))
            ds = rng.random(len(db)).tolist()
        dbox = np.clip(np.array(db, dtype=np.float64).reshape(-1, 4), 0, [w, h, w, h])
        dbox[:, 2:] = np.maximum(dbox[:, 2:], dbox[:, :2] + 1)
        results.append(DetectionResult(dbox, np.array(ds, np.float32), np.array(dc, np.int64), classes,
                                       image_size=(w, h)))
    return records, results


def pycoco(records: list[Record], results: list[DetectionResult], classes: tuple[str, ...]) -> COCOeval:
    """pycocotools' COCOeval, run on the same COCO dicts (its loadRes cannot take an empty
    result list, so that case gets an empty results dataset built by hand)."""
    gt, dets = to_coco(records, results, classes)
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        if dets:
            coco_dt = coco_gt.loadRes(dets)
        else:
            coco_dt = COCO()
            coco_dt.dataset = {"images": gt["images"], "categories": gt["categories"], "annotations": []}
            coco_dt.createIndex()
        ev = COCOeval(coco_gt, coco_dt, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev


def _none_for_missing(value: float) -> float | None:
    return None if value == -1 else float(value)


def _valid_mean(a: np.ndarray) -> float | None:
    return float(a[a > -1].mean()) if (a > -1).any() else None


def _close(ours: float | None, ref: float | None) -> bool:
    if ours is None or ref is None:
        return ours is None and ref is None
    return abs(ours - ref) <= 1e-6


def _rec(boxes: list[tuple[float, ...]], labels: list[int], crowd: list[bool] | None = None, name: str = "a.jpg",
         size: tuple[int, int] = (100, 100)) -> Record:
    return Record(Path(f"/img/{name}"), tuple(labels), boxes=tuple(boxes), crowd=tuple(crowd or ()), size=size)


def _res(boxes: list[tuple[float, ...]], scores: list[float], class_ids: list[int],
         classes: tuple[str, ...] = CLASSES) -> DetectionResult:
    return DetectionResult(np.array(boxes, np.float32).reshape(-1, 4), np.array(scores, np.float32),
                           np.array(class_ids, np.int64), classes, image_size=(100, 100))


# -- COCO numbers equal pycocotools ---------------------------------------------------------

SPLITS: dict[str, Callable[[], tuple[list[Record], list[DetectionResult]]]] = {
    "mixed": lambda: make_split(150, seed=0),
    "mixed-2": lambda: make_split(90, seed=1),
    "class-without-gt": lambda: make_split(80, seed=2, gt_classes=3),
    "many-crowd": lambda: make_split(60, seed=3, crowd_rate=0.4),
    "no-detections": lambda: make_split(40, seed=4, with_dets=False),
    "no-gt": lambda: make_split(40, seed=5, with_gt=False),
}


@pytest.mark.parametrize("split", list(SPLITS))
def test_coco_metrics_equal_pycocotools(split: str) -> None:
    records, results = SPLITS[split]()
    ours = coco_metrics(records, results, CLASSES)
    ref = pycoco(records, results, CLASSES)
    for key, value in zip(STAT_KEYS, ref.stats[:9]):
        assert _close(ours[key], _none_for_missing(value)), (key, ours[key], value)
    precision = ref.eval["precision"][:, :, :, 0, -1]  # [T, R, K]
    for k, name in enumerate(CLASSES):
        assert _close(ours["per_class_ap"][name], _valid_mean(precision[:, :, k])), name
        assert _close(ours["per_class_ap50"][name], _valid_mean(precision[0, :, k])), name
        curve = ours["pr_curve"]["precision"][name]
        if (precision[0, :, k] > -1).any():
            np.testing.assert_allclose(curve, precision[0, :, k], atol=1e-6)
        else:
            assert curve is None
    np.testing.assert_allclose(ours["pr_curve"]["recall"], ref.params.recThrs)
    json.dumps(ours, allow_nan=False)  # JSON-ready


def test_coco_metrics_cover_every_size_and_none_where_coco_says_minus_one() -> None:
    records, results = SPLITS["mixed"]()
    ours = coco_metrics(records, results, CLASSES)
    assert all(ours[k] is not None and 0 < ours[k] < 1 for k in STAT_KEYS)  # every size range occurs
    no_gt = coco_metrics(*SPLITS["no-gt"](), CLASSES)
    assert all(no_gt[k] is None for k in STAT_KEYS)
    assert set(no_gt["per_class_ap"].values()) == {None}
    missing = coco_metrics(*SPLITS["class-without-gt"](), CLASSES)
    assert missing["per_class_ap"]["dog"] is None and missing["pr_curve"]["precision"]["dog"] is None


def test_to_coco_conventions() -> None:
    records = [_rec([(10, 20, 40, 60), (0, 0, 5, 5)], [1, 0], [False, True], size=(320, 240))]
    results = [_res([(1, 2, 4, 8)], [0.5], [3])]
    gt, dets = to_coco(records, results, CLASSES)
    assert gt["images"] == [{"id": 0, "width": 320, "height": 240}]
    assert gt["categories"][0] == {"id": 1, "name": "person"}
    assert gt["annotations"][0] == {"id": 1, "image_id": 0, "category_id": 2, "bbox": [10.0, 20.0, 30.0, 40.0],
                                    "area": 1200.0, "iscrowd": 0}
    assert gt["annotations"][1]["iscrowd"] == 1
    assert dets == [{"image_id": 0, "category_id": 4, "bbox": [1.0, 2.0, 3.0, 6.0], "score": 0.5}]


# -- matching equals COCO's at IoU 0.5 and 0.75 ----------------------------------------------

@pytest.mark.parametrize("split", ["mixed", "many-crowd"])
@pytest.mark.parametrize("iou", [0.5, 0.75])
def test_matching_equals_pycocotools_per_detection(split: str, iou: float) -> None:
    records, results = SPLITS[split]()
    ref = pycoco(records, results, CLASSES)
    t = int(np.flatnonzero(np.isclose(ref.params.iouThrs, iou))[0])
    n_dets = sum(len(r) for r in results)
    tp_ref = np.zeros(n_dets, bool)
    ignored_ref = np.zeros(n_dets, bool)
    for e in ref.evalImgs:
        if e is None or e["aRng"] != ref.params.areaRng[0]:  # area "all" only
            continue
        ids = np.asarray(e["dtIds"], dtype=np.int64) - 1  # loadRes numbers detections from 1, in order
        tp_ref[ids] = (e["dtMatches"][t] > 0) & ~e["dtIgnore"][t]
        ignored_ref[ids] = e["dtIgnore"][t]
    m = match_detections(records, results, iou)
    np.testing.assert_array_equal(m.tp, tp_ref)
    np.testing.assert_array_equal(m.ignored, ignored_ref)
    n_gt_ref = np.bincount([a["category_id"] - 1 for a in ref.cocoGt.dataset["annotations"] if not a["iscrowd"]],
                           minlength=len(CLASSES))
    np.testing.assert_array_equal(m.n_gt, n_gt_ref)


def test_matching_in_chunks_equals_matching_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    records, results = SPLITS["mixed"]()
    whole = match_detections(records, results)
    monkeypatch.setattr(det, "_PAIRS_PER_CHUNK", 7)  # many chunks, some of a single detection
    chunked = match_detections(records, results)
    np.testing.assert_array_equal(whole.tp, chunked.tp)
    np.testing.assert_array_equal(whole.ignored, chunked.ignored)


# -- F-beta by hand ------------------------------------------------------------------------

A, B = (0.0, 0.0, 10.0, 10.0), (20.0, 20.0, 30.0, 30.0)
FAR = (60.0, 60.0, 70.0, 70.0)


def test_fbeta_curve_two_boxes_three_detections() -> None:
    # A found at 0.9, a false positive at 0.8, B found at 0.7.
    records = [_rec([A, B], [0, 0])]
    results = [_res([A, FAR, B], [0.9, 0.8, 0.7], [0, 0, 0])]
    curve = fbeta_curve(records, results, beta=2.0)
    np.testing.assert_array_equal(curve["thresholds"], np.float32([0.9, 0.8, 0.7]))
    np.testing.assert_allclose(curve["precision"], [1.0, 0.5, 2 / 3])
    np.testing.assert_allclose(curve["recall"], [0.5, 0.5, 1.0])
    # F2 = 5PR / (4P + R)
    np.testing.assert_allclose(curve["fbeta"], [2.5 / 4.5, 1.25 / 2.5, 10 / 11])
    np.testing.assert_array_equal(curve["tp"], [1, 1, 2])
    np.testing.assert_array_equal(curve["fp"], [0, 1, 1])
    np.testing.assert_array_equal(curve["fn"], [1, 1, 0])
    t, best = best_threshold(records, results, beta=2.0)
    assert t == float(np.float32(0.7))
    assert best == {"threshold": t, "precision": pytest.approx(2 / 3), "recall": 1.0,
                    "fbeta": pytest.approx(10 / 11), "tp": 2, "fp": 1, "fn": 0}
    # beta 0.5 weighs precision: the first detection alone is best (F0.5 = 1.25*0.5/0.75)
    t_half, best_half = best_threshold(records, results, beta=0.5)
    assert t_half == float(np.float32(0.9)) and best_half["fbeta"] == pytest.approx(1.25 * 0.5 / 0.75)


# (GT boxes, GT labels, GT crowd, detections (box, score, class), threshold) -> (tp, fp, fn)
HAND_CASES = {
    "duplicate is a false positive": ([A], [0], None, [(A, 0.9, 0), (A, 0.8, 0)], 0.5, (1, 1, 0)),
    "wrong class: FP and a miss": ([A], [0], None, [(A, 0.9, 1)], 0.5, (0, 1, 1)),
    "below threshold not counted": ([A], [0], None, [(A, 0.3, 0)], 0.5, (0, 0, 1)),
    "IoU exactly 0.5 matches": ([A], [0], None, [((0, 0, 10, 5), 0.9, 0)], 0.5, (1, 0, 0)),
    "IoU 0.49 does not": ([A], [0], None, [((0, 0, 10, 4.9), 0.9, 0)], 0.5, (0, 1, 1)),
    "on a crowd box: ignored, crowd never missed": ([A, B], [0, 0], [False, True], [(B, 0.9, 0), (A, 0.8, 0)],
                                                   0.5, (1, 0, 0)),
    "inside a big crowd box: ignored": ([(0, 0, 100, 100)], [0], [True], [(A, 0.9, 0)], 0.5, (0, 0, 0)),
    "plain box preferred to crowd": ([A, A], [0, 0], [True, False], [(A, 0.9, 0)], 0.5, (1, 0, 0)),
    "best IoU wins, not first box": ([(0, 0, 10, 8), A], [0, 0], None, [(A, 0.9, 0), ((0, 0, 10, 8), 0.8, 0)],
                                     0.5, (2, 0, 0)),
    "threshold is inclusive": ([A], [0], None, [(A, 0.5, 0)], 0.5, (1, 0, 0)),
    "no detections": ([A, B], [0, 1], None, [], 0.5, (0, 0, 2)),
    "no ground truth": ([], [], None, [(A, 0.9, 0), (B, 0.2, 1)], 0.5, (0, 1, 0)),
}


@pytest.mark.parametrize("case", list(HAND_CASES))
def test_at_threshold_hand_cases(case: str) -> None:
    gt_boxes, gt_labels, crowd, dets, threshold, (tp, fp, fn) = HAND_CASES[case]
    records = [_rec(gt_boxes, gt_labels, crowd)]
    results = [_res([d[0] for d in dets], [d[1] for d in dets], [d[2] for d in dets])]
    got = at_threshold(records, results, threshold, beta=2.0)
    assert (got["tp"], got["fp"], got["fn"]) == (tp, fp, fn)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f2 = 5 * precision * recall / (4 * precision + recall) if precision + recall else 0.0
    assert got == {"threshold": threshold, "precision": pytest.approx(precision), "recall": pytest.approx(recall),
                   "fbeta": pytest.approx(f2), "tp": tp, "fp": fp, "fn": fn}


def test_best_threshold_ties_go_to_the_highest_threshold() -> None:
    # F1 is 2/3 at 0.9 (P 1, R 1/2) and again at 0.6 (P 1/2, R 1): keep 0.9, fewer detections.
    records = [_rec([A, B], [0, 0])]
    results = [_res([A, FAR, FAR, B], [0.9, 0.8, 0.7, 0.6], [0, 0, 1, 0])]
    curve = fbeta_curve(records, results, beta=1.0)
    np.testing.assert_allclose(curve["fbeta"], [2 / 3, 0.5, 0.4, 2 / 3])
    t, best = best_threshold(records, results, beta=1.0)
    assert t == float(np.float32(0.9)) and best["tp"] == 1 and best["fp"] == 0


@pytest.mark.parametrize("beta", [0.5, 1.0, 2.0])
def test_f_beta_equals_sklearn(beta: float) -> None:
    # the one F-beta both detection and classification use (metrics/fbeta.py)
    rng = np.random.default_rng(int(beta * 10))
    for _ in range(20):
        y, pred = rng.integers(0, 2, 12), rng.integers(0, 2, 12)
        p = skm.precision_score(y, pred, zero_division=0)
        r = skm.recall_score(y, pred, zero_division=0)
        got = f_beta(np.array([p]), np.array([r]), beta)[0]
        assert got == pytest.approx(skm.fbeta_score(y, pred, beta=beta, zero_division=0), abs=1e-12)
    assert f_beta(np.zeros(2), np.zeros(2), beta).tolist() == [0.0, 0.0]


def test_best_ties_are_equal_within_the_float_tolerance() -> None:
    assert 0.1 + 0.2 != 0.3  # equal fractions that differ in the last bit once computed
    np.testing.assert_array_equal(best_ties(np.array([0.1 + 0.2, 0.2, 0.3, 0.3 - 1e-6])), [0, 2])


def test_equal_scores_form_one_threshold() -> None:
    records = [_rec([A, B], [0, 0])]
    results = [_res([A, FAR, B], [0.8, 0.8, 0.4], [0, 0, 0])]
    curve = fbeta_curve(records, results)
    np.testing.assert_array_equal(curve["thresholds"], np.float32([0.8, 0.4]))
    np.testing.assert_array_equal(curve["tp"], [1, 2])
    np.testing.assert_array_equal(curve["fp"], [1, 1])


@pytest.mark.parametrize("case, expected_fp, expected_fn", [
    ("no detections", 0, 2),     # nothing to sweep: empty curve
    ("no ground truth", 1, 0),   # F-beta 0 everywhere
])
def test_best_threshold_falls_back_when_the_data_cannot_choose(case: str, expected_fp: int, expected_fn: int) -> None:
    gt_boxes, gt_labels, crowd, dets, _, _ = HAND_CASES[case]
    records = [_rec(gt_boxes, gt_labels, crowd)]
    results = [_res([d[0] for d in dets], [d[1] for d in dets], [d[2] for d in dets])]
    t, best = best_threshold(records, results)
    assert t == det.FALLBACK_THRESHOLD
    assert (best["fbeta"], best["fp"], best["fn"]) == (0.0, expected_fp, expected_fn)
    curve = fbeta_curve(records, results)
    assert all(v.ndim == 1 for v in curve.values())
    if case == "no detections":
        assert curve["thresholds"].size == 0
    else:
        assert (curve["fbeta"] == 0).all() and (curve["recall"] == 0).all()


def test_curve_agrees_with_at_threshold_on_generated_data() -> None:
    records, results = SPLITS["many-crowd"]()
    curve = fbeta_curve(records, results, beta=2.0)
    assert (np.diff(curve["thresholds"]) < 0).all()
    for i in (0, len(curve["thresholds"]) // 3, len(curve["thresholds"]) - 1):
        point = at_threshold(records, results, float(curve["thresholds"][i]), beta=2.0)
        assert (point["tp"], point["fp"], point["fn"]) == (curve["tp"][i], curve["fp"][i], curve["fn"][i])
        assert point["fbeta"] == pytest.approx(curve["fbeta"][i])
    _, best = best_threshold(records, results, beta=2.0)
    assert best["fbeta"] == pytest.approx(curve["fbeta"].max())


def test_sample_curve_keeps_exact_points_and_the_best() -> None:
    records, results = SPLITS["mixed"]()
    curve = fbeta_curve(records, results)
    t, _ = best_threshold(records, results)
    small = sample_curve(curve, points=20, keep=t)
    assert len(small["thresholds"]) <= 21 and t in small["thresholds"]
    assert np.all(np.diff(small["thresholds"]) < 0)
    idx = np.searchsorted(-curve["thresholds"], -np.float32(small["thresholds"]))
    np.testing.assert_allclose(small["fbeta"], curve["fbeta"][idx])
    assert sample_curve(curve, points=10**6)["thresholds"] == curve["thresholds"].astype(float).tolist()


# -- everything at once ----------------------------------------------------------------------

def test_detection_metrics_is_json_ready_and_consistent() -> None:
    records, results = SPLITS["mixed"]()
    m = detection_metrics(records, results, CLASSES, threshold=0.4, beta=2.0)
    text = json.dumps(m.to_dict(), allow_nan=False)
    assert json.loads(text) == m
    assert m["n"] == len(records) and m["n_detections"] == sum(len(r) for r in results)
    assert m["n_gt"] == sum(int((~r.crowd_array()).sum()) for r in records)
    coco = coco_metrics(records, results, CLASSES)
    assert all(m[k] == coco[k] for k in coco)
    assert m["at_threshold"] == at_threshold(records, results, 0.4, beta=2.0)
    assert m["best"] == best_threshold(records, results, beta=2.0)[1]
    rows = m["per_class"]
    assert [r["class"] for r in rows] == list(CLASSES)
    for key in ("tp", "fp", "fn"):
        assert sum(r[key] for r in rows) == m["at_threshold"][key]
    for r in rows:
        assert r["support"] == r["tp"] + r["fn"]
        if r["support"] == 0:  # no ground truth of this class here: n/a, not 0.000
            assert r["precision"] is r["recall"] is r["fbeta"] is None
        else:
            assert r["precision"] == pytest.approx(r["tp"] / (r["tp"] + r["fp"]) if r["tp"] + r["fp"] else 0.0)
        assert r["ap"] == m["per_class_ap"][r["class"]] and r["ap50"] == m["per_class_ap50"][r["class"]]
    assert m["best"]["threshold"] in m["fbeta_curve"]["thresholds"]


def test_detection_metrics_per_class_by_hand() -> None:
    records = [_rec([A, B], [0, 1]), _rec([A], [1], name="b.jpg")]
    results = [_res([A, B, FAR], [0.9, 0.8, 0.7], [0, 0, 1]), _res([A], [0.6], [1])]
    m = detection_metrics(records, results, CLASSES, threshold=0.65, beta=1.0)
    rows = {r["class"]: r for r in m["per_class"]}
    # person: A found (TP), B labelled person but is a car (FP). car: the FP at FAR; b.jpg's car below 0.65.
    assert (rows["person"]["tp"], rows["person"]["fp"], rows["person"]["fn"]) == (1, 1, 0)
    assert (rows["car"]["tp"], rows["car"]["fp"], rows["car"]["fn"]) == (0, 1, 2)
    assert rows["person"]["precision"] == 0.5 and rows["person"]["recall"] == 1.0
    assert rows["person"]["fbeta"] == pytest.approx(2 / 3)
    # no dog in the ground truth: precision, recall, F-beta and AP are n/a (None), not 0.0
    assert rows["dog"] == {"class": "dog", "support": 0, "precision": None, "recall": None, "fbeta": None,
                           "tp": 0, "fp": 0, "fn": 0, "ap": None, "ap50": None}


# -- input checks ----------------------------------------------------------------------------

def _ok() -> tuple[list[Record], list[DetectionResult]]:
    return [_rec([A], [0])], [_res([A], [0.9], [0])]


OTHER = ("x", "y", "z", "w")
INVALID: dict[str, tuple[Callable[[], tuple[Any, Any]], type[Exception], str]] = {
    "fewer results": (lambda: (_ok()[0] * 2, _ok()[1]), ValueError, "2 records but 1 results"),
    "nothing to evaluate": (lambda: ([], []), ValueError, "no images to evaluate"),
    "not a DetectionResult": (lambda: (_ok()[0], [{"boxes": []}]), TypeError, "must be a DetectionResult"),
    "label outside the classes": (lambda: ([_rec([A], [7])], _ok()[1]), DataError, "outside the 4 classes"),
    "classification record": (lambda: ([Record(Path("/img/c.jpg"), (1,))], _ok()[1]), DataError, "one box per label"),
    "model has other classes": (lambda: (_ok()[0], [_res([A], [0.9], [0], classes=OTHER)]), DataError,
                                "same classes"),
    "NaN score": (lambda: (_ok()[0], [_res([A], [float("nan")], [0])]), ValueError, "NaN or infinite"),
}
FUNCTIONS: dict[str, Callable[[Any, Any], Any]] = {
    "coco_metrics": lambda r, p: coco_metrics(r, p, CLASSES),
    "detection_metrics": lambda r, p: detection_metrics(r, p, CLASSES, threshold=0.5),
    "fbeta_curve": fbeta_curve,
    "best_threshold": best_threshold,
    "at_threshold": lambda r, p: at_threshold(r, p, 0.5, 2.0),
}


@pytest.mark.parametrize("function", list(FUNCTIONS))
@pytest.mark.parametrize("case", list(INVALID))
def test_invalid_inputs(case: str, function: str) -> None:
    make, error, message = INVALID[case]
    records, results = make()
    if case == "model has other classes" and function in ("fbeta_curve", "best_threshold", "at_threshold"):
        # without a class list, the results' own classes are the reference: then it is the
        # dataset's labels that must fit them (here they do)
        FUNCTIONS[function](records, results)
        return
    with pytest.raises(error, match=message):
        FUNCTIONS[function](records, results)


BAD_ARGUMENTS = [
    ({"beta": 0.0}, "beta must be positive"),
    ({"beta": -1.0}, "beta must be positive"),
    ({"iou": 0.0}, r"iou must be in \(0, 1\]"),
    ({"iou": 1.5}, r"iou must be in \(0, 1\]"),
    ({"threshold": float("nan")}, "threshold must be a finite score"),
]
WITH_THRESHOLD: dict[str, Callable[..., Any]] = {
    "at_threshold": at_threshold,
    "detection_metrics": lambda r, p, **kw: detection_metrics(r, p, CLASSES, **kw),
}
WITHOUT_THRESHOLD: dict[str, Callable[..., Any]] = {"fbeta_curve": fbeta_curve, "best_threshold": best_threshold}


@pytest.mark.parametrize("function, kwargs, message", [
    *[(f, kw, msg) for f in WITH_THRESHOLD for kw, msg in BAD_ARGUMENTS],
    *[(f, kw, msg) for f in WITHOUT_THRESHOLD for kw, msg in BAD_ARGUMENTS if "threshold" not in kw],
])
def test_invalid_arguments(function: str, kwargs: dict[str, float], message: str) -> None:
    records, results = _ok()
    if function in WITH_THRESHOLD:
        call = lambda: WITH_THRESHOLD[function](records, results, **{"threshold": 0.5, **kwargs})
    else:
        call = lambda: WITHOUT_THRESHOLD[function](records, results, **kwargs)
    with pytest.raises(ValueError, match=message):
        call()


def test_results_with_mixed_class_lists_are_rejected() -> None:
    records = [_rec([A], [0]), _rec([A], [0], name="b.jpg")]
    results = [_res([A], [0.9], [0]), _res([A], [0.9], [0], classes=OTHER)]
    with pytest.raises(DataError, match=r"results\[1\]"):
        fbeta_curve(records, results)


# -- plots -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def metrics() -> dict[str, Any]:
    classes = CLASSES + ("a class with a rather long name",)  # no box of it: an n/a bar, no curve
    records, results = make_split(60, seed=7, classes=classes, gt_classes=4)
    return detection_metrics(records, results, classes, threshold=0.5)


@pytest.mark.parametrize("plot, size", [
    (dplots.plot_detection_pr_curves, (1000, 650)),
    (dplots.plot_fbeta_curve, (900, 550)),
    (dplots.plot_ap_bars, (850, 350)),  # 1.4 + 0.42 in per class, 5 classes
])
def test_plots_written_at_their_size(plot: Callable[..., Path], size: tuple[int, int], metrics: dict[str, Any],
                                     tmp_path: Path) -> None:
    out = plot(metrics, tmp_path / "sub" / "plot.png")
    assert out == tmp_path / "sub" / "plot.png" and out.stat().st_size > 10_000
    with Image.open(out) as img:
        assert img.format == "PNG" and img.size == size


@pytest.mark.parametrize("split", ["no-gt", "no-detections"])
def test_plots_of_degenerate_splits_still_render(split: str, tmp_path: Path) -> None:
    records, results = SPLITS[split]()
    m = detection_metrics(records, results, CLASSES, threshold=0.5)
    for plot in (dplots.plot_detection_pr_curves, dplots.plot_fbeta_curve, dplots.plot_ap_bars):
        assert plot(m, tmp_path / f"{plot.__name__}.png").stat().st_size > 5_000


@pytest.mark.parametrize("plot", [dplots.plot_detection_pr_curves, dplots.plot_fbeta_curve, dplots.plot_ap_bars])
def test_plots_reject_other_dicts(plot: Callable[..., Path], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="detection_metrics"):
        plot({"accuracy": 0.9}, tmp_path / "x.png")


def test_image_grid_from_paths_and_images(tmp_path: Path) -> None:
    records, results = make_split(12, seed=8)
    paths = []
    for r in records:
        w, h = r.size
        paths.append(tmp_path / Path(r.path).name)
        # smooth gradients, like photos: noise would make the PNG slow to compress
        x, y = np.meshgrid(np.linspace(60, 200, w), np.linspace(60, 200, h))
        Image.fromarray(np.stack([x, y, (x + y) / 2], axis=-1).astype(np.uint8)).save(paths[-1], quality=85)
    out = dplots.plot_detection_grid(records, results, tmp_path / "grid.png", images=paths, threshold=0.3,
                                     max_images=4)
    shown = [records[i] for i in (0, 4, 7, 11)]  # spread evenly over the 12
    # at most 640 px on the longer side; smaller pictures enlarged to 480 (labels stay readable)
    scales = [max(min(1, 640 / max(r.size)), 480 / max(r.size)) for r in shown]
    thumbs = [(round(r.size[0] * k), round(r.size[1] * k)) for r, k in zip(shown, scales)]
    with Image.open(out) as img:
        # two columns of thumbnails at their pixel size, 30 px of titles per row, 12-px gaps
        assert img.size == (2 * max(w for w, _ in thumbs) + 3 * 12, sum(h for _, h in thumbs) + 4 * 30 + 12)
    # PIL images work the same, default threshold each result's own; one image is enough
    one = dplots.plot_detection_grid(records[:1], results[:1], tmp_path / "one.png",
                                     images=[Image.open(paths[0])], max_images=8)
    assert one.stat().st_size > 5_000


def test_image_grid_draws_boxes_in_class_colours(tmp_path: Path) -> None:
    from lensforge.runtime.draw import class_color

    records = [_rec([(10, 10, 90, 90)], [2], size=(100, 100))]
    results = [_res([(12, 12, 88, 88)], [0.9], [2])]
    white = Image.new("RGB", (100, 100), "white")
    out = dplots.plot_detection_grid(records, results, tmp_path / "g.png", images=[white])
    assert Image.open(out).size[0] == 2 * 480 + 3 * 12  # a 100-px picture is enlarged to 480 px
    pixels = np.asarray(Image.open(out).convert("RGB")).reshape(-1, 3)
    # thumbnails land 1:1 on the PNG, so draw.py's colour survives exactly: two 2-px outlines
    # of about 300 px each, plus the labels' backgrounds
    assert (pixels == class_color(2)).all(axis=1).sum() > 1000


@pytest.mark.parametrize("kwargs, message", [
    ({"records_n": 2, "results_n": 1}, "one result per record"),
    ({"images_n": 3}, "one image per record"),
    ({"records_n": 0, "results_n": 0}, "no images to draw"),
    ({"max_images": 0}, "max_images must be at least 1"),
])
def test_image_grid_checks_its_inputs(kwargs: dict[str, int], message: str, tmp_path: Path) -> None:
    rec, res = _ok()
    records = rec * kwargs.get("records_n", 1)
    results = res * kwargs.get("results_n", 1)
    images = [Image.new("RGB", (100, 100))] * kwargs["images_n"] if "images_n" in kwargs else None
    with pytest.raises(ValueError, match=message):
        dplots.plot_detection_grid(records, results, tmp_path / "g.png", images=images,
                                   max_images=kwargs.get("max_images", 8))
