"""Evaluation plots, each written to one PNG: confusion matrix, PR curves, training curves,
per-class bars.

Built on ``matplotlib.figure.Figure`` directly, never pyplot: no global figure state, no GUI
backend, safe in a server or a worker thread. Every function takes the output path, creates
its folder, writes the PNG and returns the path.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from sklearn.metrics import average_precision_score, precision_recall_curve

_DPI = 100
_HEADINGS = {"f1": "F1", "ap": "AP"}
_MAX_NAME = 24  # longer class names are cut with an ellipsis so tick labels stay legible


def short_name(name: str) -> str:
    """``name`` cut to :data:`_MAX_NAME` characters with an ellipsis, for tick labels and
    legends (shared with :mod:`lensforge.metrics.detection_plots`)."""
    return name if len(name) <= _MAX_NAME else name[: _MAX_NAME - 1] + "…"


def save_png(fig: Figure, path: str | Path) -> Path:
    """Write ``fig`` as a PNG to ``path``, creating its folder; returns the path (every plot
    function of this module and :mod:`lensforge.metrics.detection_plots` ends with it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=_DPI, format="png")
    return path


def plot_confusion_matrix(
    cm: np.ndarray,
    classes: list[str],
    path: str | Path,
    normalize: bool = True,
    title: str = "Confusion matrix",
) -> Path:
    """Draw a confusion matrix; the title adds the accuracy and image count read from ``cm``.

    cm: int (C, C) counts, rows = true class, columns = predicted class (as in
        ``single_label_metrics(...)["confusion_matrix"]``).
    normalize: colour (and write) each row as fractions of its true class, so rare classes
        read as clearly as common ones; a class with no image keeps a row of zeros.
    Cells hold their value when C <= 20 (zero cells stay blank); the figure grows and the
    fonts shrink with C so that 2 to 100 classes stay readable.
    """
    cm = np.asarray(cm)
    n_classes = len(classes)
    if cm.shape != (n_classes, n_classes):
        raise ValueError(f"cm must have shape ({n_classes}, {n_classes}) to match the classes, got {cm.shape}")
    total = int(cm.sum())
    accuracy = float(np.trace(cm)) / total if total else float("nan")
    if normalize:
        rows = cm.sum(axis=1, keepdims=True)
        values = np.divide(cm, rows, out=np.zeros(cm.shape, dtype=float), where=rows > 0)
    else:
        values = cm.astype(float)

    # Cells shrink from about half an inch (few classes, room for text) to a third (50+),
    # and the figure grows with C; fonts shrink a little, never below what prints legibly.
    cell = float(np.clip(0.6 - 0.006 * n_classes, 0.3, 0.55))
    side = max(5.5, 3.0 + cell * n_classes)
    tick_size = float(np.clip(11.5 - n_classes / 10, 8, 11))
    fig = Figure(figsize=(side + 1.2, side), layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(values, cmap="Blues", vmin=0, vmax=1 if normalize else max(values.max(), 1))
    cbar = fig.colorbar(image, ax=ax, fraction=0.04, pad=0.02, shrink=0.8)
    cbar.set_label("fraction of the true class" if normalize else "images", fontsize=11)
    cbar.ax.tick_params(labelsize=10)

    names = [short_name(c) for c in classes]
    ticks = np.arange(n_classes)
    if n_classes <= 20:  # slanted labels read more easily; beyond 20 only vertical ones fit
        ax.set_xticks(ticks, names, fontsize=tick_size, rotation=45, ha="right", rotation_mode="anchor")
    else:
        ax.set_xticks(ticks, names, fontsize=tick_size, rotation=90)
    ax.set_yticks(ticks, names, fontsize=tick_size)
    ax.set_xlabel("predicted class", fontsize=12)
    ax.set_ylabel("true class", fontsize=12)
    # Thin white lines between cells, so neighbouring cells of equal colour stay apart.
    ax.set_xticks(ticks[:-1] + 0.5, minor=True)
    ax.set_yticks(ticks[:-1] + 0.5, minor=True)
    ax.grid(which="minor", color="white", linewidth=0.8)
    ax.tick_params(which="minor", length=0)

    if n_classes <= 20:
        text_size = float(np.clip(13 - n_classes / 4, 7.5, 12))
        dark = values.max() * 0.55
        for i in range(n_classes):
            for j in range(n_classes):
                if cm[i, j] == 0:
                    continue
                text = f"{values[i, j]:.2f}" if normalize else str(int(cm[i, j]))
                if normalize and n_classes <= 6:
                    text += f"\n({int(cm[i, j])})"
                ax.text(j, i, text, ha="center", va="center", fontsize=text_size,
                        color="white" if values[i, j] > dark else "black")
    ax.set_title(f"{title}\naccuracy {accuracy:.3f} · {total} images · {n_classes} classes",
                 fontsize=14)
    return save_png(fig, path)


def plot_pr_curves(
    y_true: np.ndarray,
    scores: np.ndarray,
    classes: list[str],
    path: str | Path,
    thresholds: np.ndarray | None = None,
    max_legend: int = 10,
) -> Path:
    """One precision-recall curve per label of a multi-label classifier.

    y_true: 0/1 (N, C); scores: float (N, C); classes: the C label names.
    thresholds: float (C,) decision thresholds; when given, each highlighted label's
        operating point (``score >= threshold``) is marked with a dot.
    max_legend: with more labels than this, every curve is drawn in grey and only the
        ``max_legend // 2`` worst and best by AP are coloured and named in the legend.
    Labels with no positive in ``y_true`` have no curve; the legend says how many.
    """
    y_true = np.asarray(y_true)
    scores = np.asarray(scores)
    if y_true.ndim != 2 or scores.shape != y_true.shape or y_true.shape[1] != len(classes):
        raise ValueError(
            f"y_true and scores must both have shape (N, {len(classes)}), got {y_true.shape} and {scores.shape}"
        )
    if thresholds is not None:
        thresholds = np.asarray(thresholds, dtype=np.float32)
        if thresholds.shape != (len(classes),):
            raise ValueError(f"thresholds must have shape ({len(classes)},), got {thresholds.shape}")

    with_pos = [j for j in range(len(classes)) if y_true[:, j].any()]
    aps = {j: float(average_precision_score(y_true[:, j], scores[:, j])) for j in with_pos}
    by_ap = sorted(with_pos, key=lambda j: aps[j])
    if len(by_ap) <= max_legend:
        highlight = by_ap
    else:
        half = max(max_legend // 2, 1)
        highlight = by_ap[:half] + by_ap[-half:]

    fig = Figure(figsize=(10, 6.5), layout="constrained")
    ax = fig.add_subplot()
    for f in (0.2, 0.4, 0.6, 0.8):  # iso-F1 curves, to read an operating point's F1
        r = np.linspace(f / (2 - f) + 1e-3, 1, 100)
        ax.plot(r, f * r / (2 * r - f), color="0.85", linewidth=0.8, linestyle=":", zorder=0)
        ax.text(1.0, f / (2 - f), f"F1={f:.1f}", fontsize=7, color="0.5", ha="right", va="bottom",
                bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.8, "pad": 1})
    colors = [f"C{i}" for i in range(10)] + [f"tab:{c}" for c in ("olive", "cyan")] * 10
    for j in with_pos:
        if j in highlight:
            continue
        precision, recall, _ = precision_recall_curve(y_true[:, j], scores[:, j])
        ax.plot(recall, precision, drawstyle="steps-post", color="0.75", linewidth=0.8)
    for k, j in enumerate(highlight):
        color = colors[k % len(colors)]
        precision, recall, _ = precision_recall_curve(y_true[:, j], scores[:, j])
        ax.plot(recall, precision, drawstyle="steps-post", color=color, linewidth=1.6,
                label=f"{short_name(classes[j])} (AP {aps[j]:.2f})")
        if thresholds is not None:
            predicted = scores[:, j].astype(np.float32) >= thresholds[j]
            tp = int((predicted & (y_true[:, j] == 1)).sum())
            if predicted.any():
                ax.plot(tp / y_true[:, j].sum(), tp / predicted.sum(), "o", color=color,
                        markersize=7, markeredgecolor="black", markeredgewidth=0.8)

    notes = []
    if len(highlight) < len(with_pos):
        notes.append(f"{len(with_pos) - len(highlight)} more in grey")
    if len(with_pos) < len(classes):
        notes.append(f"{len(classes) - len(with_pos)} without positives: no curve")
    if thresholds is not None:
        notes.append("● = chosen threshold")
    if highlight:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9,
                  title="\n".join(notes) if notes else None, title_fontsize=8, alignment="left")
    mean_ap = f"mAP {np.mean(list(aps.values())):.3f} over {len(aps)} labels" if aps else "no label has a positive"
    pr_axes(ax, f"Precision–recall per label · {mean_ap}")
    return save_png(fig, path)


def pr_axes(ax: Any, title: str) -> None:
    """Title, labels, limits and grid of a precision–recall plot (multi-label and detection)."""
    ax.set_title(title)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1.02)
    ax.set_ylim(0, 1.03)
    ax.grid(alpha=0.3)


def plot_training_curves(history: list[dict[str, Any]], path: str | Path) -> Path:
    """Losses (left) and other metrics (right) against the epoch.

    history: one dict per epoch, ``{"epoch": 0, "train_loss": ..., "val_loss": ...,
        "val_acc": ..., "val_f1": ...}``; any keys beyond ``epoch``, keys ending in ``loss``
        go on the loss axes. A missing value (absent, None or NaN, e.g. validation run every
        few epochs) is skipped and the line joins the points on either side.
    """
    if not history:
        raise ValueError("history is empty: nothing to plot")
    keys: list[str] = []
    for i, row in enumerate(history):
        if "epoch" not in row:
            raise ValueError(f"history row {i} has no 'epoch' key: {row}")
        keys += [k for k in row if k != "epoch" and k not in keys]
    epochs = np.array([float(row["epoch"]) for row in history])

    def series(key: str) -> np.ndarray:
        out = []
        for i, row in enumerate(history):
            value = row.get(key)
            # Any number (int, numpy scalar, 0-d tensor) passes; text would mean a bug upstream.
            if value is not None and (isinstance(value, str) or not hasattr(value, "__float__")):
                raise ValueError(f"history row {i}: {key} must be a number or None, got {value!r}")
            out.append(math.nan if value is None else float(value))
        return np.array(out)

    groups = [(title, [k for k in keys if k.endswith("loss") == is_loss])
              for title, is_loss in (("loss", True), ("metrics", False))]
    groups = [(t, ks) for t, ks in groups if ks]
    if not groups:
        raise ValueError("history has only 'epoch': add values such as train_loss or val_acc")
    fig = Figure(figsize=(5.5 * len(groups) + 0.5, 4.5), layout="constrained")
    axes = fig.subplots(1, len(groups), squeeze=False)[0]
    marker = "o" if len(history) <= 30 else None  # dots stay visible for a handful of epochs
    for ax, (title, group) in zip(axes, groups):
        for key in group:
            values = series(key)
            ok = np.isfinite(values)
            ax.plot(epochs[ok], values[ok], marker=marker, markersize=4, label=key)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=9)
    return save_png(fig, path)


def plot_per_class_bars(per_class: list[dict[str, Any]], path: str | Path, metric: str = "f1") -> Path:
    """Horizontal bars of one per-class metric, worst at the top.

    per_class: the ``per_class`` rows of ``single_label_metrics`` or ``multilabel_metrics``
        (each with ``class``, ``support`` and ``metric``). Rows whose value is None (AP of a
        label with no positive) go at the bottom, marked n/a. The dashed line is the
        unweighted mean over the classes that have a value.
    """
    if not per_class:
        raise ValueError("per_class is empty: nothing to plot")
    if metric not in per_class[0]:
        raise ValueError(f"unknown metric {metric!r}; the rows have {', '.join(sorted(per_class[0]))}")
    known = sorted((r for r in per_class if r[metric] is not None), key=lambda r: (r[metric], -r.get("support", 0)))
    rows = known + [r for r in per_class if r[metric] is None]
    values = np.array([r[metric] if r[metric] is not None else 0.0 for r in rows], dtype=float)
    unit = bool(values.size) and values.min() >= 0 and values.max() <= 1  # a fraction: colour it
    xmax = 1.0 if unit else max(values.max(), 1.0)

    n = len(rows)
    fig = Figure(figsize=(8, max(2.5, 1.2 + 0.3 * n)), layout="constrained")
    ax = fig.add_subplot()
    y = np.arange(n)
    red_to_green = colormaps["RdYlGn"]
    colors = ["0.8" if r[metric] is None else red_to_green(0.1 + 0.8 * v) if unit else "C0" for r, v in zip(rows, values)]
    ax.barh(y, values, color=colors, height=0.75)
    labels = [short_name(str(r["class"])) + (f" (n={r['support']})" if "support" in r else "") for r in rows]
    font = float(np.clip(11 - n / 12, 8, 10))
    ax.set_yticks(y, labels, fontsize=font)
    for yi, (r, v) in enumerate(zip(rows, values)):
        text = "n/a" if r[metric] is None else f"{v:.2f}" if unit else f"{v:g}"
        ax.text(v + xmax * 0.01, yi, text, va="center", fontsize=font - 0.5,
                bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.8, "pad": 0.5})
    title = f"{_HEADINGS.get(metric, metric)} per {'label' if 'ap' in rows[0] else 'class'}, worst first"
    if known:
        mean = float(np.mean([r[metric] for r in known]))
        ax.axvline(mean, color="0.3", linestyle="--", linewidth=1, zorder=0)
        title += f" · mean {mean:.3f} (dashed)"
    ax.set_xlim(0, xmax * 1.1)
    ax.set_ylim(n - 0.5, -0.5)  # inverted: worst at the top, where the eye starts
    ax.set_xlabel(_HEADINGS.get(metric, metric))
    ax.set_title(title)
    ax.grid(axis="x", alpha=0.3)
    return save_png(fig, path)
