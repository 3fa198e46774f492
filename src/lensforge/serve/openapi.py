"""OpenAPI 3.1 description of the server (``/openapi.json``) and an offline docs page (``/docs``).

The schema is generated from the app's route list at request time (Starlette's
:class:`~starlette.schemas.SchemaGenerator` walks it), so routes that other modules add appear
without being registered here. Each operation comes from, in order:

1. the handler's docstring YAML after a ``---`` line (Starlette's convention; a wrapped
   handler is unwrapped through ``__wrapped__``),
2. :data:`OPERATIONS` below, keyed by method and path with parameter names ignored
   (``/v2/models/{model}/infer`` and ``/v2/models/{name}/infer`` match),
3. a generic entry: the first docstring line, or "METHOD path".

Path parameters are added from the path when an operation does not list them. ``/docs``
renders the schema as plain HTML on the server: no JavaScript, no CDN, works offline.
"""

from __future__ import annotations

import copy
import html
import json
import logging
import re
from collections.abc import Callable, Sequence
from typing import Any

import yaml
from starlette.routing import BaseRoute
from starlette.schemas import SchemaGenerator

from lensforge import __version__

log = logging.getLogger(__name__)

_PARAM = re.compile(r"{([^}:]+)(?::[^}]*)?}")

# -- building blocks of the table -------------------------------------------------------------

_BINARY = {"type": "string", "format": "binary"}


# Strict base64 as the server decodes it (``b64decode(validate=True)``: whole 4-character groups,
# padding only at the end), after an optional data URL prefix; non-empty, since "" is `empty image`.
_BASE64 = {"type": "string", "contentEncoding": "base64", "minLength": 4,
           "pattern": r"^(data:image/[A-Za-z0-9.+-]+;base64,)?(?:[A-Za-z0-9+/]{4})*"
                      r"(?:[A-Za-z0-9+/]{4}|[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)$"}


def _image_body(fields: Sequence[str] = ("file",), *, seed_json: bool = False) -> dict[str, Any]:
    """An image sent as multipart (under any of ``fields``) or as the raw body."""
    props = {f: {**_BINARY, "description": "the image (JPEG, PNG, WebP, BMP, GIF)"} for f in fields}
    # the server answers 400 `missing file field` without one of the fields (RELIABILITY.md M1)
    form: dict[str, Any] = {"type": "object", "properties": props}
    if len(fields) == 1:
        form["required"] = list(fields)
    else:
        form["anyOf"] = [{"required": [f]} for f in fields]
    content: dict[str, Any] = {
        "multipart/form-data": {"schema": form},
        "image/jpeg": {"schema": _BINARY},
        "image/png": {"schema": _BINARY},
        "application/octet-stream": {"schema": _BINARY},
    }
    if seed_json:
        content["application/json"] = {
            "schema": {"type": "object", "properties": {"raw_file": _BASE64}, "required": ["raw_file"]},
            "example": {"raw_file": "/9j/4AAQSkZJRgABAQAAAQABAAD..."},
        }
    return {"required": True, "content": content}


def _json(description: str, example: Any) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"example": example}}}


def _errors(example: Callable[[int, str, str], Any], statuses: Sequence[int]) -> dict[str, Any]:
    messages = {
        400: ("corrupt", "corrupt or truncated image"),
        404: ("unknown_model", "Request for unknown model: 'nope' is not found"),
        406: ("not_acceptable", "cannot answer with any type in Accept: text/html"),
        408: ("timeout", "request body not received within 10 s"),
        413: ("body_too_large", "request body larger than 20971520 bytes"),
        415: ("unsupported_format", "unsupported image format: text/plain is not an image"),
        503: ("unavailable", "model 'shapes' is not ready"),
    }
    return {str(s): _json(messages[s][1], example(s, *messages[s])) for s in statuses}


def _seed_error(status: int, code: str, message: str) -> Any:
    return {"status": "Error", "error": message}


def _ts_error(status: int, code: str, message: str) -> Any:
    kinds = {400: "BadRequestException", 404: "ModelNotFoundException", 413: "RequestEntityTooLargeException",
             415: "UnsupportedMediaTypeException", 503: "ServiceUnavailableException"}
    return {"code": status, "type": kinds.get(status, "BadRequestException"), "message": message}


def _native_error(status: int, code: str, message: str) -> Any:
    return {"error": {"code": code, "message": message}}


_MODEL_QUERY = {"name": "model", "in": "query", "required": False, "schema": {"type": "string"},
                "description": "the model to use (default: the first one served)"}
_IMAGE_ERRORS = (400, 404, 408, 413, 415, 503)
_SEED_OK = _json("top labels with scores as strings (detectors: a list of boxes above the tuned threshold)",
                 {"preds": {"circle": "0.91", "square": "0.05"}, "status": "Success"})
_NATIVE_OK = {
    "description": "classifiers: predicted labels, top-k and every score; detectors: the boxes at or above the "
                   "tuned threshold (xyxy, original-image pixels), the threshold and the image size",
    "content": {"application/json": {"examples": {
        "classification": {"value": {"model": "shapes", "labels": ["circle"],
                                     "top": [{"label": "circle", "score": 0.91}, {"label": "square", "score": 0.05}],
                                     "scores": {"circle": 0.91, "square": 0.05, "triangle": 0.03, "star": 0.01},
                                     "latency_ms": 12.5}},
        "detection": {"value": {"model": "boxes", "detections": [
            {"label": "cat", "class_id": 0, "score": 0.92, "box": [12.0, 30.5, 200.0, 180.0]}],
            "threshold": 0.45, "image_size": [640, 480], "latency_ms": 35.1}},
    }}},
}
_ANNOTATE_OK = {
    "description": "the image with boxes (detectors) or the top labels (classifiers) drawn; the original size, "
                   "or shrunk to a longer side of 2048 px when larger",
    "content": {"image/jpeg": {"schema": _BINARY}, "image/png": {"schema": _BINARY}},
}
_EXPLAIN_OK = {
    "description": "the heat map (class activation map) over the image with label, score and a colour bar, at the "
                   "decoded image's size (longer side capped at 2048 px); `?format=json`: the map shrunk to at most "
                   "32 px with label, score, method and the image size",
    "content": {"image/png": {"schema": _BINARY}, "image/jpeg": {"schema": _BINARY},
                "application/json": {"schema": {
                    "type": "object", "required": ["label", "score", "method", "width", "height", "map"],
                    "properties": {"label": {"type": "string"}, "score": {"type": "number"},
                                   "method": {"type": "string"}, "width": {"type": "integer"},
                                   "height": {"type": "integer"},
                                   "map": {"type": "array", "items": {"type": "array", "items": {"type": "number"}}}}},
                    "example": {"label": "circle", "score": 0.91, "method": "cam", "width": 64, "height": 64,
                                "map": [[0.0, 0.12], [0.56, 1.0]]}}},
}
_EXPLAIN_REFUSED = {
    "409": _json("the model's bundle has no explain graph", {
        "status": "Error", "error": "model 'old' has no explain graph (its bundle was made before lensforge could "
                                    "explain, or its head is not pooling + linear); add it with: lensforge export "
                                    "BUNDLE --to explain"}),
    "422": _json("the model is a detector", {
        "status": "Error", "error": "model 'boxes' is a detector; /explain explains classifiers"}),
}
_EXPLAIN_QUERY = [
    {"name": "format", "in": "query", "required": False, "schema": {"type": "string", "enum": ["png", "jpeg", "jpg", "json"]},
     "description": "the answer: overlay as PNG (default) or JPEG, or JSON (400 for another value; `format` wins "
                    "over `Accept`)"},
    {"name": "label", "in": "query", "required": False, "schema": {"type": "string"},
     "description": "the class to explain (default: the top label); 400 when the model has no such class"},
]
_KSERVE_ERROR = {"error": "model 'nope' is not found"}
# The v2 inference request as kserve_wire.parse_request checks it: one input, either the model's
# FP32 tensor or encoded images (BYTES, base64 in JSON); at most 8 dimensions. What JSON Schema
# cannot say (the input's name and shape for this model, len(data) = the shape's product) is a 400.
_V2_INFER_REQUEST = {
    "type": "object", "required": ["inputs"],
    "properties": {
        "id": {"type": "string"},
        "parameters": {"type": "object", "properties": {"binary_data_output": {"type": "boolean"}}},
        "inputs": {"type": "array", "minItems": 1, "maxItems": 1, "items": {
            "type": "object", "required": ["name", "datatype", "shape", "data"],
            "properties": {
                "name": {"type": "string", "description": "the model's tensor input (GET /v2/models/{name}) or 'image'"},
                "datatype": {"type": "string", "enum": ["FP32", "BYTES"]},
                "shape": {"type": "array", "minItems": 1, "maxItems": 8, "items": {"type": "integer", "minimum": 1}},
                "data": {"type": "array", "description": "FP32: numbers, row-major (may be nested); BYTES: base64 images"},
                "parameters": {"type": "object"}}}},
        "outputs": {"type": "array", "items": {
            "type": "object", "required": ["name"],
            "properties": {"name": {"type": "string"}, "parameters": {"type": "object"}}}},
    },
}


def _op(summary: str, tag: str, responses: dict[str, Any], *, description: str = "",
        parameters: Sequence[dict[str, Any]] = (), body: dict[str, Any] | None = None) -> dict[str, Any]:
    op: dict[str, Any] = {"summary": summary, "tags": [tag], "responses": responses}
    if description:
        op["description"] = description
    if parameters:
        op["parameters"] = list(parameters)
    if body is not None:
        op["requestBody"] = body
    return op


# (method, path with parameter names removed) → operation
OPERATIONS: dict[tuple[str, str], dict[str, Any]] = {
    ("post", "/predict"): _op(
        "Predict one image (the seed contract)", "seed",
        {"200": _SEED_OK, **_errors(_seed_error, _IMAGE_ERRORS)},
        description="JSON `{\"raw_file\": base64}` (also double-encoded JSON), multipart `file`, or the raw image "
                    "as the body. Multi-label models answer the labels above their thresholds, others the top-k.",
        parameters=[_MODEL_QUERY], body=_image_body(seed_json=True)),
    ("post", "/predict/{}"): _op(
        "Predict one image with a named model (seed contract)", "seed",
        {"200": _SEED_OK, **_errors(_seed_error, _IMAGE_ERRORS)}, body=_image_body(seed_json=True)),
    ("get", "/ping"): _op("TorchServe health check", "torchserve",
                          {"200": _json("the server answers", {"status": "Healthy"})}),
    ("post", "/predictions/{}"): _op(
        "Predict one image (TorchServe inference API)", "torchserve",
        {"200": _json("top-5 `{label: score}`; detectors `[{label: [x1, y1, x2, y2], \"score\": s}]`",
                      {"circle": 0.91, "square": 0.05, "triangle": 0.03}),
         **_errors(_ts_error, _IMAGE_ERRORS)},
        description="The raw image as the body, or multipart `data` / `body` / `file`.",
        body=_image_body(("data", "body", "file"))),
    ("put", "/predictions/{}"): _op(
        "Predict one image (TorchServe inference API, PUT)", "torchserve",
        {"200": _json("as POST", {"circle": 0.91}), **_errors(_ts_error, _IMAGE_ERRORS)},
        body=_image_body(("data", "body", "file"))),
    ("get", "/models"): _op("List the models (TorchServe management API)", "torchserve",
                            {"200": _json("the served models", {"models": [{"modelName": "shapes",
                                                                            "modelUrl": "shapes"}]})}),
    ("get", "/models/{}"): _op(
        "Describe one model (TorchServe management API)", "torchserve",
        {"200": _json("one entry, TorchServe's fields plus task and classes", [{
            "modelName": "shapes", "modelVersion": "1.0", "modelUrl": "shapes", "runtime": "onnxruntime",
            "minWorkers": 1, "maxWorkers": 1, "batchSize": 16, "maxBatchDelay": 5, "loadedAtStartup": True,
            "workers": [{"id": "0", "status": "READY"}], "task": "classify",
            "classes": ["circle", "square", "star", "triangle"]}]),
         **_errors(_ts_error, (404,))}),
    ("post", "/v1/models/{}/predict"): _op(
        "Predict one image (native JSON)", "native",
        {"200": _NATIVE_OK, **_errors(_native_error, _IMAGE_ERRORS)},
        description="Multipart `file` or the raw image as the body. `latency_ms` is the server-side time.",
        body=_image_body()),
    ("post", "/annotate"): _op(
        "Draw the result on the image", "web", {"200": _ANNOTATE_OK, **_errors(_seed_error, (*_IMAGE_ERRORS, 406))},
        description="JPEG by default; PNG with `Accept: image/png` or `?format=png` (`format` wins). Errors in the "
                    "seed shape. The image is drawn EXIF-oriented at its own size (longer side capped at 2048 px).",
        parameters=[_MODEL_QUERY, {"name": "format", "in": "query", "required": False,
                                   "schema": {"type": "string", "enum": ["jpeg", "jpg", "png"]},
                                   "description": "image format of the answer (400 for another value)"}],
        body=_image_body()),
    ("post", "/annotate/{}"): _op(
        "Draw a named model's result on the image", "web",
        {"200": _ANNOTATE_OK, **_errors(_seed_error, (*_IMAGE_ERRORS, 406))},
        parameters=[{"name": "format", "in": "query", "required": False,
                     "schema": {"type": "string", "enum": ["jpeg", "jpg", "png"]}}],
        body=_image_body()),
    ("post", "/explain"): _op(
        "Explain the prediction as a heat map over the image", "web",
        {"200": _EXPLAIN_OK, **_errors(_seed_error, (*_IMAGE_ERRORS, 406)), **_EXPLAIN_REFUSED},
        description="Multipart `file` or `data`, or the raw image as the body. The exact class activation map "
                    "from the bundle's `explain.onnx` (classifiers whose head is pooling + linear). JPEG by default, "
                    "PNG with `?format=png` or `Accept: image/png`, JSON with `?format=json`. Errors in the seed "
                    "shape; a detector (422) or a bundle without the explain graph (409) still serves `/predict`.",
        parameters=[_MODEL_QUERY, *_EXPLAIN_QUERY], body=_image_body(("file", "data"))),
    ("post", "/explain/{}"): _op(
        "Explain a named model's prediction as a heat map", "web",
        {"200": _EXPLAIN_OK, **_errors(_seed_error, (*_IMAGE_ERRORS, 406)), **_EXPLAIN_REFUSED},
        parameters=_EXPLAIN_QUERY, body=_image_body(("file", "data"))),
    ("get", "/"): _op("The web page: try images in a browser", "web",
                      {"200": {"description": "HTML page", "content": {"text/html": {}}}}),
    ("get", "/ui/models"): _op(
        "The served models with task and classes (for the web page)", "web",
        {"200": _json("one entry per model", {"models": [
            {"name": "shapes", "task": "classify", "classes": ["circle", "square", "star", "triangle"],
             "ready": True, "default": True, "explain": True}]})}),
    ("get", "/openapi.json"): _op("This OpenAPI description", "web",
                                  {"200": {"description": "OpenAPI 3.1 JSON", "content": {"application/json": {}}}}),
    ("get", "/docs"): _op("The API documentation as a web page (works offline)", "web",
                          {"200": {"description": "HTML page", "content": {"text/html": {}}}}),
    ("get", "/healthz"): _op("Liveness: the process answers", "health", {"200": _json("alive", {"status": "ok"})}),
    ("get", "/readyz"): _op(
        "Readiness: every model loaded and warmed up, not shutting down", "health",
        {"200": _json("ready", {"status": "ready", "models": {"shapes": True}}),
         "503": _json("loading or draining (with Retry-After)", {"status": "loading", "models": {"shapes": False}})}),
    ("get", "/metrics"): _op(
        "Prometheus metrics", "health",
        {"200": {"description": "request counts and latencies, batch sizes, queue depths, load times",
                 "content": {"text/plain": {"example": "lensforge_requests_total{route=\"/predict\",status=\"200\"} 3.0"}}}}),
    # KServe v2 (Open Inference Protocol), served by serve/kserve.py where present
    ("get", "/v2"): _op("KServe v2 server metadata", "kserve",
                        {"200": _json("name, version, extensions", {"name": "lensforge", "version": __version__,
                                                                   "extensions": []})}),
    ("get", "/v2/health/live"): _op("KServe v2 liveness", "kserve", {"200": _json("alive", {"live": True})}),
    ("get", "/v2/health/ready"): _op("KServe v2 readiness", "kserve", {"200": _json("ready", {"ready": True})}),
    ("get", "/v2/models/{}"): _op(
        "KServe v2 model metadata", "kserve",
        {"200": _json("inputs and outputs", {"name": "shapes", "platform": "onnxruntime_onnx",
                                             "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 3, 224, 224]}],
                                             "outputs": [{"name": "scores", "datatype": "FP32", "shape": [-1, 4]}]}),
         "404": _json("unknown model", _KSERVE_ERROR)}),
    ("get", "/v2/models/{}/config"): _op(
        "Triton model configuration", "kserve",
        {"200": _json("the model's configuration (Triton's JSON form of config.pbtxt)",
                      {"name": "shapes", "platform": "onnxruntime_onnx", "max_batch_size": 16}),
         "404": _json("unknown model", _KSERVE_ERROR)}),
    ("get", "/v2/models/{}/ready"): _op("KServe v2 model readiness", "kserve",
                                        {"200": _json("ready", {"name": "shapes", "ready": True})}),
    ("post", "/v2/models/{}/infer"): _op(
        "KServe v2 inference", "kserve",
        {"200": _json("outputs as typed tensors", {"model_name": "shapes", "outputs": [
            {"name": "scores", "datatype": "FP32", "shape": [1, 4], "data": [0.91, 0.05, 0.03, 0.01]}]}),
         "400": _json("malformed request", {"error": "inputs[0].shape does not match its data"}),
         "404": _json("unknown model", _KSERVE_ERROR),
         "413": _json("body over the cap", {"error": "request body larger than 20971520 bytes"}),
         "503": _json("not ready, queue full or past the deadline (with Retry-After)",
                      {"error": "model 'shapes' is not ready"})},
        body={"required": True, "content": {"application/json": {"schema": _V2_INFER_REQUEST, "example": {
            "inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 3, 224, 224], "data": ["..."]}]}}}}),
}


# -- the schema -------------------------------------------------------------------------------

class _Generator(SchemaGenerator):
    def get_schema(self, routes: list[BaseRoute]) -> dict[str, Any]:
        schema = copy.deepcopy(self.base_schema)
        paths: dict[str, dict[str, Any]] = schema.setdefault("paths", {})
        for ep in self.get_endpoints(routes):
            op = _docstring_op(ep.func) or _table_op(ep.http_method, ep.path) or _generic_op(ep.func, ep.http_method, ep.path)
            op.setdefault("responses", {"200": {"description": "success"}})
            op.setdefault("operationId", _operation_id(ep.http_method, ep.path))
            _add_path_parameters(op, ep.path)
            paths.setdefault(ep.path, {})[ep.http_method] = op
        schema["paths"] = dict(sorted(paths.items()))
        return schema


_GENERATOR = _Generator({
    "openapi": "3.1.0",
    "info": {"title": "lensforge", "version": __version__,
             "description": "Vision models over HTTP: the seed `/predict` contract, TorchServe and KServe v2 "
                            "routes, native JSON, annotated images, heat maps, health and metrics. Every route serves every "
                            "model; errors keep each dialect's own shape."},
})


def schema(routes: list[BaseRoute]) -> dict[str, Any]:
    """The OpenAPI 3.1 document for ``routes`` (an app's ``app.routes``): one operation per
    route and method, HEAD left out, ``{param:converter}`` written ``{param}``."""
    return _GENERATOR.get_schema(routes)


def _shape(path: str) -> str:
    return _PARAM.sub("{}", path)


def _table_op(method: str, path: str) -> dict[str, Any]:
    shape = _shape(path)
    op = OPERATIONS.get((method, shape))
    if op is not None:
        return copy.deepcopy(op)
    unversioned = shape.replace("/versions/{}", "")  # KServe v2: every model route also exists per version
    if unversioned != shape and (method, unversioned) in OPERATIONS:
        op = copy.deepcopy(OPERATIONS[(method, unversioned)])
        op["summary"] += " (one version)"
        return op
    return {}


def _operation_id(method: str, path: str) -> str:
    words = re.sub(r"[^A-Za-z0-9]+", "_", _PARAM.sub(r"by_\1", path)).strip("_")
    return f"{method}_{words or 'root'}"


def _docstring_op(func: Callable[..., Any]) -> dict[str, Any]:
    func = getattr(func, "__wrapped__", func)
    doc = func.__doc__ or ""
    if "---" not in doc:  # plain prose docstrings are not schema (and "a: b" prose parses as YAML)
        return {}
    try:
        parsed = yaml.safe_load(doc.split("---")[-1])
    except yaml.YAMLError:
        log.warning("the OpenAPI YAML in %s's docstring does not parse; using the generic entry",
                    getattr(func, "__qualname__", func))
        return {}
    return parsed if isinstance(parsed, dict) else {}


def _generic_op(func: Callable[..., Any], method: str, path: str) -> dict[str, Any]:
    func = getattr(func, "__wrapped__", func)
    lines = (func.__doc__ or "").strip().splitlines()
    return {"summary": lines[0].strip() if lines else f"{method.upper()} {path}",
            "responses": {"200": {"description": "success"}}}


def _add_path_parameters(op: dict[str, Any], path: str) -> None:
    params = op.setdefault("parameters", [])
    listed = {p.get("name") for p in params if isinstance(p, dict) and p.get("in") == "path"}
    missing = [name for name in _PARAM.findall(path) if name not in listed]
    for i, name in enumerate(missing):  # path parameters first, in path order
        desc = "a served model's name (see GET /ui/models)" if name in ("model", "name", "model_name") else ""
        params.insert(i, {"name": name, "in": "path", "required": True, "schema": {"type": "string"},
                          **({"description": desc} if desc else {})})
    if not params:
        del op["parameters"]


# -- the docs page ----------------------------------------------------------------------------

_METHOD_ORDER = ("get", "post", "put", "patch", "delete", "options")
_CSS = """
body{font:15px/1.5 system-ui,-apple-system,"Segoe UI",sans-serif;margin:0;color:#1b1f24;background:#f6f7f9}
main{max-width:960px;margin:0 auto;padding:1.5rem}
h1{margin:.2rem 0}a{color:#0a58ca}
nav ul{columns:2;padding-left:1.2rem}
section.op{background:#fff;border:1px solid #d5d9de;border-radius:8px;padding:1rem 1.2rem;margin:1rem 0}
h2{font-size:1.05rem;margin:0 0 .3rem;font-family:ui-monospace,Menlo,Consolas,monospace}
.m{display:inline-block;min-width:4.2em;text-align:center;border-radius:4px;color:#fff;padding:0 .4em;margin-right:.5em}
.get{background:#1565c0}.post{background:#2e7d32}.put{background:#8d5a00}.delete{background:#b71c1c}
.tag{color:#57606a;font-size:.85rem}
table{border-collapse:collapse;margin:.4rem 0}td,th{border:1px solid #d5d9de;padding:.2rem .5rem;text-align:left;vertical-align:top}
pre{background:#f0f2f5;padding:.5rem;border-radius:4px;overflow:auto;font-size:.85rem;margin:.3rem 0}
h3{font-size:.95rem;margin:.8rem 0 .2rem}code{font-family:ui-monospace,Menlo,Consolas,monospace}
"""


def render_docs(doc: dict[str, Any]) -> str:
    """The OpenAPI document as one self-contained HTML page: an index of operations, then
    each with its summary, parameters, request body types and examples, and responses."""
    e = html.escape
    info = doc.get("info", {})
    ops = [(path, method, op) for path, item in doc.get("paths", {}).items()
           for method, op in sorted(item.items(), key=lambda kv: _METHOD_ORDER.index(kv[0])
                                    if kv[0] in _METHOD_ORDER else 99)]
    out = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        "<meta name='viewport' content='width=device-width, initial-scale=1'>",
        f"<title>{e(info.get('title', 'API'))} API</title><style>{_CSS}</style></head><body><main>",
        f"<h1>{e(info.get('title', 'API'))} API <small>{e(str(info.get('version', '')))}</small></h1>",
        f"<p>{_prose(info.get('description', ''))}</p>",
        "<p><a href='/openapi.json'>openapi.json</a> · <a href='/'>try images in the browser</a></p>",
        "<nav aria-label='Operations'><ul>",
    ]
    for path, method, op in ops:
        anchor = e(op.get("operationId", _operation_id(method, path)))
        out.append(f"<li><a href='#{anchor}'><code>{e(method.upper())} {e(path)}</code></a> "
                   f"— {e(op.get('summary', ''))}</li>")
    out.append("</ul></nav>")
    for path, method, op in ops:
        out.append(_render_op(path, method, op))
    out.append("</main></body></html>")
    return "\n".join(out)


def _render_op(path: str, method: str, op: dict[str, Any]) -> str:
    e = html.escape
    anchor = e(op.get("operationId", _operation_id(method, path)))
    parts = [f"<section class='op' id='{anchor}' aria-labelledby='{anchor}-h'>",
             f"<h2 id='{anchor}-h'><span class='m {e(method)}'>{e(method.upper())}</span>{e(path)}</h2>",
             (f"<p><strong>{e(op.get('summary', ''))}</strong> "
              f"<span class='tag'>{e(', '.join(op.get('tags', [])))}</span></p>")]
    if op.get("description"):
        parts.append(f"<p>{_prose(op['description'])}</p>")
    params = op.get("parameters") or []
    if params:
        parts.append("<h3>Parameters</h3><table><tr><th>name</th><th>in</th><th>required</th><th>description</th></tr>")
        for p in params:
            parts.append(f"<tr><td><code>{e(str(p.get('name')))}</code></td><td>{e(str(p.get('in')))}</td>"
                         f"<td>{'yes' if p.get('required') else 'no'}</td><td>{e(str(p.get('description', '')))}</td></tr>")
        parts.append("</table>")
    body = op.get("requestBody")
    if body:
        parts.append("<h3>Request body</h3><ul>")
        for media, spec in body.get("content", {}).items():
            fields = ", ".join((spec.get("schema") or {}).get("properties", {}))
            parts.append(f"<li><code>{e(media)}</code>{e(f' (fields: {fields})') if fields else ''}</li>")
            parts.extend(_examples(spec))
        parts.append("</ul>")
    parts.append("<h3>Responses</h3><ul>")
    for status, resp in op.get("responses", {}).items():
        media = ", ".join(resp.get("content", {}))
        parts.append(f"<li><strong>{e(str(status))}</strong> {_prose(str(resp.get('description', '')))}"
                     f"{f' <code>{e(media)}</code>' if media else ''}")
        for spec in resp.get("content", {}).values():
            parts.extend(_examples(spec))
        parts.append("</li>")
    parts.append("</ul></section>")
    return "".join(parts)


def _prose(text: str) -> str:
    """Escaped text with Markdown's `code` spans as <code> (OpenAPI descriptions are CommonMark)."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(text))


def _examples(spec: dict[str, Any]) -> list[str]:
    values = []
    if "example" in spec:
        values.append(("", spec["example"]))
    for name, ex in (spec.get("examples") or {}).items():
        values.append((name, ex.get("value") if isinstance(ex, dict) else ex))
    out = []
    for name, value in values:
        text = value if isinstance(value, str) else json.dumps(value, indent=2)
        label = f"<div class='tag'>{html.escape(name)}</div>" if name else ""
        out.append(f"{label}<pre>{html.escape(text)}</pre>")
    return out
