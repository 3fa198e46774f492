"""``GET /healthz`` (live), ``/readyz`` (every model loaded and warmed up, not draining) and
``/metrics`` (Prometheus). Never refused by the in-flight limit (:mod:`.admission`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from lensforge.serve.batching import RETRY_AFTER_S

if TYPE_CHECKING:
    from lensforge.serve.server import Server


def routes(server: Server) -> list[Route]:
    health = Health(server)
    return [
        Route("/healthz", health.healthz, methods=["GET"]),
        Route("/readyz", health.readyz, methods=["GET"]),
        Route("/metrics", health.metrics, methods=["GET"]),
    ]


class Health:
    def __init__(self, server: Server) -> None:
        self.server = server

    async def healthz(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(self, request: Request) -> Response:
        server = self.server
        states = {name: m.ready for name, m in server.models.items()}
        if server.ready():
            return JSONResponse({"status": "ready", "models": states})
        return JSONResponse({"status": "draining" if server.draining else "loading", "models": states},
                            status_code=503, headers={"Retry-After": str(RETRY_AFTER_S)})

    async def metrics(self, request: Request) -> Response:
        metrics = self.server.metrics
        return Response(metrics.render(), media_type=metrics.content_type)
