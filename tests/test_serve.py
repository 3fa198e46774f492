"""The HTTP server over real loopback HTTP: seed /predict, TorchServe and native routes,
batching, overload and the bad-input rows of RELIABILITY.md (B, J, I, O)."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families
from serving import LiveServer, raw_exchange

from lensforge.runtime import Predictor
from lensforge.serve import create_app, model_name

CAP = 1_000_000  # body cap of the test servers (small, so B1/B2 need little traffic)


@pytest.fixture(scope="module")
def live(shapes_bundle: Path) -> Iterator[LiveServer]:
    app = create_app({"run": shapes_bundle, "second": shapes_bundle}, max_wait_ms=20, max_body_bytes=CAP)
    with LiveServer(app) as server:
        yield server


def _clean(response: requests.Response, *paths: Path) -> None:
    """No traceback, no server path in any body."""
    text = response.text
    assert "Traceback" not in text and "File \"" not in text
    assert "/tmp" not in text and "/work" not in text
    for p in paths:
        assert str(p) not in text


def test_serve_never_imports_torch() -> None:
    code = ("import sys, lensforge.serve; "
            "print(sorted(m for m in ('torch', 'timm', 'lightning', 'sklearn') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_model_name_uses_run_dir_for_bundle_dirs(tmp_path: Path) -> None:
    assert model_name(tmp_path / "myrun" / "bundle") == "myrun"
    assert model_name(tmp_path / "cats-v2") == "cats-v2"


# -- seed /predict -----------------------------------------------------------------------

def _seed_expected(predictor: Predictor, data: bytes, k: int = 5) -> dict[str, str]:
    return {label: str(np.float32(score)) for label, score in predictor.predict(data).top(k)}


def test_seed_double_encoded_json_replayed_verbatim(live: LiveServer, predictor: Predictor, jpegs: list[bytes]) -> None:
    b64 = base64.b64encode(jpegs[0]).decode()
    r = requests.post(live.url + "/predict", json=json.dumps({"raw_file": b64}), timeout=10)  # the seed client
    assert r.status_code == 200, r.text
    assert r.json() == {"preds": _seed_expected(predictor, jpegs[0]), "status": "Success"}
    assert all(isinstance(v, str) for v in r.json()["preds"].values())


@pytest.mark.parametrize("how", ["plain_json", "data_url", "multipart", "raw", "path_model", "query_model"])
def test_seed_input_modes(how: str, live: LiveServer, predictor: Predictor, jpegs: list[bytes]) -> None:
    data = jpegs[1]
    b64 = base64.b64encode(data).decode()
    url = live.url + "/predict"
    if how == "plain_json":
        r = requests.post(url, json={"raw_file": b64}, timeout=10)
    elif how == "data_url":
        r = requests.post(url, json={"raw_file": "data:image/jpeg;base64," + b64}, timeout=10)
    elif how == "multipart":
        r = requests.post(url, files={"file": ("x.jpg", data, "image/jpeg")}, timeout=10)
    elif how == "raw":
        r = requests.post(url, data=data, headers={"Content-Type": "image/jpeg"}, timeout=10)
    elif how == "path_model":
        r = requests.post(url + "/second", json={"raw_file": b64}, timeout=10)
    else:
        r = requests.post(url, params={"model": "second"}, json={"raw_file": b64}, timeout=10)
    assert r.status_code == 200, r.text
    assert r.json() == {"preds": _seed_expected(predictor, data), "status": "Success"}


# -- TorchServe and native --------------------------------------------------------------

def test_torchserve_routes(live: LiveServer, predictor: Predictor, jpegs: list[bytes]) -> None:
    assert requests.get(live.url + "/ping", timeout=5).json() == {"status": "Healthy"}
    expected = dict(predictor.predict(jpegs[2]).top(5))
    for method in ("PUT", "POST"):  # curl -T sends PUT; curl --data-binary sends POST
        r = requests.request(method, live.url + "/predictions/run", data=jpegs[2], timeout=10)
        assert r.status_code == 200, r.text
        assert list(r.json()) == list(expected)
        assert r.json() == pytest.approx(expected, abs=1e-6)
    for field in ("data", "body"):
        r = requests.post(live.url + "/predictions/second", files={field: ("x.jpg", jpegs[2])}, timeout=10)
        assert r.json() == pytest.approx(expected, abs=1e-6)
    models = requests.get(live.url + "/models", timeout=5).json()["models"]
    assert [m["modelName"] for m in models] == ["run", "second"]
    detail = requests.get(live.url + "/models/run", timeout=5).json()
    assert detail[0]["modelName"] == "run" and detail[0]["workers"][0]["status"] == "READY"
    r = requests.post(live.url + "/predictions/nope", data=jpegs[2], timeout=10)
    assert r.status_code == 404 and set(r.json()) == {"code", "type", "message"}
    assert requests.get(live.url + "/models/nope", timeout=5).status_code == 404


def test_native_route(live: LiveServer, predictor: Predictor, jpegs: list[bytes]) -> None:
    expected = predictor.predict(jpegs[3])
    for kwargs in ({"files": {"file": ("x.jpg", jpegs[3])}}, {"data": jpegs[3]}):
        r = requests.post(live.url + "/v1/models/run/predict", timeout=10, **kwargs)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model"] == "run" and body["labels"] == expected.labels
        assert [t["label"] for t in body["top"]] == [n for n, _ in expected.top(5)]
        assert body["scores"] == pytest.approx(expected.to_dict()["scores"], abs=1e-6)
        assert body["latency_ms"] > 0
    r = requests.post(live.url + "/v1/models/nope/predict", data=jpegs[3], timeout=10)
    assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_model"


def test_health_ready_metrics(live: LiveServer) -> None:
    assert requests.get(live.url + "/healthz", timeout=5).status_code == 200
    ready = requests.get(live.url + "/readyz", timeout=5)
    assert ready.status_code == 200 and ready.json()["models"] == {"run": True, "second": True}
    text = requests.get(live.url + "/metrics", timeout=5).text
    names = {f.name for f in text_string_to_metric_families(text)}
    assert {"lensforge_requests", "lensforge_request_latency_seconds", "lensforge_batch_size",
            "lensforge_queue_depth", "lensforge_model_load_seconds"} <= names


# -- batching and overload ----------------------------------------------------------------

def _batch_sizes(url: str) -> tuple[float, float]:
    """(observations, observations of size 1) of the batch-size histogram of model 'run'."""
    total = ones = 0.0
    for family in text_string_to_metric_families(requests.get(url + "/metrics", timeout=5).text):
        if family.name == "lensforge_batch_size":
            for s in family.samples:
                if s.labels.get("model") != "run":
                    continue
                if s.name.endswith("_count"):
                    total = s.value
                elif s.name.endswith("_bucket") and float(s.labels["le"]) == 1.0:
                    ones = s.value
    return total, ones


def test_concurrent_requests_are_batched_and_correct(live: LiveServer, predictor: Predictor, jpegs: list[bytes]) -> None:
    images = [jpegs[i % len(jpegs)] for i in range(16)]
    expected = [predictor.predict(d).scores for d in images]
    before = _batch_sizes(live.url)

    def call(data: bytes) -> dict[str, float]:
        r = requests.post(live.url + "/v1/models/run/predict", data=data, timeout=30)
        assert r.status_code == 200, r.text
        return r.json()["scores"]

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(call, images))
    for got, want in zip(answers, expected):
        np.testing.assert_allclose(list(got.values()), want, atol=1e-5)
    total, ones = (a - b for a, b in zip(_batch_sizes(live.url), before))
    assert total > ones, "no batch larger than one was run"
    assert total < 16


def test_overload_answers_200_or_503_with_retry_after(shapes_bundle: Path, jpegs: list[bytes]) -> None:
    app = create_app([shapes_bundle], max_queue=1, max_batch=1, max_wait_ms=0)
    with LiveServer(app) as server:
        def call(i: int) -> requests.Response:
            return requests.post(server.url + "/predictions/run", data=jpegs[i % len(jpegs)], timeout=30)

        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(call, range(64)))
        assert len(answers) == 64
        codes = [r.status_code for r in answers]
        assert set(codes) <= {200, 503}, codes
        assert 503 in codes and 200 in codes
        for r in answers:
            if r.status_code == 503:
                assert r.headers["Retry-After"] == "1" and r.json()["type"] == "ServiceUnavailableException"
        assert call(0).status_code == 200


# -- bad input -----------------------------------------------------------------------------

def _truncated(data: bytes) -> bytes:
    return data[: len(data) // 2]


BAD = [  # (id, route, request kwargs builder, status, text in the error)
    ("empty_raw", "/predict", lambda j: {"data": b"", "headers": {"Content-Type": "image/jpeg"}}, 400, "empty"),
    ("empty_b64", "/predict", lambda j: {"json": {"raw_file": ""}}, 400, "empty"),
    ("text", "/predict", lambda j: {"data": b"hello, I am not an image " * 4}, 415, "unsupported"),
    ("html_b64", "/predict", lambda j: {"json": {"raw_file": base64.b64encode(b"<html></html>" * 9).decode()}},
     415, "unsupported"),
    ("truncated_jpeg", "/predict", lambda j: {"data": _truncated(j[0])}, 400, "corrupt"),
    ("truncated_multipart", "/predict", lambda j: {"files": {"file": ("a.jpg", _truncated(j[0]))}}, 400, "corrupt"),
    ("bad_base64", "/predict", lambda j: {"json": {"raw_file": "not*base64!"}}, 400, "invalid base64"),
    ("bad_padding", "/predict", lambda j: {"json": json.dumps({"raw_file": "abc"})}, 400, "invalid base64"),
    ("b64_over_cap", "/predict", lambda j: {"json": {"raw_file": "A" * (CAP + 4)}}, 413, "too large"),
    ("invalid_json", "/predict", lambda j: {"data": b"{nope", "headers": {"Content-Type": "application/json"}},
     400, "invalid JSON"),
    ("deep_json", "/predict", lambda j: {"data": b"[" * 100_000, "headers": {"Content-Type": "application/json"}},
     400, "invalid JSON"),
    ("no_key", "/predict", lambda j: {"json": {"image": "x"}}, 400, "raw_file"),
    ("local_url", "/predict", lambda j: {"json": json.dumps({"local_url": "/etc/passwd"})}, 403,
     "local paths are disabled"),
    ("remote_url", "/predict", lambda j: {"json": {"remote_url": "http://169.254.169.254/"}}, 403,
     "remote URLs are disabled"),
    ("unknown_model", "/predict/nope", lambda j: {"data": j[0]}, 404, "unknown model"),
    ("unknown_model_query", "/predict?model=nope", lambda j: {"data": j[0]}, 404, "unknown model"),
    ("missing_field", "/predict", lambda j: {"files": {"image": ("a.jpg", j[0])}}, 400, "missing file field"),
    ("ts_missing_field", "/predictions/run", lambda j: {"files": {"photo": ("a.jpg", j[0])}}, 400, "'data'"),
    ("chunked_over_cap", "/predictions/run", lambda j: {"data": iter([b"x" * 65536] * 20)}, 413, "too large"),
    ("too_many_fields", "/predictions/run", lambda j: {"files": {f"f{i}": ("a", b"x") for i in range(40)}},
     400, "multipart"),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_input_then_valid(case: tuple, live: LiveServer, shapes_bundle: Path, jpegs: list[bytes]) -> None:
    _, route, build, status, text = case
    r = requests.post(live.url + route, timeout=10, **build(jpegs))
    assert r.status_code == status, r.text
    body = r.json()
    message = body["error"] if route.startswith("/predict") and not route.startswith("/predictions") else body["message"]
    if route.startswith("/predict") and not route.startswith("/predictions"):
        assert body["status"] == "Error"
    assert text.lower() in message.lower()
    _clean(r, shapes_bundle)
    ok = requests.post(live.url + "/predict", json=json.dumps({"raw_file": base64.b64encode(jpegs[0]).decode()}),
                       timeout=10)
    assert ok.status_code == 200


def test_base64_size_judged_before_decoding() -> None:
    from lensforge.errors import RequestError
    from lensforge.serve.inputs import decode_base64

    with pytest.raises(RequestError) as e:
        decode_base64("data:image/png;base64," + "!" * 400, cap=100)  # invalid too: size is checked first
    assert e.value.status == 413
    assert decode_base64("data:image/png;base64," + base64.b64encode(b"abc").decode(), cap=100) == b"abc"


@pytest.mark.parametrize("length, status", [(str(CAP + 1), b"413"), (str(20 * 1024 * 1024 + 1), b"413"),
                                            ("-5", b"400"), ("12abc", b"400")])
def test_content_length_checked_before_reading(length: str, status: bytes, live: LiveServer,
                                               jpegs: list[bytes]) -> None:
    head = (f"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\nContent-Length: {length}\r\n\r\n"
            "abc").encode()
    answer = raw_exchange(live.port, head)
    assert answer.split(b" ")[1] == status, answer[:200]
    assert b"Traceback" not in answer
    ok = requests.post(live.url + "/predictions/run", data=jpegs[0], timeout=10)
    assert ok.status_code == 200


def test_served_models_do_not_busy_wait(live: LiveServer) -> None:
    """onnxruntime's idle threads would spin on the cores the decode pool needs."""
    for model in live.server.config.app.state.server.models.values():
        options = model.predictor.session.get_session_options()
        assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"


def test_model_failure_is_generic_500_and_worker_survives(live: LiveServer, jpegs: list[bytes],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    model = live.server.config.app.state.server.models["second"]

    def broken(batch: np.ndarray) -> np.ndarray:
        raise RuntimeError("/secret/path/model.onnx exploded")

    monkeypatch.setattr(model.batcher, "_run", broken)
    r = requests.post(live.url + "/predict/second", data=jpegs[0], timeout=10)
    assert r.status_code == 500 and r.json() == {"status": "Error", "error": "inference failed"}
    assert "secret" not in r.text
    monkeypatch.undo()
    assert requests.post(live.url + "/predict/second", data=jpegs[0], timeout=10).status_code == 200


# -- the batcher on its own ----------------------------------------------------------------

def test_batcher_refuses_expired_inputs_without_running_them() -> None:
    import asyncio

    from lensforge.errors import RequestError
    from lensforge.serve.batching import Batcher

    ran: list[int] = []

    def slow(batch: list[np.ndarray]) -> list[np.ndarray]:
        ran.append(len(batch))
        time.sleep(0.2)
        return [x * 2 for x in batch]

    async def scenario() -> list[object]:
        loop = asyncio.get_running_loop()
        with ThreadPoolExecutor(1) as pool:
            batcher = Batcher(slow, pool, max_batch=1, max_wait_ms=0, max_queue=2)
            batcher.start()
            first = loop.create_task(batcher.submit(np.ones(2, np.float32), loop.time() + 5))
            await asyncio.sleep(0.05)  # first is running now
            late = loop.create_task(batcher.submit(np.ones(2, np.float32), loop.time() + 0.05))
            queued = loop.create_task(batcher.submit(np.ones(2, np.float32), loop.time() + 5))
            await asyncio.sleep(0.01)  # both are queued now
            with pytest.raises(RequestError) as full:
                await batcher.submit(np.ones(2, np.float32), loop.time() + 5)  # queue of 2 is full
            out = await asyncio.gather(first, late, queued, return_exceptions=True)
            await batcher.stop()
            return [*out, full.value]

    first, late, queued, full = asyncio.run(scenario())
    np.testing.assert_array_equal(first, [2, 2])
    np.testing.assert_array_equal(queued, [2, 2])
    assert isinstance(late, RequestError) and late.status == 503 and "deadline" in str(late)
    assert isinstance(full, RequestError) and full.status == 503 and "queue full" in str(full)
    assert ran == [1, 1]  # the expired input never ran


def test_batcher_waits_for_company_only_while_other_requests_are_in_flight() -> None:
    """With max_wait 60 s: a lone request runs at once; with a second request in flight the
    first waits for it and both run as one batch."""
    import asyncio

    from lensforge.serve.batching import Batcher

    ran: list[int] = []
    in_flight = [1]

    def double(batch: list[np.ndarray]) -> list[np.ndarray]:
        ran.append(len(batch))
        return [x * 2 for x in batch]

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        with ThreadPoolExecutor(1) as pool:
            batcher = Batcher(double, pool, max_batch=8, max_wait_ms=60_000, in_flight=lambda: in_flight[0])
            batcher.start()
            alone = await asyncio.wait_for(batcher.submit(np.ones(2, np.float32), loop.time() + 120), 10)
            np.testing.assert_array_equal(alone, [2, 2])
            in_flight[0] = 2  # another request is being read or decoded: worth waiting for
            first = loop.create_task(batcher.submit(np.ones(2, np.float32), loop.time() + 120))
            await asyncio.sleep(0.3)
            assert not first.done() and ran == [1]
            second = batcher.submit(np.full(2, 3, np.float32), loop.time() + 120)
            out = await asyncio.wait_for(asyncio.gather(first, second), 10)
            np.testing.assert_array_equal(out[1], [6, 6])
            await batcher.stop()

    asyncio.run(scenario())
    assert ran == [1, 2]


def test_a_stalled_body_gets_408_at_the_deadline(shapes_bundle: Path, jpegs: list[bytes]) -> None:
    """B4: a client that promises more bytes than it sends is answered at the deadline and
    does not hold the server."""
    app = create_app([shapes_bundle], timeout_s=1.0)
    with LiveServer(app) as server:
        port = int(server.url.rsplit(":", 1)[1])
        head = (b"POST /predictions/run HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
                b"Content-Length: 100000\r\n\r\n" + jpegs[0][:100])
        started = time.monotonic()
        answer = raw_exchange(port, head)
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
        assert time.monotonic() - started < 5
        ok = requests.post(server.url + "/predictions/run", data=jpegs[0], timeout=30)
        assert ok.status_code == 200
