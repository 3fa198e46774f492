"""torch → ONNX, verified in onnxruntime right away."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lensforge.errors import ExportError

log = logging.getLogger(__name__)

OPSET = 17
INPUT_NAME, OUTPUT_NAME = "images", "scores"


def export_onnx(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    """Write ``model`` (eval mode, fp32) as ONNX with a dynamic batch axis.

    Uses the TorchScript-based exporter where torch still ships it: for these CNN/ViT
    graphs it produces the same numbers as the dynamo exporter in ~1 s instead of ~18 s
    (measured on EfficientNet-Lite0, torch 2.14, 2 cores).
    """
    model = model.eval().float().to(memory_format=torch.contiguous_format)
    example = example.float().contiguous()
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the exporter's deprecation notices are not for our users
            try:
                torch.onnx.export(
                    model, (example,), str(path), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                    dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                    opset_version=OPSET, dynamo=False,
                )
            except (TypeError, RuntimeError) as legacy_error:
                log.info("TorchScript ONNX exporter unavailable (%s); using the dynamo exporter", legacy_error)
                batch = torch.export.Dim("batch", min=1, max=4096)
                torch.onnx.export(
                    model, (example,), str(path), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                    dynamic_shapes=({0: batch},), dynamo=True, external_data=False,  # positional: forward(x) or forward(images)
                )
    except Exception as e:
        raise ExportError(f"ONNX export failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}") from e


def verify_onnx(model: nn.Module, path: Path, batch: torch.Tensor, max_abs_diff: float) -> float:
    """Run ``batch`` through torch and through onnxruntime; return the max abs difference of
    the outputs, or raise :class:`ExportError` past ``max_abs_diff``."""
    import onnxruntime as ort

    model = model.eval().float()
    with torch.no_grad():
        expected = model(batch.float().contiguous()).numpy()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {INPUT_NAME: batch.numpy().astype(np.float32)})[0]
    if got.shape != expected.shape:
        raise ExportError(f"ONNX output shape {got.shape} differs from torch {expected.shape}")
    diff = float(np.abs(got - expected).max())
    if not np.isfinite(diff) or diff > max_abs_diff:
        raise ExportError(
            f"the ONNX model disagrees with the torch model: max abs difference {diff:.3g} > {max_abs_diff:g}; "
            "the bundle was not written"
        )
    return diff
