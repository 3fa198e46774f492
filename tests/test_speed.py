"""lensforge.speed: the bench table, on the tiny shapes bundle and an fp16 sibling."""

from __future__ import annotations

import io
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from rich.console import Console

from lensforge.errors import BundleError, ConfigError, DataError
from lensforge.runtime.bundle import Bundle, load_bundle
from lensforge.runtime.predictor import Predictor
from lensforge.speed import (
    BenchReport,
    BenchRow,
    _accuracy,
    _Format,
    _recommend,
    _torch_eager,
    benchmark,
    generated_jpegs,
    print_report,
)

TINY = {"seconds": 0.05, "batch_sizes": (1, 4), "threads": (1,)}


@pytest.fixture(scope="module")
def fp16_bundle(shapes_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from lensforge.export.quantize import export_fp16

    return export_fp16(shapes_bundle, tmp_path_factory.mktemp("speed") / "bundle-fp16")


@pytest.fixture(scope="module")
def report(shapes_bundle: Path, fp16_bundle: Path) -> BenchReport:
    return benchmark([fp16_bundle, shapes_bundle], **TINY)  # fp32 given second: still the baseline


def test_rows_for_every_format_batch_and_mode(report: BenchReport) -> None:
    has_torch = "torch eager" in report.formats
    assert report.formats == ["fp32", "fp16"] + (["torch eager"] if has_torch else [])
    assert has_torch or any(n.startswith("torch eager: skipped") for n in report.notes)
    for fmt in report.formats:
        for batch in (1, 4):
            for mode in ("model", "e2e"):
                assert report.row(fmt, batch, 1, mode) is not None, (fmt, batch, mode)
    assert len(report.rows) == len(report.formats) * 2 * 2


def test_numbers_are_positive_finite_and_ordered(report: BenchReport) -> None:
    for r in report.rows:
        values = (r.img_s, r.p50_ms, r.p99_ms, r.batch_p50_ms, r.batch_p99_ms)
        assert all(math.isfinite(v) and v > 0 for v in values), r
        assert r.p99_ms >= r.p50_ms and r.batch_p99_ms >= r.batch_p50_ms, r
        assert r.batch_p50_ms == pytest.approx(r.p50_ms * r.batch, rel=1e-2, abs=1e-2)
        assert r.runs >= 4  # one per slice at least
    assert report.row("fp32", 1, 1, "e2e").accuracy_delta == 0.0  # type: ignore[union-attr]


def test_accuracy_comes_from_each_bundle(report: BenchReport, shapes_bundle: Path, fp16_bundle: Path) -> None:
    fp32_meta, fp16_meta = load_bundle(shapes_bundle).meta, load_bundle(fp16_bundle).meta
    assert report.row("fp32", 1, 1, "model").accuracy == round(100 * fp32_meta["metrics"]["test"]["accuracy"], 2)  # type: ignore[union-attr]
    export = fp16_meta["export"]
    fp16 = report.row("fp16", 1, 1, "model")
    assert fp16 is not None and fp16.accuracy == export["fp16"]
    assert fp16.accuracy_delta == pytest.approx(export["fp16"] - export["fp32"])  # same images, not fp32's test metric


def test_recommendation_names_a_bench_format(report: BenchReport) -> None:
    bundles = [f for f in report.formats if f != "torch eager"]
    assert any(report.recommendation.startswith(f"{f}, batch ") for f in bundles), report.recommendation
    assert "thread" in report.recommendation


def test_to_dict_is_json(report: BenchReport) -> None:
    data = json.loads(json.dumps(report.to_dict()))
    assert data["machine"] == report.machine and data["recommendation"] == report.recommendation
    assert len(data["rows"]) == len(report.rows)
    assert set(data["rows"][0]) >= {"format", "batch", "threads", "mode", "img_s", "p50_ms", "p99_ms", "accuracy"}
    assert "test split" in data["images"]  # the bundle's own held-out images were decoded


def test_print_report_renders(report: BenchReport) -> None:
    console = Console(record=True, width=180)
    print_report(report, console)
    text = console.export_text()
    assert report.machine[:30] in text
    for heading in ("format", "model img/s", "e2e p50/p99 ms", "accuracy %", "fp16", "Recommended:"):
        assert heading in text
    assert text.rstrip().splitlines()[-1].startswith("Recommended: ")


def _broken_model(tmp_path: Path, good: Path) -> Path:
    bad = tmp_path / "broken"
    shutil.copytree(good, bad)
    (bad / "model.onnx").write_bytes(b"not an onnx model")
    return bad


@pytest.mark.parametrize("breakage", ["model", "missing"])
def test_a_broken_bundle_is_a_bundle_error(shapes_bundle: Path, tmp_path: Path, breakage: str) -> None:
    bad = _broken_model(tmp_path, shapes_bundle) if breakage == "model" else tmp_path / "nowhere"
    with pytest.raises(BundleError):
        benchmark([shapes_bundle, bad], **TINY)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"batch_sizes": (0,)}, "batch sizes"),
        ({"batch_sizes": ()}, "batch sizes"),
        ({"threads": (1, -2)}, "thread counts"),
        ({"seconds": 0}, "seconds"),
        ({"seconds": float("nan")}, "seconds"),
    ],
)
def test_bad_settings_are_config_errors(shapes_bundle: Path, kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        benchmark([shapes_bundle], **{**TINY, **kwargs})


def test_no_bundles_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="at least one bundle"):
        benchmark([])


def test_given_images_are_used(shapes_bundle: Path, shapes_dir: Path) -> None:
    r = benchmark([shapes_bundle], seconds=0.01, batch_sizes=(2,), threads=(1,), images=[shapes_dir], torch_eager=False)
    assert r.images == "2 given image(s)" and len(r.rows) == 2
    assert r.recommendation.startswith("fp32, batch 2, 1 thread: ")
    assert r.notes == []


def test_unreadable_images_are_a_data_error(shapes_bundle: Path, tmp_path: Path) -> None:
    (tmp_path / "a.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match="could be read"):
        benchmark([shapes_bundle], images=[tmp_path], torch_eager=False, **TINY)


def test_generated_jpegs_are_photo_sized() -> None:
    images = generated_jpegs(2)
    assert len(images) == 2 and images[0] != images[1]
    with Image.open(io.BytesIO(images[0])) as im:
        assert (im.format, im.size) == ("JPEG", (640, 480))


# -- accuracy and the recommendation, on metadata alone ----------------------------------------


@pytest.mark.parametrize(
    ("meta", "expected"),
    [
        ({"metrics": {"test": {"accuracy": 0.875}}}, (87.5, None)),
        ({"metrics": {"val": {"accuracy": 0.5}}}, (50.0, None)),
        ({"task": "multilabel", "metrics": {"test": {"mAP": 0.9, "accuracy": 0.1}}}, (90.0, None)),
        ({"precision": "int8", "export": {"int8": 96.0, "fp32": 96.5}, "metrics": {"test": {"accuracy": 0.9}}}, (96.0, 96.5)),
        ({"precision": "fp16", "export": {"fp16": 70.0}}, (70.0, None)),
        ({"precision": "int8", "export": {"int8": None}, "metrics": {"test": {"accuracy": 0.9}}}, (90.0, None)),
        ({"metrics": {"test": {"accuracy": "high"}}}, (None, None)),
        ({"metrics": "none"}, (None, None)),
        ({}, (None, None)),
    ],
)
def test_accuracy_from_metadata(meta: dict, expected: tuple) -> None:
    assert _accuracy(Bundle(Path("b"), {"task": "classify", **meta})) == expected


def _rows(speeds: dict[tuple[str, int], float]) -> list[BenchRow]:
    return [BenchRow(f, b, 2, "e2e", s, 1.0, 1.0, float(b), float(b), 4, None, None) for (f, b), s in speeds.items()]


def _fmt(label: str, vs_fp32: float | None) -> _Format:
    return _Format(label, Bundle(Path(label), {}), None, vs_fp32)


@pytest.mark.parametrize(
    ("int8_delta", "expected"),
    [
        (-0.3, "int8, batch 8, 2 threads: 3.0× fp32 (batch 8) at −0.3 pt"),
        (0.25, "int8, batch 8, 2 threads: 3.0× fp32 (batch 8) at +0.2 pt"),
        (-1.5, "fp32, batch 8, 2 threads: 100.0 img/s end to end (no other format is within 1 pt of its accuracy)"),
        (None, "fp32, batch 8, 2 threads: 100.0 img/s end to end (no accuracy recorded for the other formats: fastest fp32)"),
    ],
)
def test_recommendation(int8_delta: float | None, expected: str) -> None:
    rows = _rows({("fp32", 1): 50.0, ("fp32", 8): 100.0, ("int8", 1): 120.0, ("int8", 8): 300.0, ("torch eager", 8): 999.0})
    formats = [_fmt("fp32", 0.0), _fmt("int8", int8_delta), _Format("torch eager", Bundle(Path("t"), {}), None, 0.0, torch=True)]
    assert _recommend(rows, formats) == expected  # torch eager is never recommended: it is not a bundle


# -- the torch eager row -----------------------------------------------------------------------


def test_torch_eager_matches_onnx(shapes_bundle: Path) -> None:
    pytest.importorskip("timm")
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    run, why_not = _torch_eager(load_bundle(shapes_bundle))
    assert run is not None, why_not
    pred = Predictor(shapes_bundle, threads=1)
    batch = np.stack([pred.prepare(im) for im in generated_jpegs(2)])
    np.testing.assert_allclose(run(batch, before), pred.run(batch), atol=1e-4)


def test_torch_eager_without_weights_is_skipped(shapes_bundle: Path, tmp_path: Path) -> None:
    copy = tmp_path / "no-weights"
    shutil.copytree(shapes_bundle, copy)
    (copy / "weights.safetensors").unlink()
    run, why_not = _torch_eager(load_bundle(copy))
    assert run is None and "weights.safetensors" in why_not


def test_bench_gives_torch_its_threads_back(shapes_bundle: Path) -> None:
    pytest.importorskip("timm")
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        r = benchmark([shapes_bundle], seconds=0.01, batch_sizes=(1,), threads=(1,))
        assert "torch eager" in r.formats, r.notes
        assert torch.get_num_threads() == 3  # it ran at 1 thread, then gave the caller's count back
    finally:
        torch.set_num_threads(before)
