"""The one Predictor: a bundle + onnxruntime → results. Used by the CLI, evaluate, the server
and the benchmarks alike."""

from __future__ import annotations

import logging
import os
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Iterable, Iterator, Sequence, Union

import numpy as np
import onnxruntime as ort
from PIL import Image

from lensforge.data.image import decode_image, to_rgb
from lensforge.errors import BundleError, ImageError
from lensforge.hardware import cpu_count
from lensforge.runtime.bundle import Bundle, load_bundle
from lensforge.runtime.preprocess import preprocess
from lensforge.runtime.results import ClassificationResult

log = logging.getLogger(__name__)

ImageSource = Union[str, os.PathLike, bytes, bytearray, memoryview, Image.Image, np.ndarray]


class Predictor:
    """Load a bundle once, then turn images into :class:`ClassificationResult`.

    bundle: a bundle directory (or an already loaded :class:`Bundle`).
    threads: onnxruntime intra-op threads; default all cores this process may use. Give
        each of several server workers a share so they don't oversubscribe the CPU.
    providers: onnxruntime execution providers, default CPU.

    Images may be paths, encoded bytes, PIL images or HWC uint8 RGB arrays. Paths and bytes
    go through the safe decoder (allow-list, pixel cap, EXIF; large JPEGs decoded at a
    reduced DCT scale, as in training); PIL images and arrays count as already decoded and
    are only converted to RGB. All then get the bundle's preprocessing.
    """

    def __init__(
        self,
        bundle: str | os.PathLike[str] | Bundle,
        *,
        threads: int | None = None,
        providers: Sequence[str] | None = None,
    ) -> None:
        self.bundle = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
        self.spec = self.bundle.input_spec
        self.classes = tuple(self.bundle.classes)
        self.multilabel = self.bundle.task == "multilabel"
        self.thresholds = self.bundle.thresholds
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or cpu_count()
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        try:
            self.session = ort.InferenceSession(
                str(self.bundle.model_path), opts, providers=list(providers or ["CPUExecutionProvider"])
            )
        except Exception as e:  # onnxruntime raises its own Fail/InvalidProtobuf types
            raise BundleError(f"{self.bundle.model_path} could not be loaded by onnxruntime: {str(e).splitlines()[0][:200]}") from None
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        self.input_name, self.output_name = inputs[0].name, outputs[0].name
        n_out = outputs[0].shape[-1]
        if isinstance(n_out, int) and n_out != len(self.classes):
            raise BundleError(f"{self.bundle.path}: the model has {n_out} outputs but the bundle lists {len(self.classes)} classes")

    # -- the three stages, usable one by one (the server batches between them) -------------

    def load(self, source: ImageSource) -> Image.Image:
        """Decode any supported source to an RGB image (safe decoder: caps, allow-list, EXIF)."""
        if isinstance(source, Image.Image):
            try:
                source.load()
            except (OSError, ValueError) as e:
                raise ImageError("corrupt", f"corrupt or truncated image: {type(e).__name__}") from None
            return to_rgb(source)  # the decoder's own mode policy (alpha over white, 16-bit scaled)
        if isinstance(source, np.ndarray):
            if source.ndim != 3 or source.shape[2] != 3 or source.dtype != np.uint8:
                raise ImageError("unreadable", f"arrays must be HxWx3 uint8 RGB, got {source.shape} {source.dtype}")
            return Image.fromarray(source, "RGB")
        return decode_image(source, min_size=self.spec.resize)

    def prepare(self, source: ImageSource) -> np.ndarray:
        """Source → float32 (3, S, S) model input."""
        return preprocess(self.load(source), self.spec)

    def run(self, batch: np.ndarray) -> np.ndarray:
        """float32 (N, 3, S, S) → scores float32 (N, C)."""
        return self.session.run([self.output_name], {self.input_name: np.ascontiguousarray(batch, dtype=np.float32)})[0]

    def result(self, scores: np.ndarray) -> ClassificationResult:
        return ClassificationResult(scores, self.classes, self.multilabel, self.thresholds)

    # -- convenience ----------------------------------------------------------------------

    def predict(self, source: ImageSource) -> ClassificationResult:
        """One image → its result."""
        return self.result(self.run(self.prepare(source)[None])[0])

    def predict_batch(self, sources: Sequence[ImageSource]) -> list[ClassificationResult]:
        """Several images, run as one batch; results in input order."""
        if not sources:
            return []
        scores = self.run(np.stack([self.prepare(s) for s in sources]))
        return [self.result(s) for s in scores]

    def predict_many(
        self, sources: Iterable[ImageSource], batch_size: int = 16, decode_threads: int = 2
    ) -> Iterator[tuple[ImageSource, ClassificationResult | ImageError]]:
        """Stream results over many images (folders, whole splits).

        Decoding runs in a small thread pool (Pillow releases the GIL while decoding) while
        the model runs; an image that fails to decode yields its :class:`ImageError` in
        place of a result instead of stopping the stream. Order is preserved.
        """

        def prep(src: ImageSource) -> np.ndarray | ImageError:
            try:
                return self.prepare(src)
            except ImageError as e:
                return e

        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        with ThreadPoolExecutor(max_workers=max(1, decode_threads)) as pool:
            # the next chunk is submitted before the current one runs, so decoding overlaps inference
            pending: tuple[list[ImageSource], list[Future]] | None = None
            for chunk in _chunks(sources, batch_size):
                submitted = (chunk, [pool.submit(prep, src) for src in chunk])
                if pending is not None:
                    yield from self._run_chunk(pending[0], [f.result() for f in pending[1]])
                pending = submitted
            if pending is not None:
                yield from self._run_chunk(pending[0], [f.result() for f in pending[1]])

    def _run_chunk(
        self, chunk: list[ImageSource], items: list[np.ndarray | ImageError]
    ) -> Iterator[tuple[ImageSource, ClassificationResult | ImageError]]:
        ok = [x for x in items if isinstance(x, np.ndarray)]
        scores = iter(self.run(np.stack(ok))) if ok else iter(())
        for src, item in zip(chunk, items):
            yield src, (item if isinstance(item, ImageError) else self.result(next(scores)))

    def __repr__(self) -> str:
        return f"Predictor({str(self.bundle.path)!r}, task={self.bundle.task}, classes={len(self.classes)})"


def _chunks(items: Iterable[ImageSource], size: int) -> Iterator[list[ImageSource]]:
    chunk: list[ImageSource] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
