"""lensforge's own JSON answer: ``POST /v1/models/{name}/predict`` (multipart ``file`` or a
raw body) → the result's ``to_dict()`` + ``latency_ms``; errors ``{"error": {"code", "message"}}``.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from lensforge.runtime import DetectionResult

if TYPE_CHECKING:
    from lensforge.serve.server import Server

PATH = "/v1/models/{model}/predict"


def routes(server: Server) -> list[Route]:
    """The native route over ``server``, errors in the ``"native"`` dialect."""
    return [Route(PATH, server.endpoint(PATH, "native", Native(server).predict), methods=["POST"])]


class Native:
    def __init__(self, server: Server) -> None:
        self.server = server

    async def predict(self, request: Request) -> Response:
        started = time.perf_counter()
        server = self.server
        model = server.model(request.path_params["model"])
        data = await server.image_from(request, ("file",))
        result = await server.infer(model, data)
        out = result.to_dict() if isinstance(result, DetectionResult) else result.to_dict(server.settings.top_k)
        return JSONResponse({"model": model.name, **out, "latency_ms": round((time.perf_counter() - started) * 1000, 3)})
