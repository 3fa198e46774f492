"""Serving-side runtime: bundles, preprocessing, results and the Predictor.

Depends on onnxruntime, numpy and Pillow only — never torch — so a serving install is small.
"""

from lensforge.runtime.bundle import Bundle, load_bundle
from lensforge.runtime.predictor import Predictor
from lensforge.runtime.preprocess import DetectSpec, InputSpec, preprocess
from lensforge.runtime.results import ClassificationResult, DetectionResult

__all__ = ["Bundle", "ClassificationResult", "DetectSpec", "DetectionResult", "InputSpec", "Predictor", "load_bundle", "preprocess"]
