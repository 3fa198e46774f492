"""Dynamic batching for one model: a bounded queue of preprocessed inputs, one worker task
that groups them into batches and runs each batch as one call in a thread, off the event loop.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lensforge.errors import RequestError

log = logging.getLogger(__name__)

RETRY_AFTER_S = 1  # what a 503 tells the client to wait; one batch is far shorter


def unavailable(message: str) -> RequestError:
    """A 503 the client may retry (the response carries ``Retry-After``)."""
    return RequestError(503, "unavailable", message)


@dataclass
class _Item:
    x: np.ndarray
    deadline: float  # event-loop time after which the input is no longer worth running
    future: asyncio.Future = field(repr=False)


class Batcher:
    """Group concurrent inputs of one model into batches.

    run: a list of prepared inputs → a list of outputs, one per input, in order
        (:meth:`Predictor.run_many`); called in ``executor``, one batch at a time.
    max_batch: most inputs per call. max_wait_ms: how long the first input of a batch waits
    for company. max_queue: inputs that may wait; one more is refused with 503.
    on_batch: called with each batch's size (metrics).
    in_flight: requests the server is working on now (each brings at most one input, or a
        few at once). When the inputs at hand account for all of them, nothing else can join
        the batch and it runs at once: a lone client no longer pays ``max_wait_ms`` on every
        request. Under load there are always others, and the batch waits for company as before.
    """

    def __init__(
        self,
        run: Callable[[list[np.ndarray]], Sequence[Any]],
        executor: Executor,
        *,
        max_batch: int = 16,
        max_wait_ms: float = 5,
        max_queue: int = 64,
        on_batch: Callable[[int], None] | None = None,
        in_flight: Callable[[], int] | None = None,
    ) -> None:
        if max_batch < 1 or max_queue < 1 or max_wait_ms < 0:
            raise ValueError(
                f"need max_batch >= 1, max_queue >= 1, max_wait_ms >= 0; got {max_batch}, {max_queue}, {max_wait_ms}"
            )
        self._run, self._executor, self._on_batch, self._in_flight = run, executor, on_batch, in_flight
        self.max_batch, self.max_wait = max_batch, max_wait_ms / 1000
        self._queue: asyncio.Queue[_Item] = asyncio.Queue(max_queue)
        self._arrived = asyncio.Event()
        self._task: asyncio.Task | None = None

    @property
    def depth(self) -> int:
        """Inputs waiting to run."""
        return self._queue.qsize()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        """Stop the worker; inputs still waiting are answered 503."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        while not self._queue.empty():
            item = self._queue.get_nowait()
            if not item.future.done():
                item.future.set_exception(unavailable("server is shutting down"))

    async def submit(self, x: np.ndarray, deadline: float) -> Any:
        """Queue one input and wait for its output (its row of the batch output).

        Raises a 503 :class:`RequestError` when the queue is full, or when ``deadline``
        (event-loop time) passes before the input has run (it is then never run).
        """
        loop = asyncio.get_running_loop()
        item = _Item(x, deadline, loop.create_future())
        try:
            self._queue.put_nowait(item)
        except asyncio.QueueFull:
            raise unavailable("server busy: queue full") from None
        self._arrived.set()
        try:
            return await asyncio.wait_for(item.future, max(0.0, deadline - loop.time()))
        except (asyncio.TimeoutError, TimeoutError):  # distinct classes before Python 3.11
            raise unavailable("deadline exceeded while waiting for the model") from None

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            items = [await self._queue.get()]
            await self._gather(items, loop.time() + self.max_wait)
            now = loop.time()
            live = []
            for item in items:
                if item.future.done():  # the client gave up (timeout or disconnect)
                    continue
                if item.deadline <= now:  # never started: refuse rather than run late
                    item.future.set_exception(unavailable("deadline exceeded while waiting for the model"))
                    continue
                live.append(item)
            if live:
                await self._run_batch(live)

    async def _gather(self, items: list[_Item], until: float) -> None:
        """Add queued inputs to ``items`` until the batch is full or ``until`` passes."""
        loop = asyncio.get_running_loop()
        while len(items) < self.max_batch:
            try:
                items.append(self._queue.get_nowait())
                continue
            except asyncio.QueueEmpty:
                pass
            remaining = until - loop.time()
            if remaining <= 0 or (self._in_flight is not None and self._in_flight() <= len(items)):
                return
            # waiting on an event (not on queue.get) so a timeout can never lose an item
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except (asyncio.TimeoutError, TimeoutError):  # distinct classes before Python 3.11
                return

    async def _run_batch(self, live: list[_Item]) -> None:
        loop = asyncio.get_running_loop()
        try:
            scores = await loop.run_in_executor(self._executor, self._run, [i.x for i in live])
            if len(scores) != len(live):
                raise RuntimeError(f"model returned {len(scores)} rows for a batch of {len(live)}")
        except Exception:
            log.exception("inference failed for a batch of %d", len(live))
            for item in live:
                if not item.future.done():
                    item.future.set_exception(RequestError(500, "inference_failed", "inference failed"))
            return
        if self._on_batch is not None:
            self._on_batch(len(live))
        for item, row in zip(live, scores):
            if not item.future.done():
                item.future.set_result(row)
