"""Which explanations fit a classifier, and the torch graphs that compute them.

A timm backbone built with ``num_classes=0`` splits into ``forward_features`` (the last
convolutional stage's map, (N, F, h, w)) and ``forward_head`` (its pooling). When that pooling
is a plain spatial mean and the head one linear layer, ``logit_c = w_c · mean(F) + b_c =
mean(w_c · F) + b_c``: the class activation map ``w_c · F`` explains the logit exactly.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

from lensforge.models.classifier import Classifier

PROBE_SIZE = 64  # input side of the one forward pass that checks a backbone's pooling


class FeatureClassifier(nn.Module):
    """The classifier with its last feature map exposed: ``self.features`` (an identity) is
    where Grad-CAM hooks; the forward is the classifier's own (logits)."""

    def __init__(self, classifier: Classifier) -> None:
        super().__init__()
        self.classifier = classifier
        self.features = nn.Identity()

    def feature_map(self, images: torch.Tensor) -> torch.Tensor:
        return self.features(self.classifier.backbone.forward_features(images))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        bb = self.classifier.backbone
        return self.classifier.head(bb.forward_head(self.feature_map(images)))


class CamGraph(nn.Module):
    """What ``explain.onnx`` holds: images → (cams float32 (N, C, h, w), scores float32 (N, C)).
    cams: each class's head weights applied to the last feature map (a 1x1 convolution; the
    bias, the same everywhere, is left out), for softmax heads the weights centred over the
    classes; scores: softmax (sigmoid for multi-label)."""

    def __init__(self, classifier: Classifier, multilabel: bool) -> None:
        super().__init__()
        self.net = FeatureClassifier(classifier)
        self.multilabel = multilabel

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.net.feature_map(images)
        logits = self.net.classifier.head(self.net.classifier.backbone.forward_head(feats))
        weight = self.net.classifier.final_linear().weight
        if not self.multilabel:
            # softmax ignores anything added to every class's weights (the binary probe leaves class 0's at
            # zero): centred, each map explains logit_c - mean(logits) exactly, i.e. what sets this class apart
            weight = weight - weight.mean(0, keepdim=True)
        cams = F.conv2d(feats, weight[:, :, None, None])
        scores = torch.sigmoid(logits) if self.multilabel else torch.softmax(logits, dim=-1)
        return cams, scores


def _feature_map_4d(classifier: Classifier) -> torch.Tensor | None:
    """A feature map of the backbone for a small input, or None when it has no spatial map
    (ViTs: tokens) or no timm-style split."""
    bb = classifier.backbone
    if not (hasattr(bb, "forward_features") and hasattr(bb, "forward_head")):
        return None
    was_training = classifier.training
    classifier.eval()
    try:
        with torch.no_grad():
            feats = bb.forward_features(torch.zeros(1, 3, PROBE_SIZE, PROBE_SIZE).normal_(generator=torch.Generator().manual_seed(0)))
    except Exception:  # noqa: BLE001 - an architecture that refuses the probe size has no usable map here
        return None
    finally:
        classifier.train(was_training)
    return feats if feats.ndim == 4 else None


def cam_supported(classifier: Classifier) -> bool:
    """Whether the exact CAM explains this classifier: a spatial feature map, pooled by a plain
    mean (checked numerically: MobileNetV3 and ConvNeXt put layers after their pooling), and a
    head that is one linear layer (``head="linear"``; dropout is the identity at inference)."""
    head = classifier.head
    if not (isinstance(head, nn.Sequential) and len(head) == 2 and isinstance(head[0], nn.Dropout)
            and isinstance(head[1], nn.Linear)):
        return False
    feats = _feature_map_4d(classifier)
    if feats is None:
        return False
    was_training = classifier.training
    try:
        with torch.no_grad():
            pooled = classifier.eval().backbone.forward_head(feats)
    finally:
        classifier.train(was_training)
    return pooled.shape == feats.shape[:2] and torch.allclose(pooled, feats.mean((2, 3)), atol=1e-5, rtol=1e-4)


def methods_for(classifier: Classifier) -> tuple[str, ...]:
    """The explain methods that fit ``classifier``, the default first."""
    if cam_supported(classifier):
        return ("cam", "gradcam", "gradcam++")
    if _feature_map_4d(classifier) is not None:
        return ("gradcam", "gradcam++")
    return ()
