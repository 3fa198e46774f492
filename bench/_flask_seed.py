"""The seed-style app our users run today, as the baseline bench/serve_load.py measures against.

Exactly the shape of the seed apps: Flask ``POST /predict`` taking JSON (often double-encoded:
a JSON string holding JSON) with the image as base64 ``raw_file``, PIL decode, torchvision
transforms, ``model(x)`` in torch eager once per request, ``{"preds": {label: "score"},
"status": "Success"}``; run by gunicorn with 2 sync workers:

    SEED_BUNDLE=path/to/bundle gunicorn -w 2 -b 127.0.0.1:8001 --chdir bench _flask_seed:app

The model is the bundle's own torch classifier (``weights.safetensors``), so both servers
answer with the same weights. Nothing is tuned: torch keeps its default thread count in each
worker, as the seed apps do. ``SEED_TORCH_THREADS=1`` is the one fix a careful user would
make (2 workers x 2 OpenMP threads on 2 busy cores spin against each other: measured here,
one forward pass took ~2 s instead of ~40 ms); the benchmark reports both.
"""

from __future__ import annotations

import base64
import io
import json
import os

import torch
from flask import Flask, jsonify, request
from PIL import Image
from torchvision import transforms

from lensforge.models.classifier import load_bundle_model
from lensforge.runtime import load_bundle

BUNDLE = load_bundle(os.environ["SEED_BUNDLE"])
SPEC = BUNDLE.input_spec
CLASSES = list(BUNDLE.classes)
MODEL = load_bundle_model(BUNDLE)  # loaded at import: once per gunicorn worker
if os.environ.get("SEED_TORCH_THREADS"):
    torch.set_num_threads(int(os.environ["SEED_TORCH_THREADS"]))
TRANSFORM = transforms.Compose([
    transforms.Resize(SPEC.resize),
    transforms.CenterCrop(SPEC.size),
    transforms.ToTensor(),
    transforms.Normalize(list(SPEC.mean), list(SPEC.std)),
])

app = Flask(__name__)


@app.route("/predict", methods=["POST"])
def predict():
    payload = request.get_json(force=True)
    if isinstance(payload, str):  # double-encoded JSON
        payload = json.loads(payload)
    image = Image.open(io.BytesIO(base64.b64decode(payload["raw_file"]))).convert("RGB")
    x = TRANSFORM(image).unsqueeze(0)
    with torch.no_grad():
        scores = MODEL(x)[0]
    top = torch.topk(scores, min(5, len(CLASSES)))
    preds = {CLASSES[int(i)]: str(float(s)) for s, i in zip(top.values, top.indices)}
    return jsonify({"preds": preds, "status": "Success"})
