"""Which dialect a request speaks, and each dialect's error shape (RELIABILITY.md, error table).

Below both the app (its handlers' errors) and :mod:`.admission` (refusals made before a
request reaches a handler), so that a client hears the same shape from either.
"""

from __future__ import annotations

from typing import Any

from starlette.responses import JSONResponse

from lensforge.serve.batching import RETRY_AFTER_S

TORCHSERVE_TYPES = {400: "BadRequestException", 403: "ForbiddenException", 404: "ModelNotFoundException",
                    413: "RequestEntityTooLargeException", 415: "UnsupportedMediaTypeException",
                    500: "InternalServerException", 503: "ServiceUnavailableException"}
# path prefix → dialect, first match wins; anything else (/v1/..., the docs) is native
PREFIXES = (("/predict/", "seed"), ("/annotate", "seed"), ("/predictions/", "torchserve"),
            ("/models", "torchserve"), ("/ping", "torchserve"), ("/v2/", "kserve"))


def dialect_of(path: str) -> str:
    """``"seed"``, ``"torchserve"``, ``"kserve"`` or ``"native"`` for a request path; the same
    dialect the route's own handler answers errors in."""
    if path == "/predict":
        return "seed"
    if path == "/v2":
        return "kserve"
    return next((dialect for prefix, dialect in PREFIXES if path.startswith(prefix)), "native")


def error_response(dialect: str, status: int, code: str, message: str) -> JSONResponse:
    """An error in the shape each dialect's clients expect; 503s carry Retry-After."""
    headers = {"Retry-After": str(RETRY_AFTER_S)} if status == 503 else None
    if dialect == "seed":
        body: Any = {"status": "Error", "error": message}
    elif dialect == "torchserve":
        body = {"code": status, "type": TORCHSERVE_TYPES.get(status, "BadRequestException"), "message": message}
    elif dialect == "kserve":
        body = {"error": message}  # Triton's shape, what tritonclient reads
    else:
        body = {"error": {"code": code, "message": message}}
    return JSONResponse(body, status_code=status, headers=headers)
