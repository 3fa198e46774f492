"""Progress where nobody watches a terminal (``lensforge train DATA > train.log``): plain lines
per group of batches and per epoch, with images/s and an ETA; ``--quiet`` keeps only
warnings and the summary; a warning, with numbers, when other work takes the CPUs."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from rich.console import Console

from lensforge.cli.console import ConsoleReporter
from lensforge.hardware import contention_warning, load_warning
from lensforge.ui import ProgressLines, Reporter, duration, epoch_line, progress_line


class Clock:
    """A clock the test moves: ``ProgressLines`` must not depend on how fast the machine is."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _lines_at(total: int, every: float | None, step: int, seconds_per_step: float) -> list[int]:
    """Advance ``ProgressLines`` to ``total`` by ``step`` items, each step taking
    ``seconds_per_step``; returns the item counts at which a line was written."""
    clock, written = Clock(), []
    lines = ProgressLines("epoch 1/1", total, "img", every, written.append, clock=clock)
    for _ in range(0, total, step):
        clock.now += seconds_per_step
        lines.advance(step)
    return [int(text.split()[2].split("/")[0]) for text in written]


@pytest.mark.parametrize(("total", "every", "step", "seconds", "expected"), [
    (100, 0.1, 1, 0.01, [10, 20, 30, 40, 50, 60, 70, 80, 90]),  # fast: every 10 %, none at 100 %
    (24, 0.1, 8, 0.01, [8, 16]),  # 3 batches of 8: each batch is past 10 %
    (100, 0.1, 1, 5.0, [6, 12, 18, 24, 30, 36, 42, 48, 54, 60, 66, 72, 78, 84, 90, 96]),  # slow: every 30 s first
    (100, None, 1, 1.0, [30, 60, 90]),  # no fraction (scoring, decoding): time alone
    (100, None, 1, 0.01, []),  # ... and a quick stage stays silent
    (0, 0.1, 1, 0.0, []),  # nothing to do
])
def test_a_line_comes_every_10_percent_or_30_seconds_whichever_first(
    total: int, every: float | None, step: int, seconds: float, expected: list[int]
) -> None:
    assert _lines_at(total, every, step, seconds) == expected


@pytest.mark.parametrize(("args", "expected"), [
    (("epoch 2/15", 480, 1200, "img", 10.0), "epoch 2/15  480/1200 img (40%)  48.0 img/s  ETA 15s"),
    (("Scoring", 30, 0, "img", 2.0), "Scoring  30 img  15.0 img/s"),  # unknown total: no percentage, no ETA
    (("Benchmarking", 0, 10, "cells", 0.0), "Benchmarking  0/10 cells (0%)  0.0 cells/s"),
])
def test_progress_line(args: tuple, expected: str) -> None:
    assert progress_line(*args) == expected


@pytest.mark.parametrize(("seconds", "text"), [(3.2, "3s"), (59.6, "1m00s"), (125, "2m05s"), (7300, "2h01m"), (-1, "0s")])
def test_duration(seconds: float, text: str) -> None:
    assert duration(seconds) == text


def test_epoch_line_is_self_describing() -> None:
    row = {"epoch": 3, "epochs": 15, "train_loss": 0.41213, "val_acc": 0.931, "best": True, "seconds": 58.2,
           "img_per_s": 412.04, "eta_s": 696.0, "lr": 0.1}
    assert epoch_line(row) == "epoch 3/15  train_loss 0.4121  val_acc 0.9310  ★ best  412.0 img/s  58s  ETA 11m36s"
    assert epoch_line({"epoch": 1, "epochs": 1, "eta_s": None}) == "epoch 1/1"


def _consoles(terminal: bool = False) -> tuple[Console, io.StringIO, Console, io.StringIO]:
    out, err = io.StringIO(), io.StringIO()
    return (Console(file=out, width=60, force_terminal=terminal, color_system=None), out,
            Console(file=err, width=60, force_terminal=terminal, color_system=None), err)


def _use(ui: ConsoleReporter) -> None:
    ui.step("Fine-tuning a model with a long description that is wider than the console")
    with ui.track("epoch 1/2", 40, every=0.1) as advance:
        for _ in range(10):
            advance(4)
    ui.epoch({"epoch": 1, "epochs": 2, "train_loss": 1.0, "best": True, "img_per_s": 20.0, "seconds": 2.0, "eta_s": 2.0})
    ui.warn("something to know")


def test_console_reporter_writes_plain_lines_where_stdout_is_not_a_terminal() -> None:
    out_console, out, err_console, err = _consoles()
    _use(ConsoleReporter(out=out_console, err=err_console))
    lines = out.getvalue().splitlines()
    assert lines[0] == "› Fine-tuning a model with a long description that is wider than the console"  # never wrapped
    assert [line.split()[2] for line in lines[1:-1]] == [f"{n}/40" for n in range(4, 40, 4)]
    assert all(" img/s  ETA " in line for line in lines[1:-1])
    assert lines[-1] == "  epoch 1/2  train_loss 1.0000  ★ best  20.0 img/s  2s  ETA 2s"
    assert err.getvalue() == "warning: something to know\n"


def test_quiet_keeps_only_warnings() -> None:
    out_console, out, err_console, err = _consoles()
    _use(ConsoleReporter(quiet=True, out=out_console, err=err_console))
    assert out.getvalue() == ""
    assert err.getvalue() == "warning: something to know\n"


def test_a_terminal_gets_a_bar_and_a_table_not_lines() -> None:
    out_console, out, err_console, _ = _consoles(terminal=True)
    _use(ConsoleReporter(out=out_console, err=err_console))
    text = out.getvalue()
    header = [line for line in text.splitlines() if line.startswith("  epoch ")]
    assert "4/40" not in text and len(header) == 1 and header[0].split()[-2:] == ["img/s", "ETA"]


def test_warn_once_says_a_thing_once() -> None:
    said: list[str] = []

    class Collect(Reporter):
        def warn(self, message: str) -> None:
            said.append(message)

    ui = Collect()
    ui.warn_once("cpu", "first")
    ui.warn_once("cpu", "second")
    ui.warn_once("disk", "third")
    assert said == ["first", "third"]


# -- oversubscription --------------------------------------------------------------------------


@pytest.mark.parametrize(("load", "system_cpus", "threads", "cores", "expected"), [
    (6.3, 2, 2, 2, "load average 6.3 on 2 core(s)"),
    (1.5, 2, 2, 2, None),
    (None, 2, 2, 2, None),  # no load average on this platform
    (40.0, 64, 2, 2, None),  # a busy host, but not saturated: the load counts all 64 CPUs
    (0.1, 2, 8, 2, "8 threads on 2 core(s)"),  # --threads above the cores this process may use
])
def test_load_warning(load: float | None, system_cpus: int, threads: int, cores: int, expected: str | None) -> None:
    got = load_warning(load, system_cpus, threads, cores)
    assert (got is None) if expected is None else (got is not None and got.startswith(expected) and "slower" in got)


@pytest.mark.parametrize(("ours", "busy", "threads", "cores", "expected"), [
    (0.6, 2.0, 2, 2, "other processes used 1.4 of 2 core(s) during the first 8 batches (training got 0.6 of the 2"),
    (1.9, 2.0, 2, 2, None),  # training has its cores; the rest is noise
    (0.6, 0.7, 2, 2, None),  # idle cores: training is slow for its own reasons (data loading), not competition
    (0.9, 1.9, 1, 2, None),  # one thread asked for, one core used: nobody took anything
    (0.3, 1.96, 1, 2, "other processes used 1.7 of 2 core(s)"),
])
def test_contention_warning(ours: float, busy: float, threads: int, cores: int, expected: str | None) -> None:
    before = (100.0, 10.0, 1000.0)
    after = (110.0, 10.0 + 10 * ours, 1000.0 + 10 * busy)  # 10 s apart
    got = contention_warning(before, after, threads, cores, "the first 8 batches")
    assert (got is None) if expected is None else (got is not None and got.startswith(expected))
    assert contention_warning(before, (after[0], after[1], None), threads, cores, "x") is None  # no /proc/stat


# -- a real run ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_training_run_logs_lines_per_batch_group_and_per_epoch(tmp_path: Path, shapes_dir: Path) -> None:
    import lensforge

    out_console, out, err_console, _ = _consoles()
    ui = ConsoleReporter(out=out_console, err=err_console)
    # 26 training images, batches of 8 with the last short one dropped: 3 batches (24 images) an epoch
    lensforge.train(data=str(shapes_dir), out=str(tmp_path / "run"), pretrained=False, image_size=64, epochs=2,
                    batch_size=8, reporter=ui)
    lines = [line.strip() for line in out.getvalue().splitlines()]
    for epoch in (1, 2):
        progress = [line for line in lines if line.startswith(f"epoch {epoch}/2  ") and " img (" in line]
        assert [line.split()[2] for line in progress] == ["8/24", "16/24"], lines
        assert all(" img/s  ETA " in line for line in progress)
        done = [line for line in lines if line.startswith(f"epoch {epoch}/2  train_loss ")]
        assert len(done) == 1 and " img/s  " in done[0] and "val_acc " in done[0], lines
        assert ("ETA " in done[0]) == (epoch == 1)  # the last epoch has nothing left to estimate
