"""The KServe v2 / Triton HTTP protocol, so ``tritonclient[http]`` and other v2 clients work.

Routes (errors are ``{"error": message}``, as Triton's; unknown model 404, not ready 503 +
``Retry-After``, malformed request 400, never 422):

- ``GET /v2`` server metadata; ``GET /v2/health/live``; ``GET /v2/health/ready`` (200 when
  every model is ready, else 503).
- ``GET /v2/models/{name}[/versions/{v}]`` metadata, ``.../ready``, ``.../config`` (a minimal
  Triton-like configuration). Each model has one version, ``"1"``.
- ``POST /v2/models/{name}[/versions/{v}]/infer``: one input, either the model's preprocessed
  FP32 tensor or a BYTES tensor of encoded images (see :mod:`lensforge.serve.kserve_wire`);
  JSON or the binary tensor extension, both ways.

Every row or image goes through the model's batcher (images through the server's decode pool
first), so v2 requests batch with the other dialects' and count in the same metrics.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from lensforge import __version__
from lensforge.errors import RequestError
from lensforge.runtime.results import DetectionResult
from lensforge.serve.batching import unavailable
from lensforge.serve.kserve_wire import (
    HEADER_LENGTH,
    InferRequest,
    Signature,
    classification_outputs,
    detection_outputs,
    encode_response,
    model_config,
    parse_request,
    signature_for,
)

if TYPE_CHECKING:
    from lensforge.runtime.predictor import Result
    from lensforge.serve.server import Model, Server

VERSION = "1"  # bundles carry no version of their own; one per served name
EXTENSIONS = ["classification", "model_configuration", "binary_tensor_data"]


def routes(server: Server) -> list[Route]:
    """The v2 routes over ``server``'s models, errors in the ``"kserve"`` dialect."""
    return KServe(server).routes()


class KServe:
    """The v2 handlers of one server; model signatures are built once, on first use."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self._signatures: dict[str, Signature] = {}

    def routes(self) -> list[Route]:
        def route(path: str, handler: Callable[[Request], Awaitable[Response]],
                  methods: tuple[str, ...] = ("GET",)) -> Route:
            return Route(path, self.server.endpoint(path, "kserve", handler), methods=list(methods))

        out = [route("/v2", self.server_metadata), route("/v2/health/live", self.live),
               route("/v2/health/ready", self.ready)]
        for base in ("/v2/models/{model}", "/v2/models/{model}/versions/{version}"):
            out += [route(base, self.model_metadata), route(base + "/ready", self.model_ready),
                    route(base + "/config", self.model_config), route(base + "/infer", self.infer, ("POST",))]
        return out

    # -- server --------------------------------------------------------------------------

    async def server_metadata(self, request: Request) -> Response:
        return JSONResponse({"name": "lensforge", "version": __version__, "extensions": EXTENSIONS})

    async def live(self, request: Request) -> Response:
        return JSONResponse({"live": True})  # the v2 spec's body; Triton's clients read the status only

    async def ready(self, request: Request) -> Response:
        if not self.server.ready():  # every model loaded, and not draining
            waiting = [name for name, m in self.server.models.items() if not m.ready]
            raise unavailable(f"not ready: models loading: {', '.join(waiting)}" if waiting else "server is shutting down")
        return JSONResponse({"ready": True})

    # -- models --------------------------------------------------------------------------

    def _model(self, request: Request) -> Model:
        """The named model, loaded (404 unknown name or version, 503 not ready)."""
        name = request.path_params["model"]
        model = self.server.model(name)
        version = request.path_params.get("version")
        if version is not None and version != VERSION:
            raise RequestError(404, "unknown_model",
                               f"Request for unknown model: {name[:100]!r} version {version[:20]} is not found")
        return model

    def signature(self, model: Model) -> Signature:
        sig = self._signatures.get(model.name)
        if sig is None:
            sig = signature_for(model.name, model.predictor, self.server.settings.max_queue)  # type: ignore[arg-type]
            self._signatures[model.name] = sig
        return sig

    async def model_metadata(self, request: Request) -> Response:
        model = self._model(request)
        sig = self.signature(model)
        return JSONResponse({
            "name": model.name, "versions": [VERSION], "platform": "onnxruntime_onnx",
            "inputs": [t.to_dict() for t in sig.inputs], "outputs": [t.to_dict() for t in sig.outputs],
        })

    async def model_ready(self, request: Request) -> Response:
        model = self._model(request)  # 404 unknown, 503 (with Retry-After) loading or draining
        return JSONResponse({"name": model.name, "ready": True})

    async def model_config(self, request: Request) -> Response:
        model = self._model(request)
        s = self.server.settings
        return JSONResponse(model_config(self.signature(model), max_batch=s.max_batch, max_wait_ms=s.max_wait_ms,
                                         max_queue=s.max_queue, timeout_s=s.timeout_s, task=model.bundle.task))

    # -- inference -----------------------------------------------------------------------

    async def infer(self, request: Request) -> Response:
        model = self._model(request)
        sig = self.signature(model)
        s = self.server.settings
        body = await self.server.read_body(request)
        loop = asyncio.get_running_loop()
        # JSON of up to max_body_bytes (millions of numbers): parsed in the pool, never on the event loop
        req = await loop.run_in_executor(self.server.decode_pool, parse_request, body,
                                         request.headers.get(HEADER_LENGTH), sig, s.max_body_bytes)
        timeout = min(s.timeout_s, req.timeout_s) if req.timeout_s else s.timeout_s
        try:
            results = await asyncio.wait_for(self._run(model, req, loop.time() + timeout), timeout)
        except (asyncio.TimeoutError, TimeoutError):  # distinct classes before Python 3.11
            raise unavailable("request timeout expired (the 'timeout' parameter)") from None
        if isinstance(results[0], DetectionResult):
            tensors = detection_outputs(results[0], req.outputs)
        else:
            tensors = classification_outputs(results, req.outputs)  # type: ignore[arg-type]
        body, headers = encode_response(model.name, req.id, tensors, [w.binary for w in req.outputs])
        return Response(body, headers=headers)

    async def _run(self, model: Model, req: InferRequest, deadline: float) -> list[Result]:
        """Every row / image through the model's batcher; results in order.

        A failed item fails the request with its own status (the first one, by position):
        a bad image its 4xx, a full queue 503.
        """
        if req.images is not None:
            answers = await asyncio.gather(*(self.server.infer(model, data) for data in req.images),
                                           return_exceptions=True)
        else:
            if model.batcher is None or model.predictor is None:
                raise unavailable(f"model {model.name!r} is not ready")
            rows = list(req.tensor)  # type: ignore[arg-type]
            outputs = await asyncio.gather(*(model.batcher.submit(x, deadline) for x in rows),
                                           return_exceptions=True)
            answers = [o if isinstance(o, BaseException) else self.server.result(model, o, x)
                       for o, x in zip(outputs, rows)]
        for i, answer in enumerate(answers):
            if isinstance(answer, RequestError):
                where = f"input {req.input_name[:64]!r} element {i}: " if len(answers) > 1 else ""
                raise RequestError(answer.status, answer.code, where + str(answer))
            if isinstance(answer, BaseException):
                raise answer
        return answers  # type: ignore[return-value]

