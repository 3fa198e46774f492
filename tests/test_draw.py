"""Drawing results on images (lensforge.runtime.draw) and ``lensforge predict --annotate``."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lensforge.runtime.draw import (
    PALETTE,
    Style,
    annotate,
    class_color,
    draw_classification,
    draw_detections,
    encode_image,
    fit_within,
    label_layout,
    text_color,
)
from lensforge.runtime.results import ClassificationResult, DetectionResult

CLASSES = ("cat", "dog", "person", "car")
GREY = (128, 128, 128)


def grey(w: int, h: int, mode: str = "RGB") -> Image.Image:
    return Image.new(mode, (w, h), GREY if mode == "RGB" else 128)


def det(boxes: list[list[float]], scores: list[float], ids: list[int], threshold: float = 0.5,
        size: tuple[int, int] | None = None) -> DetectionResult:
    return DetectionResult(np.array(boxes, dtype=np.float32).reshape(-1, 4), scores, ids, CLASSES, threshold, size)


def px(img: Image.Image, x: float, y: float) -> tuple[int, int, int]:
    return img.getpixel((int(x), int(y)))  # type: ignore[return-value]


# -- colours ----------------------------------------------------------------------------------

def test_palette_colours_are_distinct_and_cycle() -> None:
    assert len(set(PALETTE)) == len(PALETTE)
    assert class_color(0) != class_color(1)
    assert class_color(len(PALETTE) + 3) == class_color(3)


@pytest.mark.parametrize("background, expected", [
    ((255, 225, 25), (0, 0, 0)),  # yellow → black text
    ((0, 0, 128), (255, 255, 255)),  # navy → white text
    ((230, 25, 75), (255, 255, 255)),  # red → white text
    ((255, 255, 255), (0, 0, 0)),
])
def test_text_contrasts_with_its_background(background: tuple[int, int, int], expected: tuple[int, int, int]) -> None:
    assert text_color(background) == expected


# -- detections -------------------------------------------------------------------------------

def test_each_box_edge_is_drawn_in_its_class_colour() -> None:
    img = grey(320, 240)
    boxes = [[40, 60, 140, 200], [180, 80, 300, 220]]
    out = draw_detections(img, det(boxes, [0.9, 0.8], [0, 3]))
    for (x1, y1, x2, y2), cid in zip(boxes, [0, 3]):
        color = class_color(cid)
        mx, my = (x1 + x2) / 2, (y1 + y2) / 2
        for x, y in [(x1, my), (x2, my), (mx, y2), (x1 + 1, my), (x2 - 1, my), (mx, y2 - 1)]:
            assert px(out, x, y) == color, (x, y)
        assert px(out, mx, my) == GREY  # boxes are outlines, not filled
    assert out.size == img.size and out.mode == "RGB"


def test_label_background_sits_above_the_box_in_its_colour() -> None:
    out = draw_detections(grey(320, 240), det([[40, 100, 200, 200]], [0.9], [1]))
    style = Style.for_size(320, 240)
    above = np.asarray(out)[100 - style.font_size:100, 40:90]  # the band just above the box's left end
    n_fill = int((above == class_color(1)).all(axis=-1).sum())
    assert n_fill > 0.5 * above.shape[0] * above.shape[1]  # mostly the label's filled background
    assert text_color(class_color(1)) == (255, 255, 255)
    n_text = int((above > 200).all(axis=-1).sum())  # anti-aliased: near-white, not exactly white
    assert n_text > 10  # and its text


def test_a_box_at_the_top_edge_gets_its_label_inside() -> None:
    out = draw_detections(grey(320, 240), det([[50, 0, 250, 150]], [0.9], [0]))
    line = Style.for_size(320, 240).line
    inside = np.asarray(out)[line:14, 52:90]  # below the top edge, right of the left edge: only a label fills it
    assert (inside == class_color(0)).all(axis=-1).mean() > 0.3


@pytest.mark.parametrize("threshold, drawn", [(None, [True, False]), (0.1, [True, True]), (0.95, [False, False])])
def test_only_boxes_at_or_above_the_threshold_are_drawn(threshold: float | None, drawn: list[bool]) -> None:
    boxes = [[20, 20, 100, 100], [180, 120, 300, 220]]
    out = draw_detections(grey(320, 240), det(boxes, [0.9, 0.3], [0, 1], threshold=0.5), threshold=threshold)
    for (x1, y1, x2, y2), cid, want in zip(boxes, [0, 1], drawn):
        assert (px(out, x1, (y1 + y2) / 2) == class_color(cid)) is want


def test_nothing_drawn_for_an_empty_or_all_low_result() -> None:
    img = grey(64, 48)
    for r in (det([], [], []), det([[1, 1, 30, 30]], [0.1], [0])):
        assert np.array_equal(np.asarray(draw_detections(img, r)), np.asarray(img))


def test_line_width_and_font_scale_with_the_image() -> None:
    small, large = Style.for_size(320, 240), Style.for_size(4000, 3000)
    assert 2 <= small.line <= 3 and 12 <= small.font_size <= 16
    assert large.line >= 4 * small.line and large.font_size >= 5 * small.font_size

    def measured_width(w: int, h: int) -> int:  # pixels of class colour across the left edge
        out = draw_detections(grey(w, h), det([[w * 0.2, h * 0.3, w * 0.6, h * 0.8]], [0.9], [0], size=(w, h)))
        row = np.asarray(out)[int(h * 0.55), : int(w * 0.4)]
        return int((row == class_color(0)).all(axis=-1).sum())

    assert measured_width(320, 240) == small.line
    assert measured_width(4000, 3000) == large.line


@pytest.mark.parametrize("box", [
    [0, 0, 320, 240],  # the whole image
    [-50, -20, 40, 30],  # partly outside
    [300, 220, 400, 400],  # bottom-right corner, label must be pushed inside
    [100, 100, 100, 100],  # zero area
    [200, 50, 150, 20],  # reversed corners
    [500, 500, 600, 600],  # wholly outside
])
def test_boxes_at_or_beyond_the_border_do_not_crash(box: list[float]) -> None:
    out = draw_detections(grey(320, 240), det([box], [0.9], [2]))
    assert out.size == (320, 240)
    assert (np.asarray(out) == class_color(2)).all(axis=-1).any()


def test_boxes_are_scaled_to_a_resized_image() -> None:
    big = det([[400, 300, 1200, 900]], [0.9], [0], size=(1600, 1200))
    out = draw_detections(grey(320, 240), big)  # drawn at 1/5 scale
    assert px(out, 80, 120) == class_color(0) and px(out, 240, 120) == class_color(0)
    assert px(out, 160, 120) == GREY


def test_hiding_scores_makes_a_narrower_label() -> None:
    r = det([[40, 100, 300, 200]], [0.9], [1])
    def label_px(show: bool) -> int:
        out = np.asarray(draw_detections(grey(320, 240), r, show_scores=show))
        return int((out[80:99] == class_color(1)).all(axis=-1).sum())
    assert label_px(False) < label_px(True)


# -- label placement --------------------------------------------------------------------------

def dense_scene() -> tuple[tuple[int, int], DetectionResult]:
    """40 boxes in an 8x5 grid with 6-px gaps (each label is wider than its box) and a cluster
    of 12 heavily overlapping boxes: old labels covered each other in both."""
    rng = np.random.default_rng(0)
    boxes = [[10 + (i % 8) * 56, 30 + (i // 8) * 56, 60 + (i % 8) * 56, 80 + (i // 8) * 56] for i in range(40)]
    for cx, cy in rng.uniform([570, 340], [670, 460], (12, 2)):
        boxes.append([cx - 40, cy - 30, cx + 40, cy + 30])
    n = len(boxes)
    return (800, 600), det(boxes, rng.uniform(0.5, 0.99, n).tolist(), [i % 4 for i in range(n)], size=(800, 600))


def overlapping_pairs(rects: list[tuple[int, int, int, int]]) -> list[tuple[int, int]]:
    return [(i, j) for i, a in enumerate(rects) for j, b in enumerate(rects[:i])
            if a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]]


def test_dense_labels_never_overlap_and_stay_inside_the_image() -> None:
    (w, h), r = dense_scene()
    labels = label_layout((w, h), r)
    assert len(labels) == len(r)  # every box keeps its label
    rects = [lab.rect for lab in labels]
    assert overlapping_pairs(rects) == []
    for left, top, right, bottom in rects:
        assert 0 <= left < right <= w and 0 <= top < bottom <= h
    # the drawing puts each plate where the layout says: its four corners are in its class colour
    out = draw_detections(Image.new("RGB", (w, h), GREY), r)
    for lab in labels:
        left, top, right, bottom = lab.rect
        for x, y in [(left, top), (right - 1, top), (left, bottom - 1), (right - 1, bottom - 1)]:
            assert px(out, x, y) == lab.color, (lab.text, x, y)


def test_a_label_with_no_room_by_its_box_gets_a_leader_line_to_it() -> None:
    (w, h), r = dense_scene()
    moved = [lab for lab in label_layout((w, h), r) if lab.leader is not None]
    assert moved  # the cluster cannot hold all its labels next to their boxes
    for lab in moved:
        x1, y1, x2, y2 = lab.leader
        (l, t, rr, b), (bx1, by1, bx2, by2) = lab.rect, lab.box
        assert l <= x1 < rr and t <= y1 < b  # starts on the plate
        assert bx1 <= x2 <= bx2 and by1 <= y2 <= by2  # ends on the box


def test_a_lone_box_keeps_its_label_above_it_left_aligned() -> None:
    r = det([[40, 100, 200, 200]], [0.9], [1])
    (lab,) = label_layout((320, 240), r)
    left, top, right, bottom = lab.rect
    assert (left, bottom) == (40, 100) and right < 200 and lab.leader is None
    assert bottom - top > Style.for_size(320, 240).font_size  # the text and its padding
    assert lab.text == "dog 0.90" and lab.color == class_color(1)


@pytest.mark.parametrize("box, where", [
    ([50, 0, 250, 150], "inside top"),  # no room above: flips inside
    ([0, 5, 100, 239], "inside top"),  # 5 px above is too little
    ([300, 100, 319, 150], "above"),  # at the right edge: shifted left, still above
])
def test_label_flips_inside_at_the_image_border(box: list[float], where: str) -> None:
    (lab,) = label_layout((320, 240), det([box], [0.9], [0]))
    left, top, right, bottom = lab.rect
    assert right <= 320 and left >= 0
    assert (top == box[1]) if where == "inside top" else (bottom == box[1])


def test_the_better_box_gets_the_spot_above_when_two_labels_compete() -> None:
    boxes = [[40, 100, 80, 200], [84, 100, 124, 200]]  # side by side, labels wider than the boxes
    for scores in ([0.9, 0.6], [0.6, 0.9]):
        labels = {lab.box[0]: lab for lab in label_layout((320, 240), det(boxes, scores, [0, 1]))}
        best = labels[40] if scores[0] > scores[1] else labels[84]
        other = labels[84] if best is labels[40] else labels[40]
        assert best.rect[3] == 100  # above its box
        assert overlapping_pairs([best.rect, other.rect]) == []


def test_a_label_wider_than_the_image_is_shortened_to_fit() -> None:
    r = DetectionResult(np.array([[5, 20, 50, 40]], np.float32), [0.9], [0], ("a-very-long-class-name",), 0.5)
    (lab,) = label_layout((80, 60), r)
    assert lab.text.endswith("…") and lab.text.startswith("a-very")
    assert 0 <= lab.rect[0] and lab.rect[2] <= 80


# -- classification ---------------------------------------------------------------------------

def test_classification_panel_shows_top_labels_with_bars() -> None:
    r = ClassificationResult(np.array([0.1, 0.7, 0.15, 0.05], np.float32), CLASSES)
    out = np.asarray(draw_classification(grey(320, 240), r, k=3))
    corner, elsewhere = out[:72, :72], out[100:, 100:]
    assert corner.mean() < 100  # dark translucent panel over grey 128
    assert (elsewhere == GREY).all()
    for cid in (1, 2, 0):  # the top-3's bars in their class colours
        assert (corner == class_color(cid)).all(axis=-1).any(), CLASSES[cid]
    assert not (out == class_color(3)).all(axis=-1).any()  # 4th label not shown
    assert (corner > 200).all(axis=-1).sum() > 20  # the text


def test_bar_lengths_follow_the_scores() -> None:
    r = ClassificationResult(np.array([0.2, 0.8, 0.0, 0.0], np.float32), CLASSES)
    out = np.asarray(draw_classification(grey(640, 480), r, k=2))
    length = {cid: int((out == class_color(cid)).all(axis=-1).any(axis=0).sum()) for cid in (0, 1)}
    assert 3.0 < length[1] / length[0] < 5.0


@pytest.mark.parametrize("scores, shown, hidden", [
    ([0.9, 0.2, 0.7, 0.1], [0, 2], [1, 3]),  # the hits only
    ([0.1, 0.2, 0.3, 0.1], [], [0, 1, 2, 3]),  # no hit: a message, no bars
])
def test_multilabel_panel_shows_the_hits(scores: list[float], shown: list[int], hidden: list[int]) -> None:
    r = ClassificationResult(np.array(scores, np.float32), CLASSES, multilabel=True)
    out = np.asarray(draw_classification(grey(320, 240), r))
    for cid in shown:
        assert (out == class_color(cid)).all(axis=-1).any()
    for cid in hidden:
        assert not (out == class_color(cid)).all(axis=-1).any()
    assert (out[:40, :150] > 200).all(axis=-1).sum() > 20


def test_a_tiny_image_still_gets_a_panel() -> None:
    r = ClassificationResult(np.array([0.1, 0.7, 0.15, 0.05], np.float32), CLASSES)
    out = draw_classification(grey(20, 10), r)
    assert out.size == (20, 10)


# -- shared behaviour -------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA"])
def test_inputs_are_never_modified(mode: str) -> None:
    img = grey(100, 80, mode)
    before = img.tobytes()
    for r in (det([[10, 10, 90, 70]], [0.9], [0]),
              ClassificationResult(np.array([0.1, 0.7, 0.15, 0.05], np.float32), CLASSES)):
        out = annotate(img, r)
        assert out is not img and out.mode == "RGB"
        assert img.tobytes() == before and img.mode == mode


def test_annotate_rejects_other_types() -> None:
    with pytest.raises(TypeError, match="DetectionResult or ClassificationResult"):
        annotate(grey(10, 10), {"labels": []})  # type: ignore[arg-type]


@pytest.mark.parametrize("fmt, magic", [("jpeg", b"\xff\xd8\xff"), ("JPG", b"\xff\xd8\xff"), ("png", b"\x89PNG")])
def test_encode_image(fmt: str, magic: bytes) -> None:
    img = grey(64, 48, "RGBA")
    data = encode_image(img, fmt)
    assert data.startswith(magic)
    assert Image.open(io.BytesIO(data)).size == (64, 48)


def test_encode_image_rejects_unknown_formats() -> None:
    with pytest.raises(ValueError, match="use one of jpeg, png"):
        encode_image(grey(4, 4), "gif")


@pytest.mark.parametrize("size, cap, expected", [((4000, 3000), 2048, (2048, 1536)), ((300, 200), 2048, (300, 200)),
                                                  ((1000, 4000), 500, (125, 500)), ((640, 480), None, (640, 480))])
def test_fit_within(size: tuple[int, int], cap: int | None, expected: tuple[int, int]) -> None:
    assert fit_within(Image.new("RGB", size), cap).size == expected


def test_examples_for_a_person_to_look_at(tmp_path: Path) -> None:
    """Writes a 320-px and a 4000-px example (look at them when changing the style)."""
    for w, h in [(320, 240), (4000, 3000)]:
        s = w / 320
        boxes = np.array([[10, 0, 120, 100], [150, 60, 300, 230], [200, 20, 319, 120], [50, 120, 140, 200]]) * s
        out = draw_detections(grey(w, h), det(boxes.tolist(), [0.92, 0.81, 0.66, 0.55], [0, 1, 2, 3], size=(w, h)))
        out.save(tmp_path / f"detections-{w}.png")
        assert (tmp_path / f"detections-{w}.png").stat().st_size > 0
    size, r = dense_scene()
    draw_detections(grey(*size), r).save(tmp_path / "detections-dense.png")


# -- lensforge predict --annotate -------------------------------------------------------------

def test_predict_annotate_writes_one_jpeg_per_input(
    shapes_bundle: Path, shapes_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from lensforge.cli import main

    inputs = tmp_path / "in"
    inputs.mkdir()
    sources = sorted(shapes_dir.rglob("*.jpg"))[:3]
    for i, src in enumerate(sources):
        shutil.copy(src, inputs / f"img{i}.jpg")
    Image.open(sources[0]).save(inputs / "img0.png")  # same stem as img0.jpg: must not collide
    # DIR is the input folder itself: the inputs must survive
    before = {p.name: p.read_bytes() for p in inputs.iterdir()}
    code = main(["predict", str(shapes_bundle), str(inputs), "--json", "--annotate", str(inputs)])
    out, _ = capsys.readouterr()
    assert code == 0
    docs = [json.loads(line) for line in out.splitlines()]
    assert len(docs) == 4
    for name, data in before.items():
        assert (inputs / name).read_bytes() == data, f"{name} was overwritten"
    written = [Path(d["annotated"]) for d in docs]
    assert len(set(written)) == 4 and all(p.suffix == ".jpg" and p.parent == inputs for p in written)
    for d, p in zip(docs, written):
        assert Path(p).stem.startswith(Path(d["path"]).stem)
        with Image.open(p) as annotated, Image.open(d["path"]) as original:
            assert annotated.format == "JPEG" and annotated.size == original.size
            diff = np.abs(np.asarray(annotated, np.int16) - np.asarray(original.convert("RGB"), np.int16))
            assert diff.max() > 100  # the panel is drawn


def test_predict_annotate_reports_the_directory(
    shapes_bundle: Path, shapes_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from lensforge.cli import main

    src = min(shapes_dir.rglob("*.jpg"))
    out_dir = tmp_path / "annotated" / "nested"
    code = main(["predict", str(shapes_bundle), str(src), "--annotate", str(out_dir)])
    out, _ = capsys.readouterr()
    assert code == 0
    assert (out_dir / f"{src.stem}.jpg").is_file()
    assert "Annotated images in" in out and "nested" in out
