"""The lensforge HTTP app: several bundles, one port, several dialects around one Predictor.

:func:`create_app` only assembles: it checks the bundles, resolves the :class:`Settings`, builds
the :class:`~lensforge.serve.server.Server` and adds each dialect's routes and the admission
middleware. Routes (each dialect keeps its own error shape, see RELIABILITY.md):

- seed ``POST /predict`` (:mod:`.seed`); TorchServe ``/ping``, ``/predictions/{model}``,
  ``/models`` (:mod:`.torchserve`); native ``/v1/models/{name}/predict`` (:mod:`.native`);
- KServe v2 / Triton HTTP ``/v2/...`` (:mod:`.kserve`); ``/annotate``, ``/docs``,
  ``/openapi.json`` and the web page at ``/`` (:mod:`.web`);
- ``/explain`` heat maps of classifiers (:mod:`.explain`);
- ``/healthz`` (live), ``/readyz`` (every model loaded and warmed up), ``/metrics`` (:mod:`.health`).

Decoding and preprocessing run in a thread pool, inference in one thread per model behind a
:class:`~lensforge.serve.batching.Batcher`; the event loop only moves bytes.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from starlette.applications import Starlette

from lensforge.errors import ConfigError
from lensforge.runtime import load_bundle
from lensforge.runtime.bundle import display_name
from lensforge.serve import explain, fetch, health, kserve, native, seed, torchserve, web
from lensforge.serve.admission import Admission
from lensforge.serve.server import DEFAULT_MAX_BODY, DetectionFilter, Model, Server, Settings
from lensforge.serve.signals import DRAIN_S


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
    drain_s: float = DRAIN_S,
    conf: float | None = None,
    iou: float | None = None,
    classes: Sequence[str] | None = None,
    max_det: int | None = None,
    agnostic_nms: bool = False,
) -> Starlette:
    """The ASGI app serving ``bundles`` (the first is the default model).

    bundles: bundle directories, named by :func:`lensforge.runtime.bundle.display_name`, or a ``{name: directory}`` map.
    max_batch / max_wait_ms: dynamic batching per model (a batch waits up to max_wait_ms for
    company while other requests are in flight, not at all when there are none). max_queue: inputs that may wait per
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
    a body read and a decode. drain_s: after SIGTERM, how long readiness says 503 before
    the port closes (:mod:`lensforge.serve.signals`).
    conf / iou / classes / max_det / agnostic_nms: which detections every dialect's answer
    keeps (:meth:`~lensforge.runtime.DetectionResult.filtered`); default each detector's tuned
    threshold. A :class:`~lensforge.errors.ConfigError` when no bundle is a detector, or a
    value does not fit one (an unknown class name).

    Bundle metadata is checked now (a :class:`~lensforge.errors.BundleError` names the bad
    one); the onnxruntime sessions load and warm up in the background after startup, while
    ``/healthz`` already answers and ``/readyz`` says 503.
    """
    if not bundles:
        raise ConfigError("no bundle to serve; pass at least one bundle directory")
    detections = DetectionFilter(conf, iou, tuple(classes) if classes is not None else None, max_det, agnostic_nms)
    settings = Settings(
        max_batch, max_wait_ms, max_queue, max_body_bytes, timeout_s, threads, top_k,
        local_roots=fetch.resolve_roots(local_roots), allow_remote=allow_remote,
        max_inflight=2 * max_queue * len(bundles) if max_inflight is None else max_inflight, drain_s=drain_s,
        detections=detections if detections.given() else None,
    )
    named = bundles.items() if isinstance(bundles, Mapping) else [(display_name(Path(b)), b) for b in bundles]
    models: dict[str, Model] = {}
    for name, path in named:
        if name in models:
            raise ConfigError(f"two bundles are named {name!r}; give them distinct names ({{name: path}})")
        models[name] = Model(name, load_bundle(path))
    server = Server(models, settings)
    routes = [
        *seed.routes(server),  # /predict
        *torchserve.routes(server),  # /ping, /predictions, /models
        *native.routes(server),  # /v1/models/{model}/predict
        *health.routes(server),  # /healthz, /readyz, /metrics
        *kserve.routes(server),  # KServe v2 / Triton HTTP
        *web.routes(server),  # /annotate, the web page at /, /docs and /openapi.json
        *explain.routes(server),  # /explain: class activation maps (classifiers with explain.onnx)
    ]
    app = Starlette(routes=routes, lifespan=server.lifespan)
    app.add_middleware(Admission, server=server, limit=settings.max_inflight)
    app.state.server = server
    return app
