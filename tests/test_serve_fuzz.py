"""schemathesis over every operation of ``/openapi.json`` (RELIABILITY.md, figure 6, CI size).

One real uvicorn server (:class:`serving.LiveServer`, lifespan on, ``/readyz`` 200 before the
first request) serves the tiny classifier and the tiny detector. Every operation in the
schema it publishes gets ``EXAMPLES`` generated requests (derandomized: the same cases every
run) checked with ``not_a_server_error`` and ``response_schema_conformance``, in schemathesis'
positive mode (inputs the schema allows) and negative mode (inputs it forbids). Operations
with a model in their path run bound to each served model (so generated bodies reach decoding
and inference) and with generated names (unknown models, odd characters).
``bench/fuzz_openapi.py`` is the long version (200 examples per operation).

The fuzzer found no 5xx. It found inputs the schema allowed and the server rightly refused
(non-base64 ``raw_file``, multipart bodies without the image field, any JSON for v2 infer);
serve/openapi.py now describes them, and the rows at the end keep schema and server agreeing."""

from __future__ import annotations

import base64
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

schemathesis = pytest.importorskip("schemathesis")  # the dev extra; the server itself does not need it

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import FailureGroup
from schemathesis.specs.openapi.checks import response_schema_conformance
from serving import LiveServer
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from lensforge.serve import create_app, openapi

pytestmark = pytest.mark.slow  # schemathesis over the live server: not in the fast inner loop (-m 'not slow')

EXAMPLES = 25  # per operation, binding and mode: ~1,100 requests, ~30 s on 2 cores
CHECKS = [not_a_server_error, response_schema_conformance]
MODELS = ("shapes", "boxes")


@pytest.fixture(scope="module")
def live(shapes_bundle: Path, detect_bundle: Path) -> Iterator[LiveServer]:
    app = create_app({"shapes": shapes_bundle, "boxes": detect_bundle}, max_wait_ms=1, max_body_bytes=1 << 20)
    with LiveServer(app) as server:
        yield server


@pytest.fixture(scope="module")
def api(live: LiveServer) -> object:
    return schemathesis.openapi.from_url(live.url + "/openapi.json")


def bind(operation: object, model: str) -> dict[str, str]:
    """Path parameters pinning ``operation`` to ``model`` and KServe's one version ("1")."""
    values = {"model": model, "name": model, "model_name": model, "version": "1"}
    return {p.name: values[p.name] for p in operation.path_parameters if p.name in values}  # type: ignore[attr-defined]


def fuzz_operation(operation: object, base_url: str, examples: int, path_parameters: dict[str, str],
                   mode: GenerationMode = GenerationMode.POSITIVE) -> list[str]:
    """Run ``examples`` generated cases of ``operation``; one line per failing case
    (check titles and a curl command to replay it), empty when all pass."""
    failures: list[str] = []

    @settings(max_examples=examples, derandomize=True, database=None, deadline=None,
              phases=[Phase.explicit, Phase.generate],  # no shrinking: each failure is reported as sent
              suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(mode, path_parameters=path_parameters))  # type: ignore[attr-defined]
    def run(case: schemathesis.Case) -> None:
        try:
            case.call_and_validate(base_url=base_url, checks=CHECKS, timeout=30)
        except FailureGroup as group:
            titles = "; ".join(sorted({f.title for f in group.exceptions}))
            failures.append(f"{titles}: {case.as_curl_command()}"[:2000])

    try:
        run()
    except Unsatisfiable:  # negative mode on an operation with no input to break (GET /ping)
        pass
    return failures


# (binding, mode): each served model with valid and schema-violating inputs; then generated
# model names (mostly 404s), where only the positive mode has anything to vary
ROWS = [(m, mode) for m in MODELS for mode in GenerationMode] + [("generated", GenerationMode.POSITIVE)]


@pytest.mark.parametrize(("binding", "mode"), ROWS, ids=[f"{b}-{m.value}" for b, m in ROWS])
def test_every_operation_survives_fuzzing(binding: str, mode: GenerationMode, live: LiveServer, api: object) -> None:
    operations = [result.ok() for result in api.get_all_operations()]  # type: ignore[attr-defined]
    assert len(operations) >= 20, "the schema lost operations"
    failures: list[str] = []
    fuzzed = 0
    for op in operations:
        if binding != "generated" and not op.path_parameters and binding != MODELS[0]:
            continue  # operations without a model in the path run in the first model's rows only
        bound = {} if binding == "generated" else bind(op, binding)
        failures += [f"{op.label}: {line}" for line in fuzz_operation(op, live.url, EXAMPLES, bound, mode)]
        fuzzed += 1
    assert fuzzed >= 10
    assert not failures, "\n".join(failures)
    # the server is still healthy afterwards
    assert requests.get(live.url + "/v2/health/live", timeout=5).status_code == 200
    assert requests.get(live.url + "/readyz", timeout=5).status_code == 200


# -- the harness finds what it should --------------------------------------------------------


def test_fuzzing_reports_a_server_error() -> None:
    """The same loop against a route that answers 500 must report it (the fuzz rows can fail)."""
    async def broken(request: Request) -> Response:
        return JSONResponse({"error": "boom"}, status_code=500)

    async def schema_route(request: Request) -> Response:
        return JSONResponse(openapi.schema(request.app.routes))

    app = Starlette(routes=[Route("/v2/models/{model}/ready", broken), Route("/openapi.json", schema_route),
                            Route("/readyz", lambda request: JSONResponse({"status": "ready"}))])
    with LiveServer(app) as server:
        ops = [r.ok() for r in schemathesis.openapi.from_url(server.url + "/openapi.json").get_all_operations()]
        op = next(op for op in ops if op.path == "/v2/models/{model}/ready")
        failures = fuzz_operation(op, server.url, 3, {"model": "shapes"})
    assert len(failures) == 1 and "Server error" in failures[0], failures  # one case: nothing else to vary


# -- regression rows: what the schema says about a body matches what the server does ----------

_RAW_FILE = re.compile(openapi.OPERATIONS[("post", "/predict")]["requestBody"]["content"]["application/json"]
                       ["schema"]["properties"]["raw_file"]["pattern"])


@pytest.mark.parametrize(("raw_file", "allowed", "status"), [
    ("", False, 400),  # empty image (the schema's minLength)
    ("%\r!&", False, 400),  # outside the alphabet (what the fuzzer sent before the schema had a pattern)
    ("QUJ", False, 400),  # bad padding
    ("QUI", False, 400),
    ("QUJD", True, 415),  # valid base64 of b"ABC": decoded, then not an image
    ("QUI=", True, 415),
    ("QQ==", True, 415),
    ("data:image/png;base64,QUJD", True, 415),  # the data URL prefix the server strips
    (None, True, 200),  # a real JPEG of the shapes set
])
def test_seed_base64_schema_matches_server(raw_file: str | None, allowed: bool, status: int, live: LiveServer,
                                           jpegs: list[bytes]) -> None:
    if raw_file is None:
        raw_file = base64.b64encode(jpegs[0]).decode()
    assert (_RAW_FILE.match(raw_file) is not None and len(raw_file) >= 4) is allowed
    r = requests.post(live.url + "/predict/shapes", json={"raw_file": raw_file}, timeout=30)
    assert r.status_code == status, r.text


@pytest.mark.parametrize(("path", "fields", "status"), [
    ("/predict/shapes", {"image": b"x"}, 400),  # not the schema's required field 'file'
    ("/v1/models/shapes/predict", {"other": b"x"}, 400),
    ("/predictions/shapes", {"photo": b"x"}, 400),  # TorchServe: one of data / body / file
    ("/predictions/shapes", {"body": b"x"}, 415),  # found, then not an image
])
def test_multipart_field_schema_matches_server(path: str, fields: dict[str, bytes], status: int,
                                               live: LiveServer) -> None:
    op = openapi.OPERATIONS[("post", re.sub(r"/shapes", "/{}", path))]
    form = op["requestBody"]["content"]["multipart/form-data"]["schema"]
    names = form.get("required") or [r["required"][0] for r in form["anyOf"]]
    assert (set(fields) & set(names) != set()) is (status != 400)
    r = requests.post(live.url + path, files={k: ("x.jpg", v) for k, v in fields.items()}, timeout=30)
    assert r.status_code == status, r.text
