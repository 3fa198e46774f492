"""How long-running library functions report progress without printing.

Library code calls a :class:`Reporter`; the default one logs. The CLI passes one that draws
progress bars and tables on the console (``lensforge.cli``)."""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Callable, Iterator

log = logging.getLogger("lensforge")


class Reporter:
    def step(self, message: str) -> None:
        """A stage starts or a fact worth telling ("Exporting to ONNX")."""
        log.info(message)

    def warn(self, message: str) -> None:
        log.warning(message)

    @contextlib.contextmanager
    def track(self, description: str, total: int) -> Iterator[Callable[[int], None]]:
        """Yields ``advance(n)`` for a progress bar of ``total`` items."""
        yield lambda n=1: None

    def epoch(self, row: dict[str, Any]) -> None:
        """One finished training epoch: epoch, epochs, train_loss, val_* metrics, best."""
        log.info("epoch %s/%s %s", row.get("epoch"), row.get("epochs"), {k: v for k, v in row.items() if k.startswith(("val_", "train_"))})
