"""Per-box maps for detectors: EigenCAM (grad-cam) on the FPN, restricted to each box, drawn
by ``lensforge explain DETECTOR_BUNDLE IMAGE``; the boxes are the Predictor's own."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lensforge.cli import main
from lensforge.errors import ConfigError, ModelError
from lensforge.explain.detect import DetectionExplainer, fpn_reshape
from lensforge.runtime import Predictor


@pytest.fixture(scope="module")
def image(detect_dir: Path) -> Path:
    return sorted(detect_dir.rglob("*.jpg"))[0]


def test_boxes_are_the_predictors_and_each_map_stays_in_its_box(detect_bundle: Path, image: Path) -> None:
    e = DetectionExplainer(detect_bundle, conf=0.3).explain(image)
    expected = Predictor(detect_bundle).predict(image).above(0.3)
    assert len(e.result) == len(expected) > 0
    np.testing.assert_allclose(e.result.boxes, expected.boxes, atol=0.5)  # torch vs ONNX: the same detections
    w, h = Image.open(image).size
    assert e.cam.shape == (h, w) and e.cam.dtype == np.float32 and 0 <= e.cam.min() and e.cam.max() <= 1
    for i, box in enumerate(e.result.boxes):
        m = e.box_map(i)
        x1, y1, x2, y2 = int(np.floor(box[0])), int(np.floor(box[1])), int(np.ceil(box[2])), int(np.ceil(box[3]))
        outside = m.copy()
        outside[max(0, y1):y2, max(0, x1):x2] = 0
        assert not outside.any()  # nothing outside the box
        inside = m[max(0, y1):y2, max(0, x1):x2]
        assert inside.min() == 0  # renormalised within the box: its minimum is 0, its maximum 1 ...
        flat = np.ptp(e.cam[max(0, y1):y2, max(0, x1):x2]) == 0  # ... unless the cam is flat there (all 0)
        assert inside.max() == pytest.approx(1) or (flat and inside.max() == 0)
    assert e.maps().max() == pytest.approx(1)


def test_overlay_leaves_the_image_outside_the_boxes(detect_bundle: Path, image: Path) -> None:
    """Outside the box the overlay is the plain drawing of the box (outline, label plate); inside
    it, the box's map is blended in."""
    from lensforge.runtime.draw import draw_detections

    e = DetectionExplainer(detect_bundle, conf=0.3).explain(image)
    e.result = e.result.above(float(e.result.scores.max()))  # one box
    out = np.asarray(e.overlay()).astype(int)
    plain = np.asarray(draw_detections(Image.open(image).convert("RGB"), e.result, threshold=0.0)).astype(int)
    assert out.shape == plain.shape
    x1, y1, x2, y2 = (int(v) for v in np.round(e.result.boxes[0]))
    outside = np.ones(out.shape[:2], bool)
    outside[max(0, y1 - 1):y2 + 1, max(0, x1 - 1):x2 + 1] = False
    assert np.array_equal(out[outside], plain[outside])
    inner = (slice(y1 + 3, y2 - 3), slice(x1 + 3, x2 - 3))  # inside the outline
    assert np.abs(out[inner] - plain[inner]).max() > 20  # the colour map is there


def test_fpn_map_excludes_torchvisions_padding() -> None:
    """A 100x60 input is padded to 128x64: the stride-8 level (16x8) keeps the 12.5x7.5 cells
    that hold the image, and the cell the padding fills is gone."""
    levels = {"0": torch.ones(1, 4, 16, 8), "1": torch.ones(1, 4, 8, 4), "pool": torch.ones(1, 4, 4, 2)}
    out = fpn_reshape((100, 60), 32)(levels)
    assert out.shape == (1, 12, 12, 8)  # channels of every level, at the finest level's resolution, cropped


def test_label_filter_and_methods(detect_bundle: Path, image: Path) -> None:
    e = DetectionExplainer(detect_bundle, labels=["circle"], conf=0.0).explain(image)
    assert set(e.result.labels) <= {"circle"}
    with pytest.raises(ConfigError, match="label 'nosuch' is not one of"):
        DetectionExplainer(detect_bundle, labels=["nosuch"])
    with pytest.raises(ModelError, match="cam does not fit a detector; it supports: eigencam"):
        DetectionExplainer(detect_bundle, method="cam")


def test_cli_draws_boxes_with_their_maps(detect_bundle: Path, image: Path, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["explain", str(detect_bundle), str(image), "--out", str(tmp_path / "x")]) == 0
    assert Image.open(tmp_path / "x" / f"{image.stem}.png").size == Image.open(image).size
    assert "(eigencam)" in capsys.readouterr().out
    for argv, message in ((["--method", "attention"], "attention does not fit a detector; it supports: eigencam"),
                          (["--label", "nosuch"], "label 'nosuch' is not one of this model's")):
        assert main(["explain", str(detect_bundle), str(image), *argv, "--out", str(tmp_path / "y")]) == 2
        err = " ".join(capsys.readouterr().err.split())
        assert message in err and "Traceback" not in err
