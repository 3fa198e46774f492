"""How long-running library functions report progress without printing.

Library code calls a :class:`Reporter`; the default one logs. The CLI passes one that draws
progress bars and tables on the console (``lensforge.cli``). Where nobody watches a terminal
(a log file, CI), progress is a plain line now and then (:class:`ProgressLines`), with the
rate and the time left, as Lightning's and Ultralytics' loggers do."""

from __future__ import annotations

import contextlib
import logging
import math
import time
from typing import Any, Callable, Iterator

log = logging.getLogger("lensforge")

LINE_EVERY_S = 30.0  # a progress line at least this often, so a log never looks stuck
LINE_EVERY_FRACTION = 0.1  # ... and, for training epochs, at least every 10 % of the epoch
METRIC_KEYS = ("train_loss", "val_loss", "val_acc", "val_f1", "val_map", "val_map50")  # the columns a task's rows have


class Reporter:
    def step(self, message: str) -> None:
        """A stage starts or a fact worth telling ("Exporting to ONNX")."""
        log.info(message)

    def warn(self, message: str) -> None:
        log.warning(message)

    def warn_once(self, key: str, message: str) -> None:
        """``warn`` unless a warning with this ``key`` was already given by this reporter (two
        checks of one condition, e.g. CPU contention at start and during training, say it once)."""
        given: set[str] = self.__dict__.setdefault("_warned", set())
        if key not in given:
            given.add(key)
            self.warn(message)

    @contextlib.contextmanager
    def track(self, description: str, total: int, *, unit: str = "img",
              every: float | None = None) -> Iterator[Callable[[int], None]]:
        """Yields ``advance(n)`` for ``total`` items (``unit``: what they are, for the rate).

        Where no bar is drawn, a line is logged every :data:`LINE_EVERY_S` seconds and, when
        ``every`` is given (a fraction of ``total``), each time that much more is done."""
        lines = ProgressLines(description, total, unit, every, log.info)
        yield lines.advance

    def epoch(self, row: dict[str, Any]) -> None:
        """One finished training epoch: epoch, epochs, train_loss, val_* metrics, best, and
        (from training) seconds, img_per_s and eta_s (the rest of the run, None if unknown)."""
        log.info(epoch_line(row))


class ProgressLines:
    """Decides when a plain progress line is due and writes it through ``write``.

    A line comes when :data:`LINE_EVERY_S` seconds have passed since the last one, or ``every``
    (a fraction of ``total``) more items are done, whichever first; none at 100 % (the caller
    reports the end: an epoch line, a summary). ``clock`` is injectable for tests."""

    def __init__(self, description: str, total: int, unit: str, every: float | None,
                 write: Callable[[str], None], clock: Callable[[], float] = time.perf_counter) -> None:
        self.description, self.total, self.unit, self.write, self.clock = description, total, unit, write, clock
        self.step = max(1, math.ceil(total * every)) if every and total > 0 else None
        self.done = 0
        self.start = self.last_time = clock()
        self.last_done = 0

    def advance(self, n: int = 1) -> None:
        self.done += n
        now = self.clock()
        if 0 < self.total <= self.done:
            return
        due_by_count = self.step is not None and self.done - self.last_done >= self.step
        if due_by_count or now - self.last_time >= LINE_EVERY_S:
            self.last_time, self.last_done = now, self.done
            self.write(progress_line(self.description, self.done, self.total, self.unit, now - self.start))


def progress_line(description: str, done: int, total: int, unit: str, seconds: float) -> str:
    """"epoch 2/15  480/1200 img (40%)  41.3 img/s  ETA 17s": where a long stage is, for logs."""
    rate = done / seconds if seconds > 0 else 0.0
    of = f"/{total}" if total > 0 else ""
    pct = f" ({100 * done / total:.0f}%)" if total > 0 else ""
    eta = f"  ETA {duration((total - done) / rate)}" if total > 0 and rate > 0 else ""
    return f"{description}  {done}{of} {unit}{pct}  {rate:.1f} {unit}/s{eta}"


def epoch_line(row: dict[str, Any]) -> str:
    """"epoch 3/15  train_loss 0.4121  val_acc 0.9310  ★ best  412.0 img/s  58s  ETA 11m36s"."""
    parts = [f"epoch {row.get('epoch')}/{row.get('epochs')}"]
    parts += [f"{k} {row[k]:.4f}" for k in METRIC_KEYS if k in row]
    if row.get("best"):
        parts.append("★ best")
    if row.get("img_per_s") is not None:
        parts.append(f"{row['img_per_s']:.1f} img/s")
    if row.get("seconds") is not None:
        parts.append(duration(row["seconds"]))
    if row.get("eta_s") is not None:
        parts.append(f"ETA {duration(row['eta_s'])}")
    return "  ".join(parts)


def duration(seconds: float) -> str:
    """3.2 → "3s", 125 → "2m05s", 7300 → "2h01m"."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"
