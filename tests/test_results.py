"""Result types (lensforge.runtime.results): DetectionResult.filtered() and the numpy NMS behind
``predict``/``serve``'s --conf --iou --classes --max-det --agnostic-nms."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from lensforge.runtime.results import DetectionResult, box_iou, nms

CLASSES = ("cat", "dog", "person")

# Six detections whose overlaps are easy to work out by hand (threshold 0.5):
#   0 cat    .9  [0,0,10,10]
#   1 cat    .8  [1,0,11,10]      IoU(0,1) = 90/110 = 0.82
#   2 dog    .7  [0,0,10,10]      IoU(0,2) = 1 (same box, other class)
#   3 person .6  [50,50,60,60]    overlaps nothing
#   4 cat    .4  [0,5,10,15]      IoU(0,4) = 50/150 = 0.33, IoU(1,4) = 45/155 = 0.29
#   5 dog    .2  [100,100,120,120]
BOXES = [[0, 0, 10, 10], [1, 0, 11, 10], [0, 0, 10, 10], [50, 50, 60, 60], [0, 5, 10, 15], [100, 100, 120, 120]]
SCORES = [0.9, 0.8, 0.7, 0.6, 0.4, 0.2]
IDS = [0, 0, 1, 2, 0, 1]


def result(order: list[int] | None = None) -> DetectionResult:
    """The table above; ``order`` shuffles its rows (filtered() must not depend on input order)."""
    o = list(range(len(SCORES))) if order is None else order
    return DetectionResult(np.array(BOXES, np.float32)[o], np.array(SCORES)[o], np.array(IDS)[o], CLASSES,
                           threshold=0.5, image_size=(200, 150))


@pytest.mark.parametrize("kwargs, kept", [
    ({}, [0, 1, 2, 3]),  # conf defaults to the result's tuned threshold, 0.5
    ({"conf": 0.0}, [0, 1, 2, 3, 4, 5]),
    ({"conf": 0.75}, [0, 1]),
    ({"conf": 0.6}, [0, 1, 2, 3]),  # >= conf: the 0.6 box stays
    ({"conf": 1.0}, []),
    ({"classes": ["dog"]}, [2]),
    ({"classes": ["dog"], "conf": 0.0}, [2, 5]),
    ({"classes": [0, "person"]}, [0, 1, 3]),  # ids and names mixed
    ({"classes": ["1"]}, [2]),  # a number typed on a command line is an id
    ({"classes": "cat"}, [0, 1]),  # one name, not its letters
    ({"classes": []}, []),
    ({"iou": 0.5}, [0, 2, 3]),  # per class: 1 goes (0.82 with 0), 2 is a dog and stays
    ({"iou": 0.5, "agnostic": True}, [0, 3]),  # across classes the dog on the same box goes too
    ({"iou": 0.9}, [0, 1, 2, 3]),  # 0.82 is not above 0.9
    ({"iou": 1.0, "agnostic": True}, [0, 1, 2, 3]),  # IoU 1 is not *above* 1
    ({"conf": 0.0, "iou": 0.3}, [0, 2, 3, 5]),  # 4 goes: 0.33 with 0
    ({"conf": 0.0, "iou": 0.34}, [0, 2, 3, 4, 5]),  # 0.33 < 0.34 with 0; 1 (0.29) was suppressed already
    ({"conf": 0.0, "iou": 0.3, "agnostic": True}, [0, 3, 5]),
    ({"max_det": 2}, [0, 1]),
    ({"max_det": 100}, [0, 1, 2, 3]),
    ({"conf": 0.0, "iou": 0.5, "max_det": 3}, [0, 2, 3]),  # NMS before the top-k cut
    ({"conf": 0.0, "classes": ["cat"], "iou": 0.5, "max_det": 1}, [0]),
])
def test_filtered_keeps_the_hand_computed_rows(kwargs: dict[str, Any], kept: list[int]) -> None:
    for order in (None, [5, 3, 1, 4, 0, 2]):
        r = result(order)
        out = r.filtered(**kwargs)
        assert out.scores.tolist() == pytest.approx([SCORES[i] for i in kept])  # best first
        assert out.boxes.tolist() == [BOXES[i] for i in kept]
        assert out.class_ids.tolist() == [IDS[i] for i in kept]
        assert out.classes == CLASSES and out.image_size == (200, 150)
        assert out.boxes.dtype == np.float32 and out.class_ids.dtype == np.int64
        assert len(r) == 6  # the original is untouched


def test_filtered_threshold_becomes_conf_so_above_and_to_dict_keep_everything() -> None:
    out = result().filtered(conf=0.3)
    assert out.threshold == pytest.approx(0.3)
    assert len(out.above()) == len(out) == 5
    assert len(out.to_dict()["detections"]) == 5
    assert result().filtered().threshold == pytest.approx(0.5)


@pytest.mark.parametrize("kwargs", [{"iou": 1.5}, {"iou": "x"}, {"conf": 2}, {"max_det": 0}])
def test_filtered_checks_options_on_an_empty_result_too(kwargs: dict[str, Any]) -> None:
    # predict and serve validate their options once on an empty result, before any image:
    # a bad --iou must fail there, not on the first image with a box (a traceback / a 500)
    empty = DetectionResult(np.zeros((0, 4)), [], [], CLASSES)
    with pytest.raises(ValueError, match="must be"):
        empty.filtered(**kwargs)


def test_filtered_on_an_empty_result() -> None:
    empty = DetectionResult(np.zeros((0, 4)), [], [], CLASSES)
    out = empty.filtered(conf=0.0, iou=0.5, classes=["dog"], max_det=5)
    assert len(out) == 0 and out.boxes.shape == (0, 4)


@pytest.mark.parametrize("kwargs, message", [
    ({"classes": ["horse"]}, r"unknown class 'horse'; this model knows \(id=name\): 0=cat, 1=dog, 2=person"),
    ({"classes": ["horse", 7]}, r"unknown classes 'horse', 7;"),
    ({"classes": [3]}, r"unknown class 3;"),  # id out of range
    ({"classes": [-1]}, r"unknown class -1;"),
    ({"classes": [True]}, r"unknown class True;"),
    ({"conf": 1.5}, r"conf must be between 0 and 1, got 1.5"),
    ({"conf": float("nan")}, r"conf must be between 0 and 1"),
    ({"conf": "high"}, r"conf must be a number between 0 and 1, got 'high'"),
    ({"iou": -0.1}, r"iou must be between 0 and 1"),
    ({"max_det": 0}, r"max_det must be a whole number of at least 1, got 0"),
    ({"max_det": 2.5}, r"max_det must be a whole number"),
])
def test_filtered_rejects_bad_options_with_a_clear_message(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        result().filtered(**kwargs)


@pytest.mark.parametrize("iou, kept", [(0.5, [0, 1]), (0.49, [0])])
def test_nms_drops_only_above_the_iou(iou: float, kept: list[int]) -> None:
    boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 5]], np.float32)  # IoU exactly 50 / 100
    assert nms(boxes, np.array([0.9, 0.8]), iou).tolist() == kept


def test_box_iou_of_empty_boxes_is_zero() -> None:
    assert box_iou(np.array([[5, 5, 5, 5]]), np.array([[5, 5, 5, 5], [0, 0, 10, 10]])).tolist() == [[0.0, 0.0]]


@pytest.mark.parametrize("seed, iou, agnostic", [(0, 0.5, False), (1, 0.3, False), (2, 0.7, True), (3, 0.45, True)])
def test_nms_matches_torchvision(seed: int, iou: float, agnostic: bool) -> None:
    torch = pytest.importorskip("torch")
    ops = pytest.importorskip("torchvision.ops")
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, 200, (300, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(5, 60, (300, 2))], axis=1).astype(np.float32)
    scores = rng.permutation(300).astype(np.float32) / 300  # distinct: the order is unambiguous
    labels = rng.integers(0, 3, 300)
    t_boxes, t_scores = torch.from_numpy(boxes), torch.from_numpy(scores)
    if agnostic:
        expected = ops.nms(t_boxes, t_scores, iou).numpy()
    else:
        expected = ops.batched_nms(t_boxes, t_scores, torch.from_numpy(labels), iou).numpy()
    got = nms(boxes, scores, iou, None if agnostic else labels)
    assert 30 < len(got) < 300  # the case suppresses something and keeps something
    assert got.tolist() == expected.tolist()

    r = DetectionResult(boxes, scores, labels, CLASSES, threshold=0.0)
    out = r.filtered(iou=iou, agnostic=agnostic)
    assert out.boxes.tolist() == boxes[expected].tolist()
