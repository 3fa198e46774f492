"""Classification heads on a backbone, and the wrapper that exports scores."""

from __future__ import annotations

import torch
from safetensors.torch import load_file
from torch import nn

from lensforge.errors import ModelError
from lensforge.models.backbones import create_backbone
from lensforge.runtime.bundle import WEIGHTS_FILE, Bundle


class Classifier(nn.Module):
    """backbone → head → logits (N, C).

    head: "linear" (one layer, also what the linear probe fills in) or "mlp"
    (Linear → GELU → Dropout → Linear, hidden = min(512, features)).
    """

    def __init__(self, backbone: nn.Module, num_classes: int, head: str = "linear", dropout: float = 0.2) -> None:
        super().__init__()
        self.backbone = backbone
        f = int(backbone.num_features)
        if head == "linear":
            self.head: nn.Module = nn.Sequential(nn.Dropout(dropout), nn.Linear(f, num_classes))
        elif head == "mlp":
            hidden = min(512, f)
            self.head = nn.Sequential(nn.Linear(f, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, num_classes))
        else:
            raise ValueError(f"head must be 'linear' or 'mlp', got {head!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def final_linear(self) -> nn.Linear:
        layer = self.head[-1]
        assert isinstance(layer, nn.Linear)
        return layer


class ScoresModel(nn.Module):
    """What goes into the ONNX file: images → probabilities (softmax, or sigmoid for
    multi-label), so every consumer reads scores without knowing the loss."""

    def __init__(self, model: nn.Module, multilabel: bool) -> None:
        super().__init__()
        self.model = model
        self.multilabel = multilabel

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = self.model(images)
        return torch.sigmoid(logits) if self.multilabel else torch.softmax(logits, dim=-1)


def load_bundle_model(bundle: Bundle) -> ScoresModel:
    """The bundle's classifier rebuilt in torch from ``weights.safetensors`` and the model
    facts in ``lensforge.json`` (backbone, head; classes and input size from the bundle), in
    eval mode. No pretrained download. Raises ModelError when the bundle lacks what it takes;
    weights that do not fit raise from ``load_state_dict``."""
    weights = bundle.path / WEIGHTS_FILE
    if not weights.is_file():
        raise ModelError(f"{bundle.path} has no {WEIGHTS_FILE}")
    info = bundle.meta.get("model")
    if not isinstance(info, dict) or not isinstance(info.get("backbone"), str):
        raise ModelError(f"{bundle.path}'s lensforge.json names no backbone")
    backbone, _ = create_backbone(info["backbone"], pretrained=False, image_size=bundle.input_spec.size)
    classifier = Classifier(backbone, len(bundle.classes), head=str(info.get("head", "linear")))
    classifier.load_state_dict(load_file(str(weights)))
    return ScoresModel(classifier, bundle.task == "multilabel").eval()
