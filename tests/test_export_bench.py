"""lensforge.export.bench (the `lensforge bench` command): the bench table, on the tiny shapes bundle and an fp16 sibling."""

from __future__ import annotations

import dataclasses
import importlib.util
import io
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from rich.console import Console

from lensforge.cli import main
from lensforge.cli.render import print_bench as print_report
from lensforge.errors import BundleError, ConfigError, DataError
from lensforge.runtime.bundle import Bundle, load_bundle
from lensforge.runtime.predictor import Predictor
from lensforge.export import bench
from lensforge.export.bench import (
    MODES,
    BenchReport,
    BenchRow,
    _accuracy,
    _Format,
    _not_an_export_of,
    _recommend,
    _seconds_left,
    _torch_eager,
    benchmark,
    discover_exports,
    export_places,
    generated_jpegs,
)
from lensforge.ui import Reporter

TINY = {"seconds": 0.05, "batch_sizes": (1, 4), "threads": (1,)}


@pytest.fixture(autouse=True)
def _quiet_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    """The notes a test compares do not depend on how busy the test machine is
    (test_a_busy_machine_is_reported sets the load itself)."""
    monkeypatch.setattr(bench, "load_average", lambda: None)


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
        ({"task": "detect", "metrics": {"test": {"map": 0.3, "map50": 0.625}}}, (62.5, None)),  # mAP50, not mAP
        ({"task": "detect", "metrics": {"test": {"map": 0.3}, "val": {"map50": 0.5}}}, (50.0, None)),
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


def test_a_slower_format_that_keeps_accuracy_is_not_said_to_lose_it() -> None:
    rows = _rows({("fp32", 8): 100.0, ("fp16", 8): 60.0})
    assert _recommend(rows, [_fmt("fp32", 0.0), _fmt("fp16", 0.0)]) == (
        "fp32, batch 8, 2 threads: 100.0 img/s end to end (fastest here; fp16 kept the accuracy but ran slower)")


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


# -- detectors: batch 1, Predictor.run_detector / predict, torch eager via ExportableDetector -----


@pytest.fixture(scope="module")
def detect_report(detect_bundle: Path) -> BenchReport:
    return benchmark([detect_bundle], **TINY)  # batch 4 asked: a note, not an error


def test_detector_rows_are_batch_1_model_and_e2e(detect_report: BenchReport) -> None:
    pytest.importorskip("torchvision")  # the detector fixture trained in torch: the torch row must be there
    assert detect_report.formats == ["fp32", "torch eager"], detect_report.notes
    cells = {(r.format, r.batch, r.threads, r.mode) for r in detect_report.rows}
    assert cells == {(f, 1, 1, m) for f in ("fp32", "torch eager") for m in MODES}
    for r in detect_report.rows:
        assert all(math.isfinite(v) and v > 0 for v in (r.img_s, r.p50_ms, r.p99_ms)), r
        assert r.p99_ms >= r.p50_ms and r.batch_p50_ms == r.p50_ms and r.runs >= 4, r
    assert "test split" in detect_report.images  # real images: a realistic box count


def test_detector_accuracy_is_the_recorded_test_map50(detect_report: BenchReport, detect_bundle: Path) -> None:
    map50 = load_bundle(detect_bundle).meta["metrics"]["test"]["map50"]
    assert detect_report.metric == "mAP50"
    for r in detect_report.rows:
        assert r.accuracy == round(100 * map50, 2) and r.accuracy_delta == 0.0, r


def test_detector_report_prints_note_and_recommendation(detect_report: BenchReport) -> None:
    assert detect_report.recommendation.startswith("fp32, batch 1, 1 thread: "), detect_report.recommendation
    assert detect_report.recommendation.endswith(" img/s end to end")
    console = Console(record=True, width=200)
    print_report(detect_report, console)
    text = console.export_text()
    for expected in ("mAP50 %", "torch eager", "batch sizes 4 not timed: detectors run one image per", "Recommended: fp32"):
        assert expected in text


@pytest.mark.parametrize(
    ("batch_sizes", "note"),
    [
        (None, None),  # the default: batch 1 for detectors, nothing to explain
        ((1,), None),
        ((8, 32), "batch sizes 8, 32 not timed"),
        ((1, 8, 1), "batch sizes 8 not timed"),
    ],
)
def test_detector_batch_sizes(detect_bundle: Path, batch_sizes: tuple[int, ...] | None, note: str | None) -> None:
    r = benchmark([detect_bundle], batch_sizes=batch_sizes, seconds=0.01, threads=(1,), torch_eager=False)
    assert {row.batch for row in r.rows} == {1} and len(r.rows) == len(MODES)
    assert [n[: len(note)] for n in r.notes] == ([note] if note else [])


def test_detectors_and_classifiers_are_not_mixed(shapes_bundle: Path, detect_bundle: Path) -> None:
    with pytest.raises(ConfigError, match="is a detector but .* is not \\(task 'classify'\\)"):
        benchmark([shapes_bundle, detect_bundle], **TINY)


def test_torch_eager_detector_matches_onnx(detect_bundle: Path) -> None:
    pytest.importorskip("torchvision")
    run, why_not = _torch_eager(load_bundle(detect_bundle))
    assert run is not None, why_not
    pred = Predictor(detect_bundle, threads=1)
    x = pred.prepare(generated_jpegs(1)[0])  # 640×480 → the model's size: boxes in input pixels
    (tb, ts, tl), (ob, os_, ol) = run(x, 1), pred.run_detector(x)
    assert len(ob) > 0 and tb.shape == ob.shape  # the tiny detector still proposes boxes
    np.testing.assert_allclose(tb, ob, atol=1e-2)
    np.testing.assert_allclose(ts, os_, atol=1e-4)
    np.testing.assert_array_equal(tl, ol)
    assert tl.dtype == ol.dtype == np.int64


def _no_torchvision(monkeypatch: pytest.MonkeyPatch, bundle: Path, tmp_path: Path) -> Path:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torchvision" else real(name, *a))
    return bundle


def _no_weights(monkeypatch: pytest.MonkeyPatch, bundle: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "no-weights"
    shutil.copytree(bundle, copy)
    (copy / "weights.safetensors").unlink()
    return copy


def _no_config(monkeypatch: pytest.MonkeyPatch, bundle: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "no-config"
    shutil.copytree(bundle, copy)
    meta = json.loads((copy / "lensforge.json").read_text())
    del meta["config"]
    (copy / "lensforge.json").write_text(json.dumps(meta))
    return copy


@pytest.mark.parametrize(
    ("breakage", "why_not"),
    [(_no_torchvision, "torchvision not installed"), (_no_weights, "weights.safetensors"), (_no_config, "training config")],
)
def test_torch_eager_detector_is_skipped_with_a_reason(
    detect_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, breakage: object, why_not: str
) -> None:
    bundle = breakage(monkeypatch, detect_bundle, tmp_path)  # type: ignore[operator]
    run, reason = _torch_eager(load_bundle(bundle))
    assert run is None and why_not in reason


def test_cli_bench_detector(detect_bundle: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["bench", str(detect_bundle), "--seconds", "0.05", "--threads", "1", "--batch-sizes", "1,8",
                 "--no-torch", "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    report = json.loads(out)
    assert {(r["format"], r["batch"], r["mode"]) for r in report["rows"]} == {("fp32", 1, "model"), ("fp32", 1, "e2e")}
    assert report["metric"] == "mAP50" and report["recommendation"].startswith("fp32, batch 1, 1 thread: ")
    assert any(n.startswith("batch sizes 8 not timed") for n in report["notes"])


# -- what export made is found and compared (issue 12) ------------------------------------------


@pytest.fixture(scope="module")
def run_with_exports(shapes_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run directory: its bundle, a real fp16 export where ``export --to all`` writes it
    (exports/fp16), and in bundle-int8 an int8 export of another model (other classes)."""
    from lensforge.export.quantize import export_fp16

    run = tmp_path_factory.mktemp("run-with-exports")
    shutil.copytree(shapes_bundle, run / "bundle")
    export_fp16(run / "bundle", run / "exports" / "fp16")
    shutil.copytree(run / "exports" / "fp16", run / "bundle-int8")
    meta = json.loads((run / "bundle-int8" / "lensforge.json").read_text())
    meta.update(precision="int8", classes=["cat", "dog", "fox", "owl"], export={"int8": 99.0, "fp32": 99.0})
    (run / "bundle-int8" / "lensforge.json").write_text(json.dumps(meta))
    return run / "bundle"


def test_bench_finds_the_exports_of_the_bundle(run_with_exports: Path) -> None:
    r = benchmark([run_with_exports], torch_eager=False, **TINY)
    assert r.formats == ["fp32", "fp16"], r.notes
    fp16 = r.row("fp16", 1, 1, "e2e")
    assert fp16 is not None and fp16.accuracy == load_bundle(run_with_exports.parent / "exports" / "fp16").meta["export"]["fp16"]
    assert any(n.startswith("exports of bundle found and compared: exports/fp16") for n in r.notes), r.notes
    assert any(n.startswith("bundle-int8 left out: its task and classes are not the bundle's") for n in r.notes), r.notes
    assert r.recommendation.startswith(("fp32, batch", "fp16, batch"))  # chosen across both


def test_no_discover_benches_only_the_bundles_given(run_with_exports: Path) -> None:
    r = benchmark([run_with_exports], torch_eager=False, discover=False, seconds=0.01, batch_sizes=(1,), threads=(1,))
    assert r.formats == ["fp32"] and r.notes == []


def test_an_export_given_and_found_is_benched_once(run_with_exports: Path) -> None:
    fp16 = run_with_exports.parent / "exports" / "fp16"
    r = benchmark([run_with_exports, fp16], torch_eager=False, seconds=0.01, batch_sizes=(1,), threads=(1,))
    assert r.formats == ["fp32", "fp16"]


def test_cli_bench_finds_exports_unless_told_not_to(run_with_exports: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["bench", str(run_with_exports), "--seconds", "0.01", "--threads", "1", "--batch-sizes", "1", "--no-torch", "--json"]
    for extra, formats in (([], {"fp32", "fp16"}), (["--no-discover"], {"fp32"})):
        assert main(argv + extra) == 0
        assert {row["format"] for row in json.loads(capsys.readouterr().out)["rows"]} == formats


def test_export_places_are_where_export_writes(tmp_path: Path) -> None:
    bundle = tmp_path / "run" / "bundle"
    assert export_places(bundle) == [tmp_path / "run" / "bundle-fp16", tmp_path / "run" / "bundle-int8",
                                     tmp_path / "run" / "exports" / "fp16", tmp_path / "run" / "exports" / "int8"]


SOURCE = Path("/runs/a/bundle")
THIS = {"task": "classify", "classes": ["a", "b"], "input": {"size": 64}}
EXPORT = {**THIS, "precision": "int8", "export": {"int8": 90.0}, "source_bundle": str(SOURCE)}


@pytest.mark.parametrize(
    ("meta", "why_not"),
    [
        (EXPORT, None),
        ({**EXPORT, "precision": "fp16"}, None),
        ({**EXPORT, "precision": "fp32"}, "not an fp16/int8 export"),
        ({k: v for k, v in EXPORT.items() if k != "export"}, "not an fp16/int8 export"),
        ({**EXPORT, "source_bundle": "/runs/b/bundle"}, "exported from /runs/b/bundle, not from /runs/a/bundle"),
        ({k: v for k, v in EXPORT.items() if k != "source_bundle"}, "exported from an unknown bundle"),
        ({**EXPORT, "classes": ["a", "c"]}, "its task and classes are not the bundle's"),
        ({**EXPORT, "input": {"size": 96}}, "its input settings are not the bundle's"),
    ],
)
def test_what_counts_as_an_export_of_the_bundle(meta: dict, why_not: str | None) -> None:
    reason = _not_an_export_of(Bundle(Path("/runs/a/bundle-int8"), meta), Bundle(SOURCE, THIS))
    assert reason == why_not if why_not is None else reason is not None and reason.startswith(why_not)


def test_a_moved_run_still_finds_its_exports_by_their_weights(run_with_exports: Path, tmp_path: Path) -> None:
    moved = tmp_path / "moved"
    shutil.copytree(run_with_exports.parent, moved)  # source_bundle still names the old place
    found, notes = discover_exports(moved / "bundle")
    assert [b.path for b in found] == [moved / "exports" / "fp16"], notes


# -- the time it takes, and a busy machine -----------------------------------------------------


class _Recorder(Reporter):
    def __init__(self) -> None:
        self.steps: list[str] = []
        self.warnings: list[str] = []

    def step(self, message: str) -> None:
        self.steps.append(message)

    def warn(self, message: str) -> None:
        self.warnings.append(message)


def test_the_estimate_is_said_again_after_the_first_batch_size(shapes_bundle: Path) -> None:
    ui = _Recorder()
    benchmark([shapes_bundle], seconds=0.01, batch_sizes=(1, 2), threads=(1,), torch_eager=False, discover=False, reporter=ui)
    again = [s for s in ui.steps if s.startswith("batch 1 × 1 thread(s) took ")]
    assert len(again) == 1 and again[0].endswith("s more for the other 2 cells"), ui.steps


def test_a_model_slower_than_the_budget_is_estimated_by_its_runs() -> None:
    # 0.5 s per image at batch 8 = 4 s a call: 1 warm-up + 4 bursts of one call (+ pauses), not 0.1 s
    left = _seconds_left([(1, 8, "model")], ["fp32"], {("fp32", "model"): 0.5}, seconds=0.1)
    assert left == pytest.approx(4 + 4 * (bench.SWITCH_PAUSE + 4))
    # 8 ms a call: each burst runs its 0.5 s budget (and half a call past it, on average)
    timed = _seconds_left([(1, 8, "e2e")], ["fp32"], {("fp32", "e2e"): 1e-3}, seconds=2.0)
    assert timed == pytest.approx(0.008 + 4 * (bench.SWITCH_PAUSE + 0.5 + 0.004))
    # 80 µs a call: a burst stops at MAX_RUNS / 4 = 100 calls, long before its budget
    capped = _seconds_left([(1, 8, "e2e")], ["fp32"], {("fp32", "e2e"): 1e-5}, seconds=2.0)
    assert capped == pytest.approx(8e-5 + 4 * (bench.SWITCH_PAUSE + 100 * 8e-5))
    # measured on 4 threads, the 1-thread cell is expected to take up to 4 times as long a call
    one = _seconds_left([(1, 8, "model")], ["fp32"], {("fp32", "model"): 0.125}, seconds=0.1, measured_threads=4)
    assert one == pytest.approx(4 + 4 * (bench.SWITCH_PAUSE + 4))


@pytest.mark.parametrize(("load", "busy"), [(1e6, True), (0.0, False), (None, False)])
def test_a_busy_machine_is_reported(shapes_bundle: Path, monkeypatch: pytest.MonkeyPatch, load: float | None, busy: bool) -> None:
    monkeypatch.setattr(bench, "load_average", lambda: load)
    ui = _Recorder()
    r = benchmark([shapes_bundle], seconds=0.01, batch_sizes=(1,), threads=(1,), torch_eager=False, discover=False, reporter=ui)
    said = [n for n in r.notes if n.startswith("the machine is busy (load average")]
    assert bool(said) is busy and bool(ui.warnings) is busy, (r.notes, ui.warnings)


# -- one image set per comparison (issue 12, item 4) -------------------------------------------


def _b(name: str, meta: dict) -> Bundle:
    return Bundle(Path(name), {"task": "classify", "classes": ["a", "b"], **meta})


def test_figures_from_different_images_are_not_compared() -> None:
    # the report that started it: fp16 96.9 % from a 32-image val check beside fp32 78.2 % on 500 test images
    fp32 = _b("fp32", {"metrics": {"test": {"accuracy": 0.782, "n": 500}}})
    fp16 = _b("fp16", {"precision": "fp16", "export": {"fp16": 96.9, "checked_on": "32 images of the val split"}})
    base, half = bench._formats([fp16, fp32])  # no saved split here: nothing to score again
    assert (base.label, base.accuracy, base.on) == ("fp32", 78.2, "500 test images")
    assert (half.accuracy, half.on, half.vs_fp32) == (96.9, None, None)  # was +18.7


def test_figures_from_the_same_images_are_compared() -> None:
    fp32 = _b("fp32", {"metrics": {"test": {"accuracy": 0.8, "n": 80}}})
    int8 = _b("int8", {"precision": "int8",
                       "export": {"int8": 79.0, "fp32": 80.0, "checked_on": {"split": "test", "images": 80, "of": 80}}})
    base, eight = bench._formats([fp32, int8])
    assert base.on == eight.on == "80 test images" and eight.vs_fp32 == -1.0


def test_bench_scores_every_format_on_the_same_images_when_records_differ(
    shapes_bundle: Path, fp16_bundle: Path, tmp_path: Path
) -> None:
    old = tmp_path / "bundle-fp16"
    shutil.copytree(fp16_bundle, old)
    meta = json.loads((old / "lensforge.json").read_text())
    meta["export"].update(fp16=99.9, fp32=99.9, checked_on="32 images of the val split")  # an older, smaller check
    (old / "lensforge.json").write_text(json.dumps(meta))
    r = benchmark([shapes_bundle, old], torch_eager=False, discover=False, **TINY)
    fp32_meta = load_bundle(shapes_bundle).meta["metrics"]["test"]
    assert r.accuracy_on == f"{fp32_meta['n']} test images"
    fp32, fp16 = (r.row(f, 1, 1, "model") for f in ("fp32", "fp16"))
    assert fp32.accuracy == round(100 * fp32_meta["accuracy"], 2)  # the Predictor on the saved test split, again
    assert fp16.accuracy != 99.9 and fp16.accuracy_on == fp32.accuracy_on == r.accuracy_on
    assert fp16.accuracy_delta == pytest.approx(fp16.accuracy - fp32.accuracy)
    console = Console(record=True, width=200)
    print_report(r, console)
    assert f"every row on the same {r.accuracy_on}" in console.export_text()


def test_rows_from_different_images_say_which_in_the_table(report: BenchReport) -> None:
    rows = [dataclasses.replace(x, accuracy_on="8 test images" if x.format == "fp32" else "32 val images") for x in report.rows]
    mixed = dataclasses.replace(report, rows=rows, accuracy_on=None)
    for width in (200, 80):  # the wide table and the narrow layout's accuracy table
        console = Console(record=True, width=width)
        print_report(mixed, console)
        text = console.export_text()
        assert "32 val images" in text and "8 test images" in text and "each row on its own images" in text
