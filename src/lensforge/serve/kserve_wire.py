"""The KServe v2 / Triton HTTP wire format: request parsing and response encoding.

Plain functions over bytes and numpy, no Starlette (the routes are in
:mod:`lensforge.serve.kserve`). Every size and shape is checked with Python integers *before*
anything is allocated from it (RELIABILITY.md J4-J6, J8-J10; Triton CVE-2025-23323/23324/23331).

Requests carry exactly one input, either

- the model's own tensor (classifiers): FP32, the ONNX input's name, shape ``[N, 3, S, S]``,
  already preprocessed (:meth:`Predictor.prepare`); or
- encoded images: any ``BYTES`` input (``"image"`` by convention), shape ``[N]`` or
  ``[N, 1]``, one encoded image per element. In the binary tensor extension an element is a
  4-byte little-endian length and then the raw file bytes; in JSON ``data`` (which must be
  UTF-8 text, so raw JPEG bytes cannot travel there) each element is the file's base64, an
  optional ``data:image/...;base64,`` prefix allowed.

Detectors take encoded images only, one per request (their outputs have one row per box).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from lensforge.errors import RequestError
from lensforge.runtime.results import ClassificationResult, DetectionResult
from lensforge.serve.inputs import decode_base64

if TYPE_CHECKING:
    from lensforge.runtime import Predictor

HEADER_LENGTH = "Inference-Header-Content-Length"
IMAGE_INPUT = "image"  # the BYTES input's advertised name; any BYTES input name is accepted
MAX_DIMS = 8  # ranks past this are refused before any product is taken (J5: 100-dim shapes)
ITEM_BYTES = {"BOOL": 1, "UINT8": 1, "INT8": 1, "UINT16": 2, "INT16": 2, "FP16": 2, "BF16": 2,
              "UINT32": 4, "INT32": 4, "FP32": 4, "UINT64": 8, "INT64": 8, "FP64": 8,
              "BYTES": 4}  # BYTES: each element costs at least its 4-byte length prefix
CONFIG_TYPES = {"FP32": "TYPE_FP32", "INT64": "TYPE_INT64", "BYTES": "TYPE_STRING"}


@dataclass(frozen=True)
class TensorMeta:
    """One input or output as v2 metadata describes it; -1 marks a dynamic dimension."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


@dataclass(frozen=True)
class Signature:
    """What one served model takes and returns over v2.

    tensor_input: classifiers' ONNX input, FP32 ``(-1, 3, S, S)``; None for detectors.
    outputs: the outputs a request may ask for (the first ``len(defaults)`` when it asks none).
    max_items: most rows or images one request may carry (the model's queue bound).
    """

    model: str
    tensor_input: TensorMeta | None
    outputs: tuple[TensorMeta, ...]
    defaults: tuple[str, ...]
    classes: tuple[str, ...]
    detector: bool
    max_items: int

    @property
    def image_input(self) -> TensorMeta:
        return TensorMeta(IMAGE_INPUT, "BYTES", (1,) if self.detector else (-1,))

    @property
    def inputs(self) -> tuple[TensorMeta, ...]:
        """The alternatives a request chooses one of: the model's tensor, or encoded images."""
        return (self.tensor_input, self.image_input) if self.tensor_input else (self.image_input,)

    def output(self, name: str) -> TensorMeta | None:
        return next((o for o in self.outputs if o.name == name), None)


def signature_for(model: str, predictor: Predictor, max_items: int) -> Signature:
    """The v2 signature of a loaded model, its tensor input read from the ONNX session."""
    classes = tuple(predictor.classes)
    if predictor.detector:
        outputs = (TensorMeta("boxes", "FP32", (-1, 4)), TensorMeta("scores", "FP32", (-1,)),
                   TensorMeta("class_ids", "INT64", (-1,)), TensorMeta("labels", "BYTES", (-1,)))
        return Signature(model, None, outputs, ("boxes", "scores", "class_ids"), classes, True, 1)
    graph_input = predictor.session.get_inputs()[0]
    dims = tuple(d if isinstance(d, int) and d > 0 else -1 for d in graph_input.shape)
    # the batch dimension is always dynamic here: the server regroups rows into its own batches
    tensor = TensorMeta(graph_input.name, "FP32", (-1, *dims[1:]))
    outputs = (TensorMeta("scores", "FP32", (-1, len(classes))), TensorMeta("labels", "BYTES", (-1,)))
    return Signature(model, tensor, outputs, ("scores",), classes, False, max_items)


def model_config(sig: Signature, *, max_batch: int, max_wait_ms: float, max_queue: int,
                 timeout_s: float, task: str) -> dict[str, Any]:
    """A minimal Triton-like model configuration (``GET .../config``), for clients that read one.

    Classifiers: ``max_batch_size`` is the most rows one request may carry and dims leave out
    the batch dimension, as Triton's do; detectors take one image (``max_batch_size`` 0).
    """
    batched = not sig.detector

    def dims(t: TensorMeta) -> dict[str, Any]:
        shape = list(t.shape[1:] if batched else t.shape)
        entry: dict[str, Any] = {"name": t.name, "data_type": CONFIG_TYPES[t.datatype]}
        if shape:
            entry["dims"] = shape
        else:  # one scalar per batch row: Triton spells it dims [1] reshaped to []
            entry["dims"], entry["reshape"] = [1], {"shape": []}
        return entry

    config: dict[str, Any] = {
        "name": sig.model, "platform": "onnxruntime_onnx", "backend": "onnxruntime",
        "max_batch_size": sig.max_items if batched else 0,
        "input": [dims(t) for t in sig.inputs], "output": [dims(t) for t in sig.outputs],
        "parameters": {"task": {"string_value": task}},
    }
    if batched:
        config["dynamic_batching"] = {
            "preferred_batch_size": [max_batch],
            "max_queue_delay_microseconds": int(max_wait_ms * 1000),
            "default_queue_policy": {"timeout_action": "REJECT", "max_queue_size": max_queue,
                                     "default_timeout_microseconds": int(timeout_s * 1_000_000)},
        }
    return config


# -- requests --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Requested:
    """One requested output: ``binary`` selects the binary tensor extension for it;
    ``classification`` > 0 asks for the top-k as Triton's ``"score:index:label"`` strings."""

    name: str
    binary: bool
    classification: int = 0


@dataclass
class InferRequest:
    """A parsed, checked request: exactly one of ``tensor`` / ``images`` is set.

    tensor: float32 (N, 3, S, S), the model's preprocessed input.
    images: N encoded image files.
    outputs: what to return, in order (the model's defaults when the request named none).
    timeout_s: the request's own ``timeout`` parameter (Triton: microseconds), if any.
    """

    id: str | None
    input_name: str
    tensor: np.ndarray | None
    images: list[bytes] | None
    outputs: list[Requested]
    timeout_s: float | None = None


def _bad(message: str) -> RequestError:
    return RequestError(400, "invalid_request", message)


def _q(name: object) -> str:
    """A client-given name, quoted and cut short, for messages."""
    return repr(str(name)[:64])


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def split_body(body: bytes, header_length: str | None) -> tuple[bytes, memoryview]:
    """The JSON header and the binary data after it (binary tensor extension, J9)."""
    if header_length is None:
        return body, memoryview(b"")
    text = header_length.strip()
    if not (text.isascii() and text.isdigit()) or int(text) > len(body):
        raise _bad(f"invalid {HEADER_LENGTH} header {text[:20]!r}: it must be the JSON header's byte length, "
                   f"an integer from 0 to the body's {len(body)} bytes")
    n = int(text)
    return body[:n], memoryview(body)[n:]


def parse_request(body: bytes, header_length: str | None, sig: Signature, cap: int) -> InferRequest:
    """Body (and its ``Inference-Header-Content-Length``) → a checked :class:`InferRequest`.

    cap: the body cap; no declared shape may need more bytes than that. Raises
    :class:`RequestError` 400 with a Triton-style message for every malformed request.
    """
    header, binary = split_body(body, header_length)
    try:
        payload = json.loads(header)
    except (ValueError, RecursionError) as e:  # RecursionError: JSON nested thousands deep (J1)
        detail = str(e).split("\n")[0][:120] if isinstance(e, json.JSONDecodeError) else "invalid JSON"
        raise _bad(f"failed to parse the request JSON buffer: {detail}") from None
    if not isinstance(payload, dict):
        raise _bad("the inference request must be a JSON object with 'inputs'")
    request_id = payload.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise _bad("the request 'id' must be a string")
    params = _parameters(payload.get("parameters"), "the request")
    timeout_s = _reserved(params)
    default_binary = params.get("binary_data_output", False)
    if not isinstance(default_binary, bool):
        raise _bad("parameter 'binary_data_output' must be a boolean")
    outputs = _outputs(payload.get("outputs"), sig, default_binary)
    name, tensor, images = _input(payload.get("inputs"), binary, sig, cap)
    return InferRequest(request_id, name, tensor, images, outputs, timeout_s)


def _parameters(value: object, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _bad(f"'parameters' of {where} must be a JSON object")
    return value


def _reserved(params: dict[str, Any]) -> float | None:
    """Check Triton's reserved request parameters (J10); the ``timeout`` in seconds, if any.

    ``priority`` is accepted and ignored: each model has one FIFO queue. Sequence parameters
    are type-checked only (no model here keeps state across requests).
    """
    for key in ("timeout", "priority"):
        if key in params and not (_is_int(params[key]) and params[key] >= 0):
            unit = " (microseconds)" if key == "timeout" else ""
            raise _bad(f"parameter {key!r} must be a non-negative integer{unit}, got {type(params[key]).__name__} "
                       f"{str(params[key])[:40]!r}")
    for key in ("sequence_start", "sequence_end"):
        if key in params and not isinstance(params[key], bool):
            raise _bad(f"parameter {key!r} must be a boolean")
    if "sequence_id" in params and not (_is_int(params["sequence_id"]) or isinstance(params["sequence_id"], str)):
        raise _bad("parameter 'sequence_id' must be an integer or a string")
    timeout = params.get("timeout")
    return timeout / 1_000_000 if timeout else None


def _outputs(value: object, sig: Signature, default_binary: bool) -> list[Requested]:
    if value is None:
        return [Requested(n, default_binary) for n in sig.defaults]
    if not isinstance(value, list):
        raise _bad("'outputs' must be a list of {\"name\": ...} objects")
    names = [o.name for o in sig.outputs]
    if len(value) > len(names):  # checked before looking at any entry (J8)
        raise _bad(f"too many requested outputs: {len(value)}; model {_q(sig.model)} has {len(names)} "
                   f"({', '.join(names)})")
    chosen: list[Requested] = []
    for entry in value:
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise _bad("each requested output must be an object with a string 'name'")
        name = entry["name"]
        if name not in names:
            raise _bad(f"unexpected inference output {_q(name)} for model {_q(sig.model)}; "
                       f"it has {', '.join(names)}")
        if any(c.name == name for c in chosen):
            raise _bad(f"output {_q(name)} is requested twice")
        p = _parameters(entry.get("parameters"), f"output {_q(name)}")
        binary = p.get("binary_data", default_binary)
        if not isinstance(binary, bool):
            raise _bad(f"parameter 'binary_data' of output {_q(name)} must be a boolean")
        k = p.get("classification", 0)
        if not _is_int(k) or k < 0:
            raise _bad(f"parameter 'classification' of output {_q(name)} must be a non-negative integer")
        if k and (sig.detector or name != "scores"):
            raise _bad(f"classification is only offered on a classifier's 'scores' output, not {_q(name)}")
        if "shared_memory_region" in p:
            raise _bad("shared memory outputs are not supported by this server; use binary_data")
        chosen.append(Requested(name, binary, min(k, len(sig.classes))))
    return chosen


def _input(value: object, binary: memoryview, sig: Signature, cap: int
           ) -> tuple[str, np.ndarray | None, list[bytes] | None]:
    alternatives = " or ".join(f"{t.name!r} ({t.datatype} {list(t.shape)})" for t in sig.inputs)
    if not isinstance(value, list) or len(value) != 1:
        got = len(value) if isinstance(value, list) else 0
        raise _bad(f"expected 1 inputs but got {got} inputs for model {_q(sig.model)}; "
                   f"send one input: {alternatives}")
    spec = value[0]
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise _bad("each input must be an object with a string 'name', 'datatype' and 'shape'")
    name, datatype = spec["name"], spec.get("datatype")
    if not isinstance(datatype, str) or datatype not in ITEM_BYTES:
        raise _bad(f"invalid datatype {str(datatype)[:20]!r} for input {_q(name)}; v2 datatypes are "
                   f"{', '.join(ITEM_BYTES)}")
    tensor = sig.tensor_input
    if tensor is not None and name == tensor.name:
        expected = tensor
    elif datatype == "BYTES":
        expected = TensorMeta(name, "BYTES", sig.image_input.shape)
    elif name.lower() == IMAGE_INPUT:
        expected = sig.image_input
    else:
        raise _bad(f"unexpected inference input {_q(name)} for model {_q(sig.model)}; send one input: {alternatives}")
    if datatype != expected.datatype:
        raise _bad(f"inference input {_q(name)} data-type is {datatype!r}, but model {_q(sig.model)} "
                   f"expects {expected.datatype!r}")
    shape = _shape(spec.get("shape"), name, datatype, sig, cap)
    count = _check_dims(shape, expected, name, sig)
    params = _parameters(spec.get("parameters"), f"input {_q(name)}")
    if "shared_memory_region" in params:
        raise _bad("shared memory inputs are not supported by this server; use binary_data")
    data = _raw(spec, params, binary, name, sig)
    if datatype == "BYTES":
        items = _unpack_bytes(data, count, name, sig) if isinstance(data, memoryview) else \
            _json_bytes(data, count, name, sig, cap)
        return name, None, items
    if isinstance(data, memoryview):
        if len(data) != count * 4:
            raise _bad(f"input byte size mismatch for input {_q(name)} for model {_q(sig.model)}. "
                       f"Expected {count * 4}, got {len(data)}")
        x = np.frombuffer(data, dtype="<f4").astype(np.float32)  # a copy: the body's buffer is not ours to keep
    else:
        x = _json_numbers(data, count, name, sig)
    return name, x.reshape(shape), None


def _shape(value: object, name: str, datatype: str, sig: Signature, cap: int) -> tuple[int, ...]:
    """A declared shape, refused unless every dim is a positive integer and the tensor could
    fit in the body cap: decided on Python integers, before any allocation (J5)."""
    where = f"input {_q(name)} for model {_q(sig.model)}"
    if not isinstance(value, list) or not value:
        raise _bad(f"'shape' of {where} must be a non-empty list of integers")
    if len(value) > MAX_DIMS:
        raise _bad(f"{where} has {len(value)} dimensions; at most {MAX_DIMS} are accepted")
    total = 1
    for i, d in enumerate(value):
        if not _is_int(d) or d < 1:
            raise _bad(f"invalid shape for {where}: dimension {i} is {str(d)[:24]}; every dimension must be a "
                       "positive integer")
        total *= d
        if total * ITEM_BYTES[datatype] > cap:  # also stops products that would overflow int64
            shown = value if len(str(value)) < 120 else "[...]"
            raise _bad(f"shape {shown} of {where} is too large: it needs over {cap} bytes, the request body cap")
    return tuple(value)


def _check_dims(shape: tuple[int, ...], expected: TensorMeta, name: str, sig: Signature) -> int:
    """Check ``shape`` against the model's; the number of rows / images N."""
    if expected.datatype == "BYTES":
        ok = len(shape) == 1 or (len(shape) == 2 and shape[1] == 1)
        want = "[N] or [N, 1]" if not sig.detector else "[1]"
    else:
        ok = len(shape) == len(expected.shape) and all(e in (-1, d) for d, e in zip(shape, expected.shape))
        want = str(list(expected.shape))
    if not ok:
        raise _bad(f"unexpected shape for input {_q(name)} for model {_q(sig.model)}. Expected {want}, "
                   f"got {list(shape)}")
    n = shape[0]
    if sig.detector and n != 1:
        raise _bad(f"model {_q(sig.model)} is a detector: send one image per request (its outputs have one row "
                   f"per box), got {n}")
    if n > sig.max_items:
        raise _bad(f"input {_q(name)} for model {_q(sig.model)} carries {n} items; at most {sig.max_items} per "
                   "request (the model's queue); split the batch")
    count = 1
    for d in shape:
        count *= d
    return count


def _raw(spec: dict[str, Any], params: dict[str, Any], binary: memoryview, name: str, sig: Signature
         ) -> memoryview | list[Any]:
    """The input's data: its slice of the binary section, or its JSON ``data`` list."""
    size = params.get("binary_data_size")
    if size is not None:
        if not _is_int(size) or size < 0:
            raise _bad(f"parameter 'binary_data_size' of input {_q(name)} must be a non-negative integer")
        if "data" in spec:
            raise _bad(f"input {_q(name)} has both 'data' and binary_data_size; send one")
        if size > len(binary):
            raise _bad(f"input {_q(name)} for model {_q(sig.model)} declares binary_data_size {size} but only "
                       f"{len(binary)} bytes follow the JSON header (check {HEADER_LENGTH})")
        if size < len(binary):
            raise _bad(f"unexpected additional input data for model {_q(sig.model)}: {len(binary)} bytes follow "
                       f"the JSON header, the inputs declare {size}")
        return binary
    if len(binary):
        raise _bad(f"unexpected additional input data for model {_q(sig.model)}: {len(binary)} bytes follow the "
                   f"JSON header but no input declares binary_data_size")
    data = spec.get("data")
    if not isinstance(data, list):
        raise _bad(f"input {_q(name)} for model {_q(sig.model)} needs a 'data' list or a binary_data_size parameter")
    return data


def _flatten(data: list[Any], limit: int, name: str) -> tuple[list[Any], int]:
    """Flat or nested JSON lists → (the first ``limit + 1`` scalars, how many there are)."""
    out: list[Any] = []
    count = 0
    stack = [iter(data)]
    while stack:
        for v in stack[-1]:
            if isinstance(v, list):
                if len(stack) >= MAX_DIMS:
                    raise _bad(f"'data' of input {_q(name)} is nested deeper than {MAX_DIMS} levels")
                stack.append(iter(v))
                break
            count += 1
            if count <= limit + 1:
                out.append(v)
        else:
            stack.pop()
    return out, count


def _mismatch(name: str, sig: Signature, expected: int, got: int, unit: str) -> RequestError:
    return _bad(f"input byte size mismatch for input {_q(name)} for model {_q(sig.model)}. "
                f"Expected {expected} {unit}, got {got}")


def _json_numbers(data: list[Any], count: int, name: str, sig: Signature) -> np.ndarray:
    flat, n = _flatten(data, count, name)
    if n != count:
        raise _mismatch(name, sig, count, n, "elements")
    if not all(type(v) in (float, int) for v in flat):  # type(): bools and strings are not FP32
        raise _bad(f"unable to parse 'data' of input {_q(name)} for model {_q(sig.model)}: FP32 data must be numbers")
    try:
        return np.asarray(flat, dtype=np.float64).astype(np.float32)
    except OverflowError:  # an integer beyond float64
        raise _bad(f"unable to parse 'data' of input {_q(name)}: a number is out of range") from None


def _json_bytes(data: list[Any], count: int, name: str, sig: Signature, cap: int) -> list[bytes]:
    flat, n = _flatten(data, count, name)
    if n != count:
        raise _mismatch(name, sig, count, n, "elements")
    if not all(isinstance(v, str) for v in flat):
        raise _bad(f"BYTES data of input {_q(name)} must be strings (in JSON: each image's base64)")
    try:
        return [decode_base64(v, cap) for v in flat]
    except RequestError as e:
        raise RequestError(e.status, e.code, f"input {_q(name)}: {e} (JSON BYTES elements are base64; send raw "
                           "bytes with binary_data)") from None


def _unpack_bytes(buf: memoryview, count: int, name: str, sig: Signature) -> list[bytes]:
    """The binary extension's BYTES layout: per element a uint32 little-endian length, then the bytes."""
    items: list[bytes] = []
    pos = 0
    while pos < len(buf):
        if len(items) == count:
            raise _mismatch(name, sig, count, count + 1, "elements (or more)")
        if pos + 4 > len(buf):
            raise _bad(f"BYTES input {_q(name)} is truncated: element {len(items)} has no complete 4-byte length")
        (size,) = struct.unpack_from("<I", buf, pos)
        pos += 4
        if pos + size > len(buf):
            raise _bad(f"BYTES input {_q(name)} is truncated: element {len(items)} declares {size} bytes, "
                       f"{len(buf) - pos} remain")
        items.append(bytes(buf[pos:pos + size]))
        pos += size
    if len(items) != count:
        raise _mismatch(name, sig, count, len(items), "elements")
    return items


# -- responses -------------------------------------------------------------------------------

@dataclass(frozen=True)
class OutTensor:
    """One response tensor: ``values`` a numpy array (FP32, INT64) or a list of bytes (BYTES)."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    values: np.ndarray | list[bytes]


def classification_outputs(results: Sequence[ClassificationResult], wanted: Sequence[Requested]) -> list[OutTensor]:
    """``scores`` float32 (N, C); ``labels`` BYTES (N,), each row's top-1 label; ``scores`` with
    ``classification=k`` → BYTES (N, k) ``"score:index:label"``, best first (Triton's extension)."""
    scores = np.stack([r.scores for r in results]).astype(np.float32)
    out = []
    for w in wanted:
        if w.name == "labels":
            out.append(OutTensor("labels", "BYTES", (len(results),), [r.label.encode() for r in results]))
        elif w.classification:
            classes = results[0].classes
            rows = [[f"{row[i]:f}:{i}:{classes[i]}".encode() for i in np.argsort(-row, kind="stable")[:w.classification]]
                    for row in scores]
            out.append(OutTensor("scores", "BYTES", (len(results), w.classification), [v for r in rows for v in r]))
        else:
            out.append(OutTensor("scores", "FP32", scores.shape, scores))
    return out


def detection_outputs(result: DetectionResult, wanted: Sequence[Requested]) -> list[OutTensor]:
    """One image's detections at or above the bundle's tuned threshold: ``boxes`` float32 (K, 4)
    xyxy original-image pixels, ``scores`` float32 (K,), ``class_ids`` int64 (K,), ``labels``
    BYTES (K,)."""
    kept = result.above()
    k = len(kept)
    tensors = {
        "boxes": OutTensor("boxes", "FP32", (k, 4), kept.boxes),
        "scores": OutTensor("scores", "FP32", (k,), kept.scores),
        "class_ids": OutTensor("class_ids", "INT64", (k,), kept.class_ids),
        "labels": OutTensor("labels", "BYTES", (k,), [label.encode() for label in kept.labels]),
    }
    return [tensors[w.name] for w in wanted]


def _binary(t: OutTensor) -> bytes:
    if t.datatype == "BYTES":
        return b"".join(struct.pack("<I", len(v)) + v for v in t.values)  # type: ignore[union-attr]
    dtype = {"FP32": "<f4", "INT64": "<i8"}[t.datatype]
    return np.ascontiguousarray(t.values, dtype=dtype).tobytes()


def _json_data(t: OutTensor) -> list[Any]:
    if t.datatype == "BYTES":
        return [v.decode("utf-8", "replace") for v in t.values]  # type: ignore[union-attr]
    return np.asarray(t.values).ravel().tolist()


def encode_response(model: str, request_id: str | None, tensors: Sequence[OutTensor],
                    binary: Sequence[bool]) -> tuple[bytes, dict[str, str]]:
    """The response body and its headers: JSON, or (when any output is binary) the JSON header
    followed by the binary outputs in order, its length in ``Inference-Header-Content-Length``."""
    outputs, chunks = [], []
    for t, as_binary in zip(tensors, binary):
        entry: dict[str, Any] = {"name": t.name, "datatype": t.datatype, "shape": list(t.shape)}
        if as_binary:
            chunk = _binary(t)
            chunks.append(chunk)
            entry["parameters"] = {"binary_data_size": len(chunk)}
        else:
            entry["data"] = _json_data(t)
        outputs.append(entry)
    payload: dict[str, Any] = {"model_name": model, "model_version": "1", "outputs": outputs}
    if request_id is not None:
        payload["id"] = request_id
    header = json.dumps(payload, separators=(",", ":")).encode()
    if not chunks:
        return header, {"Content-Type": "application/json"}
    return header + b"".join(chunks), {"Content-Type": "application/octet-stream",
                                       HEADER_LENGTH: str(len(header))}
