"""How ``lensforge serve`` starts, scales and stops (RELIABILITY.md O4-O6, B5-B9).

- **Strict load (O6)**: every bundle's ONNX graph is opened once before the port is bound;
  a truncated, empty or foreign ``model.onnx`` stops startup with one
  :class:`~lensforge.errors.BundleError` line naming the file and the cause (the CLI prints
  it and exits 2). Strict is the default when one bundle is served (a server whose only
  model cannot load is useless); with several bundles the default is lenient: the broken
  model answers 503 and stays not ready, the others serve.
- **Drain (O4)**: on SIGTERM/SIGINT the server marks itself draining (``/readyz`` 503 at
  once, new inference requests 503 + ``Retry-After``), keeps the port open ``drain_s`` so a
  load balancer sees the readiness change, then lets uvicorn stop accepting, finish the
  requests it had accepted (up to ``grace_s``) and exit 0. Inputs still queued in a batcher
  when the app shuts down are answered 503, never left hanging.
- **Workers (O5)**: ``workers > 1`` runs uvicorn's supervisor, which restarts a worker that
  dies; each worker builds its app from :func:`app_from_env` (uvicorn needs an import string
  to start processes) and gets ``cores // workers`` onnxruntime threads, so N workers never
  oversubscribe the machine.
- **Transport limits (B5, B7, B8)**: uvicorn's h11 parser (garbage → 400 and closed) with a
  16 KB cap on a request head still arriving, and :class:`HeadLimit` for a head that arrived
  in one read (h11 only caps *incomplete* heads): over 16 KB or 100 headers → 431.
  :class:`HeadDeadlineH11` closes a connection whose request head is not complete within
  ``head_timeout_s`` (slowloris: uvicorn itself times out only idle keep-alive connections;
  slow *bodies* hit the app's read deadline). A keep-alive timeout closes idle connections.
  uvicorn's ``limit_concurrency`` stays off: it refuses health checks too, as plain text
  without ``Retry-After``; the app's :class:`~lensforge.serve.admission.Admission` limits
  requests in flight instead (O13) and says ``Connection: close`` while draining (O14).
- **Port (O4)**: :func:`serve` binds the port itself before uvicorn starts, so a port in use
  is one :class:`~lensforge.errors.ConfigError` line naming it, and hands what it is about
  to serve (:class:`Started`) to its caller's ``announce`` (the CLI prints it).
"""

from __future__ import annotations

import array
import asyncio
import errno
import json
import logging
import os
import signal
import socket
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from types import FrameType
from typing import Any

import uvicorn
from starlette.applications import Starlette
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.supervisors import Multiprocess

try:
    import fcntl
    import termios
except ImportError:  # Windows: no FIONREAD on sockets through fcntl; shutdown closes idle connections as uvicorn does
    fcntl = termios = None  # type: ignore[assignment]

from lensforge.errors import BundleError, ConfigError
from lensforge.hardware import cpu_count
from lensforge.runtime import Predictor, load_bundle
from lensforge.serve import memory
from lensforge.serve.app import create_app
from lensforge.serve.server import Model, Settings
from lensforge.serve.signals import DRAIN_S

log = logging.getLogger(__name__)

ENV_VAR = "LENSFORGE_SERVE_CONFIG"  # JSON handed from the supervisor to its worker processes
APP_FACTORY = "lensforge.serve.lifecycle:app_from_env"
GRACE_S = 30.0  # then: accepted requests may take this long to finish before they are cancelled
MAX_HEAD_BYTES = 16 * 1024  # request line + headers; h11 answers 400 above it (B7)
MAX_HEADERS = 100  # the same cap as http.client's
KEEP_ALIVE_S = 5.0  # idle keep-alive connections are closed after this
HEAD_TIMEOUT_S = 10.0  # a request line + headers must arrive within this (B5)
HTTP_PROTOCOL = "lensforge.serve.lifecycle:HeadDeadlineH11"  # an import string: worker configs are pickled


@dataclass
class RunConfig:
    """Everything a worker process needs to build the same app as its siblings (JSON-able)."""

    bundles: list[str] | dict[str, str]
    options: dict[str, Any]  # create_app's keyword arguments
    drain_s: float = DRAIN_S


def check_bundles(bundles: Sequence[str | os.PathLike[str]] | Mapping[str, str | os.PathLike[str]]) -> None:
    """Open every bundle's ONNX graph once; raise :class:`BundleError` naming the first broken file.

    The message is one line: the file and the cause (empty file, or onnxruntime's first line),
    never a traceback.
    """
    paths = list(bundles.values()) if isinstance(bundles, Mapping) else list(bundles)
    for path in paths:
        bundle = load_bundle(path)  # bad metadata, a missing or empty model file: a BundleError naming it
        try:
            Predictor(bundle, threads=1)  # the real load: onnxruntime parses and checks the graph
        except BundleError as e:
            raise BundleError(f"{e} (a truncated copy or not an ONNX file?)") from None


def resolve_strict(strict: bool | None, n_bundles: int) -> bool:
    """Strict by default for one bundle, lenient for several (see the module docstring)."""
    return n_bundles == 1 if strict is None else strict


def worker_threads(threads: int | None, workers: int) -> int | None:
    """onnxruntime intra-op threads per worker: ``cores // workers`` (at least 1) unless given."""
    if threads is not None or workers <= 1:
        return threads
    return max(1, cpu_count() // workers)


def build_app(config: RunConfig) -> Starlette:
    """The app for one process, with its drain delay."""
    app = create_app(config.bundles, drain_s=config.drain_s, **config.options)
    app.add_middleware(HeadLimit)
    return app


class HeadDeadlineH11(H11Protocol):
    """uvicorn's h11 protocol, plus: a connection that has not sent a complete request head
    within ``config.head_timeout_s`` of its first byte (or of connecting) is closed (B5)."""

    _head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self._head_timer is None and (self.cycle is None or self.cycle.response_complete):
            self._arm()  # a new request begins on a kept-alive connection
        super().data_received(data)
        if self.cycle is not None and not self.cycle.response_complete:
            self._disarm()  # the head is in; the app's own deadlines take over

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def on_response_complete(self) -> None:
        self._disarm()  # uvicorn's keep-alive timeout covers the idle time
        super().on_response_complete()

    def shutdown(self) -> None:
        """uvicorn's graceful shutdown closes an idle connection at once; but a connection
        whose next request is already arriving (bytes in the socket or in h11's buffer: a
        client that connected or sent just before the drain ended) is left open, so that the
        request is read and answered (503 + Connection: close while draining, see
        :mod:`.admission`) instead of reset by a close over unread data (O14). The head
        deadline still bounds how long it may take."""
        idle = self.cycle is None or self.cycle.response_complete
        if idle and not self.transport.is_closing() and (self.conn.trailing_data[0] or _unread_bytes(self.transport)):
            log.info("graceful shutdown: answering the request arriving on an idle connection before closing it")
            self._unset_keepalive_if_required()
            return
        super().shutdown()

    def _arm(self) -> None:
        self._disarm()
        timeout = getattr(self.config, "head_timeout_s", HEAD_TIMEOUT_S)
        self._head_timer = self.loop.call_later(timeout, self._too_slow)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _too_slow(self) -> None:
        self._head_timer = None
        if not self.transport.is_closing() and (self.cycle is None or self.cycle.response_complete):
            log.info("closing a connection whose request head was not complete in time")
            self.transport.close()


def _unread_bytes(transport: asyncio.BaseTransport) -> int:
    """Bytes waiting in the kernel's receive buffer of ``transport``'s socket (0 if unknown)."""
    sock = transport.get_extra_info("socket")
    if sock is None or fcntl is None:
        return 0
    count = array.array("i", [0])
    try:
        fcntl.ioctl(sock.fileno(), termios.FIONREAD, count, True)
    except OSError:
        return 0
    return count[0]


class HeadLimit:
    """ASGI middleware: 431 for a request head over ``max_bytes`` or ``max_headers`` (B7).

    h11 refuses a head that is still incomplete past its cap, but one that arrives whole in
    a single read (up to 256 KB on loopback) is parsed; this closes that gap.
    """

    def __init__(self, app: Any, max_bytes: int = MAX_HEAD_BYTES, max_headers: int = MAX_HEADERS) -> None:
        self.app, self.max_bytes, self.max_headers = app, max_bytes, max_headers

    async def __call__(self, scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]) -> None:
        if scope["type"] == "http":
            headers = scope["headers"]
            target = len(scope.get("raw_path") or b"") + len(scope.get("query_string") or b"")
            size = target + sum(len(k) + len(v) + 4 for k, v in headers)
            if len(headers) > self.max_headers or size > self.max_bytes:
                body = b'{"error": "request header fields too large"}'
                await send({"type": "http.response.start", "status": 431, "headers": [
                    (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close")]})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


def app_from_env() -> Starlette:
    """uvicorn app factory for worker processes: the :class:`RunConfig` JSON in ``$LENSFORGE_SERVE_CONFIG``."""
    text = os.environ.get(ENV_VAR)
    if not text:
        raise ConfigError(f"{ENV_VAR} is not set; start workers with `lensforge serve --workers N`")
    memory.configure_malloc()  # a fresh worker process: before its threads start
    return build_app(RunConfig(**json.loads(text)))


def uvicorn_config(
    app: Any,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    workers: int = 1,
    log_level: str = "info",
    limit_concurrency: int | None = None,
    grace_s: float = GRACE_S,
    head_timeout_s: float = HEAD_TIMEOUT_S,
    **extra: Any,
) -> uvicorn.Config:
    """uvicorn settings shared by ``serve`` and the tests: h11 with a head cap and a head
    deadline, keep-alive timeout, graceful-shutdown grace. limit_concurrency: uvicorn's own
    cap (off by default, see the module docstring)."""
    config = uvicorn.Config(
        app, host=host, port=port, workers=workers, log_level=log_level, lifespan="on",
        http=HTTP_PROTOCOL,  # h11's limits are the ones we set and test (B7/B8); httptools would ignore them
        h11_max_incomplete_event_size=MAX_HEAD_BYTES,
        limit_concurrency=limit_concurrency, timeout_keep_alive=KEEP_ALIVE_S,
        timeout_graceful_shutdown=grace_s, **extra,
    )
    config.head_timeout_s = head_timeout_s  # read by HeadDeadlineH11 (uvicorn has no such setting)
    return config


@dataclass(frozen=True)
class Started:
    """What :func:`serve` is about to serve, once its port is bound (for the CLI's start-up text)."""

    url: str  # e.g. http://127.0.0.1:8000 (a wildcard host shown as 127.0.0.1)
    host: str  # as bound, e.g. 0.0.0.0
    models: list[Model]  # name, bundle (task, classes), input_size; loaded in the background
    settings: Settings  # the limits in force in each worker
    workers: int
    threads: int  # onnxruntime intra-op threads per model in each worker


def bind(host: str, port: int) -> socket.socket:
    """A listening-ready TCP socket on ``host:port``, as uvicorn binds it (SO_REUSEADDR,
    inheritable for workers); a :class:`ConfigError` line when the port is taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto TCP, not 0: accepted connections inherit it, and asyncio sets TCP_NODELAY only on
    # sockets whose proto says TCP. Without it every answer (head and body written apart)
    # waited for the client's delayed ACK: ~40 ms each, /healthz 44 ms instead of 4 ms
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise ConfigError(f"port {port} is already in use on {host}; stop what listens there or choose "
                              "another with --port") from None
        raise ConfigError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.set_inheritable(True)
    return sock


def base_url(host: str, port: int) -> str:
    """The URL a browser on this machine opens: a wildcard address becomes 127.0.0.1."""
    shown = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(host, host)
    return f"http://[{shown}]:{port}" if ":" in shown else f"http://{shown}:{port}"


def serve(
    bundles: Sequence[str | os.PathLike[str]] | Mapping[str, str | os.PathLike[str]],
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    workers: int = 1,
    strict: bool | None = None,
    drain_s: float = DRAIN_S,
    grace_s: float = GRACE_S,
    log_level: str = "info",
    announce: Callable[[Started], None] | None = None,
    **options: Any,
) -> None:
    """Serve ``bundles`` until SIGTERM/SIGINT, then drain and return (the process exits 0).

    workers: processes (uvicorn's supervisor restarts one that dies). strict: see
    :func:`resolve_strict`. drain_s / grace_s: see the module docstring. announce: called
    once the port is bound and the app built, before requests are served.
    options: :func:`~lensforge.serve.app.create_app`'s keyword arguments (``max_inflight``
    bounds the requests in flight per worker). A port in use: :class:`ConfigError`.
    """
    if workers < 1 or drain_s < 0 or grace_s <= 0:
        raise ConfigError(f"need workers >= 1, drain_s >= 0, grace_s > 0; got {workers}, {drain_s}, {grace_s}")
    memory.configure_malloc()  # O15: before any thread starts (serve/memory.py)
    n = len(bundles)
    if resolve_strict(strict, n):
        check_bundles(bundles)
    options = dict(options, threads=worker_threads(options.get("threads"), workers))
    named = ({k: str(v) for k, v in bundles.items()} if isinstance(bundles, Mapping) else [str(b) for b in bundles])
    config = RunConfig(named, options, drain_s)
    app: Any = build_app(config)  # with workers: fail here, once, on bad options or metadata rather than in N workers
    sock = bind(host, port)
    try:
        if workers == 1:
            uv = uvicorn_config(app, host, port, log_level=log_level, grace_s=grace_s)
        else:
            os.environ[ENV_VAR] = json.dumps(asdict(config), default=str)  # inherited by the spawned workers (paths as text)
            uv = uvicorn_config(APP_FACTORY, host, port, workers=workers, factory=True, log_level=log_level,
                                grace_s=grace_s)
        if announce is not None:
            server = app.state.server
            announce(Started(base_url(host, port), host, list(server.models.values()), server.settings, workers,
                             server.settings.threads or cpu_count()))
        # uvicorn re-raises the signal it stopped on once it has shut down; with the default
        # handlers that would kill us by SIGTERM (or raise KeyboardInterrupt) after a clean drain
        saved = {sig: signal.signal(sig, _ignore) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            if workers == 1:
                uvicorn.Server(uv).run(sockets=[sock])
            else:
                Multiprocess(uv, sockets=[sock]).run()
        finally:
            for sig, handler in saved.items():
                signal.signal(sig, handler)
    finally:
        sock.close()


def _ignore(sig: int, frame: FrameType | None) -> None:
    """A no-op handler: the signal was already handled by the server's drain."""
