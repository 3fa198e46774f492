"""The visual side of the server: ``/annotate``, the web page at ``/``, and the API docs.

Routes (added to the app by ``create_app`` through :func:`routes`):

- ``POST /annotate``, ``/annotate/{model}``, ``?model=``: multipart ``file`` or a raw image
  body → the image with the result drawn (boxes for detectors, a top-labels panel for
  classifiers), ``image/jpeg`` by default, ``image/png`` with ``Accept: image/png`` or
  ``?format=png`` (``?format=`` wins over ``Accept``). Errors in the seed shape
  ``{"status": "Error", "error"}``: 400 unknown ``format``, 406 an ``Accept`` that allows
  neither JPEG nor PNG, and the decode errors of ``/predict`` (400/413/415).
  The picture is the decoded original (EXIF orientation applied) at its own size, except
  that images whose longer side exceeds :data:`ANNOTATE_MAX_SIDE` are drawn on a copy
  shrunk to that side (aspect kept, boxes scaled to match): a 50-megapixel photo would
  otherwise cost seconds to draw and tens of MB to send back for a preview.
- ``GET /``: the web page (``static/index.html``; JS and CSS under ``/static/``).
- ``GET /ui/models``: the served models with task and classes, for the page's model picker.
- ``GET /openapi.json``, ``GET /docs``: see :mod:`lensforge.serve.openapi`.

Decoding, drawing and encoding run in the server's decode pool, never on the event loop.
"""

from __future__ import annotations

import io
import logging
import math
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from lensforge.data.image import decode_image
from lensforge.errors import ImageError, RequestError
from lensforge.runtime.draw import annotate, encode_image, fit_within
from lensforge.runtime.predictor import Result
from lensforge.serve import openapi

if TYPE_CHECKING:
    from lensforge.serve.server import Server

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).with_name("static")
ANNOTATE_MAX_SIDE = 2048  # longer side of annotated images; larger originals are drawn shrunk to it
MEDIA_TYPES = {"jpeg": "image/jpeg", "png": "image/png"}
FORMAT_ALIASES = {"jpeg": "jpeg", "jpg": "jpeg", "png": "png"}


def routes(server: Server) -> list[BaseRoute]:
    """The routes of this module, bound to ``server``: one line in ``create_app``."""
    web = Web(server)
    annotate_one = server.endpoint("/annotate", "seed", web.annotate)
    annotate_named = server.endpoint("/annotate/{model}", "seed", web.annotate)
    return [
        Route("/", web.index, methods=["GET"]),
        Route("/annotate", annotate_one, methods=["POST"]),
        Route("/annotate/{model}", annotate_named, methods=["POST"]),
        Route("/ui/models", web.ui_models, methods=["GET"]),
        Route("/openapi.json", web.openapi_json, methods=["GET"]),
        Route("/docs", web.docs, methods=["GET"]),
        Mount("/static", StaticFiles(directory=STATIC_DIR), name="static"),
    ]


class Web:
    """Handlers of the visual routes, around one :class:`~lensforge.serve.server.Server`."""

    def __init__(self, server: Server) -> None:
        self.server = server

    async def annotate(self, request: Request) -> Response:
        fmt = negotiate_format(request.query_params.get("format"), request.headers.get("accept"))
        server = self.server
        model = server.model(request.path_params.get("model") or request.query_params.get("model"))
        data = await server.image_from(request, ("file",))
        result = await server.infer(model, data)  # same decode checks, batching and metrics as /predict
        body = await server.decode(render, data, result, fmt)  # counted with the decodes (503 when busy)
        return Response(body, media_type=MEDIA_TYPES[fmt], headers={"Vary": "Accept", "Cache-Control": "no-store"})

    async def index(self, request: Request) -> Response:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html", headers={"Cache-Control": "no-cache"})

    async def ui_models(self, request: Request) -> Response:
        models = [
            {"name": m.name, "task": m.bundle.task, "classes": list(m.bundle.classes), "ready": m.ready,
             "default": m.name == self.server.default, "explain": m.explainable}
            for m in self.server.models.values()
        ]
        return JSONResponse({"models": models})

    async def openapi_json(self, request: Request) -> Response:
        # built from the app's routes at request time, so routes other modules add are included
        return JSONResponse(openapi.schema(request.app.routes))

    async def docs(self, request: Request) -> Response:
        return HTMLResponse(openapi.render_docs(openapi.schema(request.app.routes)))


def render(data: bytes, result: Result, fmt: str) -> bytes:
    """Encoded image + its result → the annotated image encoded as ``fmt`` (runs in a pool).

    JPEGs at least twice the cap are decoded at a reduced DCT scale (1/2, 1/4, 1/8) that
    keeps the longer side >= the cap, then shrunk to the cap; boxes are in original pixels
    and :func:`~lensforge.runtime.draw.draw_detections` scales them to the picture drawn on.
    """
    try:
        img = decode_image(data, min_size=_min_short_side(data, ANNOTATE_MAX_SIDE))
    except ImageError as e:  # decoded fine a moment ago for inference; kept for safety
        raise RequestError(e.http_status, e.code, str(e)) from None
    return encode_image(annotate(fit_within(img, ANNOTATE_MAX_SIDE), result), fmt)


def _min_short_side(data: bytes, max_side: int) -> int | None:
    """The shorter side an image needs for its longer side to reach ``max_side`` (what
    :func:`decode_image`'s ``min_size`` asks for), from the header only; None (full-size
    decode) when the header does not say. The sides' ratio survives EXIF rotation."""
    try:
        with Image.open(io.BytesIO(data)) as probe:  # lazy: reads the header, decodes nothing
            w, h = probe.size
    except (OSError, ValueError, Image.DecompressionBombError):
        return None
    if min(w, h) < 1:
        return None
    return max(1, math.ceil(max_side * min(w, h) / max(w, h)))


def negotiate_format(query: str | None, accept: str | None) -> str:
    """``?format=`` (jpeg | jpg | png) or else the ``Accept`` header → "jpeg" | "png".

    No ``Accept`` or a wildcard gives JPEG (smaller for photos); PNG when the client ranks it
    above JPEG. Raises :class:`RequestError` 400 for an unknown ``format``, 406 when
    ``Accept`` allows neither.
    """
    return negotiate(query, accept, MEDIA_TYPES, default="jpeg", route="/annotate")


def negotiate(query: str | None, accept: str | None, media_types: dict[str, str], *, default: str, route: str) -> str:
    """The answer format of an image route: ``?format=`` (a key of ``media_types``, or "jpg")
    wins; else the ``Accept`` type of highest quality, ``default`` on ties, without ``Accept``
    and for wildcards. 400 for an unknown ``format``, 406 when ``Accept`` allows none."""
    if query is not None:
        key = query.strip().lower()
        fmt = FORMAT_ALIASES.get(key, key if key in media_types else None)
        if fmt is None or fmt not in media_types:
            raise RequestError(400, "unknown_format",
                               f"unknown format {query[:40]!r}; use {_either(f'format={k}' for k in media_types)}")
        return fmt
    if not accept or not accept.strip():
        return default
    ranges = parse_accept(accept)
    quality = {fmt: media_quality(ranges, media) for fmt, media in media_types.items()}
    best = max(quality, key=lambda f: (quality[f], f == default))
    if quality[best] <= 0:
        raise RequestError(406, "not_acceptable",
                           f"cannot answer with any type in Accept: {accept[:100]}; {route} returns "
                           f"{_either(media_types.values())} (or use ?format={'|'.join(media_types)})")
    return best


def _either(items: Iterable[str]) -> str:
    """"a, b or c"."""
    *first, last = list(items)
    return f"{', '.join(first)} or {last}" if first else last


def parse_accept(accept: str) -> list[tuple[str, float]]:
    """``Accept`` header → [(media range, q)], lower-cased; malformed q counts as 0."""
    out = []
    for part in accept.split(","):
        media, *params = (p.strip() for p in part.split(";"))
        if not media:
            continue
        q = 1.0
        for param in params:
            key, _, value = param.partition("=")
            if key.strip().lower() == "q":
                try:
                    q = min(max(float(value), 0.0), 1.0)
                except ValueError:
                    q = 0.0
        out.append((media.lower(), q))
    return out


def media_quality(ranges: list[tuple[str, float]], media: str) -> float:
    """q of ``media`` under the most specific matching range (exact > type/* > */*; RFC 9110 12.5.1)."""
    kind = media.split("/")[0] + "/*"
    for candidate in (media, kind, "*/*"):
        qs = [q for r, q in ranges if r == candidate]
        if qs:
            return max(qs)
    return 0.0
