"""The lensforge HTTP app: several bundles, one port, several dialects around one Predictor.

Routes (each dialect keeps its own error shape, see RELIABILITY.md):

- seed ``POST /predict``, ``/predict/{model}``, ``?model=``: JSON (also double-encoded) with
  ``raw_file`` base64 (``local_url`` / ``remote_url`` when enabled, see :mod:`.fetch`),
  multipart ``file`` or a raw image body → ``{"preds": ..., "status": "Success"}``; errors
  ``{"status": "Error", "error"}``.
- TorchServe: ``GET /ping``, ``POST|PUT /predictions/{model}`` (raw body or multipart
  ``data``/``body``) → its image-classifier or object-detector answer; ``GET /models``,
  ``GET /models/{name}``; errors ``{"code", "type", "message"}``.
- native: ``POST /v1/models/{name}/predict`` (multipart ``file`` or raw body) → the result's
  ``to_dict()`` + ``latency_ms``; errors ``{"error": {"code", "message"}}``.
- KServe v2 / Triton HTTP (``/v2/...``, :mod:`.kserve`); ``/annotate``, ``/docs``,
  ``/openapi.json`` and the web page at ``/`` (:mod:`.web`).
- ``/healthz`` (live), ``/readyz`` (every model loaded and warmed up), ``/metrics`` (Prometheus).

Decoding and preprocessing run in a thread pool, inference in one thread per model behind a
:class:`~lensforge.serve.batching.Batcher`; the event loop only moves bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from lensforge.errors import ConfigError, ImageError, RequestError
from lensforge.export.torchserve_handler import torchserve_answer  # the one TorchServe answer format (no torch)
from lensforge.runtime import Bundle, DetectionResult, Predictor, load_bundle
from lensforge.runtime.predictor import Result
from lensforge.runtime.bundle import display_name
from lensforge.serve import fetch, inputs, kserve, lifecycle, memory, web
from lensforge.serve.admission import Admission
from lensforge.serve.batching import RETRY_AFTER_S, Batcher, unavailable
from lensforge.serve.dialects import error_response
from lensforge.serve.metrics import ServerMetrics

log = logging.getLogger(__name__)

DEFAULT_MAX_BODY = 20 * 1024 * 1024  # 20 MB: a large phone JPEG is ~10 MB
# Longest side / shortest side the server accepts. A classifier resizes the shorter side up to
# its input size, so a 65535x1 PNG (a few hundred bytes) would become a 350-megapixel image
# (1 GB, seconds of CPU); 100:1 leaves room for panoramas and long screenshots.
MAX_ASPECT = 100


@dataclass
class Model:
    """One served bundle: its Predictor and batcher once loaded."""

    name: str
    bundle: Bundle
    predictor: Predictor | None = None
    batcher: Batcher | None = None
    executor: ThreadPoolExecutor | None = field(default=None, repr=False)
    ready: bool = False


@dataclass
class Settings:
    max_batch: int = 16
    max_wait_ms: float = 5
    max_queue: int = 64
    max_body_bytes: int = DEFAULT_MAX_BODY
    timeout_s: float = 10
    threads: int | None = None
    top_k: int = 5
    local_roots: tuple[Path, ...] = ()  # seed local_url: resolved --allow-local-root dirs; empty = off
    allow_remote: bool = False  # seed remote_url (SSRF guards in serve/fetch.py)
    max_inflight: int = 128  # requests inside the app at once (serve/admission.py); health is exempt


def create_app(
    bundles: Sequence[str | os.PathLike[str]] | Mapping[str, str | os.PathLike[str]],
    *,
    max_batch: int = 16,
    max_wait_ms: float = 5,
    max_queue: int = 64,
    max_body_bytes: int = DEFAULT_MAX_BODY,
    timeout_s: float = 10,
    threads: int | None = None,
    top_k: int = 5,
    local_roots: Sequence[str | os.PathLike[str]] = (),
    allow_remote: bool = False,
    max_inflight: int | None = None,
) -> Starlette:
    """The ASGI app serving ``bundles`` (the first is the default model).

    bundles: bundle directories, named by :func:`lensforge.runtime.bundle.display_name`, or a ``{name: directory}`` map.
    max_batch / max_wait_ms: dynamic batching per model. max_queue: inputs that may wait per
    model (and images being decoded at once); more are refused with 503 + Retry-After.
    max_body_bytes: request body cap (413 above it). timeout_s: per-request deadline; a
    request still queued when it passes gets 503 and is not run. threads: onnxruntime
    intra-op threads per model (default: all cores). top_k: labels in seed answers.
    local_roots: directories whose files seed ``local_url`` may name (default none: 403);
    each must exist (:class:`~lensforge.errors.ConfigError`). allow_remote: let seed
    ``remote_url`` fetch public http(s) URLs (default off: 403). See :mod:`lensforge.serve.fetch`.
    max_inflight: requests inside the app at once; one more gets 503 + Retry-After in its
    dialect before its body is read, health and metrics never (:mod:`lensforge.serve.admission`).
    Default ``2 x max_queue`` per model: room for one queue of images being read and decoded
    and one waiting for the model; any more would be refused by those queues after costing
    a body read and a decode.

    Bundle metadata is checked now (a :class:`~lensforge.errors.BundleError` names the bad
    one); the onnxruntime sessions load and warm up in the background after startup, while
    ``/healthz`` already answers and ``/readyz`` says 503.
    """
    if not bundles:
        raise ConfigError("no bundle to serve; pass at least one bundle directory")
    if max_inflight is None:
        max_inflight = 2 * max_queue * len(bundles)
    if (max_body_bytes < 1 or timeout_s <= 0 or top_k < 1 or max_batch < 1 or max_queue < 1 or max_wait_ms < 0
            or max_inflight < 1):
        raise ConfigError("max_body_bytes, timeout_s, top_k, max_batch, max_queue and max_inflight must be positive, "
                          "max_wait_ms >= 0")
    settings = Settings(max_batch, max_wait_ms, max_queue, max_body_bytes, timeout_s, threads, top_k,
                        local_roots=fetch.resolve_roots(local_roots), allow_remote=allow_remote,
                        max_inflight=max_inflight)
    named = bundles.items() if isinstance(bundles, Mapping) else [(display_name(Path(b)), b) for b in bundles]
    models: dict[str, Model] = {}
    for name, path in named:
        if name in models:
            raise ConfigError(f"two bundles are named {name!r}; give them distinct names ({{name: path}})")
        models[name] = Model(name, load_bundle(path))
    server = Server(models, settings)
    routes = [
        Route("/predict", server.endpoint("/predict", "seed", server.seed_predict), methods=["POST"]),
        Route("/predict/{model}", server.endpoint("/predict/{model}", "seed", server.seed_predict), methods=["POST"]),
        Route("/ping", server.ping, methods=["GET"]),
        Route("/predictions/{model}", server.endpoint("/predictions/{model}", "torchserve", server.ts_predict),
              methods=["POST", "PUT"]),
        Route("/models", server.endpoint("/models", "torchserve", server.ts_models), methods=["GET"]),
        Route("/models/{model}", server.endpoint("/models/{model}", "torchserve", server.ts_model), methods=["GET"]),
        Route("/v1/models/{model}/predict",
              server.endpoint("/v1/models/{model}/predict", "native", server.native_predict), methods=["POST"]),
        Route("/healthz", server.healthz, methods=["GET"]),
        Route("/readyz", server.readyz, methods=["GET"]),
        Route("/metrics", server.metrics_route, methods=["GET"]),
        *kserve.routes(server),  # KServe v2 / Triton HTTP
        *web.routes(server),  # /annotate, the web page at /, /docs and /openapi.json
    ]
    app = Starlette(routes=routes, lifespan=server.lifespan)
    app.add_middleware(Admission, server=server, limit=settings.max_inflight)
    app.state.server = server
    return app


class Server:
    """State and handlers behind one app."""

    def __init__(self, models: dict[str, Model], settings: Settings) -> None:
        self.models, self.settings = models, settings
        self.default = next(iter(models))
        self.metrics = ServerMetrics()
        self.decode_pool: ThreadPoolExecutor | None = None
        self.decoding = 0  # images in or waiting for the decode pool
        self.max_decoding = settings.max_queue * max(1, len(models))
        self._loader: asyncio.Task | None = None
        self.draining = False  # set on SIGTERM/SIGINT: not ready, new requests 503, accepted ones finish
        self.drain_s = lifecycle.DRAIN_S  # how long the port stays open once draining
        self.activity = 0  # starts and ends of requests past health/metrics (Admission); the memory trim watches it

    def ready(self) -> bool:
        """Every model loaded and warmed up, and not shutting down (``/readyz``, KServe ready)."""
        return not self.draining and all(m.ready for m in self.models.values())

    # -- lifecycle ------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        self.decode_pool = ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1), thread_name_prefix="decode")
        loop = asyncio.get_running_loop()
        self._loader = loop.create_task(self._load_all())
        # O15: RSS back to its warmed-up level once a burst of load is over
        trimmer = loop.create_task(memory.trim_when_idle(lambda: self.activity, self._shrink_arenas))
        undo_signals = lifecycle.drain_on_signal(self, self.drain_s)
        try:
            yield
        finally:
            undo_signals()
            self.draining = True
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
            )
            model.batcher.start()
            self.metrics.watch_queue(model.name, lambda b=model.batcher: b.depth)
            self.metrics.load_seconds.labels(model.name).set(time.perf_counter() - started)
            model.ready = True
            log.info("model %s ready (%.2f s)", model.name, time.perf_counter() - started)
        await memory.release()  # what loading and warm-up freed: the baseline RSS starts low

    def _load(self, bundle: Bundle) -> Predictor:
        predictor = Predictor(bundle, threads=self.settings.threads)
        predictor.run_many([smallest_input(predictor)])  # warm-up: first run allocates
        return predictor

    async def _shrink_arenas(self) -> None:
        """Each loaded model's onnxruntime arena down to what is in use (:mod:`.memory`)."""
        loop = asyncio.get_running_loop()
        for model in self.models.values():
            if model.ready and model.predictor is not None:
                await loop.run_in_executor(model.executor, memory.shrink_arena, model.predictor,
                                           smallest_input(model.predictor))

    # -- plumbing -------------------------------------------------------------------------

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
        model = self.models.get(name or self.default)
        if model is None:
            raise RequestError(404, "unknown_model", f"Request for unknown model: {str(name)[:100]!r} is not found")
        if self.draining:
            raise unavailable("server is shutting down")
        if not model.ready:
            raise unavailable(f"model {model.name!r} is not ready")
        return model

    async def infer(self, model: Model, data: bytes) -> Result:
        """Encoded image → result: decode in the pool, then through the model's batcher."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.timeout_s
        if model.predictor is None or model.batcher is None:
            raise unavailable(f"model {model.name!r} is not ready")
        if self.decoding >= self.max_decoding:
            raise unavailable("server busy: too many images being decoded")
        self.decoding += 1
        try:
            x = await loop.run_in_executor(self.decode_pool, prepare_image, model.predictor, data)
        except ImageError as e:
            message = str(e)
            if e.code == "unsupported_format" and "unsupported" not in message:
                message = f"unsupported image format: {message}"  # RELIABILITY.md I2's wording
            raise RequestError(e.http_status, e.code, message) from None
        finally:
            self.decoding -= 1
        if loop.time() >= deadline:
            raise unavailable("deadline exceeded while decoding")
        output = await model.batcher.submit(x, deadline)
        return model.predictor.result(output, x)

    async def image_from(self, request: Request, fields: tuple[str, ...]) -> bytes:
        cap = self.settings.max_body_bytes
        body = await inputs.read_body(request, cap, self.settings.timeout_s)
        if inputs.is_multipart(request):
            return await inputs.form_file(request, body, fields, cap)
        return body

    # -- seed ------------------------------------------------------------------------------

    async def seed_predict(self, request: Request) -> Response:
        model = self.model(request.path_params.get("model") or request.query_params.get("model"))
        cap = self.settings.max_body_bytes
        body = await inputs.read_body(request, cap, self.settings.timeout_s)
        if inputs.is_multipart(request):
            data = await inputs.form_file(request, body, ("file",), cap)
        elif inputs.is_json(request):
            # up to max_body_bytes of JSON and base64: parsed in the pool, never on the event loop
            s = self.settings
            data = await inputs.seed_data(body, cap, self.decode_pool, local_roots=s.local_roots,
                                          allow_remote=s.allow_remote, timeout_s=s.timeout_s)
        else:
            data = body
        result = await self.infer(model, data)
        return JSONResponse({"preds": seed_preds(result, self.settings.top_k), "status": "Success"})

    # -- TorchServe ------------------------------------------------------------------------

    async def ping(self, request: Request) -> Response:
        return JSONResponse({"status": "Healthy"})

    async def ts_predict(self, request: Request) -> Response:
        model = self.model(request.path_params["model"])
        data = await self.image_from(request, ("data", "body", "file"))
        result = await self.infer(model, data)
        return JSONResponse(torchserve_answer(result))

    async def ts_models(self, request: Request) -> Response:
        return JSONResponse({"models": [{"modelName": n, "modelUrl": n} for n in self.models]})

    async def ts_model(self, request: Request) -> Response:
        name = request.path_params["model"]
        model = self.models.get(name)
        if model is None:
            raise RequestError(404, "unknown_model", f"Model not found: {name[:100]!r}")
        s = self.settings
        return JSONResponse([{
            "modelName": name, "modelVersion": "1.0", "modelUrl": name, "runtime": "onnxruntime",
            "minWorkers": 1, "maxWorkers": 1, "batchSize": s.max_batch, "maxBatchDelay": s.max_wait_ms,
            "loadedAtStartup": True,
            "workers": [{"id": "0", "status": "READY" if model.ready else "LOADING"}],
            "task": model.bundle.task, "classes": list(model.bundle.classes),
        }])

    # -- native ----------------------------------------------------------------------------

    async def native_predict(self, request: Request) -> Response:
        started = time.perf_counter()
        model = self.model(request.path_params["model"])
        data = await self.image_from(request, ("file",))
        result = await self.infer(model, data)
        out = result.to_dict() if isinstance(result, DetectionResult) else result.to_dict(self.settings.top_k)
        return JSONResponse({"model": model.name, **out, "latency_ms": round((time.perf_counter() - started) * 1000, 3)})

    # -- health and metrics ----------------------------------------------------------------

    async def healthz(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(self, request: Request) -> Response:
        states = {name: m.ready for name, m in self.models.items()}
        if self.ready():
            return JSONResponse({"status": "ready", "models": states})
        return JSONResponse({"status": "draining" if self.draining else "loading", "models": states}, status_code=503,
                            headers={"Retry-After": str(RETRY_AFTER_S)})

    async def metrics_route(self, request: Request) -> Response:
        return Response(self.metrics.render(), media_type=self.metrics.content_type)


def smallest_input(predictor: Predictor) -> np.ndarray:
    """A prepared all-zero input of the model's smallest size, float32 (3, S, S)."""
    side = predictor.detect_spec.min_size if predictor.detect_spec is not None else predictor.spec.size
    return np.zeros((3, side, side), np.float32)


def prepare_image(predictor: Predictor, data: bytes) -> np.ndarray:
    """Encoded image → the model input (runs in the decode pool): the decoder's checks, then
    :data:`MAX_ASPECT` on the decoded size, before anything is resized (RELIABILITY.md I5)."""
    img = predictor.load(data)
    w, h = img.size
    if max(w, h) > MAX_ASPECT * min(w, h):
        raise ImageError("too_large", f"image too large: {w}x{h} has an aspect ratio over {MAX_ASPECT}:1")
    return predictor.prepare(img)  # a decoded image: no second decode


def seed_preds(result: Result, top_k: int) -> Any:
    """The seed contract's ``preds``: ``{label: "score"}`` (labels above their threshold for
    multi-label, top-k for single-label; scores as strings, as the seed apps sent them); for
    detectors a list of ``{"label", "score", "box": [x1, y1, x2, y2]}`` above the tuned threshold."""
    if isinstance(result, DetectionResult):
        kept = result.above()
        return [{"label": label, "score": str(np.float32(score)), "box": [float(v) for v in box]}
                for label, score, box in zip(kept.labels, kept.scores, kept.boxes)]
    pairs = ([(label, float(result.scores[result.classes.index(label)])) for label in result.labels]
             if result.multilabel else result.top(top_k))
    return {label: str(np.float32(score)) for label, score in pairs}


def serve(
    bundles: Sequence[str | os.PathLike[str]] | Mapping[str, str | os.PathLike[str]],
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    log_level: str = "info",
    workers: int = 1,
    strict: bool | None = None,
    drain_s: float = lifecycle.DRAIN_S,
    grace_s: float = lifecycle.GRACE_S,
    **options: Any,
) -> None:
    """Run the app with uvicorn until SIGTERM/SIGINT, then drain and return.

    workers: processes; strict: refuse to start on a model that does not load (default:
    strict for one bundle); drain_s / grace_s: see :mod:`lensforge.serve.lifecycle`.
    options: :func:`create_app`'s keyword arguments.
    """
    lifecycle.run(bundles, host, port, workers=workers, strict=strict, drain_s=drain_s, grace_s=grace_s,
                  log_level=log_level, **options)
