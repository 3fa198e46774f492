"""A real uvicorn server on a free loopback port, for the HTTP tests (shared by the serve test modules)."""

from __future__ import annotations

import socket
import threading
import time
from typing import Self

import requests
import uvicorn


class LiveServer:
    """``with LiveServer(app) as s:`` serves ``app`` until the block ends; entering waits
    until ``ready_path`` answers 200 (``/readyz``: every model loaded and warmed up)."""

    def __init__(self, app: object, ready_path: str = "/readyz") -> None:
        self.ready_path = ready_path
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> Self:
        self.thread.start()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if requests.get(self.url + self.ready_path, timeout=2).status_code == 200:
                    return self
            except requests.ConnectionError:
                pass
            time.sleep(0.05)
        self.__exit__()
        raise RuntimeError(f"{self.ready_path} did not answer 200 within 60 s")

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)
        assert not self.thread.is_alive(), "server did not shut down"


def raw_exchange(port: int, data: bytes, timeout: float = 10.0, whole_json: bool = True) -> bytes:
    """Send raw bytes on a fresh connection and return what comes back: until the server
    closes, or the answer's head is in (and, with ``whole_json``, its JSON body too)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        try:
            s.sendall(data)
        except (BrokenPipeError, ConnectionResetError):  # the server may hang up before reading it all
            pass
        answer = b""
        while True:
            try:
                chunk = s.recv(65536)
            except (ConnectionResetError, TimeoutError):
                break
            if not chunk:
                break
            answer += chunk
            if b"\r\n\r\n" in answer and (not whole_json or answer.rstrip().endswith(b"}")):
                break
        return answer
