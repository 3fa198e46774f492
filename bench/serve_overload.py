"""`lensforge serve` past its capacity: 256 clients at once, then the memory it gives back.

RELIABILITY.md O13 and O15 as one measured row. The model is EfficientNet-Lite0 at 224 px with
random weights (bench/serve_load.py's bundle), every request a 640x480 JPEG to ``/predict``.

1. warm-up: 16 clients for a few seconds, then idle; the server's RSS then is the baseline;
2. overload: N clients (threads, each a keep-alive connection sending the next request as soon
   as the answer is in; a 503 is answered again at once, no back-off) for ``--seconds``, while
   one more client polls ``/healthz`` and ``/readyz`` (the orchestrator's view);
3. recovery: no load; RSS sampled every second for ``--recover`` seconds.

Reports the status-code mix, p50/p99 latency of the 200s and of the refusals, health success
rate and p99, RSS at baseline / peak / when the load ends / at the end of recovery, and how long
RSS took to come back within 10 % of the baseline (the O15 goal: within 60 s).

    python bench/serve_overload.py             # 256 clients x 30 s, 60 s recovery (~2 min)
    python bench/serve_overload.py --smoke     # 64 px, 32 clients x 2 s (< 30 s), checks the plumbing
"""

from __future__ import annotations

import argparse
import collections
import http.client
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import serve_load
from lensforge.hardware import cpu_count, describe

HEALTH = ("/healthz", "/readyz")


@dataclass
class Tally:
    codes: collections.Counter[str] = field(default_factory=collections.Counter)
    ok_latency: list[float] = field(default_factory=list)  # seconds, 200s
    refused_latency: list[float] = field(default_factory=list)  # seconds, 503s
    health: collections.Counter[str] = field(default_factory=collections.Counter)
    health_latency: list[float] = field(default_factory=list)


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) * 1000 if values else float("nan")


def overload(proc: serve_load.Proc, jpeg: bytes, clients: int, seconds: float) -> tuple[Tally, float]:
    """``clients`` closed-loop clients for ``seconds`` plus one health poller; returns the tally
    and the server's peak RSS (MB) over the run."""
    tally = Tally()
    lock = threading.Lock()
    end = time.monotonic() + seconds

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", proc.port, timeout=60)
        while time.monotonic() < end:
            t0 = time.monotonic()
            try:
                conn.request("POST", "/predict", jpeg, {"Content-Type": "image/jpeg"})
                r = conn.getresponse()
                r.read()
                code = str(r.status)
                if r.will_close:
                    conn.close()
            except (OSError, http.client.HTTPException) as e:
                code = f"{type(e).__name__}"
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", proc.port, timeout=60)
            elapsed = time.monotonic() - t0
            with lock:
                tally.codes[code] += 1
                if code == "200":
                    tally.ok_latency.append(elapsed)
                elif code == "503":
                    tally.refused_latency.append(elapsed)
        conn.close()

    def health() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", proc.port, timeout=60)
        while time.monotonic() < end:
            for path in HEALTH:
                t0 = time.monotonic()
                try:
                    conn.request("GET", path)
                    r = conn.getresponse()
                    r.read()
                    code = str(r.status)
                except (OSError, http.client.HTTPException) as e:
                    code = type(e).__name__
                    conn.close()
                with lock:
                    tally.health[code] += 1
                    tally.health_latency.append(time.monotonic() - t0)
            time.sleep(0.05)
        conn.close()

    return tally, serve_load.run_watching_rss(proc, [client] * clients + [health])


def recover(proc: serve_load.Proc, baseline: float, seconds: float) -> tuple[float, float | None]:
    """Idle for ``seconds``, sampling RSS every second: (RSS at the end, seconds until RSS first
    came within 10 % of ``baseline``, or None)."""
    start = time.monotonic()
    within: float | None = None
    while True:
        rss, elapsed = proc.rss_mb(), time.monotonic() - start
        if within is None and rss <= 1.1 * baseline:
            within = elapsed
        if elapsed >= seconds:
            return rss, within
        time.sleep(1.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=256)
    ap.add_argument("--seconds", type=float, default=30.0, help="overload duration (default 30)")
    ap.add_argument("--recover", type=float, default=60.0, help="idle seconds after the load (default 60)")
    ap.add_argument("--smoke", action="store_true", help="64 px model, 32 clients x 2 s, 3 s recovery: < 30 s")
    args = ap.parse_args()
    if args.smoke:
        serve_load.SIZE, args.clients, args.seconds, args.recover = 64, 32, 2.0, 3.0
    warm_s = 1.0 if args.smoke else 5.0

    with tempfile.TemporaryDirectory() as tmp:
        bundle = serve_load.make_bundle(Path(tmp) / "bundle")
        jpeg = serve_load.photo()
        server = serve_load.lensforge_serve(bundle)
        try:
            serve_load.load(server, "warm-up", "/predict", jpeg, "image/jpeg", 16, 0.0, warm_s / serve_load.WINDOWS)
            time.sleep(6.0)  # idle: the server gives back what the warm-up freed (serve/memory.py, after 2-3 s)
            baseline = server.rss_mb()
            tally, peak = overload(server, jpeg, args.clients, args.seconds)
            after_load = server.rss_mb()
            recovered, within = recover(server, baseline, args.recover)
        finally:
            server.stop()

    total = sum(tally.codes.values())
    health_total = sum(tally.health.values())
    mix = ", ".join(f"{code} {n} ({n / total:.1%})" for code, n in tally.codes.most_common())
    print(f"# lensforge serve overload — {serve_load.BACKBONE} at {serve_load.SIZE}px, random weights, 640x480 JPEG,"
          f" loopback, default settings")
    print(f"# {describe()} | onnxruntime threads {cpu_count()} | {args.clients} clients x {args.seconds:g} s,"
          f" {args.recover:g} s recovery")
    print(f"{'requests':24} {total} ({total / args.seconds:.1f}/s): {mix}")
    print(f"{'200 latency':24} p50 {pct(tally.ok_latency, 50):.0f} ms, p99 {pct(tally.ok_latency, 99):.0f} ms")
    print(f"{'503 latency':24} p50 {pct(tally.refused_latency, 50):.1f} ms, p99 {pct(tally.refused_latency, 99):.1f} ms")
    ok = tally.health.get("200", 0)
    print(f"{'health (healthz+readyz)':24} {ok}/{health_total} 200 ({ok / max(1, health_total):.1%}),"
          f" p99 {pct(tally.health_latency, 99):.1f} ms  goal: 100 %")
    came_back = f"within 10 % after {within:.0f} s" if within is not None else "not within 10 %"
    print(f"{'RSS MB':24} baseline {baseline:.0f}, peak {peak:.0f}, load end {after_load:.0f},"
          f" after {args.recover:g} s {recovered:.0f} ({came_back})  goal: within 10 % in 60 s")


if __name__ == "__main__":
    main()
