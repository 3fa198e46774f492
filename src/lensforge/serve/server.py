"""The state behind one app: its :class:`Settings`, its :class:`Model` s and the :class:`Server`
that loads them, decodes images in a bounded pool and runs them through each model's batcher.

The dialects (:mod:`.seed`, :mod:`.torchserve`, :mod:`.native`, :mod:`.health`, :mod:`.kserve`,
:mod:`.web`) hold the handlers and only call the Server's methods; :mod:`.app` assembles
their routes. Counters (images being decoded, request activity, draining) change only
through the Server's own methods.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from PIL import Image
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response

from lensforge.data.image import DEFAULT_MAX_ASPECT
from lensforge.errors import ConfigError, ImageError, RequestError
from lensforge.runtime import Bundle, DetectionResult, Predictor
from lensforge.runtime.bundle import EXPLAIN_FILE
from lensforge.runtime.predictor import Result
from lensforge.serve import inputs, memory
from lensforge.serve.batching import Batcher, unavailable
from lensforge.serve.dialects import error_response
from lensforge.serve.metrics import ServerMetrics
from lensforge.serve.signals import DRAIN_S, drain_on_signal

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_MAX_BODY = 20 * 1024 * 1024  # 20 MB: a large phone JPEG is ~10 MB
# Longest side / shortest side the server accepts: the one decoder's cap, checked from the header
# before decoding in every path (a 65535x1 PNG of a few hundred bytes would otherwise be resized
# into a 350-megapixel image); 100:1 leaves room for panoramas and long screenshots.
MAX_ASPECT = DEFAULT_MAX_ASPECT


@dataclass(frozen=True)
class DetectionFilter:
    """Which detections every answer keeps (``serve --conf --iou --classes --max-det
    --agnostic-nms``), applied by :meth:`DetectionResult.filtered` to each detector's result
    before any dialect formats it. None fields: that step is off (conf: the bundle's tuned
    threshold, as without a filter)."""

    conf: float | None = None
    iou: float | None = None
    classes: tuple[str, ...] | None = None
    max_det: int | None = None
    agnostic: bool = False

    def given(self) -> list[str]:
        """The options set, as the command line spells them."""
        flags = {"--conf": self.conf, "--iou": self.iou, "--classes": self.classes, "--max-det": self.max_det,
                 "--agnostic-nms": self.agnostic or None}
        return [flag for flag, value in flags.items() if value is not None]

    def __call__(self, result: DetectionResult) -> DetectionResult:
        return result.filtered(conf=self.conf, iou=self.iou, classes=self.classes, max_det=self.max_det,
                               agnostic=self.agnostic)

    def check(self, name: str, bundle: Bundle) -> None:
        """Bad values for this detector (unknown class, conf out of range): one ConfigError naming the model."""
        empty = DetectionResult(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64),
                                tuple(bundle.classes), bundle.score_threshold)
        try:
            self(empty)
        except ValueError as e:
            raise ConfigError(f"model {name!r}: {e}") from None


@dataclass
class Settings:
    """The limits and options of one app (``create_app``'s keyword arguments, resolved)."""

    max_batch: int = 16
    max_wait_ms: float = 5
    max_queue: int = 64
    max_body_bytes: int = DEFAULT_MAX_BODY
    timeout_s: float = 10
    threads: int | None = None  # onnxruntime intra-op threads per model; None: all cores
    top_k: int = 5
    local_roots: tuple[Path, ...] = ()  # seed local_url: resolved --allow-local-root dirs; empty = off
    allow_remote: bool = False  # seed remote_url (SSRF guards in serve/fetch.py)
    max_inflight: int = 128  # requests inside the app at once (serve/admission.py); health is exempt
    drain_s: float = DRAIN_S  # after SIGTERM: how long the port stays open while draining
    detections: DetectionFilter | None = None  # None: each bundle's tuned threshold, nothing else

    def __post_init__(self) -> None:
        if (self.max_body_bytes < 1 or self.timeout_s <= 0 or self.top_k < 1 or self.max_batch < 1
                or self.max_queue < 1 or self.max_wait_ms < 0 or self.max_inflight < 1 or self.drain_s < 0):
            raise ConfigError("max_body_bytes, timeout_s, top_k, max_batch, max_queue and max_inflight must be "
                              "positive, max_wait_ms and drain_s >= 0")


@dataclass
class Model:
    """One served bundle: its Predictor and batcher once loaded."""

    name: str
    bundle: Bundle
    predictor: Predictor | None = None
    batcher: Batcher | None = None
    executor: ThreadPoolExecutor | None = field(default=None, repr=False)
    ready: bool = False

    @property
    def input_size(self) -> str:
        """What the model sees, for people: ``224x224`` or a detector's ``512-853 px`` (shorter-longer side)."""
        if self.bundle.task == "detect":
            spec = self.bundle.detect_spec
            return f"{spec.min_size}-{spec.max_size} px"
        size = self.bundle.input_spec.size
        return f"{size}x{size}"

    def check_explainable(self) -> None:
        """For ``/explain``: a detector (422) or a bundle without ``explain.onnx`` (409), one line
        without paths; checked from the metadata, before any body is read."""
        bundle = self.bundle
        if bundle.task == "detect":
            raise RequestError(422, "not_explainable", f"model {self.name!r} is a detector; /explain explains "
                                                       "classifiers (use /annotate to see its boxes)")
        info = bundle.meta.get("explain")
        file = info.get("file", EXPLAIN_FILE) if isinstance(info, dict) else EXPLAIN_FILE
        if not isinstance(info, dict) or not (bundle.path / str(file)).is_file():
            raise RequestError(409, "no_explain_graph",
                               f"model {self.name!r} has no explain graph (its bundle was made before lensforge could "
                               "explain, or its head is not pooling + linear); add it with: "
                               "lensforge export BUNDLE --to explain")

    @property
    def explainable(self) -> bool:
        """Whether ``/explain`` serves this model (the web page shows its heat-map toggle)."""
        try:
            self.check_explainable()
        except RequestError:
            return False
        return True


class Server:
    """State and shared steps behind one app; the dialects' handlers call its methods."""

    def __init__(self, models: dict[str, Model], settings: Settings) -> None:
        if not models:
            raise ConfigError("no bundle to serve; pass at least one bundle directory")
        self.models, self.settings = models, settings
        self.default = next(iter(models))
        self.metrics = ServerMetrics()
        self.decode_pool: ThreadPoolExecutor | None = None
        self.max_decoding = settings.max_queue * max(1, len(models))
        self._decoding = 0  # images in or waiting for the decode pool
        self._draining = False  # not ready, new requests 503, accepted ones finish
        self._activity = 0  # starts and ends of requests past health/metrics; the memory trim watches it
        self._inflight = 0  # requests past health/metrics not yet answered (admission caps them, batchers wait for them)
        self._loader: asyncio.Task | None = None
        if settings.detections is not None:
            self._check_detections(settings.detections)

    def _check_detections(self, detections: DetectionFilter) -> None:
        detectors = {n: m for n, m in self.models.items() if m.bundle.task == "detect"}
        if not detectors:
            tasks = ", ".join(f"{n}: {m.bundle.task}" for n, m in self.models.items())
            raise ConfigError(f"{', '.join(detections.given())} filter detections, but no bundle served is a "
                              f"detector ({tasks}); drop them or serve a detector bundle")
        for name, model in detectors.items():
            detections.check(name, model.bundle)

    # -- state, read by the handlers and changed only here ------------------------------------

    @property
    def draining(self) -> bool:
        return self._draining

    @property
    def decoding(self) -> int:
        """Images in or waiting for the decode pool."""
        return self._decoding

    @property
    def activity(self) -> int:
        """Starts and ends of requests so far (the idle memory trim watches it move)."""
        return self._activity

    @property
    def inflight(self) -> int:
        """Requests past health/metrics not yet answered (one event loop: no lock needed)."""
        return self._inflight

    def start_draining(self) -> bool:
        """Stop being ready and refuse new requests (503); False when already draining."""
        first, self._draining = not self._draining, True
        return first

    def request_started(self) -> None:
        self._activity += 1
        self._inflight += 1

    def request_ended(self) -> None:
        self._activity += 1
        self._inflight -= 1

    def ready(self) -> bool:
        """Every model loaded and warmed up, and not shutting down (``/readyz``, KServe ready)."""
        return not self._draining and all(m.ready for m in self.models.values())

    # -- lifecycle ------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        self.decode_pool = ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1), thread_name_prefix="decode")
        loop = asyncio.get_running_loop()
        self._loader = loop.create_task(self._load_all())
        # O15: RSS back to its warmed-up level once a burst of load is over
        trimmer = loop.create_task(memory.trim_when_idle(lambda: self._activity, self._release_model_memory))
        undo_signals = drain_on_signal(self.start_draining, self.settings.drain_s)
        try:
            yield
        finally:
            undo_signals()
            self._draining = True
            self._loader.cancel()
            trimmer.cancel()
            await asyncio.gather(self._loader, trimmer, return_exceptions=True)
            for model in self.models.values():
                model.ready = False
                if model.batcher is not None:
                    await model.batcher.stop()
                if model.executor is not None:
                    model.executor.shutdown(wait=False, cancel_futures=True)
            self.decode_pool.shutdown(wait=False, cancel_futures=True)  # never block the loop at exit

    async def _load_all(self) -> None:
        loop = asyncio.get_running_loop()
        for model in self.models.values():
            started = time.perf_counter()
            model.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"infer-{model.name}")
            try:
                model.predictor = await loop.run_in_executor(model.executor, self._load, model.bundle)
            except Exception:
                log.exception("model %s (%s) could not be loaded; it will answer 503", model.name, model.bundle.path)
                continue
            s = self.settings
            model.batcher = Batcher(
                model.predictor.run_many, model.executor, max_batch=s.max_batch, max_wait_ms=s.max_wait_ms,
                max_queue=s.max_queue, on_batch=self.metrics.batch_size.labels(model.name).observe,
                in_flight=lambda: self.inflight,
            )
            model.batcher.start()
            self.metrics.watch_queue(model.name, lambda b=model.batcher: b.depth)
            self.metrics.load_seconds.labels(model.name).set(time.perf_counter() - started)
            model.ready = True
            log.info("model %s ready (%.2f s)", model.name, time.perf_counter() - started)
        await memory.release()  # what loading and warm-up freed: the baseline RSS starts low

    def _load(self, bundle: Bundle) -> Predictor:
        # no spinning: between batches the decode pool needs the cores onnxruntime's idle
        # threads would busy-wait on (16 clients, 2 cores: +10-15 % req/s, bench/serve_load.py)
        predictor = Predictor(bundle, threads=self.settings.threads, spin=False)
        predictor.run_many([smallest_input(predictor)])  # warm-up: first run allocates
        return predictor

    async def _release_model_memory(self) -> None:
        """Each loaded model's onnxruntime arena down to what is in use (:mod:`.memory`), in the
        model's inference thread so it never competes with a batch."""
        loop = asyncio.get_running_loop()
        for model in self.models.values():
            if model.ready and model.predictor is not None:
                await loop.run_in_executor(model.executor, model.predictor.release_memory)

    # -- the steps every dialect shares ---------------------------------------------------------

    def endpoint(self, route: str, dialect: str, handler: Callable[[Request], Awaitable[Response]]
                 ) -> Callable[[Request], Awaitable[Response]]:
        """Wrap a handler: errors in ``dialect``'s shape, 500s generic and logged, metrics."""

        async def wrapped(request: Request) -> Response:
            started = time.perf_counter()
            try:
                response = await handler(request)
            except RequestError as e:
                response = error_response(dialect, e.status, e.code, str(e))
            except Exception:
                log.exception("unexpected error on %s %s", request.method, route)
                response = error_response(dialect, 500, "internal", "inference failed")
            self.metrics.observe_request(route, response.status_code, time.perf_counter() - started)
            return response

        return wrapped

    def model(self, name: str | None) -> Model:
        """The named (default: the first) model, ready: 404 unknown, 503 loading or draining."""
        model = self.models.get(name or self.default)
        if model is None:
            raise RequestError(404, "unknown_model", f"Request for unknown model: {str(name)[:100]!r} is not found")
        if self._draining:
            raise unavailable("server is shutting down")
        if not model.ready:
            raise unavailable(f"model {model.name!r} is not ready")
        return model

    async def decode(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in the decode pool, counted against :attr:`max_decoding` (503 beyond it)."""
        if self._decoding >= self.max_decoding:
            raise unavailable("server busy: too many images being decoded")
        self._decoding += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self.decode_pool, fn, *args)
        finally:
            self._decoding -= 1

    async def infer(self, model: Model, data: bytes, unpack: Callable[[bytes], bytes] | None = None) -> Result:
        """Encoded image → result: decode in the pool, then through the model's batcher.

        unpack: body → image bytes (a seed JSON body's base64), run in the same trip to the
        pool as the decode: each trip is a hand-off to a thread and back to the event loop."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.timeout_s
        if model.predictor is None or model.batcher is None:
            raise unavailable(f"model {model.name!r} is not ready")
        x = await self.decode_request_image(prepare_image, model.predictor, data, unpack)
        if loop.time() >= deadline:
            raise unavailable("deadline exceeded while decoding")
        output = await model.batcher.submit(x, deadline)
        return self.result(model, output, x)

    async def decode_request_image(self, fn: Callable[..., T], *args: Any) -> T:
        """:meth:`decode`, with the decoder's ImageError as the request's 4xx (400/413/415)."""
        try:
            return await self.decode(fn, *args)
        except ImageError as e:
            message = str(e)
            if e.code == "unsupported_format" and "unsupported" not in message:
                message = f"unsupported image format: {message}"  # RELIABILITY.md I2's wording
            raise RequestError(e.http_status, e.code, message) from None

    def result(self, model: Model, output: object, x: Any) -> Result:
        """A batcher output → the answer's result, with the server's detection filter applied."""
        result = model.predictor.result(output, x)  # type: ignore[union-attr]
        detections = self.settings.detections
        if detections is not None and isinstance(result, DetectionResult):
            result = detections(result)
        return result

    async def image_from(self, request: Request, fields: tuple[str, ...]) -> bytes:
        """The image bytes of a raw-body or multipart request (one of ``fields``), within the body cap."""
        body = await self.read_body(request)
        if inputs.is_multipart(request):
            return await inputs.form_file(request, body, fields, self.settings.max_body_bytes)
        return body

    async def read_body(self, request: Request) -> bytes:
        """The whole body within the body cap (413) and the request deadline."""
        return await inputs.read_body(request, self.settings.max_body_bytes, self.settings.timeout_s)


def smallest_input(predictor: Predictor) -> np.ndarray:
    """A prepared all-zero input of the model's smallest size, float32 (3, S, S) (the warm-up run)."""
    side = predictor.detect_spec.min_size if predictor.detect_spec is not None else predictor.spec.size
    return np.zeros((3, side, side), np.float32)


def decoded_image(predictor: Predictor, data: bytes) -> Image.Image:
    """Encoded image → the decoded RGB image (runs in the decode pool) after the decoder's checks:
    format allow-list, pixel cap and :data:`MAX_ASPECT`, all from the header (RELIABILITY.md I4, I5)."""
    return predictor.load(data)


def prepare_image(predictor: Predictor, data: bytes, unpack: Callable[[bytes], bytes] | None = None) -> np.ndarray:
    """Encoded image (``unpack(data)`` when given) → the model input (runs in the decode pool),
    after :func:`decoded_image`'s checks."""
    if unpack is not None:
        data = unpack(data)
    return predictor.prepare(decoded_image(predictor, data))  # a decoded image: no second decode
