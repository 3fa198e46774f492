"""Which requests the server takes on, and how it lets go of connections while draining.

:class:`Admission` is ASGI middleware in front of every route (RELIABILITY.md O13, O14):

- **In-flight limit (O13).** At most ``limit`` requests are inside the app at once; one more
  is answered at once with 503 + ``Retry-After`` in the caller's dialect (seed JSON for
  ``/predict``, TorchServe ``{code, type, message}``, KServe ``{"error"}``, native
  ``{"error": {code, message}}``), before its body is read, so refusing costs next to
  nothing. Health, readiness and metrics (:data:`EXEMPT`) are never counted nor refused: an
  orchestrator must not restart a replica because it is busy. This replaces uvicorn's
  ``limit_concurrency``, which refuses every path alike with a plain-text 503 and counts idle
  keep-alive connections as load.
- **Connection: close while draining (O14).** Once the server drains (SIGTERM), every
  response says ``Connection: close`` and the connection is closed after it, so a keep-alive
  client opens a new connection for its next request and meets a 503 or a closed port,
  never a connection that uvicorn's shutdown closes under a request it already sent. A
  response that would close the connection before the request body was read first reads
  (and drops) the rest of the body: closing a socket with unread data makes the kernel
  send a reset, and the client would lose the answer it was about to read.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import TYPE_CHECKING, Any

from lensforge.serve.dialects import dialect_of, error_response

if TYPE_CHECKING:
    from lensforge.serve.server import Server

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

EXEMPT = frozenset({"/healthz", "/readyz", "/ping", "/metrics", "/v2/health/live", "/v2/health/ready"})
CLOSE = (b"connection", b"close")


def exempt(path: str) -> bool:
    """Health, readiness and metrics: never counted against the limit, never refused."""
    return path in EXEMPT or path.startswith("/v2/health/")


class Admission:
    """ASGI middleware: the in-flight limit and the draining ``Connection: close`` (see the module docstring).

    server: whose ``draining`` flag, metrics and ``settings.timeout_s`` (how long to wait
    for the rest of a body before closing) it reads. limit: requests inside the app at once.
    """

    def __init__(self, app: Any, server: Server, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"the in-flight limit must be at least 1, got {limit}")
        self.app, self.server, self.limit = app, server, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        body_done = False

        async def tracked_receive() -> Message:
            nonlocal body_done
            message = await receive()
            if message["type"] == "http.disconnect" or not message.get("more_body", False):
                body_done = True
            return message

        async def closing_send(message: Message) -> None:
            if message["type"] == "http.response.start" and self.server.draining:
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"connection"]
                message = {**message, "headers": [*headers, CLOSE]}
                if not body_done:
                    await self._drop_body(tracked_receive)
            await send(message)

        path = scope["path"]
        if exempt(path):
            await self.app(scope, tracked_receive, closing_send)
            return
        if self.server.inflight >= self.limit:
            self.server.metrics.refused.labels("inflight_limit").inc()
            refusal = error_response(dialect_of(path), 503, "unavailable",
                                     f"server busy: {self.limit} requests in flight; retry later")
            await refusal(scope, tracked_receive, closing_send)
            return
        self.server.request_started()  # counted: the cap above, the batchers, the idle memory trim (serve/memory.py)
        try:
            await self.app(scope, tracked_receive, closing_send)
        finally:
            self.server.request_ended()

    async def _drop_body(self, receive: Receive) -> None:
        """Read the rest of the request body and drop it (bounded by the request deadline)."""

        async def drain() -> None:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect" or not message.get("more_body", False):
                    return

        try:
            await asyncio.wait_for(drain(), self.server.settings.timeout_s)
        except asyncio.TimeoutError:
            log.info("request body still arriving after %.0f s; closing the connection", self.server.settings.timeout_s)
