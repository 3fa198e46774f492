"""lensforge.cli.render at 80 columns: no table cuts a class name, a format name or a header
("black-k…" for both black-king and black-knight); detection rows of a class with no ground
truth say n/a, and the detection plots still draw."""

from __future__ import annotations

import io
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from lensforge.cli import render
from lensforge.data.inspect import inspect_dataset
from lensforge.data.records import Dataset, Record
from lensforge.export.bench import BenchReport, BenchRow
from lensforge.metrics.classification import multilabel_metrics, single_label_metrics
from lensforge.metrics.detection import detection_metrics
from lensforge.runtime.results import DetectionResult

LONG = "white-queen-side-rook-on-its-home-square"  # 40 characters, no space to wrap at
NAMES = ["black-king", "black-knight", LONG]
assert len(LONG) == 40


def draw(fn: Callable[..., None], *args: object, width: int = 80, **kwargs: object) -> str:
    console = Console(width=width, record=True, color_system=None, file=io.StringIO())
    fn(*args, console=console, **kwargs)
    text = console.export_text()
    assert max(len(line) for line in text.splitlines()) <= width, text  # nothing drawn past the edge
    return text


def column_texts(text: str) -> list[str]:
    """Each table column's cells joined top to bottom without spaces, so a name folded onto the
    next line reads whole again ("black-kni" + "ght"), while an ellipsised one ("black-k…") does not."""
    columns: dict[int, list[str]] = {}
    for line in text.splitlines():
        cells = re.split(r"[│┃]", line)
        if len(cells) < 3:
            continue
        for i, cell in enumerate(cells):
            columns.setdefault(i, []).append(cell.strip())
    # folded at a character ("black-kni" + "ght") or wrapped at a space ("torch" + "eager")
    return [sep.join(parts) for parts in columns.values() for sep in ("", " ")]


def assert_whole(text: str, *names: str) -> None:
    joined = column_texts(text)
    for name in names:
        assert name in text or any(name in col for col in joined), f"{name!r} is cut in:\n{text}"
    assert "…" not in text, text


# -- data inspect ------------------------------------------------------------------------------


def _images(tmp_path: Path, make_image: Callable[..., Path], n: int) -> list[Path]:
    return [make_image(tmp_path / f"{i}.png", size=(40, 36)) for i in range(n)]


def test_inspect_classification_at_80_columns(tmp_path: Path, make_image: Callable[..., Path]) -> None:
    paths = _images(tmp_path, make_image, 18)
    records = [Record(p, (i % 3,), ("train", "val", "test")[i // 6]) for i, p in enumerate(paths)]
    report = inspect_dataset(Dataset(tmp_path, NAMES, records, fmt="split-folders"), verify=False)
    text = draw(render.print_inspection, report)
    assert_whole(text, *NAMES, "class", "train", "val", "test", "total")


def test_inspect_detection_at_80_columns(tmp_path: Path, make_image: Callable[..., Path]) -> None:
    paths = _images(tmp_path, make_image, 18)
    box = (2.0, 2.0, 20.0, 20.0)
    records = [Record(p, (i % 3,), ("train", "val", "test")[i // 6], boxes=(box,)) for i, p in enumerate(paths)]
    report = inspect_dataset(Dataset(tmp_path, NAMES, records, task="detect", fmt="coco"), verify=False)
    wide = draw(render.print_inspection, report, width=200)
    assert re.search(r"│ black-knight\s*│\s+2 │\s+2 │\s+2 │", wide), wide  # a column pair per split
    text = draw(render.print_inspection, report)
    assert_whole(text, *NAMES, "class", "split", "images", "boxes", "train", "val", "test", "total", "no boxes")
    table = text[text.index("Images / boxes per class"):text.index("boxes per image")]
    assert re.search(r"│ black-knight\s*│ train\s*│\s+2 │\s+2 │", table), table  # the tall layout, counts intact


# -- evaluate, predict -------------------------------------------------------------------------


def test_evaluate_classification_per_class_at_80_columns() -> None:
    y = np.array([0, 1, 2, 0, 1, 2])
    scores = np.eye(3)[[0, 1, 2, 1, 1, 2]].astype(np.float32)
    text = draw(render.print_classification, single_label_metrics(y, scores, NAMES), "classify")
    assert_whole(text, *NAMES, "class", "support", "precision", "recall", "F1")


def test_evaluate_multilabel_per_label_at_80_columns() -> None:
    y = np.array([[1, 0, 1], [0, 1, 1], [1, 1, 0], [0, 0, 1]])
    scores = np.array([[0.9, 0.2, 0.7], [0.1, 0.8, 0.6], [0.7, 0.6, 0.3], [0.2, 0.3, 0.9]], np.float32)
    text = draw(render.print_classification, multilabel_metrics(y, scores, np.full(3, 0.5), NAMES), "multilabel")
    assert_whole(text, *NAMES, "label", "support", "precision", "recall", "F1", "AP", "threshold")


def _det(boxes: list[tuple[float, ...]], labels: list[int], scores: list[float] | None = None) -> DetectionResult:
    return DetectionResult(np.array(boxes, np.float32).reshape(-1, 4), np.array(scores or [], np.float32),
                           np.array(labels, np.int64), tuple(NAMES), image_size=(100, 100))


A, B, FAR = (10.0, 10.0, 40.0, 40.0), (50.0, 50.0, 90.0, 90.0), (0.0, 60.0, 20.0, 99.0)


def _detection() -> object:
    """black-king and black-knight in the ground truth; LONG only among the predictions (one
    false positive): its precision, recall, F-beta and AP have no ground truth to be measured on."""
    records = [Record(Path("/img/a.jpg"), (0, 1), boxes=(A, B), size=(100, 100)),
               Record(Path("/img/b.jpg"), (1,), boxes=(A,), size=(100, 100))]
    results = [_det([A, B, FAR], [0, 1, 2], [0.9, 0.8, 0.7]), _det([A], [1], [0.6])]
    return detection_metrics(records, results, NAMES, threshold=0.5)


def test_detection_per_class_at_80_columns_says_n_a_without_ground_truth() -> None:
    m = _detection()
    row = {r["class"]: r for r in m.per_class}[LONG]  # type: ignore[attr-defined]
    assert (row["support"], row["fp"]) == (0, 1)
    assert row["precision"] is row["recall"] is row["fbeta"] is row["ap"] is row["ap50"] is None
    text = draw(render.print_detection, m)
    assert_whole(text, *NAMES, "class", "boxes", "AP", "AP50", "precision", "recall", "F2")
    lines = [line for line in text.splitlines() if "│" in line]
    cells = [c.strip() for c in next(line for line in lines if "white-queen" in line or "n/a" in line).split("│")]
    assert cells.count("n/a") == 5 and "0.000" not in cells, text  # AP, AP50, precision, recall, F2


def test_detection_plots_draw_a_class_without_ground_truth(tmp_path: Path) -> None:
    from lensforge.metrics import detection_plots as dp

    data = _detection().to_dict()  # type: ignore[attr-defined]
    for path in (dp.plot_detection_pr_curves(data, tmp_path / "pr.png"), dp.plot_ap_bars(data, tmp_path / "ap.png"),
                 dp.plot_fbeta_curve(data, tmp_path / "fbeta.png")):
        assert Path(path).stat().st_size > 1000


def test_predict_at_80_columns() -> None:
    rows = [{"path": f"/data/photos/{name}/img_0001.jpg", "labels": [name],
             "top": [{"label": name, "score": 0.9}, {"label": NAMES[0], "score": 0.05}]} for name in NAMES]
    text = draw(render.print_predictions, rows, detector=False, top=2, show=10, seconds=1.0, failed=0, annotate_dir=None)
    assert_whole(text, *NAMES, *(r["path"] for r in rows), "image", "prediction", "top 2")
    found = [{"path": "/data/x.jpg", "detections": [{"label": n, "score": 0.5, "box": [0, 0, 1, 1]} for n in NAMES]}]
    text = draw(render.print_predictions, found, detector=True, top=3, show=10, seconds=1.0, failed=0, annotate_dir=None)
    assert_whole(text, *NAMES, "image", "objects found", "best 3")


# -- bench -------------------------------------------------------------------------------------


def _bench(formats: list[str]) -> BenchReport:
    rows = [BenchRow(f, b, t, mode, 1234.5, 1.0, 2.0, 12.3 * b, 45.6 * b, 40, 97.5, -0.3 if f != "fp32" else 0.0)
            for f in formats for t in (2, 1) for b in (1, 8) for mode in ("model", "e2e")]
    return BenchReport(rows, "AMD EPYC 7B13 (2 threads, AVX2)", "int8, batch 8, 2 threads: 1.9× fp32 (batch 8) at −0.3 pt")


BENCH_HEADERS = ("format", "batch", "threads", "img/s", "p50/p99 ms", "accuracy %", "Δ pt")


@pytest.mark.parametrize("formats", [["fp32", "fp16", "int8", "torch eager"], ["fp32", "int8 (bundle-int8-calibrated-on-val)"]])
def test_bench_at_80_columns(formats: list[str]) -> None:
    text = draw(render.print_bench, _bench(formats))
    assert_whole(text, *formats, *BENCH_HEADERS, "model", "e2e", "1,234.5", "12.3 / 45.6", "97.5", "−0.3")
    assert "Recommended: int8" in text


def test_bench_wide_console_keeps_modes_side_by_side() -> None:
    text = draw(render.print_bench, _bench(["fp32", "int8"]), width=200)
    assert_whole(text, "model img/s", "model p50/p99 ms", "e2e img/s", "e2e p50/p99 ms", "accuracy %")
    assert len([line for line in text.splitlines() if line.startswith("│ int8")]) == 4  # one line per batch × threads


def test_the_run_summary_says_which_images_and_runtime_each_figure_comes_from() -> None:
    # the summary's val accuracy (ONNX) and the epoch table's (torch) read as two answers to one
    # question (issue 12, item 4): each now says its images and runtime, and the best epoch is named
    from types import SimpleNamespace

    rng = np.random.default_rng(0)
    y = np.arange(64) % 4
    val = single_label_metrics(y, rng.dirichlet(np.ones(4), 64).astype(np.float32), ["a", "b", "c", "d"])
    history = [{"epoch": e, "epochs": 4, "val_acc": a, "best": b}
               for e, a, b in ((1, 0.28, True), (2, 0.59, True), (3, 0.55, False), (4, 0.50, False))]
    result = SimpleNamespace(bundle_dir=Path("runs/x/bundle"), run_dir=Path("runs/x"), parity=1e-6,
                             metrics={"val": val}, skipped_images=0, seconds=3.0, history=history)
    text = " ".join(draw(render.print_summary, result, width=200).split())
    assert "val metrics accuracy" in text and "(64 images, the bundle's ONNX model, ONNX Runtime)" in text
    assert "best epoch epoch 2 of 4: val_acc 0.590 (torch, in training, 64 val images; the bundle holds these weights)" in text
    probe = SimpleNamespace(**{**vars(result), "history": []})
    assert "best epoch" not in draw(render.print_summary, probe, width=200)  # a linear probe has no epochs
