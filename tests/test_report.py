"""The HTML run report (lensforge.report): written by train and evaluate, self-contained,
escaped, with error analysis that agrees with the metrics; rendered in real headless Chromium
(Debian's chromium + chromium-driver, `make browser`) with no console error and no request
leaving the file."""

from __future__ import annotations

import csv
import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from lensforge import report
from lensforge.cli import main
from lensforge.report import ReportError, confused_pairs, locate, write_report
from lensforge.ui import Reporter
from serving import headless_chromium

EVIL = "<script>alert(1)</script>"


class Warnings(Reporter):
    def __init__(self) -> None:
        self.warnings: list[str] = []

    def warn(self, message: str) -> None:
        self.warnings.append(message)


def img_sources(page: str) -> list[str]:
    return re.findall(r"<img [^>]*src=\"([^\"]*)\"", page)


def assert_self_contained(page: str) -> None:
    assert "http://" not in page and "https://" not in page
    assert "<script" not in page.lower() and "<link" not in page.lower()  # no script, no stylesheet to fetch
    sources = img_sources(page)
    assert sources and all(s.startswith(("data:image/png;base64,", "data:image/jpeg;base64,")) for s in sources)


@pytest.fixture(scope="module")
def evil_run(shapes_run: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the shapes run whose first class is called ``<script>alert(1)</script>``."""
    run = tmp_path_factory.mktemp("evil") / "run"
    shutil.copytree(shapes_run.run_dir, run, ignore=shutil.ignore_patterns("checkpoints", "*.onnx", "*.safetensors"))
    meta = json.loads((run / "bundle" / "lensforge.json").read_text())
    old = meta["classes"][0]
    meta["classes"][0] = EVIL
    (run / "bundle" / "lensforge.json").write_text(json.dumps(meta))
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    metrics["per_class"][0]["class"] = EVIL
    (run / "eval" / "metrics.json").write_text(json.dumps(metrics))
    with (run / "eval" / "predictions.csv").open(newline="") as f:
        rows = list(csv.reader(f))
    with (run / "eval" / "predictions.csv").open("w", newline="") as f:
        csv.writer(f).writerows([rows[0]] + [[EVIL if v == old else v for v in row] for row in rows[1:]])
    return run


# -- written by train and evaluate, self-contained ---------------------------------------------

def test_train_writes_a_self_contained_report(shapes_run: Any) -> None:
    page = (Path(shapes_run.run_dir) / "report.html").read_text(encoding="utf-8")
    assert_self_contained(page)
    for title in ("Dataset", "Configuration", "Training", "Final metrics", "Plots", "Error analysis",
                  "Export parity", "Environment"):
        assert f"<h2>{title}</h2>" in page
    # the plots of eval/ and the training curves are all inlined
    assert page.count("<figure><img") == 3  # training curves, confusion matrix, per-class F1
    assert "Most confused class pairs" in page and "efficientnet_lite0" in page


def test_detector_report_is_self_contained_and_its_errors_agree_with_the_metrics(detect_run: Any) -> None:
    run = Path(detect_run.run_dir)
    page = (run / "report.html").read_text(encoding="utf-8")
    assert_self_contained(page)
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    counted = metrics["at_threshold"]
    # the false positives and missed boxes the report finds (from predictions.csv and the saved
    # split) are exactly those the metrics counted at the tuned threshold
    assert f"{counted['fp']} false positives, {counted['fn']} missed boxes over {metrics['n']} images" in page
    for plot in ("Per-class average precision", "F-beta against the score threshold", "Precision-recall curves"):
        assert f"<figcaption>{plot}</figcaption>" in page
    if counted["fp"] or counted["fn"]:
        assert 'class="card wide"><img src="data:image/jpeg' in page  # errors drawn on their images


def test_multilabel_report_shows_the_worst_label_sets(multilabel_run: Any) -> None:
    page = (Path(multilabel_run.run_dir) / "report.html").read_text(encoding="utf-8")
    assert_self_contained(page)
    with (Path(multilabel_run.run_dir) / "eval" / "predictions.csv").open() as f:
        rows = list(csv.DictReader(f))
    wrong = [r for r in rows if set(filter(None, r["true"].split(";"))) != set(filter(None, r["predicted"].split(";")))]
    assert (f"{len(wrong)} of {len(rows)} images wrong." in page) if wrong else "No mistakes" in page
    assert "<figcaption>Precision-recall curves</figcaption>" in page
    assert "Most confused class pairs" not in page  # no confusion matrix for several labels per image


def test_report_command_rewrites_from_the_run_alone(shapes_run: Any, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "sub" / "r.html"
    assert main(["report", str(shapes_run.run_dir), "--out", str(out)]) == 0
    page = out.read_text(encoding="utf-8")
    assert_self_contained(page)
    with (Path(shapes_run.run_dir) / "eval" / "predictions.csv").open() as f:
        rows = list(csv.DictReader(f))
    wrong = [r for r in rows if r["correct"] == "0"]
    assert f"{len(wrong)} of {len(rows)} images wrong." in page
    assert page.count('<figure class="card">') == min(len(wrong), report.MAX_MISTAKES)
    assert not list(out.parent.glob(".*.tmp"))


def test_evaluate_writes_the_report_beside_its_out_dir(shapes_bundle: Path, shapes_dir: Path, tmp_path: Path) -> None:
    from lensforge.evaluation import evaluate

    res = evaluate(shapes_bundle, shapes_dir, out_dir=tmp_path / "ev", reporter=Warnings())
    page = (tmp_path / "ev" / "report.html").read_text(encoding="utf-8")
    assert_self_contained(page)
    assert f"{res.metrics['accuracy']:.4g}" in page


def test_a_failing_report_warns_and_evaluation_still_succeeds(shapes_bundle: Path, shapes_dir: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from lensforge.evaluation import evaluate

    def broken(*_: Any, **__: Any) -> str:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(report, "render", broken)
    ui = Warnings()
    res = evaluate(shapes_bundle, shapes_dir, out_dir=tmp_path / "ev", reporter=ui)
    assert (tmp_path / "ev" / "metrics.json").is_file() and res.metrics["n"] > 0
    assert not (tmp_path / "ev" / "report.html").exists() and not list((tmp_path / "ev").glob(".*.tmp"))
    assert len(ui.warnings) == 1 and "disk on fire" in ui.warnings[0] and "lensforge report" in ui.warnings[0]


# -- user strings are escaped ------------------------------------------------------------------

def test_class_names_are_escaped(evil_run: Path) -> None:
    page = write_report(evil_run).read_text(encoding="utf-8")
    assert EVIL not in page and "<script" not in page.lower()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert_self_contained(page)


# -- bad input ---------------------------------------------------------------------------------

def test_not_a_run_is_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "notes.txt").write_text("hi")
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "not a lensforge run directory" in err and len(err.splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]  # nothing written


def test_a_run_without_test_metrics_is_refused_and_nothing_is_written(evil_run: Path, tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    shutil.copytree(evil_run, run, ignore=shutil.ignore_patterns("eval", "report.html"))
    with pytest.raises(ReportError, match="no test metrics"):
        locate(run)
    assert main(["report", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert "no test metrics" in err and "lensforge evaluate" in err and len(err.splitlines()) == 1
    assert not (run / "report.html").exists() and not list(run.glob(".*.tmp"))


def test_two_runs_compare_side_by_side(shapes_run: Any, evil_run: Path, tmp_path: Path) -> None:
    b = tmp_path / "b"
    shutil.copytree(evil_run, b)
    metrics = json.loads((b / "eval" / "metrics.json").read_text())
    metrics["accuracy"] = metrics["accuracy"] + 0.125
    (b / "eval" / "metrics.json").write_text(json.dumps(metrics))
    cfg = (b / "config.yaml").read_text()
    (b / "config.yaml").write_text(cfg.replace("  seed: 0\n", "  seed: 7\n"))
    out = tmp_path / "cmp.html"
    assert main(["report", str(shapes_run.run_dir), str(b), "--out", str(out)]) == 0
    page = out.read_text(encoding="utf-8")
    assert_self_contained(page)
    assert re.search(r"<td>accuracy</td><td>[0-9.]+</td><td>[0-9.]+</td><td>\+0\.125</td>", page)
    assert re.search(r"<td>seed</td><td>0</td><td>7</td>", page)  # the config diff
    assert "&lt;script&gt;" in page and "<script" not in page
    assert "<figcaption>run and b per epoch</figcaption>" in page  # curves overlaid


def test_report_takes_at_most_two_runs(shapes_run: Any, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", *[str(shapes_run.run_dir)] * 3]) == 2
    assert "one run, or two to compare" in capsys.readouterr().err


@pytest.mark.parametrize(("matrix", "expected"), [
    ([[2, 0], [0, 3]], []),
    ([[1, 3], [1, 4]], [("a", "b", 3, 0.75), ("b", "a", 1, 0.2)]),
    ([[0, 1, 1], [0, 2, 0], [2, 0, 0]], [("c", "a", 2, 1.0), ("a", "b", 1, 0.5), ("a", "c", 1, 0.5)]),
])
def test_confused_pairs(matrix: list[list[int]], expected: list[tuple[str, str, int, float]]) -> None:
    assert confused_pairs(np.asarray(matrix), ["a", "b", "c"][: len(matrix)]) == expected


# -- in a real browser -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    yield from headless_chromium(tmp_path_factory.mktemp("chromium-profile"), logs=True)


@pytest.mark.slow
@pytest.mark.parametrize("which", ["shapes_run", "detect_run", "evil_run"])
def test_report_renders_offline_in_chromium(browser: Any, which: str, request: pytest.FixtureRequest) -> None:
    run = request.getfixturevalue(which)
    run_dir = Path(run if isinstance(run, Path) else run.run_dir)
    page = write_report(run_dir)
    browser.get_log("browser"), browser.get_log("performance")  # drop what earlier pages left
    browser.get(page.resolve().as_uri())
    assert browser.execute_script("return document.readyState") == "complete"
    broken = browser.execute_script(
        "return Array.from(document.images).filter(i => !(i.complete && i.naturalWidth > 0)).length")
    assert broken == 0 and browser.execute_script("return document.images.length") >= 3
    assert browser.execute_script("return document.querySelectorAll('script').length") == 0
    assert [e for e in browser.get_log("browser") if e["level"] in ("SEVERE", "WARNING")] == []
    sent = [json.loads(e["message"])["message"] for e in browser.get_log("performance")]
    sent = [m["params"] for m in sent if m.get("method") == "Network.requestWillBeSent"]
    assert not [p["request"]["url"] for p in sent if p["request"]["url"].startswith(("http", "ws", "ftp"))]
    # the page's own requests: itself and its inlined images (chrome:// pages of the browser are not its)
    own = [p["request"]["url"] for p in sent if p.get("documentURL") == page.resolve().as_uri()]
    assert own and all(u.startswith(("data:", "file:")) for u in own)
    if which == "evil_run":  # the name shows as text, never runs
        assert EVIL in browser.find_element("css selector", "section#dataset").text
    height = browser.execute_script("return document.body.scrollHeight")
    browser.set_window_size(1280, min(height + 40, 8000))
    shot = Path("/tmp") / f"lensforge-report-{which}.png"
    browser.save_screenshot(str(shot))  # to look at after a run
    browser.set_window_size(1280, 1000)
    assert shot.stat().st_size > 20_000
