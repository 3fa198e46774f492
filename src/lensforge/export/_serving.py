"""What the serving exporters (Triton, TorchServe) share: the model's name and its ONNX signature."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from lensforge.errors import BundleError, ExportError
from lensforge.runtime.bundle import Bundle, display_name

# Both servers accept this (TorchServe's model-archiver enforces exactly this pattern; Triton
# uses the name as a directory and in URLs, so the same rule keeps it safe there).
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class TensorSig:
    """One ONNX input or output: its name, element type (e.g. ``tensor(float)``) and shape,
    with symbolic axes (the dynamic batch) as ``-1``."""

    name: str
    type: str
    shape: tuple[int, ...]


def model_name(bundle: Bundle, name: str | None) -> str:
    """``name`` checked, or one derived from the bundle's directory (``runs/shapes/bundle`` → ``shapes``)."""
    if name is None:
        name = re.sub(r"[^A-Za-z0-9_.-]+", "-", display_name(bundle.path)).lstrip("-_.") or "lensforge"
    if not NAME_PATTERN.match(name):
        raise ExportError(
            f"invalid model name {name!r}: use letters, digits, '_', '-' and '.', starting with a letter or digit"
        )
    return name


def onnx_signature(model_path: Path) -> tuple[list[TensorSig], list[TensorSig]]:
    """The model's inputs and outputs as onnxruntime sees them (loading it is also the check
    that the file is a model onnxruntime can run)."""
    import onnxruntime as ort

    try:
        session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own Fail/InvalidProtobuf types
        raise BundleError(f"{model_path} could not be loaded by onnxruntime: {str(e).splitlines()[0][:200]}") from None

    def sig(node: ort.NodeArg) -> TensorSig:
        return TensorSig(node.name, node.type, tuple(d if isinstance(d, int) else -1 for d in node.shape))

    return [sig(n) for n in session.get_inputs()], [sig(n) for n in session.get_outputs()]
