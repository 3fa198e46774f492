"""``POST /explain`` vs ``POST /predict`` latency on the same model and image (issue 14, goal <= 1.5x for CAM).

One run, one machine, loopback, one client (keep-alive), requests alternated so both see the same
machine load: median and p90 of each over ``--requests`` requests after a warm-up, and the ratio of
the medians. /explain is timed as JPEG overlay (the default), PNG overlay (``?format=png``, what the web
page asks for) and JSON. Then a 12-MP photo (4000x3000 JPEG, the sample photo resized up) end to end,
/predict and /explain JPEG: the server decodes it at a reduced DCT scale (Pillow's draft) and draws the
overlay at that size, the 7x7 map upsampled for display only.

    python bench/serve_explain.py [BUNDLE] [--image PATH] [--requests 50] [--smoke]

Last, the same image in-process (no HTTP, no threads between steps), median ms of each step of an
explanation next to predict's: where the route's time over /predict goes.

Without BUNDLE it builds one (EfficientNet-Lite0, random weights, with its explain graph);
``--smoke``: a 64 px one and 5 requests per route, seconds.

The default image is scikit-learn's ``china.jpg`` (640x427, a real photo).
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import requests
import uvicorn

from lensforge.serve import create_app


def sample_jpeg() -> bytes:
    from PIL import Image
    from sklearn.datasets import load_sample_images

    buf = io.BytesIO()
    Image.fromarray(load_sample_images().images[0]).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def twelve_mp_jpeg() -> bytes:
    """scikit-learn's china.jpg resized up to 4000x3000 (12 MP), JPEG quality 90."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    buf = io.BytesIO()
    Image.fromarray(load_sample_images().images[0]).resize((4000, 3000), Image.Resampling.BICUBIC).save(
        buf, "JPEG", quality=90)
    return buf.getvalue()


def serve(bundle: Path) -> tuple[str, uvicorn.Server, threading.Thread]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app({"m": bundle}, max_wait_ms=0), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    for _ in range(1200):
        try:
            if requests.get(url + "/readyz", timeout=2).status_code == 200:
                return url, server, thread
        except requests.ConnectionError:
            pass
        time.sleep(0.05)
    raise SystemExit("the server did not become ready within 60 s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path, nargs="?", help="default: a generated Lite0 bundle (random weights)")
    parser.add_argument("--image", type=Path)
    parser.add_argument("--requests", type=int, default=50)
    parser.add_argument("--smoke", action="store_true", help="a 64 px generated bundle, 5 requests per route")
    args = parser.parse_args()
    if args.smoke:
        args.requests = 5
    with tempfile.TemporaryDirectory() as tmp:
        if args.bundle is None:
            args.bundle = generated_bundle(Path(tmp) / "bundle", 64 if args.smoke else 224)
        run(args)


def generated_bundle(dest: Path, size: int) -> Path:
    """serve_load's random-weight Lite0 bundle at ``size`` px, with the explain graph added."""
    import serve_load

    from lensforge.explain.export import add_explain

    serve_load.SIZE = size
    serve_load.make_bundle(dest)
    add_explain(dest)
    return dest


def timed(session: requests.Session, url: str, routes: dict[str, str], data: bytes, rounds: int,
          warmup: int) -> dict[str, list[float]]:
    """Seconds per request of each route, routes alternated round by round, after ``warmup`` rounds."""
    times: dict[str, list[float]] = {name: [] for name in routes}
    for i in range(rounds + warmup):  # the warm-up rounds also open the explain session (lazily)
        for name, path in routes.items():
            t = time.perf_counter()
            r = session.post(url + path, data=data, timeout=120)
            elapsed = time.perf_counter() - t
            if r.status_code != 200:
                raise SystemExit(f"{path}: {r.status_code} {r.text[:200]}")
            if i >= warmup:
                times[name].append(elapsed)
    return times


def report(title: str, times: dict[str, list[float]]) -> None:
    base = statistics.median(times["predict"])
    print(f"{title:<20}{'p50 ms':>9}{'p90 ms':>9}{'x predict':>11}")
    for name, ts in times.items():
        p50 = statistics.median(ts)
        p90 = statistics.quantiles(ts, n=10)[-1] if len(ts) > 1 else ts[0]
        print(f"{name:<20}{p50 * 1e3:>9.1f}{p90 * 1e3:>9.1f}{p50 / base:>11.2f}")


def steps(bundle: Path, data: bytes, rounds: int) -> dict[str, float]:
    """Median ms of each step of one explanation in-process, beside predict's: decode, the explain graph
    vs the predict graph, the map brought to the image (to_image), the overlay, JPEG and PNG encoding."""
    from lensforge.runtime import Predictor
    from lensforge.runtime.explain import explanations
    from lensforge.runtime.preprocess import preprocess
    from lensforge.serve.explain import encode_png, render

    predictor = Predictor(bundle)
    img = predictor.load(data)
    predictor.explain(img)  # opens the explain session
    explainer = predictor._explainer
    assert explainer is not None
    batch = preprocess(img, explainer.spec)[None]
    times: dict[str, list[float]] = {}

    def timed_step(name: str, fn: Any, *a: Any) -> Any:
        t = time.perf_counter()
        out = fn(*a)
        times.setdefault(name, []).append(time.perf_counter() - t)
        return out

    for _ in range(rounds):
        timed_step("predict (all)", predictor.predict, data)
        timed_step("decode", predictor.load, data)
        timed_step("predict graph", predictor.run, batch)
        cams, scores = timed_step("explain graph", explainer.run, batch)
        e = timed_step("map to image", explanations, img, cams[0], scores[0], explainer.classes, explainer.spec,
                       "cam", None, 1)[0]
        overlay = timed_step("overlay", e.overlay)
        timed_step("overlay + jpeg", render, e, "jpeg")  # as the route renders it
        timed_step("png encode", encode_png, overlay)  # the encoding alone
        timed_step("explain (all)", lambda: render(predictor.explain(data), "jpeg"))
    return {name: statistics.median(ts) * 1e3 for name, ts in times.items()}


def run(args: argparse.Namespace) -> None:
    data = args.image.read_bytes() if args.image else sample_jpeg()
    big = twelve_mp_jpeg()
    load_before = os.getloadavg()[0]
    url, server, thread = serve(args.bundle)
    routes = {"predict": "/predict/m", "explain jpeg": "/explain/m", "explain png": "/explain/m?format=png",
              "explain json": "/explain/m?format=json"}
    with requests.Session() as session:
        small_times = timed(session, url, routes, data, args.requests, 5)
        big_times = timed(session, url, {"predict": "/predict/m", "explain jpeg": "/explain/m"}, big,
                          max(3, args.requests // 5), 1)
    server.should_exit = True
    thread.join(timeout=15)
    in_process = steps(args.bundle, data, args.requests)
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, python {sys.version.split()[0]}, "
          f"load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after")
    print(f"# bundle {args.bundle}, {args.requests} requests per route, alternated")
    report(f"image {len(data) // 1000} kB", small_times)
    report(f"12 MP {len(big) // 1000} kB", big_times)
    print(f"in-process, image   {'p50 ms':>9}")
    for name, ms in in_process.items():
        print(f"{name:<20}{ms:>9.2f}")
    print(f"explain (all) / predict (all) in-process: {in_process['explain (all)'] / in_process['predict (all)']:.2f}x")


if __name__ == "__main__":
    main()
