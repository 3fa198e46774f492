"""The consoles the CLI draws on, and the :class:`~lensforge.ui.Reporter` that draws there."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from lensforge.ui import METRIC_KEYS, ProgressLines, Reporter, duration, epoch_line

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)

EPOCH_KEYS = METRIC_KEYS  # the columns a task's rows have


class ConsoleReporter(Reporter):
    """Progress bars, one line per stage, and a per-epoch table on the console.

    Where stdout is not a terminal (``lensforge train DATA > train.log``, CI), progress is
    plain lines on stdout instead, with the rate and the time left (see
    :class:`~lensforge.ui.ProgressLines`); a bar is still drawn on stderr if that is a terminal.
    ``quiet``: warnings only (the command prints its own final summary).
    ``out`` / ``err``: the consoles to draw on (tests pass consoles writing to a StringIO)."""

    def __init__(self, quiet: bool = False, out: Console | None = None, err: Console | None = None) -> None:
        self.quiet = quiet
        self.out = out or console
        self.err = err or err_console
        self._epoch_header = False

    @property
    def lines(self) -> bool:
        """Plain progress lines rather than bars and a table: nobody watches stdout as a
        terminal (a bar on a terminal stderr does not reach a log of stdout)."""
        return not (self.out.is_terminal and self.err.is_terminal)

    def step(self, message: str) -> None:
        if not self.quiet:
            # messages hold paths: never markup; one line per message in a log
            self.out.print(f"[bold cyan]›[/] {escape(message)}", soft_wrap=self.lines)

    def warn(self, message: str) -> None:
        self.err.print(f"[yellow]warning:[/] {escape(message)}", soft_wrap=True)  # one line, like errors

    @contextlib.contextmanager
    def track(self, description: str, total: int, *, unit: str = "img",
              every: float | None = None) -> Iterator[Callable[[int], None]]:
        if self.quiet or total <= 0:
            yield _ignore
            return
        with contextlib.ExitStack() as stack:
            advances = []
            if self.err.is_terminal:
                advances.append(stack.enter_context(self._bar(description, total)))
            if self.lines:
                # soft_wrap: one line per record in a log, however narrow the pretend terminal
                advances.append(ProgressLines(description, total, unit, every,
                                              lambda text: self.out.print("  " + escape(text), soft_wrap=True)).advance)

            def advance(n: int = 1) -> None:
                for a in advances:
                    a(n)

            yield advance

    @contextlib.contextmanager
    def _bar(self, description: str, total: int) -> Iterator[Callable[[int], None]]:
        cols = (TextColumn("  {task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn())
        with Progress(*cols, console=self.err, transient=True) as progress:
            task = progress.add_task(description, total=total)

            def advance(n: int = 1) -> None:
                progress.advance(task, n)

            yield advance

    def epoch(self, row: dict[str, Any]) -> None:
        if self.quiet:
            return
        if self.lines:  # self-describing lines: a log is read (and grepped) one line at a time
            self.out.print("  " + escape(epoch_line(row)), soft_wrap=True)
            return
        keys = [k for k in EPOCH_KEYS if k in row]
        if not self._epoch_header:
            self.out.print("  " + "epoch".ljust(8) + "".join(k.rjust(12) for k in keys) + "img/s".rjust(10) + "ETA".rjust(10))
            self._epoch_header = True
        cells = "".join(f"{row[k]:12.4f}" for k in keys)
        speed = f"{row['img_per_s']:10.1f}" if row.get("img_per_s") is not None else " " * 10
        eta = duration(row["eta_s"]).rjust(10) if row.get("eta_s") is not None else " " * 10
        mark = "  [green]★ best[/]" if row.get("best") else ""
        self.out.print(f"  {str(row['epoch']) + '/' + str(row['epochs']):8}{cells}{speed}{eta}{mark}")


def _ignore(n: int = 1) -> None:
    """``advance`` where nothing is drawn."""
