"""The linear-probe baseline: frozen backbone features + scikit-learn logistic regression,
folded back into a :class:`Classifier` so it exports like any fine-tuned model."""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from lensforge.models.classifier import Classifier

log = logging.getLogger(__name__)


def extract_features(
    backbone: nn.Module, loader: torch.utils.data.DataLoader, progress: Callable[[int], None] | None = None
) -> np.ndarray:
    """Pooled features (N, F) float32, in loader order (the loader must not shuffle).

    The frozen backbone is exported to ONNX once and run in onnxruntime: on CPU that is
    ~5x faster than torch eager for the same weights (bench/predictor.py), and the export
    takes about a second.
    """
    import tempfile

    import onnxruntime as ort

    from lensforge.export.onnx import export_onnx
    from lensforge.hardware import cpu_count

    backbone.eval()
    feats: list[np.ndarray] = []
    with tempfile.TemporaryDirectory() as tmp:
        session: ort.InferenceSession | None = None
        for x, _ in loader:
            if session is None:
                path = Path(tmp) / "backbone.onnx"
                export_onnx(backbone, x[:1], path)
                opts = ort.SessionOptions()
                opts.intra_op_num_threads = cpu_count()
                session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
            feats.append(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
            if progress:
                progress(len(x))
    return np.concatenate(feats) if feats else np.zeros((0, int(backbone.num_features)), np.float32)


def cached_features(
    cache_dir: Path,
    key_parts: list[str],
    compute: Callable[[], np.ndarray],
) -> np.ndarray:
    """Features are computed once per (backbone, input spec, image files) and kept as .npy
    (plain arrays: ``allow_pickle=False``), so a second probe on the same images (another C,
    another split of the same files) skips extraction. A cache that cannot be written is
    only a missed speed-up."""
    key = hashlib.sha256("\n".join(key_parts).encode()).hexdigest()[:16]
    path = cache_dir / f"features-{key}.npy"
    if path.is_file():
        log.info("using cached features %s", path)
        return np.load(path, allow_pickle=False)
    feats = compute()
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npy")
        np.save(tmp, feats, allow_pickle=False)
        tmp.replace(path)
    except OSError as e:
        log.warning("could not cache probe features in %s: %s", cache_dir, e)
    return feats


def fit_probe(
    features: np.ndarray, y: np.ndarray, num_classes: int, multilabel: bool, c: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Standardise, fit logistic regression, and return the equivalent linear layer on the
    *raw* features: weight (C, F), bias (C,). Softmax (or sigmoid) of ``x @ W.T + b`` equals
    the scikit-learn model's ``predict_proba``."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.multiclass import OneVsRestClassifier

    mu = features.mean(0)
    sigma = features.std(0) + 1e-6
    z = (features - mu) / sigma
    if multilabel:
        ovr = OneVsRestClassifier(LogisticRegression(C=c, max_iter=2000, random_state=seed))
        ovr.fit(z, y)
        pairs = [_binary_coef(est, z.shape[1]) for est in ovr.estimators_]
        coef = np.stack([w for w, _ in pairs])
        bias = np.array([b for _, b in pairs])
    else:
        lr = LogisticRegression(C=c, max_iter=2000, random_state=seed)
        lr.fit(z, y)
        coef = np.zeros((num_classes, z.shape[1]))
        bias = np.full(coef.shape[0], -1e4)  # classes unseen in training never win
        if len(lr.classes_) == 2:
            # binary LR has one logit z for class 1: softmax([0, z]) == sigmoid(z)
            coef[lr.classes_[1]], bias[lr.classes_[1]] = lr.coef_[0], lr.intercept_[0]
            coef[lr.classes_[0]], bias[lr.classes_[0]] = 0.0, 0.0
        else:
            coef[lr.classes_], bias[lr.classes_] = lr.coef_, lr.intercept_
    weight = coef / sigma
    bias = bias - weight @ mu
    return weight.astype(np.float32), bias.astype(np.float32)


def _binary_coef(est: object, n_features: int) -> tuple[np.ndarray, float]:
    """OneVsRest keeps a constant predictor for a label that is always 0 or always 1."""
    if hasattr(est, "coef_"):
        return est.coef_[0], float(est.intercept_[0])  # type: ignore[attr-defined]
    p = float(getattr(est, "y_", [0])[0]) if hasattr(est, "y_") else 0.0
    return np.zeros(n_features), (1e4 if p > 0.5 else -1e4)


def set_linear_head(model: Classifier, weight: np.ndarray, bias: np.ndarray) -> None:
    layer = model.final_linear()
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(weight))
        layer.bias.copy_(torch.from_numpy(bias))
