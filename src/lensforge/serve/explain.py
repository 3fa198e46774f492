"""Explanations over HTTP: ``POST /explain/{model}`` (and ``/explain`` with ``?model=``).

Multipart ``file`` / ``data`` or a raw image body → the class activation map of the
model's top label (or ``?label=NAME``) from the bundle's ``explain.onnx``
(:mod:`lensforge.runtime.explain`), as

- an overlay image (heat map over the image, label and score in the corner, colour bar):
  ``image/jpeg`` by default (no ``Accept``, or a wildcard), ``image/png`` with ``?format=png``
  (what the web page asks for) or an ``Accept`` that ranks PNG above JPEG;
  at the decoded image's own size, longer side capped at :data:`~lensforge.serve.web.ANNOTATE_MAX_SIDE`
  as for ``/annotate``;
- ``?format=json`` (or ``Accept: application/json``): :meth:`Explanation.to_dict` (label, score,
  method, width, height and the map shrunk to at most 32 px).

Same limits as ``/annotate``: body cap (413), decode policy (400/413/415), the request deadline
(503), errors in the seed shape ``{"status": "Error", "error"}``. Refused before the body is
decoded: an unknown model (404), an unknown label (400), a detector (422) and a bundle without
the explain graph (409, saying to run ``lensforge export BUNDLE --to explain``); ``/predict``
keeps serving those models.

Decoding and encoding run in the server's decode pool; the explain graph runs in the model's own
inference thread (between predict batches, never on the event loop), at most
``max_queue`` explanations waiting per model (503 beyond).
"""

from __future__ import annotations

import asyncio
import logging
import struct
import zlib
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from lensforge.errors import BundleError, ConfigError, RequestError
from lensforge.runtime.draw import encode_image, fit_within
from lensforge.runtime.explain import Explanation, label_index
from lensforge.serve.batching import unavailable
from lensforge.serve.server import decoded_image
from lensforge.serve.web import ANNOTATE_MAX_SIDE
from lensforge.serve.web import negotiate as negotiate_media

if TYPE_CHECKING:
    from lensforge.runtime import Predictor
    from lensforge.serve.server import Model, Server

log = logging.getLogger(__name__)

FIELDS = ("file", "data")  # multipart fields that may hold the image
MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "json": "application/json"}


def routes(server: Server) -> list[Route]:
    """``/explain`` and ``/explain/{model}``, errors in the seed shape: one line in ``create_app``."""
    handler = Explain(server).explain
    return [Route(path, server.endpoint(path, "seed", handler), methods=["POST"])
            for path in ("/explain", "/explain/{model}")]


class Explain:
    """The ``/explain`` handler around one :class:`~lensforge.serve.server.Server`."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self._waiting: dict[str, int] = {}  # explanations submitted to each model's thread, not yet done

    async def explain(self, request: Request) -> Response:
        fmt = negotiate(request.query_params.get("format"), request.headers.get("accept"))
        server = self.server
        model = server.model(request.path_params.get("model") or request.query_params.get("model"))
        model.check_explainable()
        label = request.query_params.get("label")
        if label is not None:
            check_label(model, label)
        deadline = asyncio.get_running_loop().time() + server.settings.timeout_s
        data = await server.image_from(request, FIELDS)
        img = await server.decode_request_image(decoded_image, model.predictor, data)
        explanation = await self._run(model, fit_within(img, ANNOTATE_MAX_SIDE), label, deadline)
        headers = {"Vary": "Accept", "Cache-Control": "no-store"}
        if fmt == "json":
            return JSONResponse(await server.decode(explanation.to_dict), headers=headers)
        body = await server.decode(render, explanation, fmt)  # counted with the decodes (503 when busy)
        return Response(body, media_type=MEDIA_TYPES[fmt], headers=headers)

    async def _run(self, model: Model, img: Image.Image, label: str | None, deadline: float) -> Explanation:
        """``predictor.explain`` in the model's inference thread; 503 when too many wait or the
        deadline passes before it starts (it is then not run, as the batcher does for predict)."""
        loop = asyncio.get_running_loop()
        if model.predictor is None or model.executor is None:
            raise unavailable(f"model {model.name!r} is not ready")
        waiting = self._waiting.get(model.name, 0)
        if waiting >= self.server.settings.max_queue:
            raise unavailable(f"model {model.name!r} has too many explanations waiting")
        if loop.time() >= deadline:
            raise unavailable("deadline exceeded while decoding")
        self._waiting[model.name] = waiting + 1
        try:
            return await loop.run_in_executor(model.executor, explain_before, model.predictor, img, label,
                                              loop.time, deadline)
        finally:
            self._waiting[model.name] -= 1


def explain_before(predictor: Predictor, img: Image.Image, label: str | None, clock: object,
                   deadline: float) -> Explanation:
    """In the model's thread: the explanation, unless ``clock()`` is past ``deadline`` (503).
    A bundle whose explain graph cannot be opened is a 409 without its path."""
    if clock() >= deadline:  # type: ignore[operator]
        raise unavailable("deadline exceeded while waiting for the model")
    try:
        return predictor.explain(img, label)
    except BundleError as e:
        log.warning("explain failed for %s: %s", predictor.bundle.path, e)
        raise RequestError(409, "no_explain_graph", "this model's explain graph could not be loaded; re-create "
                                                    "it with: lensforge export BUNDLE --to explain") from None


def check_label(model: Model, label: str) -> None:
    """400 for a label the model does not have, naming the ones it has."""
    try:
        label_index(label, model.bundle.classes)
    except ConfigError as e:
        raise RequestError(400, "unknown_label", str(e)[:500]) from None


PNG_LEVEL = 1  # with Z_RLE the level barely matters (runs only); 1 is the fastest that still compresses


def render(explanation: Explanation, fmt: str) -> bytes:
    """The overlay encoded as ``fmt`` ("png" | "jpeg"); runs in the decode pool. JPEG as ``/annotate``
    encodes (quality 90: 0.7 ms at 640x427); PNG through :func:`encode_png` (lossless, the web page's)."""
    if fmt == "png":
        return encode_png(explanation.overlay())
    return encode_image(explanation.overlay(), fmt)


def encode_png(img: Image.Image) -> bytes:
    """``img`` as an 8-bit RGB PNG: every row with the Sub filter (each byte minus the pixel to its
    left, one numpy subtraction for the whole image) deflated with zlib's run-length strategy.

    Why not Pillow's PNG writer: it picks a filter per row by trying all five (~10 ms of a 640x427
    overlay) and then runs full deflate (~10 ms more at level 1); the overlay's PNG was ~20 ms, most of
    ``/explain?format=png``'s cost over ``/predict``. Sub + Z_RLE: ~8 ms and ~10 % fewer bytes on a
    photo overlay, ~1 ms and a few kB on flat images (runs of equal pixels become runs of zeros).
    Any PNG decoder reads it (filter method 0, no interlace); the pixels are exact."""
    rgb = np.asarray(img if img.mode == "RGB" else img.convert("RGB"))
    h, w = rgb.shape[:2]
    rows = rgb.reshape(h, w * 3)
    raw = np.empty((h, 1 + w * 3), np.uint8)
    raw[:, 0] = 1  # filter type Sub
    raw[:, 1:4] = rows[:, :3]  # the first pixel of a row has no left neighbour (0)
    np.subtract(rows[:, 3:], rows[:, :-3], out=raw[:, 4:])  # uint8: wraps modulo 256, as PNG defines
    deflate = zlib.compressobj(PNG_LEVEL, zlib.DEFLATED, 15, 9, zlib.Z_RLE)
    data = deflate.compress(raw.data) + deflate.flush()
    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)  # 8 bits, truecolour, deflate, filter 0, no interlace
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", data) + _chunk(b"IEND", b"")


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def negotiate(query: str | None, accept: str | None) -> str:
    """``?format=`` (png | jpeg | jpg | json) or else ``Accept`` → "png" | "jpeg" | "json".

    JPEG unless the client asks for PNG or JSON (``?format=``, or ranked above JPEG in ``Accept``):
    encoding the overlay as PNG costs ~10x JPEG's time (8 vs 0.7 ms at 640x427, :func:`encode_png`) and
    is sent as ~5x the bytes (issue 14's goal, /explain <= 1.5x /predict); PNG stays exact for those who
    want it (the web page asks for it).
    400 for an unknown ``format``, 406 when ``Accept`` allows none of the three."""
    return negotiate_media(query, accept, MEDIA_TYPES, default="jpeg", route="/explain")

