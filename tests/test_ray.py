"""``lensforge predict --engine ray`` on a real Ray cluster this test starts: a head and a
second node, each its own ``ray start`` process on this machine (loopback GCS port), thousands
of real images (scikit-learn's digit scans, 32 px).

- the rows equal the in-process Predictor's, image by image;
- the second node is killed (its whole process group: raylet, agents and the actor on it)
  while the job runs: the job still finishes and every input appears exactly once.

Ray names its nodes by the machine's interface address even when told 127.0.0.1; that
traffic stays on this machine. The cluster's processes are found by the process groups of
the two ``ray start`` calls and their descendants, and only those are stopped: never
``ray stop``, which would stop every Ray on the machine.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from serving import conv_bundle

pytest.importorskip("ray", reason="the scale extra (ray[data]) is not installed")
pq = pytest.importorskip("pyarrow.parquet")

from lensforge.batch import predict_many  # noqa: E402  (after the skip: needs nothing from ray at import)

pytestmark = pytest.mark.slow

RAY = Path(sys.executable).with_name("ray")
START_TIMEOUT_S = 120  # `ray start` on a loaded 2-core machine takes 10-30 s


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(entry))
    return kids


def _group(pgid: int) -> list[int]:
    """The processes of one ``ray start`` (its process group) and all their descendants (Ray's
    workers take process groups of their own)."""
    kids = _children()
    members = [int(e) for e in os.listdir("/proc") if e.isdigit() and _pgid(int(e)) == pgid]
    found, todo = set(members), list(members)
    while todo:
        for k in kids.get(todo.pop(), []):
            if k not in found:
                found.add(k)
                todo.append(k)
    return sorted(found)


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _kill(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


class Cluster:
    """A head and a second node, 1 CPU each, state under a short /tmp directory (Ray's unix
    sockets live there and a socket path may not exceed 107 bytes)."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="lfray", dir="/tmp"))
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.groups: dict[str, int] = {}
        # auth mode stated, not inherited: a token left in ~/.ray by an earlier local `ray.init` would
        # otherwise turn token auth on for the head but not for the second node
        self.env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled", "PYTHONWARNINGS": "ignore"}

    def _start(self, name: str, *args: str) -> None:
        log = self.dir / f"{name}.log"
        with log.open("w") as f:  # a file, not a pipe: Ray's daemons keep it open after `ray start` exits
            proc = subprocess.Popen([str(RAY), "start", *args, "--num-cpus", "1", "--temp-dir", str(self.dir / "t"),
                                     "--disable-usage-stats", "--dashboard-agent-listen-port", str(free_port())],
                                    stdout=f, stderr=subprocess.STDOUT, env=self.env, start_new_session=True)
        self.groups[name] = proc.pid  # its own session: the process group id is its pid
        rc = proc.wait(timeout=START_TIMEOUT_S)
        assert rc == 0, f"ray start ({name}) exited {rc}:\n{log.read_text()[-3000:]}"

    def start(self) -> None:
        self._start("head", "--head", "--port", str(self.port), "--node-ip-address", "127.0.0.1",
                    "--ray-client-server-port", str(free_port()), "--include-dashboard=false")
        self._start("worker", "--address", self.address)

    def raylet(self, name: str) -> int:
        return next(p for p in _group(self.groups[name]) if _cmdline(p).split(" ")[0].endswith("/raylet"))

    def actors_on(self, name: str) -> list[int]:
        """The Ray Data map actors running on node ``name`` (children of its raylet)."""
        return [p for p in _children().get(self.raylet(name), []) if _cmdline(p).startswith("ray::MapWorker")]

    def kill(self, name: str) -> None:
        _kill(_group(self.groups.pop(name)))

    def stop(self) -> None:
        for name in list(self.groups):
            self.kill(name)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    c = Cluster()
    try:
        c.start()
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """A tiny classifier, 3,594 real digit images (each scan twice, PNG and JPEG) and three
    files that are not images, listed in a text file and in a Parquet table."""
    from sklearn.datasets import load_digits

    root = tmp_path_factory.mktemp("ray")
    bundle = conv_bundle(root / "bundle", size=32, classes=10)
    digits = (load_digits().images * (255 / 16)).round().astype(np.uint8)
    paths = []
    for i, scan in enumerate(digits):
        img = Image.fromarray(scan).resize((32, 32), Image.Resampling.BILINEAR).convert("RGB")
        for suffix in (".png", ".jpg"):
            paths.append(root / "imgs" / f"{i % 10}" / f"{i:04d}{suffix}")
            paths[-1].parent.mkdir(parents=True, exist_ok=True)
            img.save(paths[-1])
    bad = [root / "imgs" / "truncated.jpg", root / "imgs" / "text.png", root / "imgs" / "missing.png"]
    bad[0].write_bytes(paths[1].read_bytes()[:40])
    bad[1].write_text("not an image")
    listed = [str(p) for p in [*paths, *bad]]
    (root / "images.txt").write_text("\n".join(listed) + "\n")
    import pyarrow as pa

    pq.write_table(pa.table({"uri": listed}), root / "images.parquet")
    expected = {r["path"]: r for r in predict_many(bundle, root / "images.txt", threads=1).rows}  # in-process Predictor
    return {"root": root, "bundle": bundle, "listed": listed, "bad": {str(p) for p in bad}, "expected": expected}


def _predict(job: dict[str, object], cluster: Cluster, source: str, output: Path) -> subprocess.Popen[bytes]:
    log = output.with_suffix(".log").open("w")
    cmd = [sys.executable, "-m", "lensforge.cli", "predict", str(job["bundle"]), source, "--engine", "ray",
           "--address", cluster.address, "--actors", "2", "--batch-size", "16", "--output", str(output)]
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=cluster.env, cwd=job["root"])


def _finish(proc: subprocess.Popen[bytes], output: Path, timeout: float = 300) -> str:
    proc.wait(timeout=timeout)
    text = output.with_suffix(".log").read_text(errors="replace")
    assert proc.returncode == 0, f"predict --engine ray exited {proc.returncode}:\n{text[-4000:]}"
    return text


def _check_rows(rows: list[dict[str, object]], job: dict[str, object]) -> None:
    listed, expected = job["listed"], job["expected"]
    paths = [r["path"] for r in rows]
    assert len(paths) == len(listed) and sorted(paths) == sorted(listed)  # each input exactly once
    for row in rows:
        want = expected[row["path"]]
        assert (row["error"] is not None) == (row["path"] in job["bad"]) == (want["error"] is not None), row
        assert row["labels"] == want["labels"]
        np.testing.assert_allclose(np.float32(row["scores"]), np.float32(want["scores"]), rtol=1e-5, atol=1e-7)


def test_ray_rows_equal_the_in_process_predictor(cluster: Cluster, job: dict[str, object]) -> None:
    out = job["root"] / "results.parquet"
    text = _finish(_predict(job, cluster, "images.parquet", out), out)
    rows = pq.read_table(out).to_pylist()
    _check_rows(rows, job)
    assert sum(r["error"] is not None for r in rows) == 3
    assert f"{len(job['listed'])} image(s)" in text and "2 Ray actor(s)" in text


def test_killing_a_node_mid_job_loses_and_repeats_nothing(cluster: Cluster, job: dict[str, object]) -> None:
    out = job["root"] / "killed.jsonl"
    partial = out.with_name(out.name + ".partial")
    proc = _predict(job, cluster, "images.txt", out)
    try:
        # mid-job, by construction: the second node runs an actor and rows are arriving; then the
        # driver is paused (SIGSTOP) so the job cannot end before the node is gone
        deadline = time.monotonic() + 240
        while not (cluster.actors_on("worker") and partial.is_file() and partial.read_text().count("\n") >= 200):
            assert proc.poll() is None, _finish(proc, out)
            assert time.monotonic() < deadline, "the job never got going on both nodes"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGSTOP)
        written = partial.read_text().count("\n")
        assert proc.poll() is None and not out.exists() and written < len(job["listed"])
        cluster.kill("worker")
        os.kill(proc.pid, signal.SIGCONT)
        _finish(proc, out)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGCONT)
            proc.kill()
            proc.wait()
    _check_rows([json.loads(line) for line in out.read_text().splitlines()], job)
