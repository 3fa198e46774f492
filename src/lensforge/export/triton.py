"""Bundle → Triton Inference Server model repository (onnxruntime backend).

    <out>/<name>/config.pbtxt   platform, max_batch_size, dynamic batching, input/output
                                names, types and dims read from the ONNX graph
    <out>/<name>/1/model.onnx   the bundle's model, byte for byte
    <out>/<name>/labels.txt     one class per line (the output's label_filename, so Triton's
                                classification extension answers with class names)

Triton runs the graph only: clients send preprocessed float32 (N, 3, S, S) images (the
config's header comment states the bundle's preprocessing). Point Triton at ``<out>``.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from lensforge.errors import BundleError, ExportError
from lensforge.export._serving import TensorSig, model_name, onnx_signature
from lensforge.runtime.bundle import as_bundle
from lensforge.runtime.bundle import Bundle, atomic_directory

log = logging.getLogger(__name__)

CONFIG_FILE = "config.pbtxt"
LABELS_FILE = "labels.txt"
MODEL_FILE = "model.onnx"  # the onnxruntime backend's default_model_filename
QUEUE_DELAY_US = 2000  # wait up to 2 ms for more requests: fuller batches at a small latency cost

# onnxruntime element type → Triton data type (the types our exported graphs can have)
TRITON_TYPES = {
    "tensor(float)": "TYPE_FP32",
    "tensor(float16)": "TYPE_FP16",
    "tensor(double)": "TYPE_FP64",
    "tensor(uint8)": "TYPE_UINT8",
    "tensor(int8)": "TYPE_INT8",
    "tensor(int32)": "TYPE_INT32",
    "tensor(int64)": "TYPE_INT64",
    "tensor(bool)": "TYPE_BOOL",
}


def export_triton(
    bundle: str | os.PathLike[str] | Bundle,
    out: Path,
    *,
    name: str | None = None,
    max_batch_size: int = 32,
    overwrite: bool = False,
) -> Path:
    """Write a Triton model repository for ``bundle`` at ``out``; return ``out/<name>``.

    name: the Triton model name (default: the bundle's run directory name).
    max_batch_size: the largest batch Triton forms (> 0: the graph's dynamic first axis is the
        batch axis and is left out of ``dims``; 0 disables batching and keeps it).
    overwrite: replace an existing ``out`` (written atomically: a failure leaves the old one).

    The config is checked with Triton's own protobuf schema when ``tritonclient`` is installed
    (``pip install tritonclient[grpc]``); without it the check is skipped with a warning.
    """
    b = as_bundle(bundle)
    name = model_name(b, name)
    if not isinstance(max_batch_size, int) or max_batch_size < 0:
        raise ExportError(f"max_batch_size must be an integer >= 0, got {max_batch_size!r}")
    out = Path(out)
    if out.exists() and not overwrite:
        raise ExportError(f"{out} already exists; pass overwrite=True (--overwrite) to replace it")
    inputs, outputs = onnx_signature(b.model_path)
    if b.task == "detect":
        # a detector takes one image of any size and returns one row per box: no batch axis for Triton to use
        max_batch_size = 0
    elif len(outputs) != 1:
        raise ExportError(f"{b.model_path} has {len(outputs)} outputs; a lensforge classifier has one (the class scores)")
    text = config_text(b, name, inputs, outputs, max_batch_size)
    validate_config(text, inputs, outputs, max_batch_size)
    try:
        with atomic_directory(out, overwrite=overwrite) as tmp:
            (tmp / name / "1").mkdir(parents=True)
            shutil.copyfile(b.model_path, tmp / name / "1" / MODEL_FILE)
            (tmp / name / CONFIG_FILE).write_text(text)
            (tmp / name / LABELS_FILE).write_text("".join(f"{c}\n" for c in b.classes))
    except BundleError as e:  # a race: ``out`` appeared after the check above
        raise ExportError(str(e)) from None
    log.info("wrote Triton model %r to %s", name, out / name)
    return out / name


def config_text(
    bundle: Bundle, name: str, inputs: list[TensorSig], outputs: list[TensorSig], max_batch_size: int
) -> str:
    """The ``config.pbtxt`` text (protobuf text format of Triton's ``ModelConfig``)."""
    spec = bundle.input_spec
    lines = [
        f"# Triton model {name!r}, written by lensforge ({bundle.task}, {len(bundle.classes)} classes).",
        f"# Input: RGB float32 (3, {spec.size}, {spec.size}): resize the shorter side to {spec.resize} ({spec.interpolation}),",
        f"# centre-crop {spec.size}, scale to [0, 1], subtract mean {list(spec.mean)}, divide by std {list(spec.std)}.",
        f"name: {_quote(name)}",
        'platform: "onnxruntime_onnx"',
        f"max_batch_size: {max_batch_size}",
    ]
    for field, tensors in (("input", inputs), ("output", outputs)):
        lines.append(f"{field} [")
        for i, t in enumerate(tensors):
            dims = _dims(t, max_batch_size)
            lines += ["  {", f"    name: {_quote(t.name)}", f"    data_type: {_triton_type(t)}",
                      f"    dims: [ {', '.join(map(str, dims))} ]"]
            if field == "output":
                lines.append(f"    label_filename: {_quote(LABELS_FILE)}")
            lines.append("  }," if i < len(tensors) - 1 else "  }")
        lines.append("]")
    if max_batch_size > 0:
        lines += ["dynamic_batching {", f"  max_queue_delay_microseconds: {QUEUE_DELAY_US}", "}"]
    return "\n".join(lines) + "\n"


def validate_config(text: str, inputs: list[TensorSig], outputs: list[TensorSig], max_batch_size: int) -> bool:
    """Parse ``text`` with Triton's ``ModelConfig`` schema and compare it with the graph.

    Returns False (and logs a warning) when ``tritonclient`` is not installed; raises
    :class:`ExportError` when the text does not parse or disagrees with the ONNX model.
    """
    try:
        from google.protobuf import text_format
        from tritonclient.grpc import model_config_pb2
    except ImportError:
        log.warning(
            "tritonclient is not installed: config.pbtxt was not checked against Triton's schema "
            "(validation skipped; pip install tritonclient[grpc] to check it)"
        )
        return False
    config = model_config_pb2.ModelConfig()
    try:
        text_format.Parse(text, config)
    except text_format.ParseError as e:
        raise ExportError(f"the generated {CONFIG_FILE} does not parse: {e}") from None
    problems = []
    if config.platform != "onnxruntime_onnx" or config.max_batch_size != max_batch_size:
        problems.append(f"platform {config.platform!r} / max_batch_size {config.max_batch_size}")
    for kind, declared, graph in (("input", config.input, inputs), ("output", config.output, outputs)):
        got = [(t.name, model_config_pb2.DataType.Name(t.data_type), list(t.dims)) for t in declared]
        want = [(t.name, _triton_type(t), _dims(t, max_batch_size)) for t in graph]
        if got != want:
            problems.append(f"{kind}s {got} but the ONNX graph has {want}")
    if any(o.label_filename != LABELS_FILE for o in config.output):
        problems.append(f"outputs do not reference {LABELS_FILE}")
    if problems:
        raise ExportError(f"the generated {CONFIG_FILE} disagrees with the model: {'; '.join(problems)}")
    return True


def _dims(t: TensorSig, max_batch_size: int) -> list[int]:
    if max_batch_size == 0:
        return list(t.shape)
    if not t.shape or t.shape[0] != -1:
        raise ExportError(
            f"{t.name!r} has shape {list(t.shape)} without a dynamic batch axis; "
            "export with max_batch_size=0 or re-export the model with a dynamic batch"
        )
    return list(t.shape[1:])


def _triton_type(t: TensorSig) -> str:
    try:
        return TRITON_TYPES[t.type]
    except KeyError:
        raise ExportError(f"{t.name!r} has element type {t.type}, which this exporter does not map to Triton") from None


def _quote(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'
