"""TorchServe custom handler for a lensforge model archive (copied into every ``.mar``).

TorchServe unpacks the archive into ``model_dir``: ``model.onnx``, ``lensforge.json`` and
``index_to_name.json`` — a complete bundle. The handler is a thin adapter around the one
:class:`lensforge.Predictor` (same decoder, preprocessing and scores as everywhere else), so
the TorchServe environment needs lensforge's serving install (``pip install lensforge``:
onnxruntime, numpy, Pillow; no torch is imported here).

Each request's ``data`` or ``body`` is an encoded image; the answer per request is
TorchServe's image-classifier format: the top 5 ``{label: score}``, best first. An image
that cannot be decoded answers ``{"error": code, "message": ...}`` with a 4xx status for
that request only; the rest of the batch is still served.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)

TOP_K = 5
_STATUS = {"empty": 400, "unsupported_format": 415, "corrupt": 400, "too_large": 413, "too_small": 400, "unreadable": 400}


class LensforgeHandler:
    """TorchServe entry point: ``initialize(context)`` once per worker, then ``handle(data, context)``
    per batch. (TorchServe instantiates the one class defined in this module.)"""

    def __init__(self) -> None:
        self.predictor: Any = None

    def initialize(self, context: Any) -> None:
        try:
            from lensforge.runtime import Predictor
        except ImportError:
            raise RuntimeError(
                "lensforge is not installed in TorchServe's Python environment: pip install lensforge"
            ) from None
        model_dir = context.system_properties["model_dir"]
        self.predictor = Predictor(model_dir)
        log.info("lensforge handler ready: %r", self.predictor)

    def handle(self, data: list[dict[str, Any]] | None, context: Any) -> list[dict[str, Any]]:
        from lensforge.errors import ImageError

        if not data:
            return []
        predictor = self.predictor
        answers: list[dict[str, Any] | None] = [None] * len(data)
        ready: list[tuple[int, Any]] = []
        for i, request in enumerate(data):
            try:
                ready.append((i, predictor.prepare(_payload(request))))
            except ImageError as e:
                answers[i] = {"error": e.code, "message": str(e)}
                if hasattr(context, "set_response_status"):
                    context.set_response_status(_STATUS.get(e.code, 400), str(e), idx=i)
        if ready:
            import numpy as np

            scores = predictor.run(np.stack([x for _, x in ready]))
            for (i, _), s in zip(ready, scores):
                answers[i] = dict(predictor.result(s).top(TOP_K))
        return answers  # type: ignore[return-value]


def _payload(request: Any) -> bytes:
    """The request's image bytes (TorchServe puts them under ``data`` or ``body``)."""
    from lensforge.errors import ImageError

    body = request.get("data") if isinstance(request, dict) else None
    if body is None and isinstance(request, dict):
        body = request.get("body")
    if isinstance(body, str):  # a JSON/text body: not an image
        raise ImageError("unsupported_format", "the request body is text; send the encoded image bytes")
    if not isinstance(body, (bytes, bytearray)) or not body:
        raise ImageError("empty", "the request has no image (send the encoded image as the body)")
    return bytes(body)
