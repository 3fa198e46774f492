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

from lensforge.ui import Reporter

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)

EPOCH_KEYS = ("train_loss", "val_loss", "val_acc", "val_f1", "val_map", "val_map50")  # the columns a task's rows have


def _ignore(n: int = 1) -> None:
    """``advance`` where no bar is drawn."""


class ConsoleReporter(Reporter):
    """Progress bars, one line per stage, and a per-epoch table on the console."""

    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet
        self._epoch_header = False

    def step(self, message: str) -> None:
        if not self.quiet:
            console.print(f"[bold cyan]›[/] {escape(message)}")  # messages hold paths: never markup

    def warn(self, message: str) -> None:
        err_console.print(f"[yellow]warning:[/] {escape(message)}", soft_wrap=True)  # one line, like errors

    @contextlib.contextmanager
    def track(self, description: str, total: int) -> Iterator[Callable[[int], None]]:
        if self.quiet or total <= 0 or not err_console.is_terminal:  # no bars in logs and CI
            yield _ignore
            return
        cols = (TextColumn("  {task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn())
        with Progress(*cols, console=err_console, transient=True) as progress:
            task = progress.add_task(description, total=total)

            def advance(n: int = 1) -> None:
                progress.advance(task, n)

            yield advance

    def epoch(self, row: dict[str, Any]) -> None:
        keys = [k for k in EPOCH_KEYS if k in row]
        if not self._epoch_header:
            console.print("  " + "epoch".ljust(8) + "".join(k.rjust(12) for k in keys))
            self._epoch_header = True
        cells = "".join(f"{row[k]:12.4f}" for k in keys)
        mark = "  [green]★ best[/]" if row.get("best") else ""
        console.print(f"  {str(row['epoch']) + '/' + str(row['epochs']):8}{cells}{mark}")
