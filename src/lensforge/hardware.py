"""What this CPU can do, detected rather than assumed."""

from __future__ import annotations

import functools
import os
import platform
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
