"""``POST /explain`` (lensforge.serve.explain) over real loopback HTTP: the overlay at the image's
size, JSON, label choice, and the refusals (unknown label, detector, bundle without explain.onnx)
that leave /predict serving the same model."""

from __future__ import annotations

import io
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image
from serving import LiveServer

from lensforge.errors import RequestError
from lensforge.runtime import Predictor
from lensforge.runtime.bundle import EXPLAIN_FILE
from lensforge.serve import create_app
from lensforge.serve.explain import encode_png, negotiate

CAP = 1_000_000


@pytest.fixture(scope="module")
def old_bundle(shapes_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shapes bundle as made before lensforge could explain: no explain.onnx, no ``explain`` entry."""
    dest = tmp_path_factory.mktemp("old") / "old"
    shutil.copytree(shapes_bundle, dest)
    (dest / EXPLAIN_FILE).unlink()
    meta = json.loads((dest / "lensforge.json").read_text())
    del meta["explain"]
    (dest / "lensforge.json").write_text(json.dumps(meta))
    return dest


@pytest.fixture(scope="module")
def live(shapes_bundle: Path, old_bundle: Path, detect_bundle: Path) -> Iterator[LiveServer]:
    app = create_app({"shapes": shapes_bundle, "old": old_bundle, "boxes": detect_bundle}, max_wait_ms=2,
                     max_body_bytes=CAP)
    with LiveServer(app) as server:
        yield server


@pytest.fixture(scope="module")
def photo(shapes_dir: Path) -> Path:
    """A real shapes image, pasted off-centre on a wider canvas so the answer's size is not the model's."""
    src = Image.open(min(shapes_dir.glob("*/*.jpg"))).convert("RGB")
    canvas = Image.new("RGB", (src.width * 3, src.height * 2), (128, 128, 128))
    canvas.paste(src, (src.width, src.height // 2))
    path = shapes_dir.parent / "explain-photo.png"
    canvas.save(path)
    return path


def decoded(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


@pytest.mark.parametrize("path, kwargs, fmt", [
    ("/explain/shapes", {}, "JPEG"),  # raw body, JPEG by default (PNG encoding cost most of the route's time)
    ("/explain/shapes", {"headers": {"Accept": "image/png"}}, "PNG"),
    ("/explain/shapes?format=png", {}, "PNG"),  # what the web page asks for
    ("/explain/shapes?format=jpeg", {"headers": {"Accept": "image/png"}}, "JPEG"),  # format= wins
    ("/explain?model=shapes", {"multipart": "file"}, "JPEG"),
    ("/explain", {"multipart": "data", "headers": {"Accept": "image/png"}}, "PNG"),  # the default model, TorchServe's field
])
def test_overlay_has_the_image_size(live: LiveServer, photo: Path, path: str, kwargs: dict, fmt: str) -> None:
    data = photo.read_bytes()
    field = kwargs.get("multipart")
    send = {"files": {field: ("p.png", data, "image/png")}} if field else {"data": data}
    r = requests.post(live.url + path, headers=kwargs.get("headers", {}), timeout=60, **send)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == f"image/{fmt.lower()}"
    out = decoded(r.content)
    assert out.format == fmt and out.mode == "RGB"
    assert out.size == Image.open(photo).size
    # a heat map, not the image sent back: the overlay differs from the original almost everywhere
    original = np.asarray(Image.open(photo).convert("RGB"), np.int16)
    assert (np.abs(np.asarray(out, np.int16) - original).sum(axis=2) > 30).mean() > 0.5


@pytest.mark.parametrize("size", [(640, 427), (1, 1), (1, 7), (9, 1), (33, 20)])
def test_png_is_exact(size: tuple[int, int]) -> None:
    """encode_png (Sub filter + zlib RLE, instead of Pillow's slower writer) decodes to the same pixels,
    for a real photo, a flat image and odd sizes (one pixel wide: no left neighbour anywhere)."""
    from sklearn.datasets import load_sample_images

    photo = Image.fromarray(load_sample_images().images[1]).resize(size)
    flat = Image.new("RGB", size, (90, 200, 30))
    for img in (photo, flat, photo.convert("L")):
        data = encode_png(img)
        Image.open(io.BytesIO(data)).verify()  # chunk CRCs and structure
        out = decoded(data)
        assert out.format == "PNG" and out.mode == "RGB" and out.size == size
        assert (np.asarray(out) == np.asarray(img.convert("RGB"))).all()
    assert len(encode_png(Image.new("RGB", (640, 427), (90, 200, 30)))) < 5000  # runs compress


def test_json_equals_the_predictor(live: LiveServer, photo: Path, shapes_bundle: Path) -> None:
    r = requests.post(live.url + "/explain/shapes?format=json", data=photo.read_bytes(), timeout=60)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/json"
    body = r.json()
    expected = Predictor(shapes_bundle).explain(photo).to_dict()
    assert {k: body[k] for k in ("label", "method", "width", "height")} == \
        {k: expected[k] for k in ("label", "method", "width", "height")}
    assert body["method"] == "cam" and (body["width"], body["height"]) == Image.open(photo).size
    assert abs(body["score"] - expected["score"]) < 1e-5
    assert np.abs(np.array(body["map"]) - np.array(expected["map"])).max() <= 2e-3
    assert len(body["map"]) <= 32 and max(len(row) for row in body["map"]) <= 32
    # the top label, as /predict says
    top = requests.post(live.url + "/v1/models/shapes/predict", data=photo.read_bytes(), timeout=60).json()["top"][0]
    assert body["label"] == top["label"] and abs(body["score"] - top["score"]) < 1e-4


def test_label_choice(live: LiveServer, photo: Path, shapes_bundle: Path) -> None:
    classes = Predictor(shapes_bundle).classes
    maps = {}
    for label in classes:
        r = requests.post(live.url + f"/explain/shapes?format=json&label={label}", data=photo.read_bytes(), timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["label"] == label
        maps[label] = np.array(r.json()["map"])
    assert any(not np.array_equal(maps[classes[0]], m) for m in maps.values())  # each label has its own map


@pytest.mark.parametrize("query, status, words", [
    ("label=nope", 400, "not one of this model's"),
    ("format=gif", 400, "unknown format"),
])
def test_bad_query_is_400(live: LiveServer, photo: Path, query: str, status: int, words: str) -> None:
    r = requests.post(live.url + f"/explain/shapes?{query}", data=photo.read_bytes(), timeout=60)
    assert r.status_code == status and words in r.json()["error"] and r.json()["status"] == "Error"


@pytest.mark.parametrize("body, status", [(b"", 400), (b"not an image at all", 415), (b"\x89PNG\r\n\x1a\n" + b"\0" * 40, 400)])
def test_bad_images_are_4xx(live: LiveServer, body: bytes, status: int) -> None:
    r = requests.post(live.url + "/explain/shapes", data=body, timeout=60)
    assert r.status_code == status, r.text
    assert "Traceback" not in r.text


def test_body_over_the_cap_is_413(live: LiveServer) -> None:
    r = requests.post(live.url + "/explain/shapes", data=b"\xff" * (CAP + 1), timeout=60)
    assert r.status_code == 413


@pytest.mark.parametrize("model, status, words", [
    ("old", 409, "lensforge export BUNDLE --to explain"),
    ("boxes", 422, "is a detector"),
    ("nope", 404, "unknown model"),
])
def test_refused_models_still_predict(live: LiveServer, photo: Path, old_bundle: Path, model: str, status: int,
                                      words: str) -> None:
    r = requests.post(live.url + f"/explain/{model}", data=photo.read_bytes(), timeout=60)
    assert r.status_code == status and words in r.json()["error"]
    assert "\n" not in r.json()["error"] and str(old_bundle) not in r.text  # one line, no server path
    if model != "nope":
        assert requests.post(live.url + f"/predict/{model}", data=photo.read_bytes(), timeout=60).status_code == 200


def test_ui_models_says_which_explain(live: LiveServer) -> None:
    flags = {m["name"]: m["explain"] for m in requests.get(live.url + "/ui/models", timeout=10).json()["models"]}
    assert flags == {"shapes": True, "old": False, "boxes": False}


def test_openapi_lists_explain(live: LiveServer) -> None:
    paths = requests.get(live.url + "/openapi.json", timeout=10).json()["paths"]
    op = paths["/explain/{model}"]["post"]
    assert {"200", "400", "404", "409", "413", "415", "422"} <= set(op["responses"])
    assert set(op["responses"]["200"]["content"]) == {"image/png", "image/jpeg", "application/json"}


@pytest.mark.parametrize("query, accept, expected", [
    (None, None, "jpeg"), (None, "*/*", "jpeg"), (None, "image/*", "jpeg"), (None, "image/png", "png"),
    (None, "image/jpeg", "jpeg"), (None, "image/png, image/jpeg;q=0.9", "png"),
    (None, "application/json", "json"), (None, "image/png;q=0.5, application/json", "json"),
    ("JSON", "image/png", "json"), ("jpg", None, "jpeg"), ("png", "image/jpeg", "png"),
])
def test_negotiate(query: str | None, accept: str | None, expected: str) -> None:
    assert negotiate(query, accept) == expected


def test_negotiate_refuses() -> None:
    with pytest.raises(RequestError) as e:
        negotiate(None, "text/html")
    assert e.value.status == 406
