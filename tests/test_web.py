"""The visual routes (lensforge.serve.web, lensforge.serve.openapi) over real loopback HTTP, and
the web page at / in real headless Chromium (Debian's chromium + chromium-driver, `make browser`)."""

from __future__ import annotations

import base64
import functools
import io
import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
from PIL import Image
from serving import LiveServer, headless_chromium
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from lensforge.errors import RequestError
from lensforge.runtime import Predictor
from lensforge.runtime.draw import PALETTE, class_color
from lensforge.runtime.results import ClassificationResult, DetectionResult
from lensforge.serve import create_app, openapi, web

pytestmark = pytest.mark.slow  # drives headless Chromium: not in the fast inner loop (-m 'not slow')

CAP = 2_000_000


@pytest.fixture(scope="module")
def live(shapes_bundle: Path) -> Iterator[LiveServer]:
    app = create_app({"shapes": shapes_bundle, "second": shapes_bundle}, max_wait_ms=2, max_body_bytes=CAP)
    with LiveServer(app) as server:
        yield server


@pytest.fixture(scope="module")
def one_per_class(shapes_dir: Path) -> list[Path]:
    return [min(d.glob("*.jpg")) for d in sorted(p for p in shapes_dir.iterdir() if p.is_dir())]


def jpeg(size: tuple[int, int], **save: Any) -> bytes:
    """A smooth gradient (compresses well even at 3000 px), encoded as JPEG."""
    w, h = size
    x = np.linspace(0, 255, w, dtype=np.float32)[None, :, None]
    y = np.linspace(0, 255, h, dtype=np.float32)[:, None, None]
    arr = np.concatenate([np.broadcast_to(x, (h, w, 1)), np.broadcast_to(y, (h, w, 1)),
                          np.full((h, w, 1), 90, np.float32)], axis=2).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=92, **save)
    return buf.getvalue()


def decoded(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


# -- /annotate --------------------------------------------------------------------------------

@pytest.mark.parametrize("headers, query, content_type, fmt", [
    ({}, "", "image/jpeg", "JPEG"),
    ({"Accept": "image/png"}, "", "image/png", "PNG"),
    ({"Accept": "image/jpeg"}, "", "image/jpeg", "JPEG"),
    ({"Accept": "*/*"}, "", "image/jpeg", "JPEG"),
    ({"Accept": "image/*"}, "", "image/jpeg", "JPEG"),
    ({"Accept": "text/html, image/png;q=0.5"}, "", "image/png", "PNG"),
    ({"Accept": "image/png;q=0.4, image/jpeg;q=0.9"}, "", "image/jpeg", "JPEG"),
    ({}, "?format=png", "image/png", "PNG"),
    ({}, "?format=JPG", "image/jpeg", "JPEG"),
    ({"Accept": "image/png"}, "?format=jpeg", "image/jpeg", "JPEG"),  # format= wins over Accept
])
def test_annotate_answers_jpeg_or_png(live: LiveServer, one_per_class: list[Path], headers: dict[str, str],
                                      query: str, content_type: str, fmt: str) -> None:
    src = one_per_class[0]
    r = requests.post(live.url + "/annotate" + query, files={"file": (src.name, src.read_bytes(), "image/jpeg")},
                      headers=headers, timeout=30)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == content_type
    out = decoded(r.content)
    assert out.format == fmt and out.mode == "RGB"
    assert out.size == Image.open(src).size


def test_annotate_draws_on_the_original_and_leaves_the_rest(live: LiveServer) -> None:
    data = jpeg((320, 240))  # the shapes are 64 px: the panel would cover them whole
    r = requests.post(live.url + "/annotate?format=png", data=data, timeout=30)  # a raw body
    assert r.status_code == 200, r.text
    out = np.asarray(decoded(r.content), np.int16)
    original = np.asarray(decoded(data).convert("RGB"), np.int16)
    assert out.shape == original.shape
    h, w = out.shape[:2]
    assert np.abs(out[: h // 4, : w // 4] - original[: h // 4, : w // 4]).mean() > 20  # the panel, top-left
    assert np.array_equal(out[-h // 4:, -w // 4:], original[-h // 4:, -w // 4:])  # untouched elsewhere (PNG: exact)


@pytest.mark.parametrize("path", ["/annotate/second", "/annotate?model=second", "/annotate/shapes"])
def test_annotate_picks_the_model(live: LiveServer, one_per_class: list[Path], path: str) -> None:
    r = requests.post(live.url + path, data=one_per_class[0].read_bytes(), timeout=30)
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"


@pytest.mark.parametrize("size, expected", [
    ((3000, 2000), (2048, 1365)),  # longer side capped, aspect kept
    ((6000, 1500), (2048, 512)),  # decoded at a reduced JPEG scale first, then shrunk
    ((2048, 100), (2048, 100)),  # at the cap: untouched
])
def test_annotate_caps_large_images(live: LiveServer, size: tuple[int, int], expected: tuple[int, int]) -> None:
    r = requests.post(live.url + "/annotate", data=jpeg(size), timeout=60)
    assert r.status_code == 200, r.text
    assert decoded(r.content).size == expected


def test_annotate_applies_exif_orientation(live: LiveServer) -> None:

    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, displayed rotated 90° clockwise
    r = requests.post(live.url + "/annotate", data=jpeg((96, 48), exif=exif.tobytes()), timeout=30)
    assert r.status_code == 200, r.text
    assert decoded(r.content).size == (48, 96)


@pytest.mark.parametrize("path, body, headers, status, message", [
    ("/annotate", b"just some text, not an image", {}, 415, "unsupported image format"),
    ("/annotate", b"", {}, 400, "empty"),
    ("/annotate", None, {}, 400, "corrupt"),  # None: a truncated JPEG
    ("/annotate?format=gif", None, {}, 400, "use format=jpeg or format=png"),
    ("/annotate", None, {"Accept": "text/html"}, 406, "image/jpeg or image/png"),
    ("/annotate/nope", None, {}, 404, "unknown model"),
])
def test_annotate_errors_in_the_seed_shape(live: LiveServer, path: str, body: bytes | None,
                                           headers: dict[str, str], status: int, message: str) -> None:
    if body is None:
        body = jpeg((64, 64))[:300]
    r = requests.post(live.url + path, data=body, headers=headers, timeout=30)
    assert r.status_code == status, r.text
    doc = r.json()
    assert set(doc) == {"status", "error"} and doc["status"] == "Error"
    assert message in doc["error"].lower() or message in doc["error"]


@pytest.mark.parametrize("query, accept, expected", [
    (None, None, "jpeg"), (None, "", "jpeg"), (None, "image/png", "png"), (None, "image/webp, image/png;q=0.8", "png"),
    (None, "image/png;q=0, */*", "jpeg"), (None, "image/*;q=0.5, image/png", "png"), (" PNG ", None, "png"),
    (None, "image/png;q=abc, image/jpeg;q=0.1", "jpeg"),
])
def test_negotiate_format(query: str | None, accept: str | None, expected: str) -> None:
    assert web.negotiate_format(query, accept) == expected


@pytest.mark.parametrize("query, accept, status", [("webp", None, 400), ("", None, 400), (None, "text/html", 406),
                                                   (None, "image/png;q=0, image/jpeg;q=0", 406)])
def test_negotiate_format_refuses(query: str | None, accept: str | None, status: int) -> None:
    with pytest.raises(RequestError) as e:
        web.negotiate_format(query, accept)
    assert e.value.status == status


def test_render_draws_a_detection_in_original_pixels() -> None:
    """The detector path of /annotate, with a real DetectionResult (no detector bundle needed):
    boxes in original pixels land on the capped picture, scaled."""
    classes = ("cat", "dog")
    for size, box in [((400, 300), (40, 60, 240, 260)), ((4096, 3072), (400, 600, 2400, 2600))]:
        result = DetectionResult([box, [0, 0, 10, 10]], [0.9, 0.1], [1, 0], classes, threshold=0.5, image_size=size)
        out = decoded(web.render(jpeg(size), result, "png"))
        scale = min(1.0, web.ANNOTATE_MAX_SIDE / max(size))
        assert out.size == (round(size[0] * scale), round(size[1] * scale))
        x1, y1, x2, y2 = (round(v * scale) for v in box)
        for x, y in [(x1 + 1, (y1 + y2) // 2), (x2 - 1, (y1 + y2) // 2), ((x1 + x2) // 2, y2 - 1)]:
            assert out.getpixel((x, y)) == class_color(1), (size, x, y)
        assert out.getpixel((2, 2)) != class_color(0)  # the 0.1 box is below the threshold


# -- /ui/models, static files -----------------------------------------------------------------

def test_ui_models_lists_task_and_classes(live: LiveServer, predictor: Predictor) -> None:
    doc = requests.get(live.url + "/ui/models", timeout=10).json()
    assert [m["name"] for m in doc["models"]] == ["shapes", "second"]
    assert [m["default"] for m in doc["models"]] == [True, False]
    for m in doc["models"]:
        assert m["task"] == "classify" and m["classes"] == list(predictor.classes) and m["ready"] is True
        assert m["explain"] is True  # the shapes bundle carries explain.onnx


@pytest.mark.parametrize("path, content_type", [("/", "text/html"), ("/static/app.js", "javascript"),
                                                ("/static/style.css", "text/css")])
def test_page_files_are_served_and_self_contained(live: LiveServer, path: str, content_type: str) -> None:
    r = requests.get(live.url + path, timeout=10)
    assert r.status_code == 200 and content_type in r.headers["content-type"]
    assert not re.search(r"https?://|//cdn|@import", r.text), "the page must work offline: no external URLs"


def test_page_palette_matches_the_drawing_palette() -> None:
    js = (Path(web.__file__).parent / "static" / "app.js").read_text()
    block = js[js.index("const PALETTE"): js.index("];", js.index("const PALETTE"))]
    colours = [tuple(map(int, m)) for m in re.findall(r"\[(\d+), (\d+), (\d+)\]", block)]
    assert colours == list(PALETTE)


# -- /openapi.json and /docs ------------------------------------------------------------------

def app_operations(app: Any) -> set[tuple[str, str]]:
    ops = set()
    for route in app.routes:
        if isinstance(route, Route):
            for method in route.methods or ["GET"]:
                if method != "HEAD":
                    ops.add((re.sub(r":\w+}", "}", route.path), method.lower()))
    return ops


def test_openapi_describes_every_route(live: LiveServer) -> None:
    r = requests.get(live.url + "/openapi.json", timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/json")
    doc = json.loads(r.content)
    assert doc["openapi"].startswith("3.1") and doc["info"]["title"] == "lensforge"
    paths = doc["paths"]
    for path in ("/predict", "/predict/{model}", "/predictions/{model}", "/v1/models/{model}/predict", "/annotate",
                 "/annotate/{model}", "/healthz", "/readyz", "/metrics", "/docs", "/openapi.json", "/"):
        assert path in paths, path
    app = live.server.config.app
    described = {(p, m) for p, item in paths.items() for m in item}
    assert app_operations(app) == described  # every route, v2 ones included when present, nothing else
    if any(getattr(route, "path", "").startswith("/v2") for route in app.routes):
        assert "/v2/models/{model}/infer" in paths and paths["/v2/models/{model}/infer"]["post"]["summary"]
    ids = [op["operationId"] for item in paths.values() for op in item.values()]
    assert len(ids) == len(set(ids))
    for path, item in paths.items():
        for method, op in item.items():
            assert op["summary"] and op["responses"], (method, path)
            declared = {p["name"] for p in op.get("parameters", []) if p["in"] == "path"}
            assert declared == set(re.findall(r"{(\w+)}", path)), (method, path)
    annotate = paths["/annotate"]["post"]
    assert set(annotate["responses"]["200"]["content"]) == {"image/jpeg", "image/png"}
    assert "multipart/form-data" in annotate["requestBody"]["content"]
    assert "application/json" in paths["/predict"]["post"]["requestBody"]["content"]  # seed raw_file


def test_openapi_takes_yaml_docstrings_and_has_a_fallback() -> None:
    async def documented(request: Request) -> Response:
        """Explained in prose.
        ---
        summary: Something special
        responses:
          200:
            description: it works
        """
        return JSONResponse({})

    @functools.wraps(documented)
    async def wrapped(request: Request) -> Response:  # as a dialect wrapper with functools.wraps
        return await documented(request)

    async def plain(request: Request) -> Response:
        """Say hello: prose with a colon is not taken as YAML."""
        return JSONResponse({})

    async def bare(request: Request) -> Response:
        return JSONResponse({})

    doc = openapi.schema([Route("/special", wrapped, methods=["POST"]), Route("/hello/{who}", plain),
                          Route("/bare", bare), Route("/healthz", bare), Route("/hidden", bare, include_in_schema=False)])
    paths = doc["paths"]
    assert paths["/special"]["post"]["summary"] == "Something special"
    assert paths["/hello/{who}"]["get"]["summary"] == "Say hello: prose with a colon is not taken as YAML."
    assert paths["/hello/{who}"]["get"]["parameters"][0] == {"name": "who", "in": "path", "required": True,
                                                             "schema": {"type": "string"}}
    assert paths["/bare"]["get"]["summary"] == "GET /bare"
    assert paths["/healthz"]["get"]["summary"].startswith("Liveness")  # from the table
    assert "/hidden" not in paths


def test_docs_page_lists_every_operation_offline(live: LiveServer) -> None:
    r = requests.get(live.url + "/docs", timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    page = r.text
    assert not re.search(r"https?://|<script", page), "the docs page must work offline and without JS"
    doc = requests.get(live.url + "/openapi.json", timeout=10).json()
    for path, item in doc["paths"].items():
        for method, op in item.items():
            assert f"id='{op['operationId']}'" in page
            assert f"{method.upper()}</span>{path}" in page
    assert "&quot;preds&quot;" in page and "raw_file" in page  # request/response examples
    assert "<script>alert(1)</script>" not in openapi.render_docs(
        {"info": {"title": "<script>alert(1)</script>"}, "paths": {}})


# -- the page in real headless Chromium -------------------------------------------------------

@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    yield from headless_chromium(tmp_path_factory.mktemp("chromium-profile"))


def open_page(driver: Any, live: LiveServer) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(live.url + "/")
    WebDriverWait(driver, 20).until(lambda d: len(d.find_elements("css selector", "#model option")) == 2)


def wait_for(driver: Any, condition: Any, timeout: float = 30) -> Any:
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(condition)


def test_page_predicts_an_uploaded_jpeg(browser: Any, live: LiveServer, predictor: Predictor,
                                        one_per_class: list[Path], tmp_path: Path) -> None:
    open_page(browser, live)
    labels = set()
    for src in one_per_class:
        expected = predictor.predict(src)
        browser.find_element("id", "file").send_keys(str(src))
        wait_for(browser, lambda d, name=src.name: d.find_element("id", "status").text == f"Done: {name}"
                 and d.find_element("id", "top-label").text)
        shown = browser.find_element("id", "top-label").text
        assert shown == expected.label, src
        labels.add(shown)
        rows = browser.find_elements("css selector", "#labels li .name")
        assert [r.text for r in rows] == [name for name, _ in expected.top(5)]
        latency = browser.find_element("id", "latency").text
        assert re.fullmatch(r"Latency: \d+\.\d ms on the server, \d+ ms round trip", latency), latency
        assert browser.find_element("id", "error").is_displayed() is False
        canvas = browser.find_element("id", "canvas")
        assert canvas.is_displayed() and canvas.get_attribute("width") == str(Image.open(src).width)
    browser.save_screenshot(str(tmp_path / "page.png"))
    assert (tmp_path / "page.png").stat().st_size > 10_000
    shutil.copy(tmp_path / "page.png", tmp_path.parent / "web-page-latest.png")  # to look at after a run


def test_page_shows_the_servers_message_for_a_text_file(browser: Any, live: LiveServer, tmp_path: Path) -> None:
    note = tmp_path / "notes.txt"
    note.write_text("this is not an image\n")
    server_says = requests.post(live.url + "/v1/models/shapes/predict", data=note.read_bytes(), timeout=10)
    assert server_says.status_code == 415
    open_page(browser, live)
    browser.find_element("id", "file").send_keys(str(note))
    error = wait_for(browser, lambda d: d.find_element("id", "error").is_displayed() and d.find_element("id", "error"))
    assert error.text == f"Error 415 for notes.txt: {server_says.json()['error']['message']}"
    assert error.get_attribute("role") == "alert"
    assert not browser.find_element("id", "result").is_displayed()
    browser.save_screenshot(str(tmp_path.parent / "web-page-error-latest.png"))


def test_page_accepts_a_dropped_file_for_the_chosen_model(browser: Any, live: LiveServer, predictor: Predictor,
                                                          one_per_class: list[Path]) -> None:
    open_page(browser, live)
    from selenium.webdriver.support.ui import Select

    Select(browser.find_element("id", "model")).select_by_value("second")
    src = one_per_class[2]
    browser.execute_script("""
        const bytes = Uint8Array.from(atob(arguments[0]), c => c.charCodeAt(0));
        const dt = new DataTransfer();
        dt.items.add(new File([bytes], arguments[1], {type: "image/jpeg"}));
        document.getElementById("drop").dispatchEvent(new DragEvent("drop", {dataTransfer: dt, bubbles: true}));
    """, base64.b64encode(src.read_bytes()).decode(), src.name)
    wait_for(browser, lambda d: d.find_element("id", "status").text == f"Done: {src.name}")
    assert browser.find_element("id", "top-label").text == predictor.predict(src).label
    assert browser.find_element("id", "answered-by").text == "second (classify)"


def test_page_is_keyboard_and_screen_reader_friendly(browser: Any, live: LiveServer) -> None:
    open_page(browser, live)
    for control in ("model", "heatmap-toggle", "file"):
        assert browser.find_elements("css selector", f"label[for='{control}']"), control
    from selenium.webdriver.common.keys import Keys

    # the keyboard path: model picker, the heat-map toggle (shown: the model explains), then the file input
    browser.find_element("id", "model").send_keys(Keys.TAB)
    assert browser.switch_to.active_element.get_attribute("id") == "heatmap-toggle"
    browser.switch_to.active_element.send_keys(Keys.TAB)
    assert browser.switch_to.active_element.get_attribute("id") == "file"
    assert browser.find_element("id", "form").get_attribute("aria-describedby") == "hint"
    assert browser.find_element("id", "status").get_attribute("aria-live") == "polite"
    options = [o.get_attribute("value") for o in browser.find_elements("css selector", "#model option")]
    assert options == ["shapes", "second"]


def test_page_draws_detection_boxes_on_the_canvas(browser: Any, live: LiveServer) -> None:
    """The detector view, fed a real DetectionResult.to_dict() as /v1/models/{name}/predict
    sends it (no detector bundle exists in the tests yet)."""
    open_page(browser, live)
    result = DetectionResult([[40, 30, 200, 150], [220, 160, 300, 230]], [0.9, 0.7], [1, 0], ("cat", "dog"),
                             threshold=0.5, image_size=(640, 480))
    payload = {"model": "shapes", **result.to_dict(), "latency_ms": 3.25}
    pixels = browser.execute_async_script("""
        const [data, done] = [arguments[0], arguments[arguments.length - 1]];
        const src = document.createElement("canvas");
        src.width = 320; src.height = 240;
        const g = src.getContext("2d"); g.fillStyle = "rgb(128,128,128)"; g.fillRect(0, 0, 320, 240);
        createImageBitmap(src).then(bitmap => {
            render({name: "boxes.png"}, data, bitmap, 12);
            const ctx = document.getElementById("canvas").getContext("2d");
            const at = (x, y) => Array.from(ctx.getImageData(x, y, 1, 1).data.slice(0, 3));
            // the image is half the size the boxes were found on: (40,30)-(200,150) -> (20,15)-(100,75)
            done({left: at(21, 45), right: at(99, 45), inside: at(60, 45), second: at(111, 97),
                  label: document.getElementById("top-label").textContent,
                  rows: Array.from(document.querySelectorAll("#labels li .name")).map(e => e.textContent)});
        });
    """, payload)
    assert pixels["left"] == list(class_color(1)) and pixels["right"] == list(class_color(1))
    assert pixels["second"] == list(class_color(0))
    assert pixels["inside"] == [128, 128, 128]
    assert pixels["label"] == "dog, cat" and pixels["rows"] == ["dog", "cat"]


def test_classification_result_matches_the_native_route(live: LiveServer, predictor: Predictor,
                                                        one_per_class: list[Path]) -> None:
    """What the page reads (labels, top, latency_ms) is what the native route sends."""
    src = one_per_class[3]
    doc = requests.post(live.url + "/v1/models/shapes/predict", files={"file": src.open("rb")}, timeout=30).json()
    expected: ClassificationResult = predictor.predict(src)  # type: ignore[assignment]
    assert doc["labels"] == [expected.label] and doc["latency_ms"] > 0
    assert [t["label"] for t in doc["top"]] == [name for name, _ in expected.top(5)]


def test_page_heatmap_toggle_shows_the_overlay_at_the_image_size(browser: Any, live: LiveServer, tmp_path: Path,
                                                                 one_per_class: list[Path]) -> None:
    """The toggle (shown: the shapes bundle has explain.onnx) swaps the preview for /explain's
    overlay, which has the uploaded image's own size; off again, the preview is back."""
    src = tmp_path / "wide.png"  # not square and not the model's size, so the size check means something
    canvas = Image.new("RGB", (300, 180), (128, 128, 128))
    canvas.paste(Image.open(one_per_class[1]).convert("RGB"), (150, 60))
    canvas.save(src)
    open_page(browser, live)
    assert browser.find_element("id", "heatmap-row").is_displayed()
    browser.find_element("id", "heatmap-toggle").click()
    browser.find_element("id", "file").send_keys(str(src))
    wait_for(browser, lambda d: d.find_element("id", "status").text == "Done: wide.png (heat map)")
    img = browser.find_element("id", "heatmap")
    assert img.is_displayed() and not browser.find_element("id", "canvas").is_displayed()
    natural = browser.execute_script("const i = arguments[0]; return [i.naturalWidth, i.naturalHeight];", img)
    assert natural == [300, 180]
    # what the page shows is /explain's answer for this image
    served = requests.post(live.url + "/explain/shapes?format=png", data=src.read_bytes(), timeout=30)
    shown = browser.execute_script("""
        const i = arguments[0], c = document.createElement("canvas");
        c.width = i.naturalWidth; c.height = i.naturalHeight;
        const g = c.getContext("2d"); g.drawImage(i, 0, 0);
        return Array.from(g.getImageData(0, 0, c.width, c.height).data.filter((_, k) => k % 4 !== 3));
    """, img)
    assert np.array_equal(np.array(shown, np.uint8).reshape(180, 300, 3), np.asarray(decoded(served.content)))
    assert img.get_attribute("alt").startswith("heat map of wide.png for ")
    browser.save_screenshot(str(tmp_path.parent / "web-page-heatmap-latest.png"))
    browser.find_element("id", "heatmap-toggle").click()  # off: the preview is back
    assert not img.is_displayed() and browser.find_element("id", "canvas").is_displayed()
    assert browser.find_element("id", "caption").text == "300 × 180 px"


def test_page_hides_the_toggle_for_models_without_explain(browser: Any, live: LiveServer) -> None:
    open_page(browser, live)
    browser.execute_script("""models.get("second").explain = false;""")  # as /ui/models says for an old bundle
    from selenium.webdriver.support.ui import Select

    Select(browser.find_element("id", "model")).select_by_value("second")
    assert not browser.find_element("id", "heatmap-row").is_displayed()
    Select(browser.find_element("id", "model")).select_by_value("shapes")
    assert browser.find_element("id", "heatmap-row").is_displayed()
