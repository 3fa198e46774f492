"""The result types, one per task: what every consumer (CLI, metrics, drawing, server) formats."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

DEFAULT_THRESHOLD = 0.5  # multi-label decision threshold where none was tuned


@dataclass(frozen=True)
class ClassificationResult:
    """Scores of one image.

    scores: float32 (C,), one per class. Softmax probabilities for single-label models
        (they sum to 1), independent sigmoid probabilities for multi-label models.
    classes: the C class names, in score order.
    multilabel: whether the scores are independent per label.
    thresholds: float32 (C,) per-label decision thresholds (multi-label only), else None.
    """

    scores: np.ndarray
    classes: tuple[str, ...]
    multilabel: bool = False
    thresholds: np.ndarray | None = None

    def __post_init__(self) -> None:
        scores = np.asarray(self.scores, dtype=np.float32)
        if scores.ndim != 1 or scores.shape[0] != len(self.classes):
            raise ValueError(
                f"scores must have shape ({len(self.classes)},) to match the classes, got {scores.shape}"
            )
        object.__setattr__(self, "scores", scores)
        if self.thresholds is not None:
            th = np.asarray(self.thresholds, dtype=np.float32)
            if th.shape != scores.shape:
                raise ValueError(f"thresholds must have shape {scores.shape}, got {th.shape}")
            object.__setattr__(self, "thresholds", th)

    def top(self, k: int = 5) -> list[tuple[str, float]]:
        """The k best (label, score) pairs, best first."""
        order = np.argsort(-self.scores, kind="stable")[:k]
        return [(self.classes[i], float(self.scores[i])) for i in order]

    @property
    def label(self) -> str:
        """The single best label (argmax), whatever the task."""
        return self.classes[int(np.argmax(self.scores))]

    @property
    def labels(self) -> list[str]:
        """The predicted labels: the argmax for single-label models; for multi-label models
        every label whose score reaches its threshold (0.5 where none was tuned), best first."""
        if not self.multilabel:
            return [self.label]
        th = self.thresholds if self.thresholds is not None else np.full_like(self.scores, DEFAULT_THRESHOLD)
        hits = np.flatnonzero(self.scores >= th)
        hits = hits[np.argsort(-self.scores[hits], kind="stable")]
        return [self.classes[i] for i in hits]

    def to_dict(self, k: int = 5) -> dict[str, Any]:
        """Plain JSON-ready form: predicted labels, top-k and every score."""
        return {
            "labels": self.labels,
            "top": [{"label": n, "score": s} for n, s in self.top(k)],
            "scores": {n: float(s) for n, s in zip(self.classes, self.scores)},
        }


@dataclass(frozen=True)
class DetectionResult:
    """Objects found in one image.

    boxes: float32 (N, 4), xyxy, in pixels of the original image as displayed (EXIF
        orientation applied), clipped to the image.
    scores: float32 (N,), detection confidence, best first.
    class_ids: int64 (N,), indices into ``classes``.
    classes: the model's class names.
    threshold: the score from which a detection counts as found: the bundle's tuned value
        (maximises F-beta on validation), 0.5 where none was tuned. ``boxes`` etc. hold every
        detection the model returned (low scores included: mAP needs them); :meth:`above`
        keeps the confident ones, and that is what the CLI, drawing and servers show.
    image_size: (width, height) of the original image, when known.
    """

    boxes: np.ndarray
    scores: np.ndarray
    class_ids: np.ndarray
    classes: tuple[str, ...]
    threshold: float = DEFAULT_THRESHOLD
    image_size: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        boxes = np.asarray(self.boxes, dtype=np.float32)
        if boxes.size == 0:
            boxes = boxes.reshape(0, 4)
        if boxes.ndim != 2 or boxes.shape[1] != 4:
            raise ValueError(f"boxes must have shape (N, 4) (x1, y1, x2, y2), got {boxes.shape}")
        n = boxes.shape[0]
        scores = np.asarray(self.scores, dtype=np.float32).reshape(-1)
        class_ids = np.asarray(self.class_ids, dtype=np.int64).reshape(-1)
        if scores.shape != (n,) or class_ids.shape != (n,):
            raise ValueError(
                f"need one score and one class id per box: {n} boxes, {scores.shape[0]} scores, "
                f"{class_ids.shape[0]} class ids"
            )
        if n and (class_ids.min() < 0 or class_ids.max() >= len(self.classes)):
            raise ValueError(f"class ids must be in [0, {len(self.classes)}), got {class_ids.min()}..{class_ids.max()}")
        object.__setattr__(self, "boxes", boxes)
        object.__setattr__(self, "scores", scores)
        object.__setattr__(self, "class_ids", class_ids)
        object.__setattr__(self, "classes", tuple(self.classes))

    def __len__(self) -> int:
        return int(self.scores.shape[0])

    @property
    def labels(self) -> list[str]:
        """The class name of each box."""
        return [self.classes[i] for i in self.class_ids]

    def above(self, threshold: float | None = None) -> DetectionResult:
        """Only the detections scoring at least ``threshold`` (default: the result's own)."""
        t = self.threshold if threshold is None else threshold
        keep = self.scores >= t
        return dataclasses.replace(self, boxes=self.boxes[keep], scores=self.scores[keep], class_ids=self.class_ids[keep])

    def filtered(
        self,
        conf: float | None = None,
        iou: float | None = None,
        classes: Sequence[str | int] | None = None,
        max_det: int | None = None,
        agnostic: bool = False,
    ) -> DetectionResult:
        """A new result with only the detections a user asked for (``predict``/``serve``'s
        ``--conf --iou --classes --max-det --agnostic-nms``), best first. Applied in order:

        conf: keep scores >= conf (default: the result's own tuned ``threshold``); the new
            result's ``threshold`` is ``conf``, so :meth:`above` and :meth:`to_dict` keep them all.
        classes: keep only these classes, given by name or by id (a string that is not a
            class name but a decimal number counts as an id, as typed on a command line).
            An unknown name or an id out of range raises ValueError listing the valid names.
        iou: an extra greedy NMS: a box is dropped when its IoU with a better-scoring kept box
            exceeds ``iou`` (the model already ran its own NMS; this only tightens it). Per
            class, or across classes when ``agnostic``. None: no extra NMS.
        max_det: keep at most this many, the best-scoring ones.

        Raises ValueError for a conf or iou outside [0, 1] or a max_det below 1.
        """
        t = self.threshold if conf is None else _unit_interval("conf", conf)
        # checked here, not only where a box is left to suppress: callers validate options
        # once on an empty result (predict, serve) before any image is read
        iou = None if iou is None else _unit_interval("iou", iou)
        keep = np.flatnonzero(self.scores >= t)
        if classes is not None:
            wanted = self._class_ids(classes)
            keep = keep[np.isin(self.class_ids[keep], wanted)]
        keep = keep[np.argsort(-self.scores[keep], kind="stable")]  # best first (ties: original order)
        if iou is not None and len(keep):
            groups = None if agnostic else self.class_ids[keep]
            keep = keep[nms(self.boxes[keep], self.scores[keep], iou, groups)]
        if max_det is not None:
            if isinstance(max_det, bool) or int(max_det) != max_det or max_det < 1:
                raise ValueError(f"max_det must be a whole number of at least 1, got {max_det!r}")
            keep = keep[: int(max_det)]
        return dataclasses.replace(self, boxes=self.boxes[keep], scores=self.scores[keep],
                                   class_ids=self.class_ids[keep], threshold=float(t))

    def _class_ids(self, classes: Sequence[str | int]) -> np.ndarray:
        """Class names/ids → int64 ids; ValueError naming the valid classes for any other."""
        if isinstance(classes, (str, int)):  # a lone "person" would otherwise be read letter by letter
            classes = [classes]
        index = {name: i for i, name in enumerate(self.classes)}
        ids, unknown = [], []
        for c in classes:
            if isinstance(c, str) and c in index:
                ids.append(index[c])
            elif isinstance(c, (int, np.integer, str)) and not isinstance(c, bool) \
                    and str(c).strip().isdecimal() and int(c) < len(self.classes):
                ids.append(int(c))
            else:
                unknown.append(repr(c))
        if unknown:
            valid = ", ".join(f"{i}={name}" for i, name in enumerate(self.classes))
            raise ValueError(f"unknown class{'es' if len(unknown) > 1 else ''} {', '.join(unknown)}; "
                             f"this model knows (id=name): {valid}")
        return np.asarray(ids, dtype=np.int64)

    def to_dict(self, threshold: float | None = None) -> dict[str, Any]:
        """Plain JSON-ready form of the detections at or above ``threshold`` (default: the
        result's own): ``{"detections": [{"label", "class_id", "score", "box": [x1, y1, x2, y2]}],
        "threshold", "image_size"}``."""
        kept = self.above(threshold)
        return {
            "detections": [
                {"label": self.classes[c], "class_id": int(c), "score": float(s), "box": [float(v) for v in b]}
                for b, s, c in zip(kept.boxes, kept.scores, kept.class_ids)
            ],
            "threshold": float(self.threshold if threshold is None else threshold),
            "image_size": list(self.image_size) if self.image_size else None,
        }


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box in ``a`` (N, 4) with every box in ``b`` (M, 4), xyxy: float64 (N, M).
    Areas are (x2 - x1) * (y2 - y1), as torchvision's; an empty union counts as IoU 0."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    wh = np.minimum(a[:, None, 2:], b[None, :, 2:]) - np.maximum(a[:, None, :2], b[None, :, :2])
    inter = np.clip(wh, 0, None).prod(axis=-1)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def nms(boxes: np.ndarray, scores: np.ndarray, iou: float, groups: np.ndarray | None = None) -> np.ndarray:
    """Greedy non-maximum suppression in numpy (same rule as ``torchvision.ops.nms``): take the
    best remaining box, drop every remaining box whose IoU with it exceeds ``iou``, repeat.

    boxes: (N, 4) xyxy; scores: (N,); groups: optional (N,) labels, boxes of different groups
    never suppress each other (``batched_nms``). Returns the kept indices, best score first.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    order = np.argsort(-scores, kind="stable")
    if groups is not None:
        groups = np.asarray(groups).reshape(-1)
    kept = []
    while order.size:
        best, rest = order[0], order[1:]
        kept.append(best)
        overlap = box_iou(boxes[best:best + 1], boxes[rest])[0] > iou
        if groups is not None:
            overlap &= groups[rest] == groups[best]
        order = rest[~overlap]
    return np.asarray(kept, dtype=np.int64)


def _unit_interval(name: str, value: float) -> float:
    """``value`` as a float, or ValueError when it is not a number in [0, 1]."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number between 0 and 1, got {value!r}") from None
    if not 0.0 <= v <= 1.0:  # also rejects NaN
        raise ValueError(f"{name} must be between 0 and 1, got {value!r}")
    return v
