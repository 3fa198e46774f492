"""Explanations in torch: the exact CAM, and Grad-CAM / Grad-CAM++ through the ``grad-cam``
package, on the same preprocessing and the same map geometry as the torch-free Predictor."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from lensforge.data.image import decode_image, to_rgb
from lensforge.errors import ModelError
from lensforge.explain.attention import AttentionGraph, attention_supported
from lensforge.explain.cam import CamGraph, FeatureClassifier, methods_for
from lensforge.models.classifier import Classifier, load_bundle_model
from lensforge.runtime.bundle import Bundle, as_bundle
from lensforge.runtime.explain import (
    ATTENTION_METHODS,
    METHODS,
    Explanation,
    attention_explanations,
    explanations,
    label_index,
    to_image,
)
from lensforge.runtime.preprocess import InputSpec, preprocess


class TorchExplainer:
    """Explain a classifier in torch: ``TorchExplainer.from_bundle(path)`` (its weights, no
    download) or ``TorchExplainer(classifier, spec, classes, multilabel)``."""

    def __init__(self, classifier: Classifier, spec: InputSpec, classes: Sequence[str], multilabel: bool = False) -> None:
        self.classifier = classifier.eval()
        self.spec = spec
        self.classes = tuple(classes)
        self.multilabel = multilabel
        # ViTs: attention maps; CNNs: CAM / Grad-CAM (methods_for)
        self.methods = ATTENTION_METHODS if attention_supported(self.classifier) else methods_for(self.classifier)

    @classmethod
    def from_bundle(cls, bundle: str | os.PathLike[str] | Bundle) -> TorchExplainer:
        b = as_bundle(bundle)
        if b.task == "detect":
            raise ModelError(f"{b.path} holds a detector; explain handles classifiers (cam, gradcam, gradcam++)")
        scores_model = load_bundle_model(b)
        return cls(scores_model.model, b.input_spec, b.classes, scores_model.multilabel)

    def resolve(self, method: str) -> str:
        """``auto`` → the default for this model; a method that does not fit → ModelError naming those that do."""
        if method not in METHODS:
            raise ModelError(f"unknown explain method {method!r}; use one of {', '.join(METHODS)}")
        if not self.methods:
            raise ModelError("this model has neither a spatial feature map (cam, gradcam, gradcam++ need a CNN "
                             "backbone) nor timm ViT attention (attention, rollout)")
        if method == "auto":
            return self.methods[0]
        if method not in self.methods:
            why = ("attention and rollout need a timm ViT backbone" if method in ATTENTION_METHODS
                   else "a ViT has no convolutional feature map" if self.methods == ATTENTION_METHODS
                   else "eigencam is for detectors" if method == "eigencam"
                   else "the exact CAM needs global average pooling + a linear head")
            raise ModelError(f"{method} does not fit this model ({why}); it supports: {', '.join(self.methods)}")
        return method

    def cams(self, batch: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """float32 (N, 3, S, S) → raw CAMs float32 (N, C, h, w) and scores (N, C), in torch."""
        with torch.no_grad():
            cams, scores = CamGraph(self.classifier, self.multilabel)(batch)
        return cams.numpy(), scores.numpy()

    def gradcam(self, batch: torch.Tensor, class_ids: Sequence[int], plus_plus: bool = False) -> np.ndarray:
        """Grad-CAM (or Grad-CAM++) maps of ``class_ids`` for each image of ``batch``: float32
        (N, K, S, S) in [0, 1] at the input's size (the package's own normalisation)."""
        from pytorch_grad_cam import GradCAM, GradCAMPlusPlus
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        net = FeatureClassifier(self.classifier).eval()
        kind = GradCAMPlusPlus if plus_plus else GradCAM
        out = np.zeros((len(batch), len(class_ids), *batch.shape[2:]), np.float32)
        with kind(model=net, target_layers=[net.features]) as cam:
            for j, c in enumerate(class_ids):
                out[:, j] = cam(input_tensor=batch, targets=[ClassifierOutputTarget(int(c))] * len(batch))
        return out

    def attention(self, batch: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """float32 (N, 3, S, S) → attention (N, heads, h, w), rollout (N, 1, h, w), scores (N, C), in torch."""
        with torch.no_grad():
            attention, rollout, scores = AttentionGraph(self.classifier, self.multilabel)(batch)
        return attention.numpy(), rollout.numpy(), scores.numpy()

    def explain(self, image: Image.Image | str | os.PathLike[str] | bytes, labels: Sequence[str | int] | None = None,
                k: int = 1, method: str = "auto", heads: bool = False) -> list[Explanation]:
        """Explanations of ``labels`` (default: the top ``k``) for one image (decoded like predict).
        ``heads``: with attention, each label's head-mean map is followed by one map per head."""
        method = self.resolve(method)
        # the decoder's own mode policy (alpha over white, 16-bit scaled), as the Predictor applies it
        img = to_rgb(image) if isinstance(image, Image.Image) else decode_image(image, min_size=self.spec.resize)
        batch = torch.from_numpy(preprocess(img, self.spec)[None])
        if method in ATTENTION_METHODS:
            attention, rollout, scores = self.attention(batch)
            return attention_explanations(img, attention[0], rollout[0], scores[0], self.classes, self.spec, method,
                                          labels, k, heads)
        cams, scores = self.cams(batch)
        if method == "cam":
            return explanations(img, cams[0], scores[0], self.classes, self.spec, "cam", labels, k)
        wanted = ([label_index(lab, self.classes) for lab in labels] if labels is not None
                  else [int(i) for i in np.argsort(-scores[0], kind="stable")[:max(1, k)]])
        maps = self.gradcam(batch, wanted, plus_plus=method == "gradcam++")[0]
        return [Explanation(to_image(m, self.spec, img.size), self.classes[c], float(scores[0][c]), method, img)
                for m, c in zip(maps, wanted)]
