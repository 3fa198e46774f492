"""The seed contract (the Flask/gunicorn app lensforge replaces): ``POST /predict``,
``/predict/{model}`` and ``?model=``.

JSON (also double-encoded) with ``raw_file`` base64 (``local_url`` / ``remote_url`` when
enabled, see :mod:`.fetch`), multipart ``file`` or a raw image body →
``{"preds": ..., "status": "Success"}``; errors ``{"status": "Error", "error"}``.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

import numpy as np
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from lensforge.runtime import DetectionResult
from lensforge.runtime.predictor import Result
from lensforge.serve import inputs

if TYPE_CHECKING:
    from lensforge.serve.server import Server


def routes(server: Server) -> list[Route]:
    """The seed routes over ``server``, errors in the ``"seed"`` dialect."""
    predict = Seed(server).predict
    return [Route(path, server.endpoint(path, "seed", predict), methods=["POST"])
            for path in ("/predict", "/predict/{model}")]


class Seed:
    def __init__(self, server: Server) -> None:
        self.server = server

    async def predict(self, request: Request) -> Response:
        server, s = self.server, self.server.settings
        model = server.model(request.path_params.get("model") or request.query_params.get("model"))
        body = await server.read_body(request)
        unpack = None
        if inputs.is_multipart(request):
            data = await inputs.form_file(request, body, ("file",), s.max_body_bytes)
        elif inputs.is_json(request) and s.allow_remote:
            # a remote_url is fetched in the fetch pool (a slow upstream must not hold a decode
            # thread), so the JSON is read first, in the pool, never on the event loop
            data = await inputs.seed_data(body, s.max_body_bytes, server.decode_pool, local_roots=s.local_roots,
                                          allow_remote=True, timeout_s=s.timeout_s)
        elif inputs.is_json(request):
            # JSON, base64 (or a local file) and the decode in one trip to the pool
            data, unpack = body, functools.partial(inputs.seed_body_image, cap=s.max_body_bytes,
                                                   local_roots=s.local_roots)
        else:
            data = body
        result = await server.infer(model, data, unpack)
        return JSONResponse({"preds": seed_preds(result, s.top_k), "status": "Success"})


def seed_preds(result: Result, top_k: int) -> Any:
    """The seed contract's ``preds``: ``{label: "score"}`` (labels above their threshold for
    multi-label, top-k for single-label; scores as strings, as the seed apps sent them); for
    detectors a list of ``{"label", "score", "box": [x1, y1, x2, y2]}`` above the tuned threshold."""
    if isinstance(result, DetectionResult):
        kept = result.above()
        return [{"label": label, "score": str(np.float32(score)), "box": [float(v) for v in box]}
                for label, score, box in zip(kept.labels, kept.scores, kept.boxes)]
    pairs = ([(label, float(result.scores[result.classes.index(label)])) for label in result.labels]
             if result.multilabel else result.top(top_k))
    return {label: str(np.float32(score)) for label, score in pairs}
