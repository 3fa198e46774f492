"""The result types, one per task: what every consumer (CLI, metrics, drawing, server) formats."""

from __future__ import annotations

import dataclasses
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
