"""Give memory back to the system once a burst of load is over (RELIABILITY.md O15).

Under load the server holds many request bodies, decoded images and full batches at once. Two
things keep that memory after the burst, so RSS would stay at its peak for good:

- onnxruntime's CPU arena grows to the largest batches it ran and never shrinks by itself.
  Turning it off makes batches of 16 ~40 % slower (every run page-faults its activations afresh), so
  instead, when the server goes idle, each model calls
  :meth:`~lensforge.runtime.Predictor.release_memory` (one smallest run with onnxruntime's
  arena-shrink run option): the arena frees every region not in use.
- glibc keeps freed memory in its heaps (one arena per thread that allocated: the decode pool,
  the inference threads, the event loop); ``malloc_trim(0)`` hands the free pages back. What
  it cannot hand back are pages that one small live object pins; :func:`configure_malloc`
  (called by ``lensforge serve`` before any thread starts) keeps those few: two arenas instead
  of 8 per core, and every block of 256 KB or more (bodies, decoded images, input tensors,
  batches) in its own mapping, returned the moment it is freed, instead of glibc's default
  threshold that rises to 32 MB after the first large free.

:func:`trim_when_idle` shrinks and trims once the server has served requests and then been
idle for :data:`IDLE_S`, and the app calls :func:`release` once after loading (graph
optimisation leaves much freed memory behind). The next burst regrows the arena at the cost of
one slower batch. Off glibc (macOS, musl) only the arena is shrunk.

Measured with ``bench/serve_overload.py`` (256 clients x 30 s, 224 px, 2 cores): before, RSS
388 MB warmed up and 515 MB still 60 s after the load; now 125 MB warmed up, 443 MB at the
peak, 127 MB 3 s after the load.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
import os
import platform
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)

IDLE_S = 2.0  # no request for this long after some activity: trim
CHECK_S = 1.0  # how often the server's activity is looked at


M_MMAP_THRESHOLD, M_ARENA_MAX = -3, -8  # mallopt parameters (glibc's malloc.h)
ARENA_MAX = 2
MMAP_THRESHOLD = 256 * 1024


def _glibc() -> ctypes.CDLL | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def configure_malloc() -> None:
    """glibc: :data:`ARENA_MAX` arenas and a fixed :data:`MMAP_THRESHOLD` (see the module
    docstring), unless ``MALLOC_ARENA_MAX`` / ``MALLOC_MMAP_THRESHOLD_`` say otherwise. Call it
    before the process starts threads; elsewhere than glibc it does nothing."""
    libc = _glibc()
    if libc is None:
        return
    if "MALLOC_ARENA_MAX" not in os.environ:
        libc.mallopt(M_ARENA_MAX, ARENA_MAX)
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)


def malloc_trim() -> Callable[[], int] | None:
    """glibc's ``malloc_trim(0)`` as a callable (returns 1 when memory was released), or None."""
    libc = _glibc()
    trim = getattr(libc, "malloc_trim", None)
    if trim is None:
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return lambda: trim(0)


async def release() -> None:
    """``malloc_trim(0)`` in a thread (it walks every heap: tens of milliseconds); no-op off glibc."""
    trim = malloc_trim()
    if trim is not None:
        await asyncio.get_running_loop().run_in_executor(None, trim)


async def trim_when_idle(activity: Callable[[], int], shrink: Callable[[], Awaitable[None]],
                         idle_s: float = IDLE_S, check_s: float = CHECK_S) -> None:
    """Run until cancelled: ``shrink()`` (the server's: each model's ``release_memory``) then :func:`release` each time
    ``activity()`` (a count of request starts and ends) has moved since the last time and then
    stood still for ``idle_s`` (a request that takes longer holds the trim off until it ends)."""
    loop = asyncio.get_running_loop()
    released_at = seen = activity()
    still_since = loop.time()
    while True:
        await asyncio.sleep(check_s)
        now, count = loop.time(), activity()
        if count != seen:
            seen, still_since = count, now
        elif count != released_at and now - still_since >= idle_s:
            released_at = count
            await shrink()
            await release()
            log.debug("idle: returned freed memory to the system")
