"""Backbones and task heads (torch)."""

from lensforge.models.backbones import BACKBONES, create_backbone
from lensforge.models.classifier import Classifier, ScoresModel, load_bundle_model

__all__ = ["BACKBONES", "Classifier", "ScoresModel", "create_backbone", "load_bundle_model"]
