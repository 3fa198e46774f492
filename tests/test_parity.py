"""``export all``: every target is written and measured against the fp32 ONNX model on the same
images; an int8 export refused by its accuracy guard is a row of the table, not a failure."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from lensforge.cli.render import print_parity as print_report
from lensforge.errors import ExportError
from lensforge.export.parity import ParityReport, export_all

ROWS = ["torch", "onnx fp32", "fp16", "int8", "triton", "torchserve"]


@pytest.fixture(scope="module")
def forced(shapes_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> ParityReport:
    return export_all(shapes_bundle, tmp_path_factory.mktemp("all") / "out", calib=16, force=True, max_drop=100)


def test_every_target_is_written_and_compared(forced: ParityReport) -> None:
    assert [r.target for r in forced.rows] == ROWS
    out = forced.out_root
    assert sorted(p.name for p in out.iterdir()) == ["fp16", "int8", "torchserve", "triton"]
    assert forced.images > 0 and forced.source.startswith("the ") and forced.metric == "accuracy"
    row = {r.target: r for r in forced.rows}
    assert row["onnx fp32"].max_abs_diff == 0.0 and row["onnx fp32"].top1_agreement == 1.0
    assert row["triton"].max_abs_diff == 0.0 and row["triton"].accuracy == row["onnx fp32"].accuracy  # the same bytes, run as Triton would
    assert row["triton"].artifact.endswith("/1/model.onnx")
    assert row["torchserve"].max_abs_diff is not None and row["torchserve"].max_abs_diff <= 1e-5
    assert row["torchserve"].top1_agreement == 1.0 and row["torchserve"].compared == "all scores"  # 4 classes: top 5 is all
    for name in ("fp16", "int8"):
        assert np.isfinite(row[name].max_abs_diff) and 0 <= row[name].top1_agreement <= 1 and row[name].note is None
    if row["torch"].note is None:  # torch and timm are installed for the training tests, so the model rebuilds
        assert row["torch"].max_abs_diff < 1e-4 and row["torch"].top1_agreement == 1.0


def test_report_serialises_and_prints(forced: ParityReport) -> None:
    d = json.loads(json.dumps(forced.to_dict()))
    assert [r["target"] for r in d["rows"]] == ROWS and d["images"] == forced.images
    console = Console(file=io.StringIO(), width=200)
    print_report(forced, console)
    text = console.file.getvalue()
    assert all(name in text for name in ROWS) and "top-1 agreement" in text and "accuracy" in text


def test_existing_targets_need_overwrite(shapes_bundle: Path, forced: ParityReport) -> None:
    with pytest.raises(ExportError, match="already exist.*pass overwrite=True"):
        export_all(shapes_bundle, forced.out_root)


def test_int8_refusal_is_a_row_not_a_failure(shapes_bundle: Path, tmp_path: Path) -> None:
    # a drop above -100 points is any drop: the guard refuses whatever int8 scores
    report = export_all(shapes_bundle, tmp_path / "out", calib=8, max_drop=-100)
    int8 = report.row("int8")
    assert int8.max_abs_diff is None and int8.artifact is None and not (tmp_path / "out" / "int8").exists()
    assert int8.note is not None and "not exported" in int8.note and "--max-drop" in int8.note
    assert report.row("triton").max_abs_diff == 0.0 and (tmp_path / "out" / "torchserve").is_dir()


def test_the_figures_that_decided_the_exports_are_reported_with_their_images(forced: ParityReport) -> None:
    # export --to all printed parity on the val images only, not the test figures that
    # decided whether int8 was kept (issue 12, item 4)
    checked = json.loads((forced.out_root / "int8" / "lensforge.json").read_text())["export"]["checked_on"]
    assert checked["split"] == "test"
    assert set(forced.decided) == {"fp16", "int8"}
    for precision, d in forced.decided.items():
        assert d["checked_on"] == checked and d["kept"] is True and isinstance(d[precision], float)
    assert forced.split == "val" and str(forced.images) in forced.source and "val" in forced.source
    d = json.loads(json.dumps(forced.to_dict()))
    assert d["decided"]["int8"]["checked_on"] == checked and d["split"] == "val"
    console = Console(file=io.StringIO(), width=200)
    print_report(forced, console)
    text = console.file.getvalue()
    assert f"Parity with the fp32 ONNX model on the {forced.images} val images" in text
    assert f"What decided the exports: accuracy on {checked['images']} test images" in text


def test_a_refused_int8_says_on_which_images(shapes_bundle: Path, tmp_path: Path) -> None:
    report = export_all(shapes_bundle, tmp_path / "out", calib=8, max_drop=-100)
    int8 = report.decided["int8"]
    assert int8["kept"] is False and int8["checked_on"]["split"] == "test" and int8["drop_points"] is not None
    console = Console(file=io.StringIO(), width=200)
    print_report(report, console)
    assert "refused" in console.file.getvalue()


def test_parity_table_carries_how_int8_was_made(tmp_path: Path) -> None:
    """The int8 row says which calibration --method auto chose, including the float first block."""
    from lensforge.export.parity import _decided  # the record reader behind ParityReport.decided

    record = {"fp32": 77.2, "int8": 78.0, "metric": "accuracy", "calibrate_method": "minmax", "float_head": False,
              "float_first_block": True, "chosen_by": "val accuracy: minmax + float first block", "unrelated": 1}
    (tmp_path / "lensforge.json").write_text(json.dumps({"export": record}))
    got = _decided(tmp_path, "int8")
    assert got["float_first_block"] is True and got["calibrate_method"] == "minmax" and got["drop_points"] == -0.8
    assert "unrelated" not in got
