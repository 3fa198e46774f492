"""Memory given back after load (RELIABILITY.md O15): when the idle trim fires, and that the
arena shrink and malloc_trim really return memory. The end-to-end figure (256 clients, RSS back
within 10 % of the warmed-up baseline) is bench/serve_overload.py's row."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lensforge.runtime import Predictor
from lensforge.serve import memory
from lensforge.serve.server import smallest_input
from serving import conv_bundle


def run_trimmer(activity: list[int], ticks: int) -> list[tuple[int, str]]:
    """Drive trim_when_idle with a scripted activity counter (one value per tick, the last
    repeated); returns (tick, what ran) for every shrink and release."""
    calls: list[tuple[int, str]] = []
    tick = [0]

    async def shrink() -> None:
        calls.append((tick[0], "shrink"))

    async def release() -> None:
        calls.append((tick[0], "release"))

    async def main() -> None:
        original = memory.release
        memory.release = release  # type: ignore[assignment]
        try:
            task = asyncio.create_task(memory.trim_when_idle(
                lambda: activity[min(tick[0], len(activity) - 1)], shrink, idle_s=0.05, check_s=0.01))
            for tick[0] in range(ticks):
                await asyncio.sleep(0.01)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        finally:
            memory.release = original  # type: ignore[assignment]

    asyncio.run(main())
    return calls


def test_idle_trim_waits_for_the_load_to_end_and_fires_once() -> None:
    busy = list(range(30))  # a request starts or ends at every tick for 30 ticks, then nothing
    calls = run_trimmer(busy, ticks=80)
    assert [what for _, what in calls] == ["shrink", "release"], calls
    assert all(at >= 30 for at, _ in calls), calls  # never while requests come and go


def test_no_trim_without_requests() -> None:
    assert run_trimmer([0], ticks=30) == []


def test_configure_malloc_keeps_an_explicit_setting() -> None:
    # the user's MALLOC_ARENA_MAX wins: configure_malloc leaves it alone (glibc reads the env itself)
    code = ("from unittest import mock; import lensforge.serve.memory as m\n"
            "libc = mock.Mock(); m._glibc = lambda: libc; m.configure_malloc()\n"
            "print(sorted(c.args[0] for c in libc.mallopt.call_args_list))")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")} | {"MALLOC_ARENA_MAX": "4"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env,
                         check=True).stdout.strip()
    assert out == str([memory.M_MMAP_THRESHOLD]), out


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.mark.skipif(memory.malloc_trim() is None, reason="malloc_trim is glibc's")
def test_shrink_and_trim_return_the_arena(tmp_path: Path) -> None:
    # a 224 px model after batches of 32: its onnxruntime arena holds their activations until shrunk
    predictor = Predictor(conv_bundle(tmp_path / "b"), threads=1)
    x = smallest_input(predictor)
    predictor.run_many([x])
    memory.malloc_trim()()  # type: ignore[misc]
    before = rss_mb()
    for _ in range(3):
        predictor.run_many([x] * 32)
    grown = rss_mb()
    predictor.release_memory()
    memory.malloc_trim()()  # type: ignore[misc]
    after = rss_mb()
    assert grown - before > 20, (before, grown)  # the batches' activations: ~45 MB at batch 32
    assert after - before < 0.25 * (grown - before), (before, grown, after)
