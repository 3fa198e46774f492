"""How the Predictor runs a bundle's graph: the two kinds of graph lensforge exports.

- :class:`ClassifierRunner`: ``images float32 (N, 3, S, S)`` → ``scores float32 (N, C)``, one
  batched call; results are :class:`ClassificationResult` (single- or multi-label).
- :class:`DetectorRunner`: ``images float32 (1, 3, H, W)`` in [0, 1] → ``boxes``, ``scores``,
  ``labels``, one call per image (images keep their own sizes); results are
  :class:`DetectionResult` with boxes in original-image pixels.

:data:`RUNNERS` says which kind of graph each task exports (the runtime sits below the tasks
and never imports them; a task that exports a new kind of graph adds its runner here). The
Predictor owns the onnxruntime session and the decoding, and hands the rest to the runner.
No torch here.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Union

import numpy as np
import onnxruntime as ort
from PIL import Image

from lensforge.errors import BundleError
from lensforge.runtime.bundle import Bundle
from lensforge.runtime.preprocess import (
    DetectSpec,
    InputSpec,
    detector_input,
    preprocess,
)
from lensforge.runtime.results import ClassificationResult, DetectionResult

Result = Union[ClassificationResult, DetectionResult]
DETECT_OUTPUTS = ("boxes", "scores", "labels")  # a detector graph's outputs, in this order


@dataclass(frozen=True)
class DetectorInput:
    """A detector's prepared input: ``pixels`` float32 (3, h, w) in [0, 1] at the model's size,
    and the (width, height) of the image it came from, to map boxes back to it."""

    pixels: np.ndarray
    original_size: tuple[int, int]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.pixels.shape)


def pixels(item: Any) -> np.ndarray:
    """The array of a prepared input (a :class:`DetectorInput`'s pixels, or the array itself)."""
    return item.pixels if isinstance(item, DetectorInput) else np.asarray(item)


def original_size(item: Any) -> tuple[int, int]:
    """(width, height) of the image a prepared detector input came from; a plain (3, h, w)
    array (a client's preprocessed tensor) is its own original."""
    if isinstance(item, DetectorInput):
        return item.original_size
    x = np.asarray(item)
    return int(x.shape[2]), int(x.shape[1])


class Runner(ABC):
    """One kind of graph: how images become its input, and its outputs become results."""

    kind: ClassVar[str]
    batched: ClassVar[bool]  # whether one call takes a batch of same-size inputs (else one image per call)

    def __init__(self, bundle: Bundle, session: ort.InferenceSession) -> None:
        self.bundle = bundle
        self.session = session
        self.classes = tuple(bundle.classes)
        self.input_name = session.get_inputs()[0].name
        self.output_names = [o.name for o in session.get_outputs()]

    @property
    @abstractmethod
    def decode_size(self) -> int:
        """The shorter side the decoder may shrink an image to (JPEG DCT scaling) and still feed the model."""

    @abstractmethod
    def prepare(self, img: Image.Image) -> Any:
        """A decoded RGB image → this graph's prepared input."""

    @abstractmethod
    def run_many(self, items: Sequence[Any]) -> list[Any]:
        """Prepared inputs → raw outputs, one per item, in order."""

    @abstractmethod
    def result(self, output: Any, item: Any) -> Result:
        """One raw output (and the prepared input it came from) → its result."""


class ClassifierRunner(Runner):
    kind = "classifier"
    batched = True

    def __init__(self, bundle: Bundle, session: ort.InferenceSession) -> None:
        super().__init__(bundle, session)
        self.spec: InputSpec = bundle.input_spec
        self.multilabel = bundle.task == "multilabel"
        self.thresholds = bundle.thresholds
        n_out = session.get_outputs()[0].shape[-1]
        if isinstance(n_out, int) and n_out != len(self.classes):
            raise BundleError(f"{bundle.path}: the model has {n_out} outputs but the bundle lists {len(self.classes)} classes")

    @property
    def decode_size(self) -> int:
        return self.spec.resize

    def prepare(self, img: Image.Image) -> np.ndarray:
        return preprocess(img, self.spec)

    def run(self, batch: np.ndarray) -> np.ndarray:
        """float32 (N, 3, S, S) → scores float32 (N, C)."""
        return self.session.run([self.output_names[0]], {self.input_name: np.ascontiguousarray(batch, dtype=np.float32)})[0]

    def run_many(self, items: Sequence[Any]) -> list[Any]:
        return list(self.run(np.stack([pixels(x) for x in items]))) if len(items) else []

    def result(self, output: Any, item: Any) -> ClassificationResult:
        return ClassificationResult(output, self.classes, self.multilabel, self.thresholds)


class DetectorRunner(Runner):
    kind = "detector"
    batched = False  # images keep their own sizes

    def __init__(self, bundle: Bundle, session: ort.InferenceSession) -> None:
        super().__init__(bundle, session)
        self.spec: DetectSpec = bundle.detect_spec
        self.score_threshold = bundle.score_threshold
        if tuple(self.output_names) != DETECT_OUTPUTS:
            raise BundleError(f"{bundle.path}: a detector must output {', '.join(DETECT_OUTPUTS)}; this model "
                              f"outputs {', '.join(self.output_names)}")

    @property
    def decode_size(self) -> int:
        return self.spec.min_size

    def prepare(self, img: Image.Image) -> DetectorInput:
        size = img.info.get("original_size") or img.size  # the decoder may have shrunk it already
        return DetectorInput(detector_input(img, self.spec), (int(size[0]), int(size[1])))

    def run_one(self, x: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """float32 (3, h, w) in [0, 1] → boxes float32 (K, 4) xyxy in the input's pixels,
        scores float32 (K,), class ids int64 (K,)."""
        boxes, scores, labels = self.session.run(
            list(DETECT_OUTPUTS), {self.input_name: np.ascontiguousarray(pixels(x)[None], dtype=np.float32)})
        return boxes, scores, labels

    def run_many(self, items: Sequence[Any]) -> list[Any]:
        return [self.run_one(x) for x in items]

    def result(self, output: Any, item: Any) -> DetectionResult:
        boxes, scores, labels = output
        w, h = original_size(item)
        x = pixels(item)
        # input pixels → original pixels, per axis (rounding the resized size makes them differ slightly)
        factors = np.array([w / x.shape[2], h / x.shape[1]] * 2, dtype=np.float32)
        boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4) * factors
        boxes[:, 0::2] = boxes[:, 0::2].clip(0, w)
        boxes[:, 1::2] = boxes[:, 1::2].clip(0, h)
        return DetectionResult(boxes, scores, labels, self.classes, self.score_threshold, (w, h))


# which kind of graph each task's bundles hold
RUNNERS: dict[str, type[Runner]] = {"classify": ClassifierRunner, "multilabel": ClassifierRunner, "detect": DetectorRunner}


def runner_for(task: str) -> type[Runner]:
    """The runner of a task's graphs; a BundleError for a task this lensforge cannot run."""
    try:
        return RUNNERS[task]
    except KeyError:
        raise BundleError(f"this lensforge cannot run {task!r} models; it runs {', '.join(RUNNERS)}") from None
