"""Getting image bytes out of a request, within caps: raw bodies, multipart, the seed JSON.

Everything here raises :class:`RequestError` with the status RELIABILITY.md gives the case;
nothing here decodes an image (that runs in the decode pool).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import json
import re
from collections.abc import Sequence
from concurrent.futures import Executor
from pathlib import Path
from typing import Any

from python_multipart.multipart import parse_options_header
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException
from starlette.requests import ClientDisconnect, Request

from lensforge.errors import RequestError
from lensforge.serve import fetch

MAX_FORM_FIELDS = 16  # a prediction needs one file; thousands of parts is an attack (M2)
MAX_FORM_FILES = 4
MAX_MULTIPART_SLACK = 1024  # bytes allowed before the first / after the closing boundary (M4)
# RFC 2046 section 5.1.1: 1-70 characters from bchars, not ending in a space
_BOUNDARY = re.compile(rb"[0-9A-Za-z'()+_,\-./:=? ]{0,69}[0-9A-Za-z'()+_,\-./:=?]")
_DATA_URL = re.compile(r"^data:image/[A-Za-z0-9.+-]+;base64,")


async def read_body(request: Request, cap: int, timeout_s: float | None = None) -> bytes:
    """The whole body, refused with 413 as soon as it is known to exceed ``cap`` bytes.

    A declared ``Content-Length`` over the cap is refused before reading (B1); a chunked body
    is counted while it streams (B2); a malformed length is 400 (B3); a body that does not
    arrive within ``timeout_s`` (a stalled or 1 B/s client) is 408 (B4/B5).
    """
    if timeout_s is not None:
        try:
            return await asyncio.wait_for(read_body(request, cap), timeout_s)
        except (asyncio.TimeoutError, TimeoutError):
            raise RequestError(408, "body_timeout", f"request body not received within {timeout_s:g} s") from None
    declared = request.headers.get("content-length")
    if declared is not None:
        text = declared.strip()
        if not text.isdigit():
            raise RequestError(400, "invalid_content_length", "invalid Content-Length header")
        if int(text) > cap:
            raise RequestError(413, "body_too_large", f"request body too large: over {cap} bytes")
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > cap:
                raise RequestError(413, "body_too_large", f"request body too large: over {cap} bytes")
            chunks.append(chunk)
    except ClientDisconnect:  # the client went away mid-upload: nothing to answer, not a 5xx (B9)
        raise RequestError(400, "client_disconnected", "client disconnected") from None
    return b"".join(chunks)



def is_multipart(request: Request) -> bool:
    return request.headers.get("content-type", "").lower().startswith("multipart/form-data")


def is_json(request: Request) -> bool:
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    return media == "application/json" or media.endswith("+json")


async def form_file(request: Request, body: bytes, names: tuple[str, ...], cap: int) -> bytes:
    """The bytes of the first file field among ``names`` in an already read multipart body."""

    check_multipart_frame(request.headers.get("content-type", ""), body)

    async def replay() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, replay).form(
            max_files=MAX_FORM_FILES, max_fields=MAX_FORM_FIELDS, max_part_size=cap
        )
    except (MultiPartException, HTTPException) as e:
        detail = getattr(e, "message", None) or getattr(e, "detail", None) or "malformed multipart body"
        raise RequestError(400, "invalid_multipart", f"invalid multipart body: {detail}") from None
    try:
        for name in names:
            value = form.get(name)
            if isinstance(value, UploadFile):
                return await value.read()  # the filename is never used (M5)
        raise RequestError(400, "missing_file", f"missing file field {names[0]!r}")
    finally:
        await form.close()


def check_multipart_frame(content_type: str, body: bytes) -> None:
    """400 for a multipart body whose framing is off before any part is parsed (RELIABILITY.md
    M4): a missing or non-RFC 2046 boundary (empty, over 70 characters, odd characters), more
    than :data:`MAX_MULTIPART_SLACK` bytes of preamble before the first boundary, or a body that
    does not end with its closing boundary (truncated, or a long epilogue). Browsers, curl and
    requests send neither preamble nor epilogue, so only crafted bodies are refused."""
    boundary = parse_options_header(content_type)[1].get(b"boundary")  # as Starlette's parser reads it
    if boundary is None:
        raise RequestError(400, "invalid_multipart", "invalid multipart body: missing boundary in Content-Type")
    if not _BOUNDARY.fullmatch(boundary):
        raise RequestError(400, "invalid_multipart",
                           "invalid multipart body: the boundary must be 1-70 characters (RFC 2046)")
    delimiter = b"--" + boundary
    if body.find(delimiter, 0, MAX_MULTIPART_SLACK + len(delimiter)) < 0:
        raise RequestError(400, "invalid_multipart",
                           f"invalid multipart body: no boundary within its first {MAX_MULTIPART_SLACK} bytes")
    closing = delimiter + b"--"
    if body.find(closing, max(0, len(body) - MAX_MULTIPART_SLACK - len(closing))) < 0:
        raise RequestError(400, "invalid_multipart", "invalid multipart body: it must end with its closing "
                           f"boundary (at most {MAX_MULTIPART_SLACK} bytes after it)")


def seed_payload(body: bytes) -> dict[str, Any]:
    """The seed clients' JSON: an object, or a JSON string that holds one (double-encoded)."""
    try:
        payload = json.loads(body)
        if isinstance(payload, str):
            payload = json.loads(payload)
    except (ValueError, RecursionError):  # RecursionError: nesting thousands deep (J1)
        raise RequestError(400, "invalid_json", "invalid JSON body") from None
    if not isinstance(payload, dict):
        raise RequestError(400, "invalid_json", "the JSON body must be an object with 'raw_file'")
    return payload


SEED_KEYS = ("raw_file", "local_url", "remote_url")  # checked in this order: the first present wins


def seed_source(payload: dict[str, Any]) -> tuple[str, Any]:
    """(key, value) of the image in a seed payload: the first of :data:`SEED_KEYS` present."""
    for key in SEED_KEYS:
        if key in payload:
            return key, payload[key]
    raise RequestError(400, "missing_image", "expected one of the keys 'raw_file', 'local_url', 'remote_url'")


def seed_image(payload: dict[str, Any], cap: int, *, local_roots: Sequence[Path] = (), allow_remote: bool = False,
               timeout_s: float = 10.0) -> bytes:
    """Image bytes from the seed keys: ``raw_file`` (base64), ``local_url`` (a file under one
    of ``local_roots``; none: 403) or ``remote_url`` (only with ``allow_remote``; fetched
    within ``timeout_s``, in this thread). At most ``cap`` bytes; the guards are in
    :mod:`lensforge.serve.fetch` (RELIABILITY.md P and U rows)."""
    key, value = seed_source(payload)
    if key == "raw_file":
        return decode_base64(value, cap)
    if key == "local_url":
        return fetch.read_local(value, local_roots, cap)
    if not allow_remote:
        raise RequestError(403, "remote_disabled", "remote URLs are disabled")
    return fetch.fetch_remote_limited(value, cap=cap, timeout_s=timeout_s)


def seed_body_image(body: bytes, cap: int, local_roots: Sequence[Path] = ()) -> bytes:
    """:func:`seed_image` of a seed JSON body, remote URLs disabled (a ``remote_url`` is 403)."""
    return seed_image(seed_payload(body), cap, local_roots=local_roots)


async def seed_data(body: bytes, cap: int, pool: Executor | None, *, local_roots: Sequence[Path] = (),
                    allow_remote: bool = False, timeout_s: float = 10.0) -> bytes:
    """:func:`seed_image` of a seed JSON body, off the event loop: parsing, base64 and local
    files in ``pool`` (the decode pool), remote fetches in the fetch pool so that a slow
    upstream never holds a decode thread."""
    loop = asyncio.get_running_loop()
    payload = await loop.run_in_executor(pool, seed_payload, body)
    if allow_remote and seed_source(payload)[0] == "remote_url":
        return await fetch.fetch_remote_async(payload["remote_url"], cap=cap, timeout_s=timeout_s)
    return await loop.run_in_executor(pool, functools.partial(
        seed_image, payload, cap, local_roots=local_roots, allow_remote=allow_remote, timeout_s=timeout_s))


def decode_base64(text: Any, cap: int) -> bytes:
    """Strict base64 (an optional ``data:image/...;base64,`` prefix) → bytes, at most ``cap``."""
    if not isinstance(text, str):
        raise RequestError(400, "invalid_base64", "invalid base64: 'raw_file' must be a string")
    text = _DATA_URL.sub("", text, count=1)
    if len(text) // 4 * 3 > cap:  # judged on the encoded length, before decoding (J3)
        raise RequestError(413, "image_too_large", f"image too large: over {cap} bytes")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(400, "invalid_base64", "invalid base64") from None
