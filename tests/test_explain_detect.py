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
        assert inside.min() == 0 and inside.max() == pytest.approx(1)  # the box's own map, over [0, 1]
    assert e.maps().max() == pytest.approx(1)


def test_a_small_box_gets_its_own_component_where_the_image_wide_one_is_flat() -> None:
    """As on a real chess photo: a large strong pattern elsewhere (the board) owns the image's
    first component, and the whole-image EigenCAM is flat all over a small box; the box's own
    component finds the blob inside it (heat grows with activation, not against it), and the
    box shows it instead of nothing."""
    from pytorch_grad_cam.utils.svd_on_activations import get_2d_projection

    from lensforge.explain.detect import _box_map, box_cells, local_eigencam

    rng = np.random.default_rng(0)
    acts = rng.uniform(0, 0.01, (8, 32, 48))
    acts[0:4, :, :24] += 5.0  # the "board": strong, half the image, four channels
    acts[6, 20:23, 36:39] += 1.0  # the "piece": a weak blob in another channel, inside the box
    box = np.array([34 * 10, 18 * 10, 41 * 10, 25 * 10], np.float32)  # xyxy pixels, image 480x320: cells 34-41, 18-25
    cells = box_cells(box, (480, 320), (32, 48))
    assert cells == (34, 18, 41, 25)

    whole = get_2d_projection(acts[None].astype(np.float32))[0]  # grad-cam's whole-image projection
    region = (slice(18, 25), slice(34, 41))
    assert np.ptp(whole[region]) < 0.01 * np.ptp(whole)  # nothing inside the box: the blob is not in its component

    local = local_eigencam(acts, cells)
    assert local.shape == (7, 7) and local.min() == 0 and local.max() == 1
    peak = np.unravel_index(np.argmax(local), local.shape)
    assert (18 + peak[0], 34 + peak[1]) in {(y, x) for y in range(20, 23) for x in range(36, 39)}  # the blob, not its surroundings

    pixels = _box_map(acts, box, (480, 320))
    assert pixels.shape == (70, 70) and pixels.min() == 0 and pixels.max() == pytest.approx(1)
    assert pixels[25:45, 25:45].mean() > 3 * pixels[:10].mean()  # hot over the blob's pixels, cool at the box's edge

    # the box's map: the whole-image map where it varies inside the box, the box's own where it is flat
    from lensforge.explain.detect import BoxExplanation
    from lensforge.runtime import DetectionResult

    result = DetectionResult(np.stack([box, np.array([40, 40, 110, 110], np.float32)]), np.array([0.9, 0.8], np.float32), np.array([0, 0]),
                             ("piece",), 0.5, (480, 320))
    cam = np.zeros((320, 480), np.float32)
    cam[40:110, 40:110] = np.linspace(0.2, 0.6, 70, dtype=np.float32)  # varies over the second box only
    e = BoxExplanation(result, cam, Image.new("RGB", (480, 320)), [pixels, np.full((70, 70), 0.5, np.float32)])
    np.testing.assert_array_equal(e.box_map(0)[180:250, 340:410], pixels)  # flat there: its own map
    second = e.box_map(1)[40:110, 40:110]
    assert second[:, 0].max() == 0 and second[:, -1].min() == pytest.approx(1)  # the cam, renormalised in the box

    assert box_cells(np.array([100, 100, 101, 101], np.float32), (480, 320), (32, 48)) == (9, 9, 12, 12)  # grown to 3x3
    assert box_cells(np.array([0, 0, 2, 2], np.float32), (480, 320), (32, 48)) == (0, 0, 3, 3)  # inside the grid
    assert not local_eigencam(np.ones((4, 5, 5)), (0, 0, 5, 5)).any()  # nothing varies: flat 0


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
