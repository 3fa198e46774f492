"""The KServe v2 / Triton HTTP protocol: the real ``tritonclient.http`` against a live server,
every J row of RELIABILITY.md over raw HTTP, and the wire format's pieces (detections,
binary layout) at the unit level."""

from __future__ import annotations

import base64
import json
import shutil
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
import tritonclient.http as triton
from serving import LiveServer
from tritonclient.utils import InferenceServerException

from lensforge.errors import RequestError
from lensforge.runtime import DetectionResult, Predictor
from lensforge.serve import create_app
from lensforge.serve.kserve_wire import (
    HEADER_LENGTH,
    Requested,
    Signature,
    TensorMeta,
    classification_outputs,
    detection_outputs,
    encode_response,
    parse_request,
)

CAP = 1_000_000  # body cap of the test server (J1's "50 MB of JSON" needs only a little over this)
MAX_QUEUE = 32  # also the most rows or images one request may carry


@pytest.fixture(scope="module")
def live(shapes_bundle: Path) -> Iterator[LiveServer]:
    app = create_app({"run": shapes_bundle}, max_wait_ms=20, max_body_bytes=CAP, max_queue=MAX_QUEUE)
    with LiveServer(app) as server:
        yield server


@pytest.fixture(scope="module")
def client(live: LiveServer) -> triton.InferenceServerClient:
    return triton.InferenceServerClient(url=f"127.0.0.1:{live.port}")


def _clean(response: requests.Response, *paths: Path) -> None:
    """A Triton error body: ``{"error": str}``, with no traceback and no server path."""
    assert set(response.json()) == {"error"} and isinstance(response.json()["error"], str)
    text = response.text
    assert "Traceback" not in text and "File \"" not in text
    assert "/tmp" not in text and "/work" not in text
    for p in paths:
        assert str(p) not in text


def _expected(predictor: Predictor, images: list[bytes]) -> np.ndarray:
    return np.stack([predictor.predict(d).scores for d in images])


# -- tritonclient ----------------------------------------------------------------------------

def test_health_and_metadata(client: triton.InferenceServerClient, predictor: Predictor) -> None:
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("run") and client.is_model_ready("run", "1")
    assert not client.is_model_ready("run", "2") and not client.is_model_ready("nope")
    meta = client.get_server_metadata()
    assert meta["name"] == "lensforge" and "binary_tensor_data" in meta["extensions"]
    model = client.get_model_metadata("run")
    size = predictor.spec.size
    assert model["versions"] == ["1"]
    assert model["inputs"] == [{"name": predictor.input_name, "datatype": "FP32", "shape": [-1, 3, size, size]},
                               {"name": "image", "datatype": "BYTES", "shape": [-1]}]
    assert model["outputs"] == [{"name": "scores", "datatype": "FP32", "shape": [-1, len(predictor.classes)]},
                                {"name": "labels", "datatype": "BYTES", "shape": [-1]}]
    assert client.get_model_metadata("run", "1") == model
    config = client.get_model_config("run")
    assert config["max_batch_size"] == MAX_QUEUE and config["input"][0]["dims"] == [3, size, size]
    with pytest.raises(InferenceServerException, match="Request for unknown model: 'nope' is not found"):
        client.get_model_metadata("nope")


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_infer_fp32_tensor(binary: bool, client: triton.InferenceServerClient, predictor: Predictor,
                           jpegs: list[bytes]) -> None:
    images = jpegs[:3]
    x = np.stack([predictor.prepare(d) for d in images])
    tensor = triton.InferInput(predictor.input_name, list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=binary)
    out = triton.InferRequestedOutput("scores", binary_data=binary)
    result = client.infer("run", [tensor], outputs=[out], request_id="r1")
    assert result.get_response()["id"] == "r1"
    np.testing.assert_allclose(result.as_numpy("scores"), _expected(predictor, images), atol=1e-5)


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json_base64"])
def test_infer_bytes_of_jpegs(binary: bool, client: triton.InferenceServerClient, predictor: Predictor,
                              jpegs: list[bytes]) -> None:
    images = jpegs[:4]
    # JSON carries text only (tritonclient refuses non-UTF-8 bytes there): files travel as base64
    elements = images if binary else [base64.b64encode(d) for d in images]
    tensor = triton.InferInput("image", [len(images)], "BYTES")
    tensor.set_data_from_numpy(np.array(elements, dtype=np.object_), binary_data=binary)
    result = client.infer("run", [tensor], outputs=[triton.InferRequestedOutput("scores", binary_data=binary)])
    assert result.as_numpy("scores").shape == (4, len(predictor.classes))
    np.testing.assert_allclose(result.as_numpy("scores"), _expected(predictor, images), atol=1e-5)


def test_default_outputs_binary_and_requested_outputs(client: triton.InferenceServerClient, predictor: Predictor,
                                                      jpegs: list[bytes]) -> None:
    images = jpegs[:5]
    tensor = triton.InferInput("IMAGE", [len(images), 1], "BYTES")  # any BYTES name, [N, 1] as Triton models use
    tensor.set_data_from_numpy(np.array(images, dtype=np.object_).reshape(-1, 1))
    plain = client.infer("run", [tensor])  # no outputs named: tritonclient asks for binary_data_output
    assert plain.get_output("scores")["parameters"]["binary_data_size"] == 5 * len(predictor.classes) * 4
    expected = _expected(predictor, images)
    np.testing.assert_allclose(plain.as_numpy("scores"), expected, atol=1e-5)
    assert plain.get_output("labels") is None

    outs = [triton.InferRequestedOutput("labels", binary_data=True), triton.InferRequestedOutput("scores", binary_data=False)]
    both = client.infer("run", [tensor], outputs=outs)
    assert [o["name"] for o in both.get_response()["outputs"]] == ["labels", "scores"]
    assert [v.decode() for v in both.as_numpy("labels")] == [predictor.classes[i] for i in expected.argmax(1)]
    np.testing.assert_allclose(both.as_numpy("scores"), expected, atol=1e-5)

    top2 = client.infer("run", [tensor], outputs=[triton.InferRequestedOutput("scores", class_count=2)])
    rows = top2.as_numpy("scores")
    assert rows.shape == (5, 2)
    for row, want in zip(rows, expected):
        best = np.argsort(-want, kind="stable")[:2]
        assert [v.decode() for v in row] == [f"{want[i]:f}:{i}:{predictor.classes[i]}" for i in best]


def _batch_sizes(url: str) -> tuple[float, float]:
    text = requests.get(url + "/metrics", timeout=10).text
    count = next(float(line.split()[-1]) for line in text.splitlines()
                 if line.startswith('lensforge_batch_size_count{model="run"}'))
    total = next(float(line.split()[-1]) for line in text.splitlines()
                 if line.startswith('lensforge_batch_size_sum{model="run"}'))
    return count, total


def test_rows_go_through_the_batcher_and_metrics(live: LiveServer, client: triton.InferenceServerClient,
                                                 predictor: Predictor, jpegs: list[bytes]) -> None:
    images = [jpegs[i % len(jpegs)] for i in range(8)]
    x = np.stack([predictor.prepare(d) for d in images])
    tensor = triton.InferInput(predictor.input_name, list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    before = _batch_sizes(live.url)
    result = client.infer("run", [tensor])
    np.testing.assert_allclose(result.as_numpy("scores"), _expected(predictor, images), atol=1e-5)
    calls, rows = (a - b for a, b in zip(_batch_sizes(live.url), before))
    assert rows == 8 and calls < 8, "the rows were not batched together"
    metrics = requests.get(live.url + "/metrics", timeout=10).text
    assert 'lensforge_requests_total{code="200",route="/v2/models/{model}/infer"}' in metrics


# -- raw HTTP: RELIABILITY.md J rows ---------------------------------------------------------

def _v2(payload: Any, binary: bytes = b"", header_length: str | None = None) -> dict[str, Any]:
    """requests kwargs for a v2 body: JSON header, then ``binary`` (binary tensor extension)."""
    header = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    headers = {"Content-Type": "application/octet-stream" if binary else "application/json"}
    if binary or header_length is not None:
        headers[HEADER_LENGTH] = header_length if header_length is not None else str(len(header))
    return {"data": header + binary, "headers": headers}


def _tensor(name: str, shape: list[Any], datatype: str = "FP32", **extra: Any) -> dict[str, Any]:
    return {"inputs": [{"name": name, "shape": shape, "datatype": datatype, **extra}]}


def _packed(*items: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(v)) + v for v in items)


def _images(*items: bytes) -> dict[str, Any]:
    """A BYTES tensor of ``items`` in the binary extension."""
    packed = _packed(*items)
    return _v2(_tensor("image", [len(items)], "BYTES", parameters={"binary_data_size": len(packed)}), packed)


class Ctx:
    """What the table's builders need: the model's input name and side, and a JPEG."""

    def __init__(self, predictor: Predictor, jpeg: bytes) -> None:
        self.name, self.s, self.jpeg = predictor.input_name, predictor.spec.size, jpeg

    def row_bytes(self) -> int:
        return 3 * self.s * self.s * 4


INFER = "/v2/models/run/infer"
JROWS: list[tuple[str, str, Callable[[Ctx], dict[str, Any]], int, str]] = [
    # J1 JSON
    ("invalid_json", INFER, lambda c: _v2(b"{nope"), 400, "failed to parse the request JSON"),
    ("deep_json", INFER, lambda c: _v2(b"[" * 100_000), 400, "failed to parse the request JSON"),
    ("json_over_cap", INFER, lambda c: _v2(b"[" + b"0," * (CAP // 2) + b"0]"), 413, "too large"),
    ("not_an_object", INFER, lambda c: _v2([1, 2]), 400, "JSON object"),
    ("inputs_not_list", INFER, lambda c: _v2({"inputs": {"name": "image"}}), 400, "expected 1 inputs but got 0"),
    # J4 sizes
    ("json_count_mismatch", INFER, lambda c: _v2(_tensor(c.name, [1, 3, c.s, c.s], data=[0.5] * 10)), 400,
     "input byte size mismatch for input 'images' for model 'run'. Expected"),
    ("binary_size_mismatch", INFER,
     lambda c: _v2(_tensor(c.name, [1, 3, c.s, c.s], parameters={"binary_data_size": 48}), b"\0" * 48), 400,
     "input byte size mismatch for input 'images' for model 'run'. Expected"),
    ("binary_size_over_data", INFER,
     lambda c: _v2(_tensor(c.name, [1, 3, c.s, c.s], parameters={"binary_data_size": c.row_bytes()}), b"\0" * 48),
     400, "only 48 bytes follow"),
    ("binary_without_size", INFER, lambda c: _v2(_tensor(c.name, [1, 3, c.s, c.s], data=[0.0] * 3 * c.s * c.s),
                                                 b"\0" * 8), 400, "unexpected additional input data"),
    ("bytes_count_mismatch", INFER,
     lambda c: _v2(_tensor("image", [2], "BYTES", parameters={"binary_data_size": 4 + len(c.jpeg)}),
                   _packed(c.jpeg)), 400, "input byte size mismatch for input 'image'"),
    ("bytes_truncated_prefix", INFER,
     lambda c: _v2(_tensor("image", [1], "BYTES", parameters={"binary_data_size": 6}), b"\xff\xff\0\0ab"), 400,
     "truncated"),
    ("data_and_binary", INFER,
     lambda c: _v2(_tensor("image", [1], "BYTES", data=["x"], parameters={"binary_data_size": 0})), 400, "send one"),
    ("fp32_strings", INFER, lambda c: _v2(_tensor(c.name, [1, 3, c.s, c.s], data=["1"] * 3 * c.s * c.s)), 400,
     "must be numbers"),
    # J5 shapes, refused before any allocation
    ("negative_dim", INFER, lambda c: _v2(_tensor(c.name, [-1, 3, c.s, c.s], data=[])), 400, "positive integer"),
    ("zero_dim", INFER, lambda c: _v2(_tensor(c.name, [0, 3, c.s, c.s], data=[])), 400, "positive integer"),
    ("huge_dim", INFER, lambda c: _v2(_tensor(c.name, [2**40, 3, c.s, c.s], data=[])), 400, "too large"),
    ("hundred_dims", INFER, lambda c: _v2(_tensor(c.name, [1] * 100, data=[])), 400, "100 dimensions"),
    ("product_overflow", INFER, lambda c: _v2(_tensor(c.name, [2**32, 2**32, 2**32, 2**32], data=[])), 400,
     "too large"),
    ("float_dim", INFER, lambda c: _v2(_tensor(c.name, [1.5, 3, c.s, c.s], data=[])), 400, "positive integer"),
    ("bool_dim", INFER, lambda c: _v2(_tensor(c.name, [True, 3, c.s, c.s], data=[])), 400, "positive integer"),
    ("too_many_images", INFER, lambda c: _v2(_tensor("image", [MAX_QUEUE + 1], "BYTES", data=["eA=="] * 33)),
     400, f"at most {MAX_QUEUE}"),
    # J6 names and datatypes
    ("unknown_input", INFER, lambda c: _v2(_tensor("pixels", [1, 3, c.s, c.s], data=[0.0])), 400,
     "unexpected inference input 'pixels' for model 'run'"),
    ("missing_input", INFER, lambda c: _v2({"inputs": []}), 400,
     "expected 1 inputs but got 0 inputs for model 'run'; send one input: 'images'"),
    ("two_inputs", INFER, lambda c: _v2({"inputs": _tensor("image", [1], "BYTES", data=["eA=="])["inputs"] * 2}),
     400, "expected 1 inputs but got 2"),
    ("wrong_datatype", INFER, lambda c: _v2(_tensor(c.name, [1, 3, c.s, c.s], "INT32", data=[0])), 400,
     "inference input 'images' data-type is 'INT32', but model 'run' expects 'FP32'"),
    ("image_not_bytes", INFER, lambda c: _v2(_tensor("image", [1], "FP32", data=[0.0])), 400,
     "expects 'BYTES'"),
    ("unknown_datatype", INFER, lambda c: _v2(_tensor(c.name, [1], "FLOAT", data=[0.0])), 400, "invalid datatype"),
    ("wrong_shape", INFER, lambda c: _v2(_tensor(c.name, [1, 3, c.s + 1, c.s], data=[])), 400,
     "unexpected shape for input 'images' for model 'run'"),
    # J7 unknown model / version
    ("unknown_model", "/v2/models/nope/infer", lambda c: _v2(_tensor("image", [1], "BYTES", data=["eA=="])), 404,
     "Request for unknown model: 'nope' is not found"),
    ("unknown_version", "/v2/models/run/versions/7/infer",
     lambda c: _v2(_tensor("image", [1], "BYTES", data=["eA=="])), 404,
     "Request for unknown model: 'run' version 7 is not found"),
    # J8 outputs
    ("ten_thousand_outputs", INFER, lambda c: _v2({**_tensor("image", [1], "BYTES", data=["eA=="]),
                                                   "outputs": [{"name": "scores"}] * 10_000}), 400,
     "too many requested outputs: 10000"),
    ("unknown_output", INFER, lambda c: _v2({**_tensor("image", [1], "BYTES", data=["eA=="]),
                                            "outputs": [{"name": "logits"}]}), 400,
     "unexpected inference output 'logits' for model 'run'"),
    ("duplicate_output", INFER, lambda c: _v2({**_tensor("image", [1], "BYTES", data=["eA=="]),
                                              "outputs": [{"name": "scores"}, {"name": "scores"}]}), 400, "twice"),
    ("binary_data_not_bool", INFER, lambda c: _v2({**_tensor("image", [1], "BYTES", data=["eA=="]),
                                                  "outputs": [{"name": "scores", "parameters": {"binary_data": "yes"}}]}),
     400, "'binary_data'"),
    # J9 Inference-Header-Content-Length
    ("header_length_over_body", INFER, lambda c: _v2(_tensor("image", [1], "BYTES", data=["eA=="]),
                                                      header_length="100000"), 400, HEADER_LENGTH),
    ("header_length_negative", INFER, lambda c: _v2(_tensor("image", [1], "BYTES", data=["eA=="]),
                                                     header_length="-5"), 400, HEADER_LENGTH),
    ("header_length_not_int", INFER, lambda c: _v2(_tensor("image", [1], "BYTES", data=["eA=="]),
                                                    header_length="12.5"), 400, HEADER_LENGTH),
    # J10 reserved parameters
    ("timeout_string", INFER, lambda c: _v2({**_tensor("image", [1], "BYTES", data=["eA=="]),
                                            "parameters": {"timeout": "soon"}}), 400, "'timeout'"),
    ("timeout_negative", INFER, lambda c: _v2({**_tensor("image", [1], "BYTES", data=["eA=="]),
                                              "parameters": {"timeout": -1}}), 400, "'timeout'"),
    ("priority_float", INFER, lambda c: _v2({**_tensor("image", [1], "BYTES", data=["eA=="]),
                                            "parameters": {"priority": 1.5}}), 400, "'priority'"),
    ("priority_bool", INFER, lambda c: _v2({**_tensor("image", [1], "BYTES", data=["eA=="]),
                                           "parameters": {"priority": True}}), 400, "'priority'"),
    ("parameters_not_object", INFER, lambda c: _v2({**_tensor("image", [1], "BYTES", data=["eA=="]),
                                                   "parameters": [1]}), 400, "'parameters'"),
    # bad images inside a BYTES tensor: their own 4xx (I rows)
    ("empty_image", INFER, lambda c: _images(b""), 400, "empty"),
    ("text_image", INFER, lambda c: _v2(_tensor("image", [1], "BYTES", data=[base64.b64encode(b"hello " * 9).decode()])),
     415, "unsupported"),
    ("truncated_second_image", INFER, lambda c: _images(c.jpeg, c.jpeg[: len(c.jpeg) // 2]), 400,
     "element 1: corrupt"),
    ("bad_base64", INFER, lambda c: _v2(_tensor("image", [1], "BYTES", data=["not*base64!"])), 400, "invalid base64"),
]


@pytest.mark.parametrize("case", JROWS, ids=[c[0] for c in JROWS])
def test_bad_request_then_valid(case: tuple, live: LiveServer, predictor: Predictor, shapes_bundle: Path,
                                jpegs: list[bytes]) -> None:
    _, route, build, status, text = case
    r = requests.post(live.url + route, timeout=10, **build(Ctx(predictor, jpegs[0])))
    assert r.status_code == status, r.text
    assert text.lower() in r.json()["error"].lower()
    _clean(r, shapes_bundle)
    ok = requests.post(live.url + INFER, timeout=10,
                       **_v2(_tensor("image", [1], "BYTES", data=[base64.b64encode(jpegs[0]).decode()])))
    assert ok.status_code == 200, ok.text
    np.testing.assert_allclose(ok.json()["outputs"][0]["data"], predictor.predict(jpegs[0]).scores, atol=1e-5)
    assert requests.get(live.url + "/v2/health/live", timeout=10).status_code == 200


def test_request_timeout_parameter_is_honoured(live: LiveServer, predictor: Predictor, jpegs: list[bytes]) -> None:
    x = np.stack([predictor.prepare(jpegs[0])] * 4)
    body = _tensor(predictor.input_name, list(x.shape), parameters={"binary_data_size": x.nbytes})
    body["parameters"] = {"timeout": 1}  # 1 microsecond: expires before the batcher runs the rows
    r = requests.post(live.url + INFER, timeout=10, **_v2(body, x.tobytes()))
    assert r.status_code == 503 and r.headers["Retry-After"] == "1", r.text
    assert "timeout" in r.json()["error"] or "deadline" in r.json()["error"]
    body["parameters"] = {"timeout": 5_000_000, "priority": 1}
    r = requests.post(live.url + INFER, timeout=10, **_v2(body, x.tobytes()))
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(np.reshape(r.json()["outputs"][0]["data"], (4, -1)),
                               _expected(predictor, [jpegs[0]] * 4), atol=1e-5)


def test_get_route_bodies_and_unknown_names(live: LiveServer) -> None:
    assert requests.get(live.url + "/v2/health/live", timeout=10).json() == {"live": True}  # the v2 spec's bodies
    assert requests.get(live.url + "/v2/health/ready", timeout=10).json() == {"ready": True}
    assert requests.get(live.url + "/v2/models/run/versions/1/ready", timeout=10).json() == {"name": "run", "ready": True}
    for path in ("/v2/models/nope", "/v2/models/nope/ready", "/v2/models/nope/config", "/v2/models/run/versions/2"):
        r = requests.get(live.url + path, timeout=10)
        assert r.status_code == 404 and "Request for unknown model" in r.json()["error"], path
    assert requests.get(live.url + "/v2/models/run/infer", timeout=10).status_code == 405


def test_binary_request_built_by_hand(live: LiveServer, predictor: Predictor, jpegs: list[bytes]) -> None:
    """The wire layout itself: JSON header, packed BYTES after it, binary output after the answer's header."""
    packed = _packed(jpegs[0], jpegs[1])
    body = _tensor("image", [2], "BYTES", parameters={"binary_data_size": len(packed)})
    body["outputs"] = [{"name": "scores", "parameters": {"binary_data": True}}]
    r = requests.post(live.url + "/v2/models/run/versions/1/infer", timeout=10, **_v2(body, packed))
    assert r.status_code == 200, r.text
    n = int(r.headers[HEADER_LENGTH])
    header = json.loads(r.content[:n])
    assert header["outputs"] == [{"name": "scores", "datatype": "FP32", "shape": [2, len(predictor.classes)],
                                  "parameters": {"binary_data_size": 2 * len(predictor.classes) * 4}}]
    scores = np.frombuffer(r.content[n:], dtype="<f4").reshape(2, -1)
    np.testing.assert_allclose(scores, _expected(predictor, jpegs[:2]), atol=1e-5)


def test_not_ready_model_answers_503_with_retry_after(shapes_bundle: Path, tmp_path: Path, jpegs: list[bytes]) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(shapes_bundle, broken)
    (broken / "model.onnx").write_bytes(b"not an onnx file")  # loads never: the model stays not ready
    app = create_app({"run": shapes_bundle, "broken": broken}, max_body_bytes=CAP)
    server = LiveServer(app, ready_path="/v2/models/run/ready")  # /readyz stays 503: a model is broken
    with server:
        url = server.url
        assert requests.get(url + "/v2/health/live", timeout=10).status_code == 200
        assert requests.get(url + "/v2/health/ready", timeout=10).status_code == 503
        r = requests.get(url + "/v2/models/broken/ready", timeout=10)
        assert r.status_code == 503 and r.headers["Retry-After"] == "1"
        r = requests.post(url + "/v2/models/broken/infer", timeout=10,
                          **_v2(_tensor("image", [1], "BYTES", data=[base64.b64encode(jpegs[0]).decode()])))
        assert r.status_code == 503 and r.headers["Retry-After"] == "1" and "not ready" in r.json()["error"]
        assert requests.get(url + "/v2/models/run/ready", timeout=10).status_code == 200
        ok = requests.post(url + INFER, timeout=10,
                           **_v2(_tensor("image", [1], "BYTES", data=[base64.b64encode(jpegs[0]).decode()])))
        assert ok.status_code == 200, ok.text


# -- the wire format, unit level ---------------------------------------------------------------

DETECTOR = Signature(
    "det", None,
    (TensorMeta("boxes", "FP32", (-1, 4)), TensorMeta("scores", "FP32", (-1,)),
     TensorMeta("class_ids", "INT64", (-1,)), TensorMeta("labels", "BYTES", (-1,))),
    ("boxes", "scores", "class_ids"), ("cat", "dog"), True, 1,
)


def test_detection_outputs_keep_boxes_above_the_tuned_threshold() -> None:
    result = DetectionResult(boxes=[[1, 2, 30, 40], [5, 5, 9, 9], [0, 0, 64, 48]], scores=[0.9, 0.2, 0.6],
                             class_ids=[1, 0, 0], classes=("cat", "dog"), threshold=0.5, image_size=(64, 48))
    wanted = [Requested("boxes", True), Requested("scores", False), Requested("class_ids", True),
              Requested("labels", False)]
    tensors = detection_outputs(result, wanted)
    body, headers = encode_response("det", None, tensors, [w.binary for w in wanted])
    answer = triton.InferResult.from_response_body(body, header_length=int(headers[HEADER_LENGTH]))
    np.testing.assert_array_equal(answer.as_numpy("boxes"), np.float32([[1, 2, 30, 40], [0, 0, 64, 48]]))
    np.testing.assert_array_equal(answer.as_numpy("scores"), np.float32([0.9, 0.6]))
    assert answer.as_numpy("class_ids").dtype == np.int64 and answer.as_numpy("class_ids").tolist() == [1, 0]
    assert answer.as_numpy("labels").tolist() == ["dog", "cat"]  # JSON BYTES come back as str

    none = detection_outputs(result.above(0.95), wanted[:3])
    body, headers = encode_response("det", "x", none, [False] * 3)
    assert [o["shape"] for o in json.loads(body)["outputs"]] == [[0, 4], [0], [0]]


@pytest.mark.parametrize("shape, datatype, name, message", [
    ([2], "BYTES", "image", "one image per request"),
    ([1, 3, 64, 64], "FP32", "images", "unexpected inference input 'images' for model 'det'"),
    ([1], "FP32", "image", "expects 'BYTES'"),
])
def test_detectors_take_one_encoded_image(shape: list[int], datatype: str, name: str, message: str) -> None:
    body = json.dumps(_tensor(name, shape, datatype, data=["eA=="] * 2)).encode()
    with pytest.raises(RequestError, match=message) as e:
        parse_request(body, None, DETECTOR, CAP)
    assert e.value.status == 400
    req = parse_request(json.dumps(_tensor("image", [1], "BYTES", data=["eA=="])).encode(), None, DETECTOR, CAP)
    assert req.images == [b"x"] and [o.name for o in req.outputs] == ["boxes", "scores", "class_ids"]


def test_classification_outputs_json_and_binary_agree() -> None:
    from lensforge.runtime import ClassificationResult

    results = [ClassificationResult(np.float32([0.1, 0.7, 0.2]), ("a", "b", "c")),
               ClassificationResult(np.float32([0.5, 0.25, 0.25]), ("a", "b", "c"))]
    for binary in (True, False):
        wanted = [Requested("scores", binary), Requested("labels", binary), ]
        body, headers = encode_response("m", None, classification_outputs(results, wanted), [binary] * 2)
        length = headers.get(HEADER_LENGTH)
        answer = triton.InferResult.from_response_body(body, header_length=int(length) if length else None)
        np.testing.assert_array_equal(answer.as_numpy("scores"), np.float32([[0.1, 0.7, 0.2], [0.5, 0.25, 0.25]]))
        assert answer.as_numpy("labels").tolist() in ([b"b", b"a"], ["b", "a"])
