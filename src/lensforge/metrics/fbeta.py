"""F-beta, and how a threshold that maximises it is chosen: shared by classification
(:func:`~lensforge.metrics.classification.tune_thresholds`, one threshold per label) and
detection (:func:`~lensforge.metrics.detection.best_threshold`, one for all classes), so both
score, break ties and fall back the same way.
"""

from __future__ import annotations

import numpy as np

from lensforge.runtime.results import DEFAULT_THRESHOLD

# Used where the data cannot choose a threshold (a label without positives or negatives, no
# ground truth box, no detection, F-beta 0 everywhere): the neutral point of a sigmoid, and
# the default every untuned ClassificationResult and DetectionResult uses.
FALLBACK_THRESHOLD = DEFAULT_THRESHOLD

# Ties in F-beta are decided within this relative tolerance: equal fractions such as 2/3 and
# 8/12 may differ in the last bit once computed from float precision and recall.
TIE_RTOL = 1e-9


def f_beta(precision: np.ndarray, recall: np.ndarray, beta: float) -> np.ndarray:
    """Element-wise F-beta of float arrays of the same shape; 0 where precision and recall
    are both 0 (undefined, as scikit-learn's ``zero_division=0``)."""
    b2 = beta * beta
    denom = b2 * precision + recall
    return np.divide((1 + b2) * precision * recall, denom, out=np.zeros_like(denom), where=denom > 0)


def best_ties(fbeta: np.ndarray) -> np.ndarray:
    """Indices (ascending) of the F-beta values equal to the maximum within :data:`TIE_RTOL`;
    the caller picks the one at the highest threshold. ``fbeta`` must not be empty."""
    return np.flatnonzero(fbeta >= fbeta.max() * (1 - TIE_RTOL))
