"""Explaining a classifier's predictions: class activation maps (exact for pooling + linear
heads), Grad-CAM and Grad-CAM++ (through the ``grad-cam`` package) on the last convolutional
stage, and the ``explain.onnx`` graph that lets the torch-free Predictor explain with CAM.

The torch-free half (maps at image resolution, overlays, running ``explain.onnx``) lives in
:mod:`lensforge.runtime.explain`; this package needs the train extra (torch, timm, grad-cam).
"""

from lensforge.explain.cam import CamGraph, FeatureClassifier, cam_supported, methods_for
from lensforge.explain.explainer import TorchExplainer
from lensforge.explain.export import add_explain, export_explain
from lensforge.runtime.explain import EXPLAIN_FILE, METHODS, Explanation, overlay_row

__all__ = ["EXPLAIN_FILE", "METHODS", "CamGraph", "Explanation", "FeatureClassifier", "TorchExplainer", "add_explain",
           "cam_supported", "export_explain", "methods_for", "overlay_row"]
