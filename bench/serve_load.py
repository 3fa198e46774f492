"""`lensforge serve` under closed-loop load, against its ceiling and the seed Flask app.

One run, one machine, loopback only. The model is EfficientNet-Lite0 at 224 px with random
weights (speed does not depend on them), exported to a bundle on the fly; every request is a
640x480 JPEG. Each row is N clients (threads, each with a keep-alive connection, sending the
next request as soon as the last answer arrives); each row is the median of 3 windows after
a warm-up (the machine may be shared):

- lensforge serve, raw JPEG body to ``/predict``, dynamic batching on, N = 1, 4, 16, 64;
- the same with batching off (``--max-batch 1``) at N = 16;
- lensforge and the seed app with the seed contract (double-encoded JSON, base64 ``raw_file``);
- the seed app: Flask + gunicorn sync workers + torch eager (bench/_flask_seed.py), as users
  run it (torch's default threads) with 1 and with 2 workers, and tuned (2 workers x 1 torch
  thread), N = 1, 16 (``--quick``: N = 16, without the 2-worker default, which thrashes); the
  goal is checked against the best of them;
- TorchServe (when ``torchserve`` and ``java`` are installed) serving this bundle's own
  ``.mar`` (``lensforge export --format torchserve``: the same ONNX model through the same
  Predictor in lensforge's handler) with TorchServe's defaults, raw JPEG, N = 16;
- the ceiling: the in-process Predictor at its best batch size, end to end (decode +
  preprocess + run from JPEG bytes, ``predict_many``) and model only (``run`` on tensors);
- not ``--smoke``: the int8 copy of the model (``export_int8``, minmax on 32 generated images;
  its accuracy on real data is the export's business, recorded in its bundle) served by
  lensforge and, when installed, by TorchServe from its own ``.mar``, N = 16. The seed app has
  no int8 path: those rows show what a user gains by exporting, not the same precision.

Every server here is bounded by the end-to-end ceiling (2 cores do all of it), so the
goals' reachable part is printed too: ceiling / best seed app is the most any server of
this model could get against the seed app, TorchServe / ceiling how close TorchServe is.

Reports req/s, p50/p95/p99 latency, errors and the server's peak RSS per row, then the goals:
serve at 16 clients >= 85 % of the end-to-end ceiling, that ceiling >= 70 % of model only,
>= 4x the seed app, >= 2x TorchServe with a p99
no worse, p99 <= 2x p50. The header names the CPU and the load average (the machine may be
shared: compare the ratios, which come from one run).

    python bench/serve_load.py            # ~7 min on 2 cores
    python bench/serve_load.py --quick    # ~2 min
    python bench/serve_load.py --smoke    # 64 px, lensforge and the 1-worker seed app at 4 clients, no goals: checks the plumbing
"""

from __future__ import annotations

import argparse
import base64
import http.client
import io
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

from lensforge.export.onnx import export_onnx
from lensforge.export.quantize import export_int8
from lensforge.export.torchserve import export_torchserve
from lensforge.hardware import cpu_count, describe
from lensforge.models import Classifier, ScoresModel, create_backbone
from lensforge.runtime import InputSpec, Predictor
from lensforge.runtime.bundle import MODEL_FILE, WEIGHTS_FILE, write_meta

HERE = Path(__file__).resolve().parent
BACKBONE, SIZE = "efficientnet_lite0", 224
SEED_TUNED = "seed app, 2w x 1 torch thread"
TORCHSERVE = "TorchServe, defaults"
TORCHSERVE_INT8 = "TorchServe, defaults, int8"
INT8 = "lensforge int8, raw JPEG"


# -- the model and the input --------------------------------------------------------------


def make_bundle(dest: Path) -> Path:
    """EfficientNet-Lite0, 10 classes, random weights: ONNX for lensforge, safetensors for the seed app."""
    backbone, _ = create_backbone(BACKBONE, pretrained=False)
    classifier = Classifier(backbone, 10)
    spec = InputSpec.for_size(SIZE)
    dest.mkdir(parents=True)
    export_onnx(ScoresModel(classifier, multilabel=False).eval(), torch.zeros(1, 3, SIZE, SIZE), dest / MODEL_FILE)
    save_file(classifier.state_dict(), str(dest / WEIGHTS_FILE))
    write_meta(dest, {"task": "classify", "classes": [f"class_{i}" for i in range(10)], "input": spec.to_dict(),
                      "model": {"backbone": BACKBONE, "head": "linear"}})
    return dest


def make_int8(bundle: Path, dest: Path) -> Path:
    """The int8 copy (minmax on 32 smooth random images: speed does not depend on the
    calibration; random weights make the accuracy check meaningless, hence ``force``)."""
    calib = dest.with_name(dest.name + "-calib")
    calib.mkdir()
    rng = np.random.default_rng(0)
    for i in range(32):
        small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        Image.fromarray(small).resize((SIZE + 32, SIZE + 32), Image.BICUBIC).save(calib / f"{i}.jpg")
    return export_int8(bundle, dest, calib_dir=calib, calib=32, method="minmax", force=True)


def photo() -> bytes:
    """A 640x480 JPEG with photo-like content (smooth gradients plus noise), ~60 KB."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:480, 0:640]
    base = np.stack([x / 640 * 255, y / 480 * 255, (x + y) / 1120 * 255], -1)
    pixels = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def seed_body(jpeg: bytes) -> bytes:
    """The seed contract: a JSON string holding the JSON object (double-encoded), base64 raw_file."""
    return json.dumps(json.dumps({"raw_file": base64.b64encode(jpeg).decode()})).encode()


# -- servers ------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Proc:
    popen: subprocess.Popen[bytes]
    port: int
    group: bool = False  # started in its own session: stop() signals the whole process group

    def pids(self) -> list[int]:
        """The server and all its descendants (gunicorn forks workers; TorchServe's launcher
        starts java, which starts the Python workers)."""
        parents: dict[int, int] = {}
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                except (OSError, IndexError, ValueError):
                    pass
        found = [self.popen.pid]
        for pid in found:  # grows while it is walked: breadth-first over the tree
            found.extend(child for child, parent in parents.items() if parent == pid)
        return found

    def rss_mb(self) -> float:
        total = 0
        for pid in self.pids():
            try:
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
            except OSError:
                pass
        return total / 1024

    def stop(self) -> None:
        if self.popen.poll() is None or self.group:
            self.signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=40)
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
                self.popen.wait()

    def signal(self, sig: int) -> None:
        try:
            if self.group:  # the launcher may exit before its java and workers do
                os.killpg(self.popen.pid, sig)
            else:
                self.popen.send_signal(sig)
        except ProcessLookupError:
            pass


def start(argv: list[str], port: int, probe: str, env: dict[str, str] | None = None, *, body: bytes | None = None,
          content_type: str = "application/json", within_s: float = 120, request_timeout_s: float = 5,
          group: bool = False, cwd: Path | None = None) -> Proc:
    """Start ``argv`` and wait until ``probe`` answers 200 (GET, or POST of ``body``)."""
    popen = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=cwd or HERE.parent,
                             start_new_session=group)
    proc = Proc(popen, port, group)
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if popen.poll() is not None and not group:
            raise RuntimeError(f"{' '.join(argv)} exited with {popen.returncode}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=request_timeout_s)
            if body is None:
                conn.request("GET", probe)
            else:
                conn.request("POST", probe, body, {"Content-Type": content_type})
            response = conn.getresponse()
            response.read()
            if response.status == 200:
                return proc
        except (OSError, http.client.HTTPException):
            pass
        time.sleep(0.5 if group else 0.2)
    proc.signal(signal.SIGKILL)
    popen.wait()
    raise RuntimeError(f"{' '.join(argv)} did not answer {probe} within {within_s:.0f} s")


def lensforge_serve(bundle: Path, *options: str) -> Proc:
    port = free_port()
    argv = [sys.executable, "-m", "lensforge.cli", "serve", str(bundle), "--port", str(port), "--drain", "0", *options]
    return start(argv, port, "/readyz")


def flask_seed(bundle: Path, torch_threads: int | None = None, workers: int = 2) -> Proc:
    """gunicorn with ``workers`` sync workers; Flask has no health route: ready when ``/predict`` answers.

    torch_threads: ``SEED_TORCH_THREADS`` (None: torch's default, as the seed apps run)."""
    port = free_port()
    gunicorn = str(Path(sys.executable).with_name("gunicorn"))
    argv = [gunicorn, "-w", str(workers), "-b", f"127.0.0.1:{port}", "--chdir", str(HERE), "--log-level", "warning",
            "_flask_seed:app"]
    env = {**os.environ, "SEED_BUNDLE": str(bundle), **({"SEED_TORCH_THREADS": str(torch_threads)} if torch_threads else {})}
    # a first /predict loads torch and the model in each worker: slow, hence the long waits
    return start(argv, port, "/predict", env, body=seed_body(photo()), within_s=180, request_timeout_s=30)


def torchserve_exe() -> str | None:
    """The torchserve launcher (the venv's own first), or None when it or java is missing."""
    beside = Path(sys.executable).with_name("torchserve")
    exe = str(beside) if beside.is_file() else shutil.which("torchserve")
    return exe if exe is not None and shutil.which("java") is not None else None


def torchserve(bundle: Path, work: Path, jpeg: bytes) -> Proc:
    """TorchServe with its defaults (workers per model = cores, batch size 1) serving the
    bundle's own ``.mar``; only the ports, token auth (off, for a loopback bench) and no
    config snapshots are set. Ready when a prediction answers."""
    exe = torchserve_exe()
    assert exe is not None
    work.mkdir(parents=True)
    export_torchserve(bundle, work / "store", name="model")
    ports = {k: free_port() for k in ("inference", "management", "metrics")}
    (work / "config.properties").write_text(
        "".join(f"{k}_address=http://127.0.0.1:{p}\n" for k, p in ports.items())
        + "disable_token_authorization=true\nenable_envvars_config=false\n")
    argv = [exe, "--start", "--ncs", "--disable-token-auth", "--foreground", "--model-store", str(work / "store"),
            "--models", "model=model.mar", "--ts-config", str(work / "config.properties")]
    return start(argv, ports["inference"], "/predictions/model", body=jpeg, content_type="image/jpeg",
                 within_s=300, request_timeout_s=30, group=True, cwd=work)


# -- the load generator -------------------------------------------------------------------


WINDOWS = 3  # RELIABILITY.md's protocol: several windows per row, report the median one


class Connection(http.client.HTTPConnection):
    """http.client with TCP_NODELAY, as real clients have it (urllib3/requests, curl, browsers).

    http.client sends a large body in a second write after the head; with Nagle's algorithm on,
    the body's last segment waits for the server's delayed ACK of the head (~40 ms on Linux
    loopback): 60+ ms per request at 1 client, and idle servers at 16."""

    def connect(self) -> None:
        super().connect()
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


@dataclass
class Window:
    name: str
    clients: int
    latencies: list[float] = field(default_factory=list)  # seconds, 200s completed inside the windows
    errors: int = 0
    rates: list[float] = field(default_factory=list)  # req/s of each window
    rss_mb: float = 0.0

    @property
    def rps(self) -> float:
        """The median window's req/s (the machine is shared: one window can catch a neighbour's burst)."""
        return statistics.median(self.rates) if self.rates else 0.0

    def pct(self, q: float) -> float:
        return float(np.percentile(self.latencies, q)) * 1000 if self.latencies else float("nan")


def load(proc: Proc, name: str, path: str, body: bytes, content_type: str, clients: int,
         warmup_s: float, window_s: float, max_requests: int = 200_000) -> Window:
    """Closed loop: ``clients`` threads, each sends the next request when its answer is in;
    ``WINDOWS`` back-to-back windows of ``window_s`` after ``warmup_s``."""
    result = Window(name, clients)
    begin = time.monotonic() + warmup_s
    end = begin + WINDOWS * window_s
    done: list[float] = []  # completion times of the 200s
    lock = threading.Lock()
    sent = [0]

    def client() -> None:
        conn = Connection("127.0.0.1", proc.port, timeout=60)
        headers = {"Content-Type": content_type}
        while True:
            t0 = time.monotonic()
            with lock:
                sent[0] += 1
                if t0 >= end or sent[0] > max_requests:
                    break
            try:
                conn.request("POST", path, body, headers)
                response = conn.getresponse()
                response.read()
                ok = response.status == 200
                if response.getheader("Connection", "").lower() == "close":
                    conn.close()
            except (OSError, http.client.HTTPException):
                ok = False
                conn.close()
                conn = Connection("127.0.0.1", proc.port, timeout=60)
            t1 = time.monotonic()
            if begin <= t1 <= end:  # answers completed inside the window count, whenever sent
                with lock:
                    if ok:
                        result.latencies.append(t1 - t0)
                        done.append(t1)
                    else:
                        result.errors += 1
        conn.close()

    result.rss_mb = run_watching_rss(proc, [client] * clients)
    result.rates = [sum(1 for t in done if begin + i * window_s <= t < begin + (i + 1) * window_s) / window_s
                    for i in range(WINDOWS)]
    return result


# -- the ceiling --------------------------------------------------------------------------


def run_watching_rss(proc: Proc, targets: list[Callable[[], None]]) -> float:
    """Run each target in its own thread until all end; the server's peak RSS (MB) meanwhile."""
    threads = [threading.Thread(target=t, daemon=True) for t in targets]
    for t in threads:
        t.start()
    peak = 0.0
    while any(t.is_alive() for t in threads):
        peak = max(peak, proc.rss_mb())
        time.sleep(0.25)
    return peak


def ceiling(bundle: Path, jpeg: bytes, seconds: float) -> tuple[float, int, float, int]:
    """Best (img/s, batch) of the in-process Predictor: end to end from JPEG bytes, and model only."""
    predictor = Predictor(bundle)
    x = predictor.prepare(jpeg)
    best_e2e, best_model = (0.0, 0), (0.0, 0)
    for batch in (1, 4, 8, 16, 32):
        predictor.run(np.stack([x] * batch))  # warm-up
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds / 2:
            predictor.run(np.stack([x] * batch))
            n += batch
        best_model = max(best_model, (n / (time.perf_counter() - t0), batch))
        images = [jpeg] * max(batch * 4, 32)
        list(predictor.predict_many(images[:batch], batch_size=batch))  # warm-up
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds / 2:
            n += sum(1 for _ in predictor.predict_many(images, batch_size=batch, decode_threads=cpu_count()))
        best_e2e = max(best_e2e, (n / (time.perf_counter() - t0), batch))
    return best_e2e[0], best_e2e[1], best_model[0], best_model[1]


# -- main ---------------------------------------------------------------------------------


def load_average() -> str:
    try:
        return " ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "n/a"



def print_rows(rows: list[Window], window: float, warmup: float, e2e: float, e2e_batch: int, model_only: float,
               model_batch: int, load_start: str) -> None:
    print(f"# lensforge serve under closed-loop load — {BACKBONE} at {SIZE}px, random weights, 640x480 JPEG, loopback")
    print(f"# {describe()} | onnxruntime threads {cpu_count()} | torch {torch.__version__} (seed app)"
          f" | per row: median of {WINDOWS} x {window:g} s windows after {warmup:g} s warm-up")
    print(f"# load average at start {load_start}, at end {load_average()} (a shared machine: compare the ratios)")
    print(f"# ceiling, in-process Predictor: end to end {e2e:.1f} img/s (batch {e2e_batch}), "
          f"model only {model_only:.1f} img/s (batch {model_batch})")
    print(f"{'server':28} {'N':>3} {'req/s':>8} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'errors':>6} {'RSS MB':>7}")
    for r in rows:
        print(f"{r.name:28} {r.clients:3d} {r.rps:8.1f} {r.pct(50):8.1f} {r.pct(95):8.1f} {r.pct(99):8.1f} "
              f"{r.errors:6d} {r.rss_mb:7.0f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="short windows and fewer rows (~1 min)")
    ap.add_argument("--window", type=float, help=f"seconds per window, {WINDOWS} windows per row (default 4, quick 1.5)")
    ap.add_argument("--smoke", action="store_true", help="64 px model, one lensforge row at 4 clients, no seed app")
    args = ap.parse_args()
    global SIZE
    if args.smoke:
        SIZE = 64  # the smallest model: the run checks the plumbing, not the speed
    window = args.window or (0.5 if args.smoke else 1.5 if args.quick else 4.0)
    warmup = 0.5 if args.smoke else 1.0 if args.quick else 2.0
    counts = (4,) if args.smoke else (1, 16) if args.quick else (1, 4, 16, 64)

    rows: list[Window] = []
    load_start = load_average()
    with tempfile.TemporaryDirectory() as tmp:
        bundle = make_bundle(Path(tmp) / "bundle")
        jpeg = photo()
        e2e, e2e_batch, model_only, model_batch = ceiling(bundle, jpeg, window / 2)

        server = lensforge_serve(bundle)
        try:
            for n in counts:
                rows.append(load(server, "lensforge, raw JPEG", "/predict", jpeg, "image/jpeg", n, warmup, window))
            if not args.smoke:
                rows.append(load(server, "lensforge, seed JSON", "/predict", seed_body(jpeg), "application/json", 16,
                                 warmup, window))
        finally:
            server.stop()
        if args.smoke:  # the seed rows' plumbing too (gunicorn, Flask, torch), at its smallest
            seed = flask_seed(bundle, workers=1)
            try:
                rows.append(load(seed, "seed app, 1 worker", "/predict", seed_body(jpeg), "application/json", 4,
                                 warmup, window))
            finally:
                seed.stop()
            print_rows(rows, window, warmup, e2e, e2e_batch, model_only, model_batch, load_start)
            return
        server = lensforge_serve(bundle, "--max-batch", "1")
        try:
            rows.append(load(server, "lensforge, batching off", "/predict", jpeg, "image/jpeg", 16, warmup, window))
        finally:
            server.stop()
        # its answers take seconds at 16 clients: a longer warm-up (both workers, torch's
        # first calls) and windows, so each row holds more than a handful of answers
        # (label, torch threads (None: torch's default), gunicorn workers); 2 workers with
        # torch's default threads oversubscribe 2 cores (seconds per answer): not in --quick
        seeds = [("seed app, 1 worker", None, 1), ("seed app, 2 workers", None, 2), (SEED_TUNED, 1, 2)]
        for label, torch_threads, workers in seeds:
            if args.quick and label == "seed app, 2 workers":
                continue
            seed = flask_seed(bundle, torch_threads, workers)
            try:
                for n in (16,) if args.quick else (1, 16):
                    rows.append(load(seed, label, "/predict", seed_body(jpeg), "application/json", n,
                                     max(warmup, 4.0), 1.5 * window))
            finally:
                seed.stop()
        int8 = make_int8(bundle, Path(tmp) / "int8")
        server = lensforge_serve(int8)
        try:
            rows.append(load(server, INT8, "/predict", jpeg, "image/jpeg", 16, warmup, window))
        finally:
            server.stop()
        if torchserve_exe() is not None:
            for label, served in ((TORCHSERVE, bundle), (TORCHSERVE_INT8, int8)):
                # TorchServe leaves its pid file behind and will not start again while it is there
                Path(tempfile.gettempdir(), ".model_server.pid").unlink(missing_ok=True)
                ts = torchserve(served, Path(tmp) / label.replace(" ", "_").replace(",", ""), jpeg)
                try:
                    rows.append(load(ts, label, "/predictions/model", jpeg, "image/jpeg", 16, max(warmup, 4.0), window))
                finally:
                    ts.stop()

    print_rows(rows, window, warmup, e2e, e2e_batch, model_only, model_batch, load_start)
    if torchserve_exe() is None:
        print("# TorchServe: not installed here (needs torchserve and java): no TorchServe row")

    def row(name: str, n: int) -> Window:
        return next(r for r in rows if r.name == name and r.clients == n)

    def seed_row(n: int) -> Window:
        """The best seed variant at ``n`` clients."""
        return max((r for r in rows if r.name.startswith("seed app") and r.clients == n), key=lambda r: r.rps)

    def ratio(a: float, b: float) -> float:
        return a / b if b else float("nan")

    serve16 = row("lensforge, raw JPEG", 16)
    seed16 = seed_row(16)
    json16 = row("lensforge, seed JSON", 16)
    off16 = row("lensforge, batching off", 16)
    print("# goals at 16 clients")
    lines = [
        ("serve / ceiling (end to end)", ratio(serve16.rps, e2e), "   goal >= 0.85"),
        ("serve / ceiling (model only)", ratio(serve16.rps, model_only), ""),
        ("ceiling end to end / model only", ratio(e2e, model_only), "   goal >= 0.70"),
        (f"serve / {seed16.name} (seed JSON both)", ratio(json16.rps, seed16.rps), "x  goal >= 4x (best seed)"),
        (f"serve raw JPEG / {seed16.name}", ratio(serve16.rps, seed16.rps), "x"),
    ]
    for r in rows:
        if r.name.startswith("seed app") and r.clients == 16 and r is not seed16:
            lines.append((f"serve / {r.name} (seed JSON both)", ratio(json16.rps, r.rps), "x"))
    ts16 = [r for r in rows if r.name == TORCHSERVE]
    if ts16:
        lines += [(f"serve / {TORCHSERVE} (raw JPEG both)", ratio(serve16.rps, ts16[0].rps), "x  goal >= 2x"),
                  ("serve p99 / TorchServe p99", ratio(serve16.pct(99), ts16[0].pct(99)), "   goal <= 1")]
    lines += [(f"ceiling end to end / {seed16.name}", ratio(e2e, seed16.rps), "x  (the most any server of this model gets)")]
    if ts16:
        lines += [(f"{TORCHSERVE} / ceiling (end to end)", ratio(ts16[0].rps, e2e), "")]
    int8_16 = row(INT8, 16)
    lines += [(f"{INT8} / {seed16.name}", ratio(int8_16.rps, seed16.rps), "x  (int8 vs the seed's fp32)")]
    ts8 = [r for r in rows if r.name == TORCHSERVE_INT8]
    if ts8:
        lines += [(f"{INT8} / {TORCHSERVE_INT8}", ratio(int8_16.rps, ts8[0].rps), "x")]
    lines += [
        ("p99 / p50", ratio(serve16.pct(99), serve16.pct(50)), "   goal <= 2"),
        ("batching on / off", ratio(serve16.rps, off16.rps), "x"),
    ]
    for label, value, note in lines:
        print(f"{label:48} {value:7.2f}{note}")


if __name__ == "__main__":
    main()
