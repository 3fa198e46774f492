"""COCO box mAP: lensforge's ``coco_metrics`` (faster-coco-eval) vs pycocotools.

Measured side by side in one run on the same generated validation split (5,000 images,
100 detections each, 10 classes, boxes of all three COCO sizes, a few crowd boxes):

(a) pycocotools: ``to_coco`` dicts -> ``COCO`` + ``loadRes`` -> ``COCOeval`` evaluate,
    accumulate, summarize (stdout silenced);
(b) ``lensforge.metrics.detection.coco_metrics(records, results, classes)``, end to end from
    the same Records and DetectionResults.

Every summary number and every per-class AP / AP50 must agree to 1e-6 (the script fails
otherwise). Also timed, for scale: the F-beta sweep at IoU 0.5 (``best_threshold``), which
has no pycocotools counterpart. Goal: (b) >= 2x faster than (a).

    python bench/coco_eval.py [--images 5000] [--dets 100] [--repeats 1] [--smoke]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path
from typing import Any

import faster_coco_eval
import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from lensforge.data.records import Record
from lensforge.hardware import cpu_count, cpu_model
from lensforge.metrics.detection import best_threshold, coco_metrics, to_coco
from lensforge.runtime.results import DetectionResult

CLASSES = [f"class_{i}" for i in range(10)]
STAT_KEYS = ("map", "map50", "map75", "map_small", "map_medium", "map_large", "mar1", "mar10", "mar100")
TOLERANCE = 1e-6


def make_split(n_images: int, n_dets: int, seed: int = 0) -> tuple[list[Record], list[DetectionResult]]:
    """Up to 20 boxes per image (every 10th image none), sides log-uniform over 6..400 px so
    small, medium and large all occur, 5% crowd. Detections: noisy copies of the boxes
    (15% with a wrong class, scores uniform in 0.3..1) topped up with random false positives
    (scores uniform in 0..0.6)."""
    rng = np.random.default_rng(seed)
    records, results = [], []
    names = tuple(CLASSES)
    for i in range(n_images):
        w, h = int(rng.integers(480, 1280)), int(rng.integers(360, 960))
        n = 0 if i % 10 == 9 else int(rng.integers(1, 21))
        side = np.exp(rng.uniform(np.log(6), np.log(400), (n, 2)))
        side = np.minimum(side, [w - 1, h - 1])
        xy = rng.uniform(0, 1, (n, 2)) * ([w, h] - side)
        boxes = np.concatenate([xy, xy + side], axis=1).astype(np.float32)
        labels = rng.integers(0, len(CLASSES), n)
        crowd = rng.random(n) < 0.05
        records.append(Record(Path(f"/val/{i:05d}.jpg"), tuple(labels.tolist()),
                              boxes=tuple(map(tuple, boxes.tolist())), crowd=tuple(crowd.tolist()), size=(w, h)))
        n_true = min(n_dets, 3 * n)  # up to three detections per object, the rest false positives
        src = rng.integers(0, max(n, 1), n_true)
        true = boxes[src] + rng.normal(0, 0.05, (n_true, 4)) * np.tile(side[src], 2) if n else np.zeros((0, 4))
        xy_fp = rng.uniform(0, 1, (n_dets - n_true, 2)) * [w, h]
        fp = np.concatenate([xy_fp, xy_fp + np.exp(rng.uniform(np.log(6), np.log(300), (n_dets - n_true, 2)))], axis=1)
        det = np.clip(np.concatenate([true, fp]), 0, [w, h, w, h])
        det[:, 2:] = np.maximum(det[:, 2:], det[:, :2] + 1)
        cls = np.concatenate([np.where(rng.random(n_true) < 0.85, labels[src] if n else 0,
                                       rng.integers(0, len(CLASSES), n_true)),
                              rng.integers(0, len(CLASSES), n_dets - n_true)])
        # copies of real objects mostly score higher than the false positives, as a trained model's do
        scores = np.concatenate([0.3 + 0.7 * rng.random(n_true), 0.6 * rng.random(n_dets - n_true)])
        results.append(DetectionResult(det.astype(np.float32), scores.astype(np.float32), cls, names,
                                       image_size=(w, h)))
    return records, results


def pycocotools_metrics(records: list[Record], results: list[DetectionResult]) -> dict[str, Any]:
    """The same numbers from pycocotools, the reference implementation."""
    gt, dets = to_coco(records, results, CLASSES)
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        ev = COCOeval(coco_gt, coco_gt.loadRes(dets), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    out: dict[str, Any] = dict(zip(STAT_KEYS, (float(s) for s in ev.stats[:9])))
    p = ev.eval["precision"][:, :, :, 0, -1]
    out["per_class_ap"] = {c: float(p[:, :, k][p[:, :, k] > -1].mean()) for k, c in enumerate(CLASSES)}
    out["per_class_ap50"] = {c: float(p[0, :, k][p[0, :, k] > -1].mean()) for k, c in enumerate(CLASSES)}
    return out


def compare(ours: dict[str, Any], ref: dict[str, Any]) -> float:
    """The largest absolute difference over every number; raises if one is missing."""
    worst = 0.0
    for key in STAT_KEYS:
        worst = max(worst, abs(ours[key] - ref[key]))
    for key in ("per_class_ap", "per_class_ap50"):
        for c in CLASSES:
            worst = max(worst, abs(ours[key][c] - ref[key][c]))
    return worst


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--dets", type=int, default=100, help="detections per image")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per method (pycocotools takes a minute)")
    parser.add_argument("--smoke", action="store_true", help="smallest sizes, a few seconds: checks the script still runs and prints its table")
    args = parser.parse_args()
    if args.smoke:
        args.images, args.dets, args.repeats = 50, 10, 1

    records, results = make_split(args.images, args.dets)
    n_gt = sum(len(r.boxes) for r in records)
    t_ref, t_ours, t_fb = [], [], []
    for _ in range(args.repeats):  # interleaved, so drifts in machine load hit both alike
        ref, t = timed(lambda: pycocotools_metrics(records, results))
        t_ref.append(t)
        ours, t = timed(lambda: coco_metrics(records, results, CLASSES))
        t_ours.append(t)
        (threshold, best), t = timed(lambda: best_threshold(records, results, beta=2.0))
        t_fb.append(t)
    diff = compare(ours, ref)

    print(f"# lensforge bench/coco_eval.py -- CPU: {cpu_model()}, threads: {cpu_count()}, "
          f"load average at the end: {os.getloadavg()[0]:.1f}")
    print(f"# Python {platform.python_version()}, numpy {np.__version__}, pycocotools {version('pycocotools')}, "
          f"faster-coco-eval {faster_coco_eval.__version__}")
    print(f"# {args.images} images, {n_gt} boxes, {args.images * args.dets} detections, {len(CLASSES)} classes; "
          f"{args.repeats} run(s), median seconds")
    base = statistics.median(t_ref)
    print(f"{'method':<52}{'median s':>10}{'speed-up':>10}")
    for name, t in (("(a) pycocotools COCOeval (incl. dict conversion)", t_ref),
                    ("(b) lensforge coco_metrics (faster-coco-eval)", t_ours)):
        print(f"{name:<52}{statistics.median(t):>10.2f}{base / statistics.median(t):>9.2f}x")
    # no reference to compare with: shown for scale only
    print(f"{'    lensforge best_threshold (F2 sweep @ IoU .5)':<52}{statistics.median(t_fb):>10.2f}{'-':>10}")
    print(f"mAP {ours['map']:.4f}  mAP50 {ours['map50']:.4f}  mAR100 {ours['mar100']:.4f}; "
          f"best F2 {best['fbeta']:.4f} at score >= {threshold:.4f}")
    print(f"largest |(b) - (a)| over {len(STAT_KEYS)} summary numbers and {2 * len(CLASSES)} per-class APs: {diff:.2e}")
    if diff > TOLERANCE:
        print(f"FAIL: lensforge and pycocotools differ by more than {TOLERANCE}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
