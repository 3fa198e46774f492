"""The Predictor: any image source gives the same scores, batches equal single images, bad
images and bad bundles fail with clear errors, and serving never imports torch."""

from __future__ import annotations

import io
import json
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lensforge.data.formats import list_images, read_dataset
from lensforge.data.split import save_split, split_records
from lensforge.errors import BundleError, ImageError
from lensforge.runtime import ClassificationResult, Predictor
from lensforge.runtime.bundle import META_FILE, atomic_directory, load_bundle


def _sources(path: Path) -> dict[str, object]:
    data = path.read_bytes()
    with Image.open(path) as im:
        rgb = im.convert("RGB")
    return {
        "path": path,
        "str path": str(path),
        "bytes": data,
        "bytearray": bytearray(data),
        "memoryview": memoryview(data),
        "PIL image": rgb,
        "PIL image, not yet loaded": Image.open(path),
        "uint8 array": np.asarray(rgb),
    }


def _photo(tmp_path: Path, size: int, suffix: str) -> Path:
    """A noisy gradient photo (JPEG or PNG) of size x size."""
    rng = np.random.default_rng(size)
    ramp = np.linspace(0, 255, size)
    pixels = np.stack([np.add.outer(ramp, ramp) / 2, np.tile(ramp, (size, 1)), rng.uniform(0, 255, (size, size))], -1)
    path = tmp_path / f"photo-{size}{suffix}"
    Image.fromarray(pixels.astype(np.uint8)).save(path)
    return path


@pytest.mark.parametrize("kind", ["shape jpeg 64px", "png 400px", "jpeg 120px"])
def test_every_source_type_gives_identical_scores(predictor: Predictor, shapes_dir: Path, tmp_path: Path, kind: str) -> None:
    if kind == "shape jpeg 64px":
        path = shapes_dir / "triangle" / "img_0003.jpg"
    else:
        size, suffix = (400, ".png") if kind.startswith("png") else (120, ".jpg")
        path = _photo(tmp_path, size, suffix)
    results = {name: predictor.predict(src) for name, src in _sources(path).items()}
    reference = results.pop("path")
    assert isinstance(reference, ClassificationResult)
    assert reference.classes == predictor.classes and reference.scores.shape == (4,)
    assert reference.scores.sum() == pytest.approx(1.0, abs=1e-5)  # softmax
    for name, res in results.items():
        np.testing.assert_array_equal(res.scores, reference.scores, err_msg=name)
        assert res.labels == reference.labels


def test_decoded_images_skip_jpeg_draft_mode(predictor: Predictor, tmp_path: Path) -> None:
    """Documented policy: paths and bytes of large JPEGs are decoded at a reduced DCT scale
    (draft mode, ~4x faster); a PIL image or array is already decoded at full size and is
    only resized. The two agree closely, not bit for bit."""
    path = _photo(tmp_path, 400, ".jpg")
    with Image.open(path) as im:
        array = np.asarray(im.convert("RGB"))
    from_path, from_array = predictor.predict(path).scores, predictor.predict(array).scores
    assert not np.array_equal(from_path, from_array)  # the draft path really was taken
    np.testing.assert_allclose(from_array, from_path, atol=0.05)


def test_scores_depend_on_the_image(predictor: Predictor, shapes_dir: Path) -> None:
    # Guards the equality tests above: a model whose scores ignore the input would pass them.
    paths = sorted(shapes_dir.glob("*/img_000[1-3].jpg"))
    scores = np.stack([predictor.predict(p).scores for p in paths])
    assert np.ptp(scores, axis=0).max() > 1e-3


def test_predict_batch_equals_predict_in_order(predictor: Predictor, shapes_dir: Path) -> None:
    paths = sorted(shapes_dir.glob("*/img_000[1-3].jpg"))
    mixed: list[object] = [p if i % 2 else p.read_bytes() for i, p in enumerate(paths)]
    for sources in (mixed, mixed[::-1], mixed[:1]):
        batch = predictor.predict_batch(sources)
        assert len(batch) == len(sources)
        for src, res in zip(sources, batch):
            np.testing.assert_allclose(res.scores, predictor.predict(src).scores, atol=1e-5, rtol=0)
    assert predictor.predict_batch([]) == []


def test_predict_batch_with_a_bad_image_raises_image_error(predictor: Predictor, shapes_dir: Path) -> None:
    with pytest.raises(ImageError):
        predictor.predict_batch([shapes_dir / "circle" / "img_0001.jpg", b"not an image"])


def test_predict_many_reports_the_corrupt_file_and_predicts_the_rest(predictor: Predictor, shapes_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "incoming"
    folder.mkdir()
    for i, src in enumerate(sorted(shapes_dir.glob("*/img_000[1-2].jpg"))):
        shutil.copy(src, folder / f"{i:02d}.jpg")
    (folder / "04-corrupt.jpg").write_bytes((folder / "04.jpg").read_bytes()[:200])  # truncated
    (folder / "notes.txt").write_text("not an image")  # not listed at all
    (folder / ".hidden.jpg").write_bytes(b"hidden files are skipped")
    paths = list_images([folder])
    assert [p.name for p in paths] == sorted(p.name for p in folder.glob("[0-9]*.jpg"))

    out = list(predictor.predict_many(paths, batch_size=3))
    assert [src for src, _ in out] == paths  # order kept across batches
    errors = {Path(src).name: res for src, res in out if isinstance(res, Exception)}
    assert list(errors) == ["04-corrupt.jpg"]
    assert isinstance(errors["04-corrupt.jpg"], ImageError) and errors["04-corrupt.jpg"].code == "corrupt"
    for src, res in out:
        if not isinstance(res, Exception):
            np.testing.assert_allclose(res.scores, predictor.predict(src).scores, atol=1e-5, rtol=0)


def test_multilabel_predictor_applies_the_bundle_thresholds(multilabel_run: object, multilabel_dir: Path) -> None:
    bundle = Path(multilabel_run.bundle_dir)  # type: ignore[attr-defined]
    thresholds = json.loads((bundle / "lensforge.json").read_text())["thresholds"]
    pred = Predictor(bundle)
    assert pred.multilabel and pred.thresholds is not None
    np.testing.assert_array_equal(pred.thresholds, np.asarray(thresholds, np.float32))
    for path in sorted((multilabel_dir / "images").glob("*.png"))[:8]:
        res = pred.predict(path)
        assert res.labels == [c for c, s, t in sorted(zip(res.classes, res.scores, thresholds), key=lambda x: -x[1]) if s >= t]


# -- broken bundles ---------------------------------------------------------------------------


def _drop_model(b: Path) -> None:
    (b / "model.onnx").unlink()


def _corrupt_meta(b: Path) -> None:
    (b / "lensforge.json").write_text('{"format_version": 1, "task": ')


def _newer_format(b: Path) -> None:
    meta = json.loads((b / "lensforge.json").read_text())
    (b / "lensforge.json").write_text(json.dumps({**meta, "format_version": 99}))


def _empty_model(b: Path) -> None:
    (b / "model.onnx").write_bytes(b"")


def _garbage_model(b: Path) -> None:
    (b / "model.onnx").write_bytes(b"\x08\x07garbage, not a protobuf \x00\xff" * 64)


def _no_meta(b: Path) -> None:
    (b / "lensforge.json").unlink()


def _wrong_class_count(b: Path) -> None:
    meta = json.loads((b / "lensforge.json").read_text())
    (b / "lensforge.json").write_text(json.dumps({**meta, "classes": meta["classes"][:3]}))


def _broken_copy(bundle: Path, tmp_path: Path, breakage: Callable[[Path], None]) -> Path:
    """A copy of ``bundle`` in ``tmp_path`` with ``breakage`` applied (the fixture stays intact)."""
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    breakage(copy)
    return copy


@pytest.mark.parametrize(
    ("breakage", "expected"),
    [
        (_drop_model, r"incomplete: model\.onnx is missing"),
        (_corrupt_meta, r"lensforge\.json is corrupt"),
        (_newer_format, r"newer lensforge \(bundle format 99.*upgrade"),
        (_empty_model, r"model\.onnx is missing or empty"),
        (_garbage_model, r"model\.onnx could not be loaded by onnxruntime"),
        (_no_meta, r"not a lensforge bundle: lensforge\.json is missing"),
        (_wrong_class_count, r"4 outputs but the bundle lists 3 classes"),
    ],
    ids=lambda v: getattr(v, "__name__", "")[1:] or None,
)
def test_broken_bundles_raise_one_line_bundle_errors(
    shapes_bundle: Path, tmp_path: Path, breakage: Callable[[Path], None], expected: str
) -> None:
    bundle = _broken_copy(shapes_bundle, tmp_path, breakage)
    with pytest.raises(BundleError, match=expected) as info:
        Predictor(bundle)
    assert "\n" not in str(info.value)


def test_a_missing_bundle_directory_says_how_to_make_one(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="lensforge train"):
        Predictor(tmp_path / "nope")


def test_the_run_directory_points_to_its_bundle(shapes_run: object) -> None:
    with pytest.raises(BundleError, match="did you mean .*bundle"):
        Predictor(shapes_run.run_dir)  # type: ignore[attr-defined]


# -- serving without torch --------------------------------------------------------------------


@pytest.mark.parametrize(
    "code",
    [
        "import lensforge.runtime\np = lensforge.runtime.Predictor(BUNDLE)",
        "import lensforge\np = lensforge.Predictor(BUNDLE)",
    ],
    ids=["lensforge.runtime", "lensforge.Predictor"],
)
def test_prediction_in_a_fresh_process_never_imports_torch(shapes_bundle: Path, shapes_dir: Path, code: str) -> None:
    image = shapes_dir / "square" / "img_0002.jpg"
    script = (
        f"import json, sys\nBUNDLE = {str(shapes_bundle)!r}\n{code}\n"
        f"r = p.predict({str(image)!r})\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision', 'timm', 'lightning', 'sklearn'))\n"
        "print(json.dumps({'heavy': heavy, 'scores': r.scores.tolist()}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["heavy"] == []
    np.testing.assert_allclose(out["scores"], Predictor(shapes_bundle).predict(image).scores, atol=1e-6)


# -- bundle files: permissions and hand-edited metadata -----------------------------------------


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
@pytest.mark.parametrize(
    ("umask", "dir_mode", "file_mode"), [(0o022, 0o755, 0o644), (0o027, 0o750, 0o640)], ids=["022", "027"]
)
def test_a_committed_bundle_is_readable_by_other_users(
    shapes_dir: Path, tmp_path: Path, umask: int, dir_mode: int, file_mode: int
) -> None:
    """A server running as another user must be able to read what training wrote: the
    bundle directory and split.json get the umask's permissions, not private 0700 / 0600."""
    ds = read_dataset(shapes_dir)
    dest = tmp_path / "bundle"
    old = os.umask(umask)
    try:
        with atomic_directory(dest) as tmp:
            save_split(split_records(ds), ds, tmp / "split.json")
    finally:
        os.umask(old)
    assert stat.S_IMODE(dest.stat().st_mode) == dir_mode
    assert stat.S_IMODE((dest / "split.json").stat().st_mode) == file_mode
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"]  # no temporary directory left


def _meta(**changes: object) -> Callable[[Path], None]:
    """Breakage: set top-level keys of lensforge.json (a value of ... deletes the key)."""

    def edit(b: Path) -> None:
        meta = json.loads((b / META_FILE).read_text())
        for key, value in changes.items():
            if value is ...:
                meta.pop(key, None)
            else:
                meta[key] = value
        (b / META_FILE).write_text(json.dumps(meta))

    return edit


def _input(**changes: object) -> Callable[[Path], None]:
    """Breakage: set keys of the input spec (a value of ... deletes the key)."""

    def edit(b: Path) -> None:
        meta = json.loads((b / META_FILE).read_text())
        for key, value in changes.items():
            if value is ...:
                meta["input"].pop(key)
            else:
                meta["input"][key] = value
        (b / META_FILE).write_text(json.dumps(meta))

    return edit


def _model_file(name: object) -> Callable[[Path], None]:
    def edit(b: Path) -> None:
        meta = json.loads((b / META_FILE).read_text())
        meta["model"]["file"] = name
        (b / META_FILE).write_text(json.dumps(meta))

    return edit


BAD_META: list[tuple[str, Callable[[Path], None], str]] = [
    ("thresholds too few", _meta(thresholds=[0.5, 0.5, 0.5]), r"'thresholds' must be a list of 4 numbers in \[0, 1\]"),
    ("thresholds above 1", _meta(thresholds=[0.5, 0.5, 0.5, 1.5]), r"'thresholds' must be .* got \[0\.5, 0\.5, 0\.5, 1\.5\]"),
    ("thresholds negative", _meta(thresholds=[0.5, -0.1, 0.5, 0.5]), r"'thresholds' must be a list of 4 numbers"),
    ("thresholds NaN", _meta(thresholds=[0.5, float("nan"), 0.5, 0.5]), r"'thresholds' must be a list of 4 numbers"),
    ("thresholds strings", _meta(thresholds=["0.5"] * 4), r"'thresholds' must be a list of 4 numbers"),
    ("thresholds booleans", _meta(thresholds=[True, False, True, False]), r"'thresholds' must be a list of 4 numbers"),
    ("thresholds a number", _meta(thresholds=0.5), r"'thresholds' must be a list of 4 numbers"),
    ("classes empty", _meta(classes=[]), r"'classes' must be a non-empty list of class names, got \[\]"),
    ("classes a string", _meta(classes="circle"), r"'classes' must be a non-empty list"),
    ("classes not strings", _meta(classes=[0, 1, 2, 3]), r"'classes' must be a non-empty list of class names"),
    ("classes repeated", _meta(classes=["a", "b", "a", "c"]), r"'classes' lists 'a' more than once"),
    ("model not an object", _meta(model="model.onnx"), r"'model' must be an object, got 'model\.onnx'"),
    ("data not an object", _meta(data=["x"]), r"'data' must be an object"),
    ("model file absolute", _model_file("/etc/passwd"), r"'model\.file' must be a relative file name inside the bundle"),
    ("model file dotdot", _model_file("../model.onnx"), r"'model\.file' must be .* got '\.\./model\.onnx'"),
    ("model file dotdot inside", _model_file("sub/../../bundle/model.onnx"), r"'model\.file' must be"),
    ("model file empty", _model_file(""), r"'model\.file' must be"),
    ("model file a number", _model_file(3), r"'model\.file' must be"),
    ("model file NUL", _model_file("model\x00.onnx"), r"'model\.file' must be"),
    ("input not an object", _meta(input=[224, 256]), r"'input' must be an object"),
    ("input without size", _input(size=...), r"the input spec has no 'size' entry"),
    ("input size infinite", _input(size=float("inf")), r"the input spec is wrong"),
    ("input size text", _input(size="big"), r"the input spec is wrong"),
    ("input two means", _input(mean=[0.5, 0.5]), r"input spec is wrong: mean must be 3 finite numbers"),
    ("input four stds", _input(std=[0.2] * 4), r"input spec is wrong: std must be 3 finite numbers"),
    ("input mean a string", _input(mean="123"), r"mean must be a list of 3 numbers, got '123'"),
    ("input mean NaN", _input(mean=[0.5, float("nan"), 0.5]), r"mean must be 3 finite numbers"),
    ("input std infinite", _input(std=[0.2, float("inf"), 0.2]), r"std must be 3 finite numbers"),
    ("input std zero", _input(std=[0.2, 0.0, 0.2]), r"std must be > 0 for every channel"),
    ("input std negative", _input(std=[0.2, -0.2, 0.2]), r"std must be > 0 for every channel"),
    ("input mean not numbers", _input(mean=[None, 0.5, 0.5]), r"the input spec is wrong"),
    ("input interpolation", _input(interpolation="nearest"), r"interpolation must be one of"),
]


@pytest.mark.parametrize(("breakage", "expected"), [c[1:] for c in BAD_META], ids=[c[0] for c in BAD_META])
def test_hand_edited_bundle_metadata_raises_one_line_bundle_errors(
    shapes_bundle: Path, tmp_path: Path, breakage: Callable[[Path], None], expected: str
) -> None:
    bundle = _broken_copy(shapes_bundle, tmp_path, breakage)
    with pytest.raises(BundleError, match=expected) as info:
        load_bundle(bundle)
    message = str(info.value)
    assert message.startswith(f"{bundle / META_FILE} is invalid: ") and "\n" not in message


def test_model_file_may_live_in_a_subfolder_of_the_bundle(shapes_bundle: Path, tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    shutil.copytree(shapes_bundle, bundle)
    (bundle / "onnx").mkdir()
    (bundle / "model.onnx").rename(bundle / "onnx" / "m.onnx")
    _model_file("onnx/m.onnx")(bundle)
    assert load_bundle(bundle).model_path == bundle / "onnx" / "m.onnx"


def test_pil_images_follow_the_decoders_mode_policy(predictor: Predictor) -> None:
    """A transparent RGBA pixel is composited over white and 16-bit values are scaled, for
    PIL inputs exactly as for files."""
    from lensforge.data.image import decode_image

    rgba = Image.new("RGBA", (80, 80), (255, 0, 0, 0))
    assert predictor.load(rgba).getpixel((0, 0)) == (255, 255, 255)
    sixteen = Image.fromarray(np.full((80, 80), 40000, np.uint16))
    buf = io.BytesIO()
    sixteen.save(buf, format="PNG")
    assert predictor.load(sixteen).getpixel((0, 0)) == decode_image(buf.getvalue()).getpixel((0, 0))
