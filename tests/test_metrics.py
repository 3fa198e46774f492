"""Tests of lensforge.metrics: our numbers equal scikit-learn's, thresholds are optimal, plots open."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from rich.console import Console
from sklearn import metrics as skm

from lensforge.cli.render import format_classification as format_report
from lensforge.cli.render import print_classification as print_report
from lensforge.metrics import plots
from lensforge.metrics.classification import (
    FALLBACK_THRESHOLD,
    multilabel_metrics,
    single_label_metrics,
    tune_thresholds,
)

# ---------------------------------------------------------------------------- single-label


def _random_single(seed: int, n: int, n_classes: int, missing: int | None = None):
    rng = np.random.default_rng(seed)
    present = [c for c in range(n_classes) if c != missing]
    y = rng.choice(present, size=n)
    scores = rng.random((n, n_classes))
    scores[np.arange(n), y] += rng.random(n)  # better than chance, not perfect
    return y, scores


SINGLE_CASES = {
    "binary": _random_single(0, 60, 2),
    "class_3_missing_from_y_true": _random_single(1, 50, 4, missing=3),
    "seven_classes_top5": _random_single(2, 80, 7),
    "hand_made": (
        np.array([0, 0, 1, 1, 2, 2]),
        np.eye(3)[[0, 1, 1, 1, 2, 0]] * 0.8 + 0.1,
    ),
}


def _names(n: int) -> list[str]:
    return [f"c{i}" for i in range(n)]


@pytest.mark.parametrize("case", SINGLE_CASES)
def test_single_label_metrics_equal_sklearn(case: str) -> None:
    y, scores = SINGLE_CASES[case]
    n_classes = scores.shape[1]
    labels = list(range(n_classes))
    pred = scores.argmax(axis=1)
    m = single_label_metrics(y, scores, _names(n_classes))

    assert m["n"] == len(y)
    assert m["accuracy"] == skm.accuracy_score(y, pred)
    for average in ("macro", "weighted"):
        kw = {"labels": labels, "average": average, "zero_division": 0}
        assert m[f"precision_{average}"] == skm.precision_score(y, pred, **kw)
        assert m[f"recall_{average}"] == skm.recall_score(y, pred, **kw)
        assert m[f"f1_{average}"] == skm.f1_score(y, pred, **kw)
    assert m["f2_macro"] == skm.fbeta_score(y, pred, beta=2, labels=labels, average="macro", zero_division=0)
    if n_classes > 5:
        assert m["top5_accuracy"] == skm.top_k_accuracy_score(y, scores, k=5, labels=labels)
    else:
        assert "top5_accuracy" not in m
    p, r, f, s = skm.precision_recall_fscore_support(y, pred, labels=labels, average=None, zero_division=0)
    assert [row["class"] for row in m["per_class"]] == _names(n_classes)
    assert [row["precision"] for row in m["per_class"]] == p.tolist()
    assert [row["recall"] for row in m["per_class"]] == r.tolist()
    assert [row["f1"] for row in m["per_class"]] == f.tolist()
    assert [row["support"] for row in m["per_class"]] == s.tolist()
    assert m["confusion_matrix"] == skm.confusion_matrix(y, pred, labels=labels).tolist()
    assert json.loads(json.dumps(m.to_dict())) == m  # JSON-ready: plain types only


def test_single_label_hand_made_values() -> None:
    y, scores = SINGLE_CASES["hand_made"]
    m = single_label_metrics(y, scores, ["cat", "dog", "fox"])
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert [r["precision"] for r in m["per_class"]] == pytest.approx([0.5, 2 / 3, 1.0])
    assert [r["recall"] for r in m["per_class"]] == pytest.approx([0.5, 1.0, 0.5])


def test_missing_class_keeps_its_row() -> None:
    y, scores = SINGLE_CASES["class_3_missing_from_y_true"]
    m = single_label_metrics(y, scores, _names(4))
    assert m["per_class"][3]["support"] == 0
    assert m["per_class"][3]["recall"] == 0.0
    assert sum(m["confusion_matrix"][3]) == 0
    assert len(m["confusion_matrix"]) == 4


@pytest.mark.parametrize(
    ("y", "scores", "classes", "message"),
    [
        (np.array([0, 1]), np.array([0.2, 0.8]), ["a", "b"], r"shape \(2, C\)"),
        (np.array([0, 1]), np.zeros((2, 3)), ["a", "b"], r"shape \(2, 2\) to match the 2 classes"),
        (np.array([[0], [1]]), np.zeros((2, 2)), ["a", "b"], r"shape \(N,\)"),
        (np.array([0, 2]), np.zeros((2, 2)), ["a", "b"], r"\[0, 2\)"),
        (np.array([0.0, 1.0]), np.zeros((2, 2)), ["a", "b"], "integer"),
        (np.array([], dtype=int), np.zeros((0, 2)), ["a", "b"], "no images"),
    ],
)
def test_single_label_errors(y, scores, classes, message) -> None:
    with pytest.raises(ValueError, match=message):
        single_label_metrics(y, scores, classes)


# ----------------------------------------------------------------------------- multi-label


def _random_multi(seed: int, n: int, n_labels: int, empty: int | None = None):
    rng = np.random.default_rng(seed)
    y = (rng.random((n, n_labels)) < 0.35).astype(int)
    if empty is not None:
        y[:, empty] = 0
    scores = np.clip(0.5 * y + 0.6 * rng.random((n, n_labels)), 0, 1).astype(np.float32)
    thresholds = rng.uniform(0.3, 0.7, n_labels).astype(np.float32)
    return y, scores, thresholds


MULTI_CASES = {
    "label_2_without_positives": _random_multi(3, 50, 4, empty=2),
    "all_labels_present": _random_multi(4, 40, 3),
    "hand_made": (
        np.array([[1, 0, 1], [0, 1, 0], [1, 1, 0], [0, 0, 0]]),
        np.array([[0.9, 0.2, 0.6], [0.4, 0.7, 0.1], [0.3, 0.8, 0.5], [0.2, 0.1, 0.5]], dtype=np.float32),
        np.array([0.5, 0.5, 0.5], dtype=np.float32),
    ),
}


@pytest.mark.parametrize("case", MULTI_CASES)
def test_multilabel_metrics_equal_sklearn(case: str) -> None:
    y, scores, thresholds = MULTI_CASES[case]
    n_labels = y.shape[1]
    pred = (scores >= thresholds).astype(int)
    m = multilabel_metrics(y, scores, thresholds, _names(n_labels))

    with_pos = [j for j in range(n_labels) if y[:, j].any()]
    aps = [skm.average_precision_score(y[:, j], scores[:, j]) for j in with_pos]
    assert m["map_labels"] == len(with_pos)
    assert m["mAP"] == pytest.approx(np.mean(aps), rel=1e-12)
    assert [row["ap"] for row in m["per_class"] if row["ap"] is not None] == aps
    assert all(m["per_class"][j]["ap"] is None for j in range(n_labels) if j not in with_pos)
    for average in ("micro", "macro", "samples"):
        assert m[f"f1_{average}"] == skm.f1_score(y, pred, average=average, zero_division=0)
    assert m["exact_match"] == skm.accuracy_score(y, pred)
    assert m["hamming_loss"] == skm.hamming_loss(y, pred)
    p, r, f, s = skm.precision_recall_fscore_support(y, pred, average=None, zero_division=0)
    assert [row["precision"] for row in m["per_class"]] == p.tolist()
    assert [row["recall"] for row in m["per_class"]] == r.tolist()
    assert [row["f1"] for row in m["per_class"]] == f.tolist()
    assert [row["support"] for row in m["per_class"]] == s.tolist()
    assert [row["threshold"] for row in m["per_class"]] == thresholds.tolist()
    assert m["n"] == len(y)
    assert json.loads(json.dumps(m.to_dict())) == m


def test_multilabel_hand_made_values() -> None:
    m = multilabel_metrics(*MULTI_CASES["hand_made"], ["front", "back", "side"])
    # Predictions [[1,0,1],[0,1,0],[0,1,1],[0,0,1]]: rows 0 and 1 exactly right, 3 of 12 cells wrong.
    assert m["exact_match"] == 0.5
    assert m["hamming_loss"] == 0.25


def test_multilabel_without_any_positive_has_no_map() -> None:
    y = np.zeros((3, 2), dtype=int)
    m = multilabel_metrics(y, np.full((3, 2), 0.4), np.full(2, 0.5), ["a", "b"])
    assert m["mAP"] is None and m["map_labels"] == 0


@pytest.mark.parametrize(
    ("y", "scores", "thresholds", "message"),
    [
        (np.zeros((2, 2)), np.zeros((2, 3)), np.zeros(2), "shape of y_true"),
        (np.zeros(2), np.zeros(2), np.zeros(2), r"shape \(N, C\)"),
        (np.full((2, 2), 2), np.zeros((2, 2)), np.zeros(2), "only 0 and 1"),
        (np.zeros((2, 2)), np.zeros((2, 2)), np.zeros(3), r"thresholds must have shape \(2,\)"),
    ],
)
def test_multilabel_errors(y, scores, thresholds, message) -> None:
    with pytest.raises(ValueError, match=message):
        multilabel_metrics(y, scores, thresholds, ["a", "b"])


# ------------------------------------------------------------------------- tune_thresholds


def _fbeta(y: np.ndarray, s: np.ndarray, t: float, beta: float) -> float:
    pred = s >= t
    tp = float((pred & (y == 1)).sum())
    fp = float((pred & (y == 0)).sum())
    fn = float((~pred & (y == 1)).sum())
    b2 = beta * beta
    denom = (1 + b2) * tp + b2 * fn + fp
    return (1 + b2) * tp / denom if denom else 0.0


@pytest.mark.parametrize("beta", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("discrete", [False, True], ids=["continuous", "tied_scores"])
def test_tune_thresholds_is_optimal_by_brute_force(beta: float, seed: int, discrete: bool) -> None:
    y, scores, _ = _random_multi(seed, 60, 3)
    if discrete:  # many equal scores: thresholds between them must not split ties
        scores = np.round(scores, 1).astype(np.float32)
    thresholds = tune_thresholds(y, scores, beta=beta)
    assert thresholds.dtype == np.float32 and thresholds.shape == (3,)
    for j in range(3):
        candidates = np.unique(scores[:, j])
        fs = np.array([_fbeta(y[:, j], scores[:, j], t, beta) for t in candidates])
        best = fs.max()
        assert _fbeta(y[:, j], scores[:, j], thresholds[j], beta) == pytest.approx(best, rel=1e-9)
        # Among thresholds that tie for the best, the highest one.
        assert thresholds[j] == candidates[fs >= best * (1 - 1e-9)].max()


def test_tune_thresholds_prefers_the_higher_of_tied_thresholds() -> None:
    # At 0.8: tp 2, fp 0, fn 2 -> F1 2/3. At 0.2: tp 4, fp 4, fn 0 -> F1 2/3 too.
    y = np.array([[1], [1], [0], [0], [0], [0], [1], [1]])
    s = np.array([[0.9], [0.8], [0.7], [0.6], [0.5], [0.4], [0.3], [0.2]], dtype=np.float32)
    assert tune_thresholds(y, s)[0] == np.float32(0.8)


def test_tune_thresholds_falls_back_where_a_label_cannot_be_tuned() -> None:
    y = np.array([[0, 1, 1], [0, 1, 0], [0, 1, 1], [0, 1, 0]])
    s = np.array([[0.9, 0.2, 0.7], [0.1, 0.3, 0.2], [0.6, 0.1, 0.8], [0.3, 0.4, 0.4]])
    th = tune_thresholds(y, s)
    assert th[0] == FALLBACK_THRESHOLD  # no positive
    assert th[1] == FALLBACK_THRESHOLD  # no negative
    assert th[2] == np.float32(0.7)


def test_tune_thresholds_rejects_bad_beta() -> None:
    with pytest.raises(ValueError, match="beta must be positive"):
        tune_thresholds(np.zeros((2, 1)), np.zeros((2, 1)), beta=0)


# ---------------------------------------------------------------------------------- report


def _render(metrics: dict, task: str) -> str:
    console = Console(record=True, width=140)
    print_report(metrics, task, console)
    return console.export_text()


def test_report_single_label_lists_every_class() -> None:
    y, scores = SINGLE_CASES["seven_classes_top5"]
    text = _render(single_label_metrics(y, scores, _names(7)), "classify")
    assert "accuracy" in text and "top-5 accuracy" in text
    assert all(name in text for name in _names(7))


def test_report_many_classes_shows_worst_and_best() -> None:
    y, scores = _random_single(5, 300, 50)
    m = single_label_metrics(y, scores, [f"class_{i:02d}" for i in range(50)])
    text = _render(m, "classify")
    assert "… 35 more …" in text and "10 worst and 5 best of 50 classes" in text
    assert sum(f"class_{i:02d}" in text for i in range(50)) == 15
    worst = min(m["per_class"], key=lambda r: r["f1"])["class"]
    assert worst in text


def test_report_multilabel() -> None:
    y, scores, thresholds = MULTI_CASES["label_2_without_positives"]
    text = _render(multilabel_metrics(y, scores, thresholds, _names(4)), "multilabel")
    assert "mAP (over 3 of 4 labels" in text and "n/a" in text and "threshold" in text


@pytest.mark.parametrize(
    ("task", "message"), [("detect", "task must be one of"), ("multilabel", "not multilabel metrics")]
)
def test_report_errors(task: str, message: str) -> None:
    y, scores = SINGLE_CASES["binary"]
    with pytest.raises(ValueError, match=message):
        format_report(single_label_metrics(y, scores, _names(2)), task)


# ----------------------------------------------------------------------------------- plots


def _png_size(path: Path) -> tuple[int, int]:
    assert path.is_file() and path.stat().st_size > 0
    with Image.open(path) as image:
        assert image.format == "PNG"
        image.load()
        return image.size


def test_confusion_matrix_grows_with_class_count(tmp_path: Path) -> None:
    sizes = []
    for n_classes in (2, 10, 30):  # 30 crosses the no-cell-text limit (20) and stays quick
        y, scores = _random_single(n_classes, 4 * n_classes, n_classes)
        cm = np.array(single_label_metrics(y, scores, _names(n_classes))["confusion_matrix"])
        path = plots.plot_confusion_matrix(cm, _names(n_classes), tmp_path / f"cm{n_classes}.png")
        sizes.append(_png_size(path))
    assert sizes[0][0] < sizes[1][0] < sizes[2][0]
    assert sizes[0][1] < sizes[1][1] < sizes[2][1]


def test_confusion_matrix_counts_and_empty_row(tmp_path: Path) -> None:
    cm = np.array([[3, 1, 0], [0, 0, 0], [1, 0, 2]])  # class 1 has no image
    path = plots.plot_confusion_matrix(cm, ["a", "b", "c"], tmp_path / "sub" / "cm.png", normalize=False)
    assert path == tmp_path / "sub" / "cm.png"
    _png_size(path)
    path = plots.plot_confusion_matrix(cm, ["a", "b", "c"], tmp_path / "cm_norm.png", title="Test split")
    _png_size(path)


def test_confusion_matrix_shape_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"shape \(3, 3\)"):
        plots.plot_confusion_matrix(np.zeros((2, 2)), ["a", "b", "c"], tmp_path / "cm.png")


@pytest.mark.parametrize("n_labels", [4, 15])
@pytest.mark.parametrize("with_thresholds", [False, True])
def test_pr_curves(tmp_path: Path, n_labels: int, with_thresholds: bool) -> None:
    y, scores, thresholds = _random_multi(n_labels, 40, n_labels, empty=1)
    path = plots.plot_pr_curves(
        y, scores, _names(n_labels), tmp_path / "pr.png", thresholds=thresholds if with_thresholds else None
    )
    _png_size(path)


def test_pr_curves_shape_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"shape \(N, 3\)"):
        plots.plot_pr_curves(np.zeros((4, 2)), np.zeros((4, 2)), _names(3), tmp_path / "pr.png")


@pytest.mark.parametrize(
    "history",
    [
        [{"epoch": e, "train_loss": 1 / (e + 1), "val_loss": None if e % 2 else 1.2 / (e + 1),
          "val_acc": float("nan") if e % 2 else e / 10, "val_f1": e / 12} for e in range(6)],
        [{"epoch": 0, "train_loss": 1.0}, {"epoch": 1, "train_loss": 0.7}],
        [{"epoch": 0, "val_acc": 0.5}, {"epoch": 1}],
    ],
    ids=["full_with_gaps", "loss_only", "metric_only_with_missing_key"],
)
def test_training_curves(tmp_path: Path, history: list[dict]) -> None:
    _png_size(plots.plot_training_curves(history, tmp_path / "curves.png"))


@pytest.mark.parametrize(
    ("history", "message"),
    [
        ([], "empty"),
        ([{"train_loss": 1.0}], "no 'epoch'"),
        ([{"epoch": 0}], "only 'epoch'"),
        ([{"epoch": 0, "val_acc": "high"}], "must be a number"),
    ],
)
def test_training_curves_errors(tmp_path: Path, history: list[dict], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        plots.plot_training_curves(history, tmp_path / "curves.png")


def test_per_class_bars_grow_with_class_count(tmp_path: Path) -> None:
    heights = []
    for n_classes in (3, 30):
        y, scores = _random_single(n_classes, 5 * n_classes, n_classes)
        rows = single_label_metrics(y, scores, _names(n_classes))["per_class"]
        heights.append(_png_size(plots.plot_per_class_bars(rows, tmp_path / f"bars{n_classes}.png"))[1])
    assert heights[0] < heights[1]


def test_per_class_bars_with_undefined_ap(tmp_path: Path) -> None:
    y, scores, thresholds = MULTI_CASES["label_2_without_positives"]
    rows = multilabel_metrics(y, scores, thresholds, _names(4))["per_class"]
    _png_size(plots.plot_per_class_bars(rows, tmp_path / "ap.png", metric="ap"))
    with pytest.raises(ValueError, match="unknown metric 'auc'"):
        plots.plot_per_class_bars(rows, tmp_path / "auc.png", metric="auc")
