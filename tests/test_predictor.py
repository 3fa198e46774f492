"""The Predictor: any image source gives the same scores, batches equal single images, bad
images and bad bundles fail with clear errors, and serving never imports torch."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lensforge.errors import BundleError, ImageError
from lensforge.runtime import ClassificationResult, Predictor
from lensforge.runtime.predictor import image_paths


@pytest.fixture(scope="module")
def predictor(shapes_bundle: Path) -> Predictor:
    return Predictor(shapes_bundle)


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
    paths = image_paths([folder])
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
    bundle = tmp_path / "bundle"
    shutil.copytree(shapes_bundle, bundle)
    breakage(bundle)
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
