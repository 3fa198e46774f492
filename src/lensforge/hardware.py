"""What this CPU can do, detected rather than assumed."""

from __future__ import annotations

import functools
import os
import platform
import time
from pathlib import Path


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags from /proc/cpuinfo (empty where there is none, e.g. macOS)."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


@functools.lru_cache(maxsize=1)
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def has_native_bf16() -> bool:
    """True where bf16 matmuls run in hardware (AMX-BF16 or AVX512-BF16).

    On AVX2-only CPUs bf16 autocast is emulated and about 10x slower than fp32
    (EfficientNet-Lite0 at batch 1: 23.9 img/s fp32 vs 2.2 img/s bf16), so training only
    turns it on where this says so.
    """
    flags = cpu_flags()
    return bool({"amx_bf16", "avx512_bf16"} & flags)


def has_int8_dot() -> bool:
    """True where int8 dot products are fast (AVX512-VNNI, AVX-VNNI or AMX-INT8)."""
    return bool({"avx512_vnni", "avx_vnni", "amx_int8"} & cpu_flags())


def cpu_count() -> int:
    """Cores this process may use: the affinity mask, capped by a cgroup v2 CPU quota
    (``docker --cpus``), so thread pools don't oversubscribe a container."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        n = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            n = min(n, max(1, int(int(quota) / int(period))))
    except (OSError, ValueError):
        pass  # no cgroup v2 quota visible: the affinity mask is the limit
    return n


def describe() -> str:
    """One line for benchmark headers and run metadata."""
    simd = "AMX" if "amx_tile" in cpu_flags() else "AVX-512" if "avx512f" in cpu_flags() else (
        "AVX2" if "avx2" in cpu_flags() else platform.machine()
    )
    return f"{cpu_model()} | {cpu_count()} threads | {simd}, native bf16: {has_native_bf16()}, int8 dot: {has_int8_dot()}"


# -- is other work competing for the cores? ---------------------------------------------------
# Training on a shared machine runs at a fraction of its usual speed, which looks like a bug
# unless someone says why; these checks say it, with the numbers.

BUSY_SHARE = 0.9  # the cores count as saturated above this busy fraction
OTHERS_MIN_CORES = 0.5  # ... and other processes must have used at least this many cores


def allowed_cpus() -> int:
    """CPUs the scheduler may run this process on (the affinity mask; no cgroup quota): the
    cores :func:`cpu_sample` sums over."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def load_average() -> float | None:
    """The 1-minute load average (runnable and waiting tasks, whole system); None where unknown."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def load_warning(load: float | None, system_cpus: int, threads: int, cores: int) -> str | None:
    """Why training will be slow before it starts, or None: more threads asked for than this
    process has cores, or a load average above the system's CPU count (``os.cpu_count()``:
    the load counts tasks of the whole system, so it is compared with all of its CPUs)."""
    if threads > cores:
        return f"{threads} threads on {cores} core(s): training will be slower than with --threads {cores}"
    if load is not None and load > system_cpus:
        return (f"load average {load:.1f} on {system_cpus} core(s): other work is competing for the CPUs, "
                f"training will be slower than usual")
    return None


def cpu_sample() -> tuple[float, float, float | None]:
    """(wall seconds, this process's CPU seconds, busy CPU seconds of the cores it may run on
    from /proc/stat, None where unreadable): two samples give each one's share of the cores."""
    wall, ours = time.perf_counter(), time.process_time()
    try:
        allowed = {f"cpu{i}" for i in os.sched_getaffinity(0)}
        tick = os.sysconf("SC_CLK_TCK")
        busy = 0
        for line in Path("/proc/stat").read_text().splitlines():
            name, *fields = line.split()
            if name in allowed:
                values = [int(v) for v in fields[:8]]  # user nice system idle iowait irq softirq steal
                busy += sum(values) - values[3] - values[4]
        return wall, ours, busy / tick
    except (AttributeError, OSError, ValueError):
        return wall, ours, None


def contention_warning(before: tuple[float, float, float | None], after: tuple[float, float, float | None],
                       threads: int, cores: int, what: str) -> str | None:
    """Why training is slower than it should be, measured between two :func:`cpu_sample`\\ s,
    or None: the cores were saturated, other processes used a real share of them, and this
    process got less than the ``threads`` it asked for. ``what``: the span, for the message."""
    wall = after[0] - before[0]
    if wall <= 0 or before[2] is None or after[2] is None:
        return None
    ours = (after[1] - before[1]) / wall
    busy = (after[2] - before[2]) / wall
    others = max(0.0, busy - ours)
    wanted = min(threads, cores)
    if busy >= BUSY_SHARE * cores and others >= OTHERS_MIN_CORES and ours < 0.8 * wanted:
        return (f"other processes used {others:.1f} of {cores} core(s) during {what} (training got {ours:.1f} of "
                f"the {wanted} it asked for): training will be slower than usual")
    return None
