"""The one Predictor: a bundle + onnxruntime → results. Used by the CLI, evaluate, the server
and the benchmarks alike."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Union

import numpy as np
import onnxruntime as ort
from PIL import Image

from lensforge.data.image import decode_image, to_rgb
from lensforge.errors import BundleError, ImageError, ProviderError
from lensforge.hardware import cpu_count, cpu_model
from lensforge.runtime.bundle import Bundle, load_bundle
from lensforge.runtime.cache import cache_root
from lensforge.runtime.explain import CamExplainer, Explanation, check_method
from lensforge.runtime.preprocess import DetectSpec, InputSpec
from lensforge.runtime.runners import (
    ClassifierRunner,
    DetectorRunner,
    Result,
    Runner,
    runner_for,
)

__all__ = ["ImageSource", "Predictor", "Result", "resolve_providers"]

log = logging.getLogger(__name__)

ImageSource = Union[str, os.PathLike, bytes, bytearray, memoryview, Image.Image, np.ndarray]

# short names users type → onnxruntime's provider names
PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "dml": "DmlExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "rocm": "ROCMExecutionProvider",
    "migraphx": "MIGraphXExecutionProvider",
}
# which onnxruntime package brings each provider (they replace the plain `onnxruntime` wheel)
INSTALL_HINTS = {
    "CUDAExecutionProvider": "install onnxruntime-gpu (and CUDA/cuDNN) for cuda/tensorrt",
    "TensorrtExecutionProvider": "install onnxruntime-gpu and TensorRT for cuda/tensorrt",
    "OpenVINOExecutionProvider": "install onnxruntime-openvino for openvino",
    "DmlExecutionProvider": "install onnxruntime-directml (Windows) for dml",
    "CoreMLExecutionProvider": "the macOS onnxruntime wheel brings coreml",
    "ROCMExecutionProvider": "install onnxruntime-rocm (AMD GPUs) for rocm",
    "MIGraphXExecutionProvider": "install onnxruntime-migraphx (AMD GPUs) for migraphx",
}
ARENA_SHRINK_OPTION = "memory.enable_memory_arena_shrinkage"  # run option; "cpu:0" shrinks the CPU arena
OPTIMIZATION_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,  # constant folding, redundant nodes
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,  # + fusions (Conv+BN, GELU, attention)
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,  # + layout changes (NCHWc): hardware specific
}


class Predictor:
    """Load a bundle once, then turn images into results: :class:`ClassificationResult` for
    classify / multilabel bundles, :class:`DetectionResult` for detectors.

    bundle: a bundle directory (or an already loaded :class:`Bundle`).
    threads: onnxruntime intra-op threads; default all cores this process may use. Give
        each of several server workers a share so they don't oversubscribe the CPU.
    providers: onnxruntime execution providers in order of preference, by short name
        ("cpu", "cuda", "tensorrt", "openvino", "dml", "coreml", "rocm", "migraphx") or by
        onnxruntime's own name ("CUDAExecutionProvider"); default CPU. One that this
        onnxruntime does not offer raises :class:`ProviderError` naming the ones it does.
    fallback: instead of raising, drop the unavailable providers (logged) and run on the
        rest, CPU last.
    optimization: onnxruntime graph optimisation, "disable" | "basic" | "extended" | "all".
    spin: let onnxruntime's idle threads busy-wait for the next piece of work (its default:
        a little lower latency for one caller alone). Turn it off where other threads of the
        process need the cores between runs: the server's decode pool, or several TorchServe
        workers each with its own session. With it on, 16 clients on 2 cores got 94-101
        req/s from ``lensforge serve`` and 51 from TorchServe's 2 workers; off, 108-111
        and 108 (bench/serve_load.py's model).
    cache_optimized: save the optimised graph on first load (beside the model when the
        bundle directory is writable, else in the user cache) and load it next time; a
        changed model.onnx is optimised again. ``providers`` holds what the session uses.

    Images may be paths, encoded bytes, PIL images or HWC uint8 RGB arrays. Paths and bytes
    go through the safe decoder (allow-list, pixel cap, EXIF; large JPEGs decoded at a
    reduced DCT scale, as in training); PIL images and arrays count as already decoded and
    are only converted to RGB. All then get the bundle's preprocessing.

    Detectors run one image per onnxruntime call (images keep their own sizes); their
    boxes come back in original-image pixels.
    """

    def __init__(
        self,
        bundle: str | os.PathLike[str] | Bundle,
        *,
        threads: int | None = None,
        providers: Sequence[str] | None = None,
        fallback: bool = False,
        optimization: str = "all",
        cache_optimized: bool = False,
        spin: bool = True,
    ) -> None:
        self.bundle = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
        self.task = self.bundle.task
        self.classes = tuple(self.bundle.classes)
        if optimization not in OPTIMIZATION_LEVELS:
            raise ProviderError(
                f"unknown graph optimization {optimization!r}; use one of {', '.join(OPTIMIZATION_LEVELS)}"
            )
        wanted = resolve_providers(providers or ["cpu"], fallback=fallback)
        opts = _session_options(threads or cpu_count(), OPTIMIZATION_LEVELS[optimization], spin)
        self.optimized_path: Path | None = None  # the cached optimised graph this session came from
        self._disabled = disabled_optimizers(self.bundle)
        self.session = self._open(opts, wanted, optimization, cache_optimized)
        self._opts = opts
        self._explainer: CamExplainer | None = None  # explain.onnx's session, opened by the first explain()
        self.providers: list[str] = list(self.session.get_providers())
        failed = [p for p in wanted if p not in self.providers]
        if failed and not fallback:  # e.g. onnxruntime-gpu installed but no CUDA libraries: ORT falls back by itself
            raise ProviderError(
                f"onnxruntime could not start {', '.join(failed)} (it runs on {', '.join(self.providers)}); "
                "check its libraries and drivers, or pass fallback=True (--fallback) to run without it"
            )
        if failed:
            log.warning("execution provider(s) %s did not start; running on %s", ", ".join(failed), ", ".join(self.providers))
        # what differs between the kinds of graph (inputs, batching, results) is the runner's
        self.runner: Runner = runner_for(self.task)(self.bundle, self.session)
        self.input_name = self.runner.input_name
        self.output_name = self.runner.output_names[0]

    # the runner's facts, as the CLI, the server and the exporters read them
    @property
    def detector(self) -> bool:
        return isinstance(self.runner, DetectorRunner)

    @property
    def multilabel(self) -> bool:
        return self.task == "multilabel"

    @property
    def spec(self) -> InputSpec | None:
        """A classifier's preprocessing (None for detectors: see :attr:`detect_spec`)."""
        return self.runner.spec if isinstance(self.runner, ClassifierRunner) else None

    @property
    def detect_spec(self) -> DetectSpec | None:
        """A detector's sizes (None for classifiers)."""
        return self.runner.spec if isinstance(self.runner, DetectorRunner) else None

    @property
    def thresholds(self) -> np.ndarray | None:
        return self.bundle.thresholds

    @property
    def score_threshold(self) -> float:
        return self.bundle.score_threshold

    def _open(self, opts: ort.SessionOptions, providers: list[str], optimization: str, cache: bool) -> ort.InferenceSession:
        """The session, from the cached optimised graph when there is a current one."""
        source = self.bundle.model_path
        if not cache:
            return self._session(str(source), opts, providers)
        target = optimized_model_path(self.bundle, optimization, providers)
        stamp = _stamp(source)
        if target is None:
            log.info("no writable place for the optimised model of %s; not caching it", source)
            return self._session(str(source), opts, providers)
        sidecar = target.with_suffix(".json")
        if target.is_file() and _read_json(sidecar) == stamp:
            load_opts = _copy_options(opts)
            # the saved graph is already optimised: loading it skips that work (the point of the cache)
            load_opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            try:
                session = ort.InferenceSession(str(target), load_opts, providers=providers,
                                               disabled_optimizers=self._disabled)
            except Exception as e:  # noqa: BLE001 - a truncated or foreign file: optimise again
                log.warning("cached optimised model %s could not be loaded (%s); optimising again", target, _first_line(e))
            else:
                self.optimized_path = target
                log.info("loaded the optimised model from %s", target)
                return session
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        save_opts = _copy_options(opts)
        save_opts.optimized_model_filepath = str(tmp)
        try:
            session = ort.InferenceSession(str(source), save_opts, providers=providers,
                                           disabled_optimizers=self._disabled)
            os.replace(tmp, target)
            sidecar.write_text(json.dumps(stamp) + "\n")
        except Exception as e:  # noqa: BLE001 - e.g. compiled nodes (TensorRT, OpenVINO) cannot be serialised
            tmp.unlink(missing_ok=True)
            log.info("the optimised model could not be saved to %s (%s); running without the cache", target, _first_line(e))
            return self._session(str(source), opts, providers)
        self.optimized_path = target
        log.info("saved the optimised model to %s", target)
        return session

    def _session(self, path: str, opts: ort.SessionOptions, providers: list[str]) -> ort.InferenceSession:
        try:
            return ort.InferenceSession(path, opts, providers=providers, disabled_optimizers=self._disabled)
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own Fail/InvalidProtobuf types
            raise BundleError(f"{path} could not be loaded by onnxruntime: {_first_line(e)}") from None

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
        return decode_image(source, min_size=self.runner.decode_size)

    def prepare(self, source: ImageSource) -> Any:
        """Source → model input: classifiers float32 (3, S, S); detectors a
        :class:`~lensforge.runtime.runners.DetectorInput` (float32 (3, h, w) in [0, 1] and the
        original (width, height), to map boxes back)."""
        return self.runner.prepare(self.load(source))

    def run(self, batch: np.ndarray) -> np.ndarray:
        """Classifiers: float32 (N, 3, S, S) → scores float32 (N, C)."""
        if not isinstance(self.runner, ClassifierRunner):
            raise TypeError("run() is for classifiers; detectors use run_detector() per image")
        return self.runner.run(batch)

    def run_detector(self, x: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Detectors: float32 (3, h, w) in [0, 1] (or a prepared input) → boxes float32 (K, 4)
        xyxy in the input's pixels, scores float32 (K,), class ids int64 (K,)."""
        if not isinstance(self.runner, DetectorRunner):
            raise TypeError("run_detector() is for detectors; classifiers use run()")
        return self.runner.run_one(x)

    def run_many(self, items: Sequence[Any]) -> list[object]:
        """Prepared inputs → raw outputs, one per item, in order: one batched call for
        classifiers, one call per image for detectors. What the server's batcher calls."""
        return self.runner.run_many(items) if items else []

    def result(self, output: object, prepared: Any = None) -> Result:
        """Raw output of one item (from :meth:`run_many`) → its result. Detectors need the
        ``prepared`` input it came from, to map boxes back to original pixels."""
        if prepared is None and self.detector:
            raise TypeError("a detector's result() needs the prepared input the output came from")
        return self.runner.result(output, prepared)

    def release_memory(self) -> None:
        """Hand back onnxruntime's CPU arena: one run of an all-zero input of the model's
        smallest size with the ``memory.enable_memory_arena_shrinkage`` run option, after which
        the arena frees every region no tensor uses (it otherwise keeps the largest batch's
        activations for good). Costs one small inference; the next large batch regrows the
        arena. Call it where this model's batches run (the server's idle trim does), so it
        never competes with one."""
        side = self.detect_spec.min_size if self.detect_spec is not None else self.spec.size  # type: ignore[union-attr]
        options = ort.RunOptions()
        options.add_run_config_entry(ARENA_SHRINK_OPTION, "cpu:0")
        self.session.run(None, {self.input_name: np.zeros((1, 3, side, side), np.float32)}, options)

    # -- convenience ----------------------------------------------------------------------

    def predict(self, source: ImageSource) -> Result:
        """One image → its result."""
        return self.predict_batch([source])[0]

    def predict_batch(self, sources: Sequence[ImageSource]) -> list[Result]:
        """Several images, run as one batch (classifiers) or one by one (detectors); results
        in input order."""
        items = [self.prepare(s) for s in sources]
        return [self.result(out, x) for out, x in zip(self.run_many(items), items)]

    def predict_many(
        self, sources: Iterable[ImageSource], batch_size: int = 16, decode_threads: int = 2
    ) -> Iterator[tuple[ImageSource, Result | ImageError]]:
        """Stream results over many images (folders, whole splits).

        Decoding runs in a small thread pool (Pillow releases the GIL while decoding) while
        the model runs; an image that fails to decode yields its :class:`ImageError` in
        place of a result instead of stopping the stream. Order is preserved.
        """

        def prep(src: ImageSource) -> Any:
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
        self, chunk: list[ImageSource], items: list[Any]
    ) -> Iterator[tuple[ImageSource, Result | ImageError]]:
        ok = [x for x in items if not isinstance(x, ImageError)]
        outputs = iter(self.run_many(ok))
        for src, item in zip(chunk, items):
            yield src, (item if isinstance(item, ImageError) else self.result(next(outputs), item))

    # -- explanations (classifiers with an explain graph: see lensforge.runtime.explain) -------

    def explain(self, source: ImageSource, label: str | int | None = None) -> Explanation:
        """Why the model scores ``label`` (default: its top label) for this image: the exact
        class activation map (CNNs) or the CLS attention averaged over heads (ViTs) from the
        bundle's ``explain.onnx``, float32 (H, W) in [0, 1] at the
        image's resolution. A bundle without the graph raises BundleError saying how to add it."""
        return self.explain_labels(source, None if label is None else [label])[0]

    def explain_labels(self, source: ImageSource, labels: Sequence[str | int] | None = None, k: int = 1,
                       method: str = "auto", heads: bool = False) -> list[Explanation]:
        """Explanations of ``labels`` (names or indices; default the top ``k``) from one run of
        the explain graph. ``method``: "auto", "cam" (CNNs), "attention" or "rollout" (ViTs; the
        others need torch). ``heads``: with attention, each label's map is followed by one per head."""
        check_method(method)
        if self._explainer is None:
            self._explainer = CamExplainer(self.bundle, lambda path: self._session(path, self._opts, self.providers))
        return self._explainer.explain(self.load(source), labels, k, method=method, heads=heads)

    def __repr__(self) -> str:
        return (f"Predictor({str(self.bundle.path)!r}, task={self.bundle.task}, classes={len(self.classes)}, "
                f"providers={self.providers})")


def resolve_providers(names: Sequence[str], *, fallback: bool = False) -> list[str]:
    """Short or onnxruntime provider names → onnxruntime names this install offers, in order.

    An unknown name always raises :class:`ProviderError` (a typo is not a fallback case). A
    known one that this onnxruntime lacks raises too, naming what it offers and what to
    install, unless ``fallback``: then it is dropped (logged) and CPU is kept last.
    """
    available = ort.get_available_providers()
    known = set(ort.get_all_providers()) | set(PROVIDERS.values())
    offers = f"onnxruntime {ort.__version__} here offers: {', '.join(available)}"
    wanted: list[str] = []
    for name in names:
        full = PROVIDERS.get(str(name).lower(), name)
        if full not in known:
            short = ", ".join(PROVIDERS)
            raise ProviderError(f"unknown execution provider {name!r}; use one of {short} (or an onnxruntime name); {offers}")
        if full not in wanted:
            wanted.append(full)
    missing = [p for p in wanted if p not in available]
    if missing and not fallback:
        hints = sorted({INSTALL_HINTS[p] for p in missing if p in INSTALL_HINTS})
        raise ProviderError(
            f"execution provider {', '.join(missing)} is not available; {offers}"
            + (f"; {'; '.join(hints)}" if hints else "")
            + " (or pass fallback=True / --fallback to run on what is available)"
        )
    if missing:
        log.warning("execution provider(s) %s not available here; dropped (%s)", ", ".join(missing), offers)
    kept = [p for p in wanted if p in available]
    if "CPUExecutionProvider" not in kept:
        kept.append("CPUExecutionProvider")
    return kept


def optimized_model_path(bundle: Bundle, optimization: str, providers: Sequence[str]) -> Path | None:
    """Where the optimised graph for this level and these providers is cached.

    ``<bundle>/model.<level>.<key>.ort.onnx`` when the bundle directory is writable, else under
    the user cache ($LENSFORGE_CACHE, else ~/.cache/lensforge); None when neither is. The key
    covers the providers, onnxruntime's version and the CPU (level "all" bakes in a layout
    chosen for this hardware), so a different setup never loads another's graph.
    """
    key_text = "|".join([*providers, ort.__version__, platform.machine(), cpu_model()])
    key = hashlib.sha256(key_text.encode()).hexdigest()[:12]
    stem = bundle.model_path.name.removesuffix(".onnx")
    name = f"{stem}.{optimization}.{key}.ort.onnx"
    if os.access(bundle.model_path.parent, os.W_OK):
        return bundle.model_path.parent / name
    root = cache_root()
    where = hashlib.sha256(str(bundle.model_path.resolve()).encode()).hexdigest()[:16]
    directory = Path(root) / "optimized" / where
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    return directory / name if os.access(directory, os.W_OK) else None


def _stamp(source: Path) -> dict[str, object]:
    """What identifies the source model the cached graph was made from: a rewrite changes it."""
    st = source.stat()
    return {"source": source.name, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "onnxruntime": ort.__version__}


def _read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def disabled_optimizers(bundle: Bundle) -> list[str]:
    """ORT graph optimisers to leave out for ``bundle``'s model.

    int8 bundles: ``QDQPropagationTransformer``, which moves a QuantizeLinear up through
    max-pools and reshapes. The int8 export keeps a ResNet's stem convolution and its max-pool
    float and quantises after the pool; propagated, the pool ran on uint8 in NCHW (ORT's slow
    path) and the stem left the blocked NCHWc layout for it. ResNet-50 int8, 224 px, batch 8,
    2 threads on an AVX-512 VNNI EPYC: 310 → 287 ms, outputs identical (max-pooling commutes
    with the monotonic quantiser); EfficientNet-Lite0 int8 (no pool there): unchanged.
    """
    return ["QDQPropagationTransformer"] if bundle.meta.get("precision") == "int8" else []


SPIN_OPTION = "session.intra_op.allow_spinning"  # session config entry, "1" (onnxruntime's default) or "0"


def _session_options(threads: int, level: ort.GraphOptimizationLevel, spin: bool) -> ort.SessionOptions:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = level
    opts.add_session_config_entry(SPIN_OPTION, "1" if spin else "0")
    return opts


def _copy_options(opts: ort.SessionOptions) -> ort.SessionOptions:
    return _session_options(opts.intra_op_num_threads, opts.graph_optimization_level,
                            opts.get_session_config_entry(SPIN_OPTION) != "0")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__


def _chunks(items: Iterable[ImageSource], size: int) -> Iterator[list[ImageSource]]:
    chunk: list[ImageSource] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
