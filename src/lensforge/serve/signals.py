"""SIGTERM/SIGINT → drain (RELIABILITY.md O14): readiness 503 first, the port closed later.

Below :mod:`.server` (whose lifespan installs it) and :mod:`.lifecycle` (which runs the
process), so that neither imports the other.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

log = logging.getLogger(__name__)

DRAIN_S = 1.0  # after SIGTERM: /readyz says 503 this long before the port closes (LB deregistration)


def drain_on_signal(start_draining: Callable[[], bool], drain_s: float = DRAIN_S) -> Callable[[], None]:
    """Chain a drain step in front of uvicorn's SIGTERM/SIGINT handlers; returns an undo.

    Called from the app's lifespan, i.e. after uvicorn installed its handlers. The first
    signal calls ``start_draining()`` (the server's: readiness 503, new requests 503; it
    returns False when the server was draining already) and hands the signal to uvicorn
    ``drain_s`` later; a second signal is handed on at once (SIGINT twice forces exit).
    Does nothing outside the main thread (tests that run uvicorn in a thread).
    """
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    loop = asyncio.get_running_loop()
    previous: dict[int, Any] = {}

    def hand_on(sig: int, frame: FrameType | None) -> None:
        handler = previous[sig]
        if callable(handler):
            handler(sig, frame)
        elif handler == signal.SIG_DFL:  # not under uvicorn's handlers: the default action, now
            signal.signal(sig, signal.SIG_DFL)
            signal.raise_signal(sig)

    def handle(sig: int, frame: FrameType | None) -> None:
        if previous[sig] == signal.SIG_IGN:
            return
        if not start_draining():  # already draining: this is the second signal
            hand_on(sig, frame)
            return
        log.info("received %s: draining (readiness 503, new requests 503), stopping in %.1f s",
                 signal.Signals(sig).name, drain_s)
        # from a signal handler: wake the loop through its self-pipe, then wait drain_s
        loop.call_soon_threadsafe(loop.call_later, drain_s, hand_on, sig, None)

    for sig in (signal.SIGTERM, signal.SIGINT):
        previous[sig] = signal.signal(sig, handle)

    def undo() -> None:
        for sig, handler in previous.items():
            if signal.getsignal(sig) is handle:
                signal.signal(sig, handler)

    return undo
