"""Classification metrics: single-label and multi-label numbers and threshold tuning.

scikit-learn is the reference: every number here is the scikit-learn function of the same
name, called with ``labels=range(C)`` (so classes absent from the evaluated split still get a
row) and ``zero_division=0`` (an undefined precision/recall/F counts as 0, never as a warning
or NaN). The dicts returned are JSON-ready (plain ``float``/``int``/``list``/``None``) and
are what the bundle's ``lensforge.json``, the CLI report (``lensforge.cli.render``) and the plots read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
from sklearn import metrics as skm

from lensforge.metrics.base import Metrics
from lensforge.metrics.fbeta import FALLBACK_THRESHOLD, best_ties, f_beta


def _check_scores(scores: np.ndarray, n: int, classes: list[str] | None = None) -> np.ndarray:
    scores = np.asarray(scores)
    if scores.ndim != 2 or scores.shape[0] != n:
        raise ValueError(f"scores must have shape ({n}, C), one row per image, got {scores.shape}")
    if classes is not None and scores.shape[1] != len(classes):
        raise ValueError(
            f"scores must have shape ({n}, {len(classes)}) to match the {len(classes)} classes, "
            f"got {scores.shape}"
        )
    if n == 0:
        raise ValueError("no images to evaluate: y_true and scores are empty")
    return scores


def _check_multilabel(y_true: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y_true = np.asarray(y_true)
    if y_true.ndim != 2:
        raise ValueError(f"y_true must be a 0/1 matrix of shape (N, C), got shape {y_true.shape}")
    scores = _check_scores(scores, y_true.shape[0])
    if scores.shape != y_true.shape:
        raise ValueError(f"scores must have the shape of y_true {y_true.shape}, got {scores.shape}")
    if not np.isin(y_true, (0, 1)).all():
        raise ValueError("y_true must contain only 0 and 1 (one column per label)")
    return y_true.astype(np.int64), scores


@dataclass(frozen=True, eq=False)  # equality is the mapping's: equal to a dict of the same JSON
class ClassificationMetrics(Metrics):
    """A single-label classifier's numbers (see :func:`single_label_metrics`)."""

    HEADLINE: ClassVar[str] = "accuracy"
    OPTIONAL: ClassVar[frozenset[str]] = frozenset({"top5_accuracy", "evaluated_on"})

    n: int
    accuracy: float
    precision_macro: float
    recall_macro: float
    f1_macro: float
    f2_macro: float
    precision_weighted: float
    recall_weighted: float
    f1_weighted: float
    top5_accuracy: float | None  # only with more than five classes (else always 1)
    per_class: list[dict[str, Any]]  # class, precision, recall, f1, support
    confusion_matrix: list[list[int]]  # rows = true class, columns = predicted
    evaluated_on: str | None = None


@dataclass(frozen=True, eq=False)
class MultilabelMetrics(Metrics):
    """A multi-label classifier's numbers at its thresholds (see :func:`multilabel_metrics`)."""

    HEADLINE: ClassVar[str] = "mAP"
    JSON_KEYS: ClassVar[dict[str, str]] = {"map": "mAP"}  # the key bundles have always held

    n: int
    map: float | None  # mean AP over the labels with a positive; None when none has
    map_labels: int
    f1_micro: float
    f1_macro: float
    f1_samples: float
    exact_match: float
    hamming_loss: float
    per_class: list[dict[str, Any]]  # class, ap, precision, recall, f1, threshold, support
    evaluated_on: str | None = None


def single_label_metrics(y_true: np.ndarray, scores: np.ndarray, classes: list[str]) -> ClassificationMetrics:
    """Metrics of a single-label classifier; the prediction is the argmax of the scores.

    y_true: int (N,), the true class index of each image, in ``[0, C)``.
    scores: float (N, C), one score per class (softmax probabilities or logits: only the
        order matters, except that ties in the argmax go to the lower class index).
    classes: the C class names, in score order.

    Returns :class:`ClassificationMetrics`, whose JSON view has the keys ``n``, ``accuracy``, ``precision_macro``,
    ``recall_macro``, ``f1_macro``, ``f2_macro``, ``precision_weighted``, ``recall_weighted``,
    ``f1_weighted``, ``top5_accuracy`` (only when C > 5), ``per_class`` (C rows of ``class``,
    ``precision``, ``recall``, ``f1``, ``support``) and ``confusion_matrix`` (C x C counts,
    rows = true class, columns = predicted class). Macro averages run over all C classes,
    including those with no image in ``y_true`` (their recall counts as 0).
    """
    y_true = np.asarray(y_true)
    if y_true.ndim != 1:
        raise ValueError(f"y_true must be class indices of shape (N,), got shape {y_true.shape}")
    scores = _check_scores(scores, y_true.shape[0], classes)
    n_classes = len(classes)
    if not np.issubdtype(y_true.dtype, np.integer):
        raise ValueError(f"y_true must hold integer class indices, got dtype {y_true.dtype}")
    if y_true.min() < 0 or y_true.max() >= n_classes:
        raise ValueError(
            f"y_true must hold class indices in [0, {n_classes}), "
            f"got values from {y_true.min()} to {y_true.max()}"
        )
    labels = list(range(n_classes))
    y_pred = np.argmax(scores, axis=1)

    def avg(fn: Any, average: str, **kw: Any) -> float:
        return float(fn(y_true, y_pred, labels=labels, average=average, zero_division=0, **kw))

    out: dict[str, Any] = {
        "n": int(y_true.shape[0]),
        "accuracy": float(skm.accuracy_score(y_true, y_pred)),
        "precision_macro": avg(skm.precision_score, "macro"),
        "recall_macro": avg(skm.recall_score, "macro"),
        "f1_macro": avg(skm.f1_score, "macro"),
        "f2_macro": avg(skm.fbeta_score, "macro", beta=2.0),
        "precision_weighted": avg(skm.precision_score, "weighted"),
        "recall_weighted": avg(skm.recall_score, "weighted"),
        "f1_weighted": avg(skm.f1_score, "weighted"),
    }
    if n_classes > 5:  # with five classes or fewer, top-5 is always 1
        out["top5_accuracy"] = float(skm.top_k_accuracy_score(y_true, scores, k=5, labels=labels))
    p, r, f, s = skm.precision_recall_fscore_support(
        y_true, y_pred, labels=labels, average=None, zero_division=0
    )
    out["per_class"] = [
        {"class": name, "precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
        for i, name in enumerate(classes)
    ]
    out["confusion_matrix"] = skm.confusion_matrix(y_true, y_pred, labels=labels).tolist()
    out.setdefault("top5_accuracy", None)
    return ClassificationMetrics(**out)


def multilabel_metrics(
    y_true: np.ndarray, scores: np.ndarray, thresholds: np.ndarray, classes: list[str]
) -> MultilabelMetrics:
    """Metrics of a multi-label classifier at the given per-label thresholds.

    y_true: 0/1 (N, C), one column per label.
    scores: float (N, C), independent per-label scores (sigmoid probabilities).
    thresholds: float (C,); label j is predicted when ``scores[:, j] >= thresholds[j]``,
        compared in float32 as the Predictor does (see ``tune_thresholds``).
    classes: the C label names, in column order.

    Returns :class:`MultilabelMetrics`, whose JSON view has the keys ``n``, ``mAP`` (mean average precision over the
    ``map_labels`` labels that have at least one positive in ``y_true``; None if none has),
    ``map_labels``, ``f1_micro``, ``f1_macro``, ``f1_samples``, ``exact_match`` (subset
    accuracy: every label of the image right), ``hamming_loss`` (fraction of wrong
    image-label pairs) and ``per_class`` (C rows of ``class``, ``ap`` (None for a label
    with no positive), ``precision``, ``recall``, ``f1``, ``threshold``, ``support`` = number
    of positives). F1 of an image with no true and no predicted label counts as 0
    (``zero_division=0``, as everywhere).
    """
    y_true, scores = _check_multilabel(y_true, scores)
    if scores.shape[1] != len(classes):
        raise ValueError(f"scores have {scores.shape[1]} columns but {len(classes)} classes were given")
    thresholds = np.asarray(thresholds, dtype=np.float32)
    if thresholds.shape != (len(classes),):
        raise ValueError(f"thresholds must have shape ({len(classes)},), got {thresholds.shape}")
    y_pred = (scores.astype(np.float32) >= thresholds).astype(np.int64)

    aps: list[float | None] = []
    for j in range(len(classes)):
        # AP is undefined without a positive; scikit-learn would warn and return 0, which
        # would drag the mean down for a label the split simply does not contain.
        aps.append(float(skm.average_precision_score(y_true[:, j], scores[:, j])) if y_true[:, j].any() else None)
    defined = [a for a in aps if a is not None]

    def f1(average: str) -> float:
        return float(skm.f1_score(y_true, y_pred, average=average, zero_division=0))

    p, r, f, s = skm.precision_recall_fscore_support(y_true, y_pred, average=None, zero_division=0)
    return MultilabelMetrics(
        n=int(y_true.shape[0]),
        map=float(np.mean(defined)) if defined else None,
        map_labels=len(defined),
        f1_micro=f1("micro"),
        f1_macro=f1("macro"),
        f1_samples=f1("samples"),
        exact_match=float(skm.accuracy_score(y_true, y_pred)),
        hamming_loss=float(skm.hamming_loss(y_true, y_pred)),
        per_class=[
            {
                "class": name,
                "ap": aps[j],
                "precision": float(p[j]),
                "recall": float(r[j]),
                "f1": float(f[j]),
                "threshold": float(thresholds[j]),
                "support": int(s[j]),
            }
            for j, name in enumerate(classes)
        ],
    )


def tune_thresholds(y_true: np.ndarray, scores: np.ndarray, beta: float = 1.0) -> np.ndarray:
    """Per label, the threshold that maximises F-beta on these (validation) scores.

    y_true: 0/1 (N, C); scores: float (N, C). Returns float32 (C,).

    Candidates are the distinct scores of the label (``precision_recall_curve``); predicting
    ``score >= threshold`` with the returned value reproduces the best operating point
    exactly. Scores are rounded to float32 first, because thresholds are stored as float32
    and the Predictor compares float32 scores: tuning in float64 could pick a score that
    float32 cannot tell from its neighbour.

    Ties (equal F-beta) go to the highest threshold: it reaches the same F-beta with fewer
    predicted positives, so fewer false positives on new data.

    A label with no positive in ``y_true`` has F-beta 0 at every threshold, and one with no
    negative is maximised by predicting everything (the lowest score seen): neither says
    anything about new data, so such labels get ``FALLBACK_THRESHOLD`` (0.5).
    """
    if not beta > 0:
        raise ValueError(f"beta must be positive, got {beta}")
    y_true, scores = _check_multilabel(y_true, scores)
    scores = scores.astype(np.float32)
    out = np.full(y_true.shape[1], FALLBACK_THRESHOLD, dtype=np.float32)
    for j in range(y_true.shape[1]):
        n_pos = int(y_true[:, j].sum())
        if n_pos == 0 or n_pos == y_true.shape[0]:
            continue
        precision, recall, thr = skm.precision_recall_curve(y_true[:, j], scores[:, j])
        # The last (precision 1, recall 0) point has no threshold; thresholds increase.
        precision, recall = precision[:-1], recall[:-1]
        best = best_ties(f_beta(precision, recall, beta))[-1]  # highest of the ties
        out[j] = thr[best]
    return out
