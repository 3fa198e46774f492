"""Detection evaluation plots, each written to one PNG: PR curves at IoU 0.5, per-class AP
bars, F-beta against the score threshold, and a grid of evaluated images (ground truth
beside prediction).

The first three read only the JSON-ready dict of :func:`~lensforge.metrics.detection.detection_metrics`
(so ``metrics.json`` can be re-plotted without the data); the grid draws with
:func:`lensforge.runtime.draw.draw_detections`, so boxes look as they do in ``predict
--annotate`` and the server, and classes keep their colour (the curves use the same palette).
Like :mod:`lensforge.metrics.plots`: ``matplotlib.figure.Figure`` only, never pyplot; every
function creates the output folder, writes the PNG and returns its path.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from PIL import Image

from lensforge.data.image import decode_image
from lensforge.data.records import Record
from lensforge.metrics.plots import pr_axes, save_png, short_name
from lensforge.runtime.draw import class_color, draw_detections, fit_within
from lensforge.runtime.results import DetectionResult

# Longer side of each thumbnail in the image grid, in pixels. Labels are drawn at the thumbnail's
# size (draw.py's font: 12 px until a 3:2 picture is ~550 px wide, 15 px at 640), and at 480 the
# 32 labels of a 2048x1371 chess photo were 12-px text crammed between 33-px boxes; 640 gives
# 15-px text, and the grid, two thumbnails per row, stays ~1300 px wide.
_GRID_SIDE = 640
_GRID_MIN_SIDE = 480  # smaller pictures are enlarged to this: boxes get wider, the 12-px labels less cramped
_GRID_DPI = 100  # plots.py saves at this dpi: figure inches * 100 = PNG pixels
_GAP = 12  # pixels between and around the grid's columns
_TITLE = 30  # pixels above each row for its titles


def _rgb(i: int) -> tuple[float, float, float]:
    """Class i's box colour from draw.py, as a matplotlib colour."""
    r, g, b = class_color(i)
    return (r / 255, g / 255, b / 255)


def _need(metrics: dict[str, Any], *keys: str) -> None:
    missing = [k for k in keys if k not in metrics]
    if missing:
        raise ValueError(
            f"these metrics lack {', '.join(missing)}: pass the dict from detection_metrics() "
            f"(keys found: {', '.join(sorted(metrics))})"
        )


def plot_detection_pr_curves(metrics: dict[str, Any], path: str | Path, max_legend: int = 12) -> Path:
    """COCO's interpolated precision-recall curve at IoU 0.5 of each class, and their mean
    (thick black; its average over the 101 recall points is mAP50).

    metrics: from ``detection_metrics`` or ``coco_metrics`` (reads ``pr_curve``,
        ``per_class_ap50``, ``map50``).
    max_legend: with more classes than this, the rest are drawn thin and grey, and only the
        ``max_legend // 2`` worst and best by AP50 are coloured and named. Classes without a
        ground truth box have no curve; the legend says how many.
    """
    _need(metrics, "pr_curve", "per_class_ap50", "map50")
    recall = np.asarray(metrics["pr_curve"]["recall"], dtype=float)
    curves = metrics["pr_curve"]["precision"]
    names = list(curves)
    with_gt = [k for k, n in enumerate(names) if curves[n] is not None]
    ap50 = {k: metrics["per_class_ap50"][names[k]] for k in with_gt}
    by_ap = sorted(with_gt, key=lambda k: ap50[k])
    half = max(max_legend // 2, 1)
    highlight = by_ap if len(by_ap) <= max_legend else by_ap[:half] + by_ap[-half:]

    fig = Figure(figsize=(10, 6.5), layout="constrained")
    ax = fig.add_subplot()
    for k in with_gt:
        if k not in highlight:
            ax.plot(recall, curves[names[k]], color="0.8", linewidth=0.8)
    for k in reversed(highlight):  # best first in the legend
        ax.plot(recall, curves[names[k]], color=_rgb(k), linewidth=1.6,
                label=f"{short_name(names[k])} (AP50 {ap50[k]:.2f})")
    if with_gt:
        mean = np.mean([curves[names[k]] for k in with_gt], axis=0)
        ax.plot(recall, mean, color="black", linewidth=3,
                label=f"all classes (mAP50 {metrics['map50']:.3f})")
    notes = []
    if len(highlight) < len(with_gt):
        notes.append(f"{len(with_gt) - len(highlight)} more in grey")
    if len(with_gt) < len(names):
        notes.append(f"{len(names) - len(with_gt)} without ground truth: no curve")
    if with_gt:
        handles, labels = ax.get_legend_handles_labels()
        order = [len(labels) - 1] + list(range(len(labels) - 1))  # the mean first
        ax.legend([handles[i] for i in order], [labels[i] for i in order], loc="upper left",
                  bbox_to_anchor=(1.01, 1.0), fontsize=9, title="\n".join(notes) or None,
                  title_fontsize=8, alignment="left")
    else:
        ax.text(0.5, 0.5, "no class has a ground truth box", ha="center", va="center", fontsize=12)
    pr_axes(ax, f"Precision–recall per class at IoU {metrics['pr_curve']['iou']:.2f} (COCO, interpolated)")
    return save_png(fig, path)


def plot_ap_bars(metrics: dict[str, Any], path: str | Path) -> Path:
    """Per-class AP@[.50:.95] and AP50 as paired horizontal bars, worst AP at the top.

    metrics: from ``detection_metrics`` or ``coco_metrics`` (reads ``per_class_ap``,
        ``per_class_ap50``, ``map``, ``map50``; ``per_class`` for box counts when present).
    Classes without a ground truth box go at the bottom, marked n/a. Dashed lines: mAP and
    mAP50 (means over the classes with ground truth).
    """
    _need(metrics, "per_class_ap", "per_class_ap50", "map", "map50")
    ap, ap50 = metrics["per_class_ap"], metrics["per_class_ap50"]
    support = {r["class"]: r["support"] for r in metrics.get("per_class", [])}
    names = list(ap)
    if not names:
        raise ValueError("per_class_ap is empty: nothing to plot")
    known = sorted((n for n in names if ap[n] is not None), key=lambda n: (ap[n], ap50[n]))
    rows = known + [n for n in names if ap[n] is None]
    n = len(rows)

    fig = Figure(figsize=(8.5, max(2.8, 1.4 + 0.42 * n)), layout="constrained")
    ax = fig.add_subplot()
    y = np.arange(n)
    h = 0.38
    font = float(np.clip(11 - n / 12, 8, 10))
    for offset, values, color, label in ((-h / 2, ap, "C0", "AP@[.50:.95]"), (h / 2, ap50, "C1", "AP50")):
        v = np.array([values[r] if values[r] is not None else 0.0 for r in rows])
        ax.barh(y + offset, v, height=h, color=color, label=label)
        for yi, r in enumerate(rows):
            text = "n/a" if values[r] is None else f"{values[r]:.2f}"
            ax.text(v[yi] + 0.01, yi + offset, text, va="center", fontsize=font - 1)
    if metrics["map"] is not None:
        ax.axvline(metrics["map"], color="C0", linestyle="--", linewidth=1, zorder=0)
        ax.axvline(metrics["map50"], color="C1", linestyle="--", linewidth=1, zorder=0)
    labels = [short_name(r) + (f" (n={support[r]})" if r in support else "") for r in rows]
    ax.set_yticks(y, labels, fontsize=font)
    ax.set_ylim(n - 0.5, -0.5)  # worst at the top
    ax.set_xlim(0, 1.1)
    ax.set_xlabel("average precision")
    overall = ("no class has a ground truth box" if metrics["map"] is None
               else f"mAP {metrics['map']:.3f} · mAP50 {metrics['map50']:.3f} (dashed)")
    ax.set_title(f"AP per class, worst first · {overall}")
    ax.legend(loc="lower right", fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    return save_png(fig, path)


def plot_fbeta_curve(metrics: dict[str, Any], path: str | Path) -> Path:
    """Precision, recall and F-beta (all classes together, IoU 0.5) against the score
    threshold, with the chosen threshold marked (and the best one, where it differs).

    metrics: from ``detection_metrics`` (reads ``fbeta_curve``, ``beta``, ``threshold``,
        ``at_threshold``, ``best``).
    """
    _need(metrics, "fbeta_curve", "beta", "threshold", "at_threshold", "best")
    curve = metrics["fbeta_curve"]
    beta = metrics["beta"]
    fname = f"F{beta:g}"
    fig = Figure(figsize=(9, 5.5), layout="constrained")
    ax = fig.add_subplot()
    th = np.asarray(curve["thresholds"], dtype=float)
    if th.size:
        # steps-post on descending thresholds: each value holds from its threshold down to the next
        ax.plot(th, curve["precision"], drawstyle="steps-post", color="C0", linewidth=1.4, label="precision")
        ax.plot(th, curve["recall"], drawstyle="steps-post", color="C2", linewidth=1.4, label="recall")
        ax.plot(th, curve["fbeta"], drawstyle="steps-post", color="C3", linewidth=2.4, label=fname)
    else:
        ax.text(0.5, 0.5, "no detections", ha="center", va="center", fontsize=12, transform=ax.transAxes)
    chosen, at = metrics["threshold"], metrics["at_threshold"]
    ax.axvline(chosen, color="black", linestyle="--", linewidth=1.2)
    ax.plot([chosen], [at["fbeta"]], "o", color="C3", markersize=9, markeredgecolor="black")
    lo = min([0.0, chosen, *th[-1:]])
    hi = max([1.0, chosen, *th[:1]])
    # the note goes on the side of the marker with more room, so it never leaves the axes
    right = chosen < (lo + hi) / 2
    ax.annotate(f"chosen {chosen:.3f}\n{fname} {at['fbeta']:.3f}, P {at['precision']:.3f}, R {at['recall']:.3f}",
                (chosen, at["fbeta"]), xytext=(10 if right else -10, -40 if at["fbeta"] > 0.25 else 30),
                textcoords="offset points", ha="left" if right else "right", fontsize=9,
                bbox={"facecolor": "white", "edgecolor": "0.6", "alpha": 0.9, "pad": 3})
    best = metrics["best"]
    if abs(best["threshold"] - chosen) > 1e-9:
        ax.axvline(best["threshold"], color="C3", linestyle=":", linewidth=1.2,
                   label=f"best on these data: {best['threshold']:.3f} ({fname} {best['fbeta']:.3f})")
    ax.set_xlabel("score threshold (a detection counts when its score ≥ threshold)")
    ax.set_ylabel("value")
    ax.set_ylim(0, 1.03)
    ax.set_xlim(lo, hi)
    ax.set_title(f"Precision, recall and {fname} vs threshold (IoU {metrics.get('iou', 0.5):.2f}, all classes)")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="lower left", fontsize=9)
    ax.grid(alpha=0.3)
    return save_png(fig, path)


def _load(image: Image.Image | str | Path) -> Image.Image:
    if isinstance(image, Image.Image):
        return image
    return decode_image(image, min_size=_GRID_SIDE)  # reduced JPEG decode: thumbnails only


def plot_detection_grid(
    records: Sequence[Record],
    results: Sequence[DetectionResult],
    path: str | Path,
    images: Sequence[Image.Image | str | Path] | None = None,
    threshold: float | None = None,
    max_images: int = 8,
) -> Path:
    """Up to ``max_images`` evaluated images (the test split, or val where there is none), one row each: ground truth (left) beside the
    prediction at ``threshold`` (right), boxes drawn by ``draw_detections``.

    records / results: one per image, same order (as for the metrics); the images shown are
        spread evenly over them. images: the pictures, one per record (PIL images or paths);
        None reads ``record.path``. Boxes are in pixels of the image as displayed
        (``record.size`` / ``result.image_size``; else the image's own size); each picture is
        scaled to 480-640 px on its longer side and the boxes with it, so labels stay readable.
    threshold: the score a detection needs to be drawn (default: each result's own).
    """
    if len(records) != len(results):
        raise ValueError(f"need one result per record: {len(records)} records but {len(results)} results")
    if images is not None and len(images) != len(records):
        raise ValueError(f"need one image per record: {len(records)} records but {len(images)} images")
    if not records:
        raise ValueError("no images to draw: records is empty")
    if max_images < 1:
        raise ValueError(f"max_images must be at least 1, got {max_images}")
    picks = np.unique(np.linspace(0, len(records) - 1, min(max_images, len(records))).round().astype(int))

    panels = []
    for i in picks:
        rec, res = records[i], results[i]
        img = _load(images[i] if images is not None else rec.path)
        size = rec.size or res.image_size or img.info.get("original_size") or img.size
        truth = DetectionResult(rec.box_array(), np.ones(len(rec.boxes), np.float32), np.asarray(rec.labels, np.int64),
                                res.classes, threshold=0.0, image_size=tuple(size))
        pred = DetectionResult(res.boxes, res.scores, res.class_ids, res.classes, res.threshold,
                               tuple(res.image_size or size))
        thumb = fit_within(img, _GRID_SIDE)
        if max(thumb.size) < _GRID_MIN_SIDE:  # small images: enlarged so boxes, labels and titles stay legible
            k = _GRID_MIN_SIDE / max(thumb.size)
            thumb = thumb.resize((round(thumb.width * k), round(thumb.height * k)), Image.Resampling.BILINEAR)
        shown = pred.above(threshold)
        panels.append((
            Path(rec.path).name,
            draw_detections(thumb, truth, show_scores=False),
            f"ground truth: {len(rec.boxes)} box{'es' if len(rec.boxes) != 1 else ''}"
            + (f" ({int(rec.crowd_array().sum())} crowd)" if rec.crowd_array().any() else ""),
            draw_detections(thumb, pred, threshold=threshold),
            f"prediction: {len(shown)} at score ≥ {pred.threshold if threshold is None else threshold:.2f}",
        ))

    # Placed by hand in pixels: each thumbnail lands 1:1 on the PNG (no resampling, boxes stay
    # crisp), and it is much faster than a constrained layout over 16 axes.
    col_w = max(p[1].width for p in panels)
    fig_w = 2 * col_w + 3 * _GAP
    fig_h = sum(p[1].height + _TITLE for p in panels) + _GAP
    fig = Figure(figsize=(fig_w / _GRID_DPI, fig_h / _GRID_DPI))
    top = fig_h
    for name, gt_img, gt_title, pred_img, pred_title in panels:
        top -= _TITLE
        for col, (img, title) in enumerate(((gt_img, gt_title), (pred_img, pred_title))):
            left = _GAP + col * (col_w + _GAP) + (col_w - img.width) // 2  # centred in its column
            ax = fig.add_axes((left / fig_w, (top - img.height) / fig_h, img.width / fig_w, img.height / fig_h))
            ax.imshow(np.asarray(img), interpolation="nearest", aspect="auto")
            ax.set_axis_off()
            fig.text((_GAP + col * (col_w + _GAP) + col_w / 2) / fig_w, (top + 6) / fig_h,
                     f"{short_name(name)} · {title}", ha="center", va="bottom", fontsize=10)
        top -= max(gt_img.height, pred_img.height)
    return save_png(fig, path)
