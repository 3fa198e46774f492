"""The TorchServe inference and management API, as its clients call it: ``GET /ping``,
``POST|PUT /predictions/{model}`` (raw body or multipart ``data``/``body``) → its
image-classifier or object-detector answer; ``GET /models``, ``GET /models/{name}``;
errors ``{"code", "type", "message"}``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from lensforge.errors import RequestError
from lensforge.export.torchserve_handler import torchserve_answer  # the one TorchServe answer format (no torch)

if TYPE_CHECKING:
    from lensforge.serve.server import Server


def routes(server: Server) -> list[Route]:
    """The TorchServe routes over ``server``, errors in the ``"torchserve"`` dialect."""
    ts = TorchServe(server)
    return [
        Route("/ping", ts.ping, methods=["GET"]),
        Route("/predictions/{model}", server.endpoint("/predictions/{model}", "torchserve", ts.predict),
              methods=["POST", "PUT"]),
        Route("/models", server.endpoint("/models", "torchserve", ts.models), methods=["GET"]),
        Route("/models/{model}", server.endpoint("/models/{model}", "torchserve", ts.model), methods=["GET"]),
    ]


class TorchServe:
    def __init__(self, server: Server) -> None:
        self.server = server

    async def ping(self, request: Request) -> Response:
        return JSONResponse({"status": "Healthy"})

    async def predict(self, request: Request) -> Response:
        model = self.server.model(request.path_params["model"])
        data = await self.server.image_from(request, ("data", "body", "file"))
        result = await self.server.infer(model, data)
        return JSONResponse(torchserve_answer(result))

    async def models(self, request: Request) -> Response:
        return JSONResponse({"models": [{"modelName": n, "modelUrl": n} for n in self.server.models]})

    async def model(self, request: Request) -> Response:
        name = request.path_params["model"]
        model = self.server.models.get(name)
        if model is None:
            raise RequestError(404, "unknown_model", f"Model not found: {name[:100]!r}")
        s = self.server.settings
        return JSONResponse([{
            "modelName": name, "modelVersion": "1.0", "modelUrl": name, "runtime": "onnxruntime",
            "minWorkers": 1, "maxWorkers": 1, "batchSize": s.max_batch, "maxBatchDelay": s.max_wait_ms,
            "loadedAtStartup": True,
            "workers": [{"id": "0", "status": "READY" if model.ready else "LOADING"}],
            "task": model.bundle.task, "classes": list(model.bundle.classes),
        }])
