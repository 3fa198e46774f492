"""``explain.onnx``: the exact class activation maps as a second small graph in the bundle,
written by the bundle writer for classifiers whose head fits (pooling + linear), and added to
bundles made before with ``lensforge export BUNDLE --to explain`` (:func:`add_explain`)."""

from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lensforge.errors import BundleError, ExportError
from lensforge.explain.attention import attention_supported, export_attention
from lensforge.explain.cam import CamGraph, cam_supported
from lensforge.export.onnx import INPUT_NAME, OPSET
from lensforge.models.classifier import Classifier, load_bundle_model
from lensforge.runtime.bundle import (
    META_FILE,
    WEIGHTS_FILE,
    load_bundle,
    staging_directory,
    write_meta,
)
from lensforge.runtime.explain import EXPLAIN_FILE, EXPLAIN_OUTPUTS, normalise

log = logging.getLogger(__name__)

PARITY_BATCH = 4  # seeded random images the explain graph is checked on
MAX_MAP_DIFF = 1e-3  # normalised maps (in [0, 1]) that differ more than this are refused


def export_explain(classifier: Classifier, multilabel: bool, size: int, path: Path) -> dict[str, Any] | None:
    """Write ``explain.onnx`` for ``classifier`` (input side ``size``) to ``path`` and check it
    against torch; returns the bundle's ``explain`` entry, or None (nothing written) when the
    head is not pooling + linear. Raises ExportError when ONNX disagrees. A ViT gets its
    attention graph instead (:mod:`lensforge.explain.attention`)."""
    if attention_supported(classifier):
        return export_attention(classifier, multilabel, size, path)
    if not cam_supported(classifier):
        log.info("no explain graph: the exact CAM needs global average pooling + one linear layer")
        return None
    graph = CamGraph(classifier.eval(), multilabel).eval().float()
    images = torch.randn(PARITY_BATCH, 3, size, size, generator=torch.Generator().manual_seed(0))
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # exporter deprecation notices
            torch.onnx.export(graph, (images[:1],), str(path), input_names=[INPUT_NAME],
                              output_names=list(EXPLAIN_OUTPUTS), opset_version=OPSET, dynamo=False,
                              dynamic_axes={INPUT_NAME: {0: "batch"}, **{o: {0: "batch"} for o in EXPLAIN_OUTPUTS}})
    except Exception as e:
        raise ExportError(f"ONNX export of the explain graph failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}") from e
    diff = explain_parity(graph, path, images)
    return {"file": EXPLAIN_FILE, "method": "cam", "outputs": list(EXPLAIN_OUTPUTS),
            "parity": {**diff, "images": PARITY_BATCH, "compared": "seeded random images, ONNX Runtime vs torch fp32"}}


def explain_parity(graph: CamGraph, path: Path, images: torch.Tensor) -> dict[str, float]:
    """Max abs differences ONNX vs torch of the raw cams, the normalised maps and the scores."""
    import onnxruntime as ort

    with torch.no_grad():
        cams, scores = (t.numpy() for t in graph(images))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    o_cams, o_scores = session.run(list(EXPLAIN_OUTPUTS), {INPUT_NAME: images.numpy()})
    if o_cams.shape != cams.shape:
        raise ExportError(f"explain graph: ONNX cams {o_cams.shape} differ in shape from torch {cams.shape}")
    maps = max(float(np.abs(normalise(a) - normalise(b)).max()) for a, b in zip(o_cams.reshape(-1, *cams.shape[2:]),
                                                                                cams.reshape(-1, *cams.shape[2:])))
    diff = {"max_abs_diff_cams": float(np.abs(o_cams - cams).max()), "max_abs_diff_maps": maps,
            "max_abs_diff_scores": float(np.abs(o_scores - scores).max())}
    if not np.isfinite(maps) or maps > MAX_MAP_DIFF:
        raise ExportError(f"the explain graph disagrees with torch: normalised maps differ by {maps:.3g} > {MAX_MAP_DIFF}")
    return diff


def add_explain(bundle_dir: str | os.PathLike[str], overwrite: bool = False) -> dict[str, Any]:
    """Add ``explain.onnx`` to a classifier bundle made before lensforge could explain (from its
    weights.safetensors); records it in lensforge.json and returns that entry. The graph is
    written beside the bundle's files and renamed into place only once checked."""

    bundle = load_bundle(bundle_dir)
    if bundle.task == "detect":
        raise ExportError(f"{bundle.path} holds a detector; explain graphs are for classifiers")
    if bundle.meta.get("explain") and (bundle.path / EXPLAIN_FILE).is_file() and not overwrite:
        raise BundleError(f"{bundle.path} already has {EXPLAIN_FILE}; pass --overwrite to write it again")
    if not (bundle.path / WEIGHTS_FILE).is_file():
        raise BundleError(f"{bundle.path} has no {WEIGHTS_FILE} to build the explain graph from")
    scores_model = load_bundle_model(bundle)
    classifier = scores_model.model
    # staged in the bundle's parent's .staging (same file system: the rename is atomic); what a
    # kill -9 leaves there, the next run sweeps
    with staging_directory(bundle.path.parent, f"{bundle.name}.explain") as work:
        tmp = work / EXPLAIN_FILE
        entry = export_explain(classifier, scores_model.multilabel, bundle.input_spec.size, tmp)
        if entry is None:
            raise ExportError(f"{bundle.path}'s head is {bundle.meta.get('model', {}).get('head', '?')!r} on "
                              f"{bundle.meta.get('model', {}).get('backbone', '?')}: the exact CAM needs global average "
                              "pooling + a linear head; explain it with --method gradcam or gradcam++ (torch) instead")
        os.replace(tmp, bundle.path / EXPLAIN_FILE)
    meta = json.loads((bundle.path / META_FILE).read_text())
    meta["explain"] = entry
    write_meta(bundle.path, {k: v for k, v in meta.items() if k != "format_version"})
    return entry
