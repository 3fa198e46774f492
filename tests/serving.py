"""A real uvicorn server on a free loopback port, for the HTTP tests (shared by the serve test modules),
and a bundle of any input size made in a fraction of a second (no torch, no training)."""

from __future__ import annotations

import socket
from collections.abc import Iterator
import threading
import time
from pathlib import Path
from typing import Any, Self

import numpy as np
import requests
import uvicorn


class LiveServer:
    """``with LiveServer(app) as s:`` serves ``app`` until the block ends; entering waits
    until ``ready_path`` answers 200 (``/readyz``: every model loaded and warmed up)."""

    def __init__(self, app: object, ready_path: str = "/readyz") -> None:
        self.ready_path = ready_path
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> Self:
        self.thread.start()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if requests.get(self.url + self.ready_path, timeout=2).status_code == 200:
                    return self
            except requests.ConnectionError:
                pass
            time.sleep(0.05)
        self.__exit__()
        raise RuntimeError(f"{self.ready_path} did not answer 200 within 60 s")

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)
        assert not self.thread.is_alive(), "server did not shut down"


def raw_exchange(port: int, data: bytes, timeout: float = 10.0, whole_json: bool = True) -> bytes:
    """Send raw bytes on a fresh connection and return what comes back: until the server
    closes, or the answer's head is in (and, with ``whole_json``, its JSON body too)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        try:
            s.sendall(data)
        except (BrokenPipeError, ConnectionResetError):  # the server may hang up before reading it all
            pass
        answer = b""
        while True:
            try:
                chunk = s.recv(65536)
            except (ConnectionResetError, TimeoutError):
                break
            if not chunk:
                break
            answer += chunk
            if b"\r\n\r\n" in answer and (not whole_json or answer.rstrip().endswith(b"}")):
                break
        return answer


def conv_bundle(dest: Path, size: int = 224, classes: int = 4) -> Path:
    """A classifier bundle at ``size`` px: two strided 3x3 convolutions, global pooling and a
    linear layer with fixed random weights (~70 M multiply-adds at 224 px), built with
    ``onnx.helper``. Real preprocessing and a real onnxruntime run at that size, for tests
    where exporting EfficientNet at 224 px would cost seconds."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from lensforge.runtime import InputSpec
    from lensforge.runtime.bundle import MODEL_FILE, write_meta

    rng = np.random.default_rng(0)
    weights = {"w1": rng.normal(0, 0.2, (32, 3, 3, 3)), "w2": rng.normal(0, 0.05, (64, 32, 3, 3)),
               "fc": rng.normal(0, 0.1, (64, classes)), "bias": np.zeros(classes)}
    nodes = [
        helper.make_node("Conv", ["images", "w1"], ["c1"], strides=[2, 2], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], strides=[2, 2], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("GlobalAveragePool", ["r2"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"]),
        helper.make_node("Gemm", ["flat", "fc", "bias"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["scores"], axis=1),
    ]
    graph = helper.make_graph(
        nodes, "conv", [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, size, size])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", classes])],
        [numpy_helper.from_array(w.astype(np.float32), name) for name, w in weights.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # readable by every onnxruntime the project supports
    dest.mkdir(parents=True)
    onnx.save(model, str(dest / MODEL_FILE))
    write_meta(dest, {"task": "classify", "classes": [f"class_{i}" for i in range(classes)],
                      "input": InputSpec.for_size(size).to_dict(), "model": {"backbone": "conv", "head": "linear"}})
    return dest


# -- headless Chromium (Debian's chromium + chromium-driver; `make browser` installs them) -------

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
CHROMIUM_FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--no-first-run", "--window-size=1280,1000")


def headless_chromium(profile: Path, *, logs: bool = False) -> Iterator[Any]:
    """A selenium driver for headless Chromium with a fresh profile (skips the test when it is not
    installed); ``logs``: keep the browser (console) and performance (requests) logs. Explicit
    driver path: Selenium Manager, which would go online, never runs."""
    import pytest

    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.skip(f"headless Chromium not installed ({CHROMIUM}, {CHROMEDRIVER}): run `make browser` "
                    "(apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile}")
    if logs:
        options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()
