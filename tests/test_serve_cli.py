"""``lensforge serve`` as an operator meets it: the start-up text (models, URLs, limits in
force), a port already in use as one line, ``--max-inflight``, and the detection options
(``--conf --iou --classes --max-det --agnostic-nms``) applied to every dialect's answer."""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import requests

from lensforge.cli.options import build_parser
from lensforge.errors import ConfigError
from lensforge.runtime import Predictor, load_bundle
from lensforge.serve import create_app
from serving import LiveServer
from test_serve_lifecycle import free_port, wait_for

pytestmark = pytest.mark.slow  # starts `lensforge serve` processes: not in the fast inner loop (-m 'not slow')


def lensforge(*args: str, log: Path) -> subprocess.Popen[bytes]:
    """``lensforge ...`` in a process, its output (stdout and stderr) to the file ``log``; a
    wide console so that rich draws every table row on one line."""
    env = {**os.environ, "COLUMNS": "200"}
    with log.open("wb") as out:
        return subprocess.Popen([sys.executable, "-m", "lensforge.cli", *args], stdout=out,
                                stderr=subprocess.STDOUT, env=env)


def test_startup_text_names_models_urls_and_the_limits_in_force(shapes_bundle: Path, tmp_path: Path) -> None:
    port, log = free_port(), tmp_path / "serve.log"
    proc = lensforge("serve", str(shapes_bundle), "--name", "shapes", "--port", str(port), "--max-inflight", "7",
                     "--max-queue", "9", "--max-batch", "3", "--max-wait-ms", "2", "--max-body-mb", "4",
                     "--timeout", "6", "--threads", "1", log=log)
    try:
        wait_for(f"http://127.0.0.1:{port}/readyz")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    text = log.read_text(errors="replace")
    bundle = load_bundle(shapes_bundle)
    size = bundle.input_spec.size
    row = next(line for line in text.splitlines() if "shapes" in line and bundle.task in line)
    assert all(c in row for c in bundle.classes[:5]) and f"({len(bundle.classes)})" in row and f"{size}x{size}" in row
    url = f"http://127.0.0.1:{port}"
    assert re.search(re.escape(url) + r"/\s", text), text  # the page
    for where in (f"{url}/docs", f"{url}/healthz", f"{url}/readyz"):
        assert where in text, (where, text)
    limits = next(line for line in text.splitlines() if "limits" in line)
    for fact in ("max batch 3", "waits up to 2 ms while busy", "queue 9", "in flight 7", "body 4 MB", "timeout 6 s", "1 worker x 1 thread"):
        assert fact in limits, (fact, limits)
    assert "Traceback" not in text


def test_default_inflight_cap_follows_the_queue(shapes_bundle: Path) -> None:
    # without --max-inflight: 2 x --max-queue per model, as before the flag existed
    assert build_parser().parse_args(["serve", "b"]).max_inflight is None
    app = create_app({"a": shapes_bundle, "b": shapes_bundle}, max_queue=5)
    assert app.state.server.settings.max_inflight == 20  # type: ignore[attr-defined]


def test_port_in_use_is_one_line_and_exit_2(shapes_bundle: Path, tmp_path: Path) -> None:
    log = tmp_path / "serve.log"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = lensforge("serve", str(shapes_bundle), "--port", str(port), log=log)
        try:
            code = proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
    text = log.read_text(errors="replace").strip()
    assert code == 2, text
    assert len(text.splitlines()) == 1 and f"port {port} is already in use" in text and "--port" in text, text


@pytest.mark.parametrize("options", [{"conf": 0.5}, {"max_det": 3, "agnostic_nms": True}])
def test_a_classifier_only_server_refuses_detection_options(shapes_bundle: Path, options: dict[str, object]) -> None:
    with pytest.raises(ConfigError, match="filter detections, but no bundle served is a detector") as e:
        create_app([shapes_bundle], **options)  # type: ignore[arg-type]
    assert "\n" not in str(e.value)


def test_unknown_class_names_the_model(detect_bundle: Path) -> None:
    with pytest.raises(ConfigError, match="model 'det'.*no-such-class"):
        create_app({"det": detect_bundle}, classes=["no-such-class"])


def test_detection_options_reach_every_dialect(detect_bundle: Path, detect_dir: Path) -> None:
    data = sorted((detect_dir / "test").glob("*.jpg"))[0].read_bytes()
    raw = Predictor(detect_bundle).predict(data)
    assert len(raw.filtered(conf=0.0)) > 2, "the fixture detector should propose several boxes"
    expected = raw.filtered(conf=0.0, max_det=2)  # the two best, whatever the tuned threshold says
    default = raw.above()
    assert (expected.labels, len(expected)) != (default.labels, len(default))  # the options change the answer
    with LiveServer(create_app({"det": detect_bundle}, conf=0.0, max_det=2)) as s:
        seed = requests.post(f"{s.url}/predict", json=json.dumps({"raw_file": base64.b64encode(data).decode()}),
                             timeout=30).json()
        ts = requests.post(f"{s.url}/predictions/det", data=data, timeout=30).json()
        native = requests.post(f"{s.url}/v1/models/det/predict", files={"file": ("x.jpg", data)}, timeout=30).json()
        v2 = requests.post(f"{s.url}/v2/models/det/infer", timeout=30, json={"inputs": [
            {"name": "image", "shape": [1], "datatype": "BYTES", "data": [base64.b64encode(data).decode()]}]}).json()
    assert [p["label"] for p in seed["preds"]] == expected.labels
    assert [next(k for k in d if k != "score") for d in ts] == expected.labels
    assert [d["label"] for d in native["detections"]] == expected.labels
    outputs = {o["name"]: o for o in v2["outputs"]}
    np.testing.assert_allclose(np.reshape(outputs["boxes"]["data"], (-1, 4)), expected.boxes, atol=1e-3)
    assert outputs["class_ids"]["data"] == expected.class_ids.tolist()
