"""The result type of classification: what every consumer (CLI, metrics, server) formats."""

from __future__ import annotations

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
