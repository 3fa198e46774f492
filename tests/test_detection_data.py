"""Detection data: COCO / Roboflow COCO / YOLO readers, their quirks and errors, format
auto-detection, splits, ``data inspect`` on detection data, and the synthetic demo set."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from lensforge.cli import main
from lensforge.data.boxes import BoxTally, clip_box
from lensforge.data.demo import DETECT_CLASSES, make_demo_detection
from lensforge.data.files import mostly_missing
from lensforge.data.formats import detect_format, read_dataset
from lensforge.data.records import Box, Dataset, Record
from lensforge.data.split import split_records
from lensforge.data.yolo import label_path
from lensforge.errors import DataError

MakeImage = Callable[..., Path]
RF = "_annotations.coco.json"


# --------------------------------------------------------------------------- builders


def _cats(*pairs: tuple[int, str], dummy: str | None = "fish-dataset") -> list[dict[str, Any]]:
    """COCO categories; with ``dummy``, Roboflow's id-0 supercategory comes first."""
    cats = [{"id": 0, "name": dummy, "supercategory": "none"}] if dummy else []
    return cats + [{"id": i, "name": n, "supercategory": dummy or "none"} for i, n in pairs]


def _coco(
    images: list[tuple[str, int, int]],
    anns: list[tuple[int, int, list[float]]] | list[dict[str, Any]],
    cats: list[dict[str, Any]],
) -> dict[str, Any]:
    """images: (file_name, width, height), ids 1..n; anns: (image id, category id, bbox) or
    full annotation dicts; annotation ids 1..m."""
    annotations = [
        a if isinstance(a, dict) else {"image_id": a[0], "category_id": a[1], "bbox": a[2], "iscrowd": 0}
        for a in anns
    ]
    for i, a in enumerate(annotations, start=1):
        a.setdefault("id", i)
    return {
        "images": [{"id": i, "file_name": f, "width": w, "height": h} for i, (f, w, h) in enumerate(images, 1)],
        "annotations": annotations,
        "categories": cats,
    }


def _write(folder: Path, payload: dict[str, Any] | str, make_image: MakeImage, name: str = RF) -> Path:
    """Write the JSON and every image it lists (at its stated size) under ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    if isinstance(payload, dict):
        for img in payload.get("images", []):
            make_image(folder / img["file_name"], size=(img["width"], img["height"]), fmt="JPEG")
        payload = json.dumps(payload)
    (folder / name).write_text(payload, encoding="utf-8")
    return folder / name


def _simple(n_images: int = 2) -> dict[str, Any]:
    images = [(f"img{i}.jpg", 40, 30) for i in range(n_images)]
    return _coco(images, [(1, 1, [2, 2, 10, 10])], _cats((1, "fish")))


def _roboflow(root: Path, make_image: MakeImage, train: dict | str | None = None, valid: dict | None = None) -> Path:
    _write(root / "train", train if train is not None else _simple(), make_image)
    _write(root / "valid", valid if valid is not None else _simple(1), make_image)
    return root


# --------------------------------------------------------------------------- COCO quirks


@pytest.fixture
def quirky(tmp_path: Path, make_image: MakeImage) -> Dataset:
    """A Roboflow export with every quirk of the issue in its train split."""
    cats = _cats((1, "fish"), (3, "shark"), (6, "starfish"), (7, "starfish"))  # ids 2, 4, 5 unused
    train = _coco(
        [("a.jpg", 40, 30), ("b.jpg", 40, 30), ("sub/dir/c.jpg", 50, 20)],
        [
            (1, 1, [1, 2, 10, 8]),            # fish
            {"image_id": 1, "category_id": 3, "bbox": [5, 5, 20, 20], "iscrowd": 1},  # crowd shark
            (1, 6, [0, 0, 5, 5]),             # starfish (6)
            (1, 7, [20, 10, 6, 6]),           # starfish (7): merged with 6
            (3, 1, [40, 10, 20, 20]),         # reaches outside 50x20: clipped to [40,10,50,20]
            (3, 3, [49.5, 0, 10, 10]),        # 0.5 px wide after clipping: dropped
            (3, 6, [5, 5, -3, 4]),            # negative width: dropped
            (3, 6, [5, 5, 4, 0.5]),           # 0.5 px high: dropped
        ],  # b.jpg (image 2) has no annotation: a negative
        cats,
    )
    root = _roboflow(tmp_path / "rf", make_image, train=train)
    make_image(root / "valid" / "stray.jpg")  # in the split folder, not in its JSON
    return read_dataset(root)


def _rec(ds: Dataset, rel: str) -> Record:
    return next(r for r in ds.records if ds.relpath(r) == rel)


def test_roboflow_quirks_classes(quirky: Dataset) -> None:
    # dummy id 0 is not a class; ids 1, 3, 6+7 become 0, 1, 2 in id order; 6 and 7 merged
    assert (quirky.fmt, quirky.task) == ("roboflow-coco", "detect")
    assert quirky.classes == ["fish", "shark", "starfish"]
    notes = "\n".join(quirky.notes)
    assert "category 0 'fish-dataset'" in notes and "not used as a class" in notes
    assert "categories 6, 7 are all named 'starfish'; merged into one class (4 annotations)" in notes


def test_roboflow_quirks_boxes(quirky: Dataset) -> None:
    a = _rec(quirky, "train/a.jpg")
    assert a.labels == (0, 1, 2, 2)
    assert a.boxes == ((1, 2, 11, 10), (5, 5, 25, 25), (0, 0, 5, 5), (20, 10, 26, 16))  # xyxy
    assert a.crowd == (False, True, False, False)
    assert (a.size, a.split) == ((40, 30), "train")

    c = _rec(quirky, "train/sub/dir/c.jpg")  # file_name with sub-folders
    assert c.path.is_file() and c.labels == (0,) and c.boxes == ((40, 10, 50, 20),)

    b = _rec(quirky, "train/b.jpg")
    assert b.boxes == () and b.labels == ()  # negative kept
    notes = "\n".join(quirky.notes)
    assert "clipped 1 boxes" in notes and "annotation 5 (sub/dir/c.jpg)" in notes
    assert "dropped 3 degenerate boxes" in notes
    assert "1 images have no boxes; kept as negatives" in notes and "1 boxes are iscrowd" in notes


def test_roboflow_splits_and_unlisted_images(quirky: Dataset) -> None:
    assert {r.split for r in quirky.records} == {"train", "val"}  # "valid" → "val"
    assert quirky.skipped == [("valid/stray.jpg", "not listed in valid/_annotations.coco.json")]
    assert all(r.path.is_absolute() for r in quirky.records)


def test_few_missing_images_are_skipped_with_a_warning(
    tmp_path: Path, make_image: MakeImage, caplog: pytest.LogCaptureFixture
) -> None:
    root = _roboflow(tmp_path, make_image, train=_simple(3))
    (root / "train" / "img2.jpg").unlink()
    with caplog.at_level(logging.WARNING):
        ds = read_dataset(root)
    assert len(ds.records) == 3  # 2 train + 1 valid
    assert ds.skipped == [("train/img2.jpg", "missing file (listed in train/_annotations.coco.json)")]
    assert "1 of 3 images listed" in caplog.text
    assert any("skipped 1 missing image files" in n for n in ds.notes)


# --------------------------------------------------------------------------- COCO errors


def _with(payload: dict[str, Any], **changes: Any) -> dict[str, Any]:
    out = {k: v for k, v in payload.items() if changes.get(k, True) is not None}
    out.update({k: v for k, v in changes.items() if v is not None})
    return out


def _missing_all(root: Path, mk: MakeImage) -> Path:
    _roboflow(root, mk)
    for p in (root / "train").glob("*.jpg"):
        p.unlink()
    return root


def _split_without_json(root: Path, mk: MakeImage) -> Path:
    _roboflow(root, mk)
    mk(root / "test" / "x.jpg")
    return root


def _conflicting_ids(root: Path, mk: MakeImage) -> Path:
    valid = _simple(1)
    valid["categories"] = _cats((1, "shark"))
    return _roboflow(root, mk, valid=valid)


BAD_COCO = [
    ("invalid json", lambda r, mk: _roboflow(r, mk, train='{"images": ['), "train/_annotations.coco.json is not valid JSON (line 1"),
    ("json list", lambda r, mk: _roboflow(r, mk, train="[]"), "holds a JSON list"),
    ("no images", lambda r, mk: _roboflow(r, mk, train=_with(_simple(), images=None)), "has no 'images' list"),
    ("no annotations", lambda r, mk: _roboflow(r, mk, train=_with(_simple(), annotations=None)), "has no 'annotations' list"),
    ("no categories", lambda r, mk: _roboflow(r, mk, train=_with(_simple(), categories=None)), "has no 'categories' list"),
    ("unknown image", lambda r, mk: _roboflow(r, mk, train=_with(_simple(), annotations=[
        {"id": 7, "image_id": 99, "category_id": 1, "bbox": [1, 1, 5, 5]}])), "annotation 7 refers to image id 99"),
    ("unknown category", lambda r, mk: _roboflow(r, mk, train=_with(_simple(), annotations=[
        {"id": 8, "image_id": 1, "category_id": 42, "bbox": [1, 1, 5, 5]}])), "annotation 8 refers to category id 42"),
    ("bad bbox", lambda r, mk: _roboflow(r, mk, train=_with(_simple(), annotations=[
        {"id": 9, "image_id": 1, "category_id": 1, "bbox": [1, 1, 5]}])), "annotation 9 (img0.jpg) has bbox [1, 1, 5]"),
    ("no image_id", lambda r, mk: _roboflow(r, mk, train=_with(_simple(), annotations=[
        {"id": 3, "category_id": 1, "bbox": [1, 1, 5, 5]}])), "annotation 3 has no valid 'image_id'"),
    ("duplicate image id", lambda r, mk: _roboflow(r, mk, train=_with(_simple(), images=[
        {"id": 1, "file_name": "a.jpg", "width": 9, "height": 9}] * 2)), "image id 1 is listed twice"),
    ("images all missing", _missing_all, "2 of 2 images listed in"),
    ("no boxes in train", lambda r, mk: _roboflow(r, mk, train=_with(_simple(), annotations=[])), "train split of"),
    # crowd regions are not trained on: a train split of only crowd boxes has nothing to learn
    ("only crowd boxes in train", lambda r, mk: _roboflow(r, mk, train=_with(_simple(), annotations=[
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 10, 10], "iscrowd": 1}])), "has no boxes (iscrowd"),
    ("only degenerate boxes", lambda r, mk: _roboflow(r, mk, train=_with(_simple(), annotations=[
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 0, 5]}])), "1 degenerate boxes dropped"),
    ("no categories at all", lambda r, mk: _write(r, _with(_simple(), categories=[]), mk), "defines no categories"),
    ("split without json", _split_without_json, "has images but no _annotations.coco.json"),
    ("class ids differ by split", _conflicting_ids, "category id 1 is 'fish' in one annotation file and 'shark'"),
]


@pytest.mark.parametrize(("build", "expected"), [c[1:] for c in BAD_COCO], ids=[c[0] for c in BAD_COCO])
def test_bad_coco_raises_one_clear_data_error(
    tmp_path: Path, make_image: MakeImage, build: Callable, expected: str
) -> None:
    root = build(tmp_path / "data", make_image)
    with pytest.raises(DataError) as info:
        read_dataset(root)
    assert expected in str(info.value)
    assert "\n" not in str(info.value)


# --------------------------------------------------------------------------- plain COCO


def test_single_coco_json_reads_images_beside_it(tmp_path: Path, make_image: MakeImage) -> None:
    payload = _coco([("x/a.png", 30, 20), ("b.png", 30, 20)], [(1, 5, [1, 1, 8, 8])], _cats((5, "car"), dummy=None))
    for name in ("x/a.png", "b.png"):
        make_image(tmp_path / name, size=(30, 20))
    ann = tmp_path / "labels.json"
    ann.write_text(json.dumps(payload))
    ds = read_dataset(ann)
    assert (ds.fmt, ds.root, ds.classes) == ("coco", tmp_path.absolute(), ["car"])
    assert [ds.relpath(r) for r in ds.records] == ["b.png", "x/a.png"]
    assert not ds.presplit  # no split in a single file's name: split_records makes one
    # Dataset.root + fmt re-reads the same data (what a run stores to reload its split)
    again = read_dataset(ds.root, fmt=ds.fmt)
    assert again.records == ds.records


def test_coco2017_layout(tmp_path: Path, make_image: MakeImage) -> None:
    cats = _cats((1, "person"), (3, "car"), dummy=None)
    for split, name in (("train", "t.jpg"), ("val", "v.jpg")):
        payload = _coco([(name, 32, 24)], [(1, 3, [4, 4, 10, 10])], cats)
        make_image(tmp_path / "images" / f"{split}2017" / name, size=(32, 24))
        (tmp_path / "annotations").mkdir(exist_ok=True)
        (tmp_path / "annotations" / f"instances_{split}2017.json").write_text(json.dumps(payload))
    (tmp_path / "annotations" / "captions_train2017.json").write_text("{}")  # not detection: ignored
    ds = read_dataset(tmp_path)
    assert (ds.fmt, ds.classes) == ("coco", ["person", "car"])
    assert {(ds.relpath(r), r.split, r.labels) for r in ds.records} == {
        ("images/train2017/t.jpg", "train", (1,)),
        ("images/val2017/v.jpg", "val", (1,)),
    }
    one = read_dataset(tmp_path / "annotations" / "instances_val2017.json")  # base = parent
    assert one.root == tmp_path.absolute() and [r.split for r in one.records] == ["val"]


@pytest.mark.parametrize(
    ("json_name", "expected_files", "described"),
    [
        # the training file itself: its held-out images saved at training time
        ("instances_train2017.json", ["t2.jpg"], "the val split saved at training time"),
        # the val file under the same root is other data, not the training data changed
        ("instances_val2017.json", ["v0.jpg", "v1.jpg"], "the val folder"),
    ],
)
def test_evaluation_picks_images_of_the_file_given(
    tmp_path: Path, make_image: MakeImage, json_name: str, expected_files: list[str], described: str
) -> None:
    from lensforge.data.split import save_split, split_records
    from lensforge.heldout import choose_records
    from lensforge.runtime.bundle import SPLIT_FILE, Bundle

    cats = _cats((1, "person"), dummy=None)
    (tmp_path / "annotations").mkdir()
    for split, n in (("train", 3), ("val", 2)):
        names = [f"{split[0]}{i}.jpg" for i in range(n)]
        payload = _coco([(name, 32, 24) for name in names], [(i, 1, [4, 4, 10, 10]) for i in range(1, n + 1)], cats)
        for name in names:
            make_image(tmp_path / "images" / f"{split}2017" / name, size=(32, 24))
        (tmp_path / "annotations" / f"instances_{split}2017.json").write_text(json.dumps(payload))
    trained_on = read_dataset(tmp_path / "annotations" / "instances_train2017.json")
    bundle = Bundle(tmp_path / "bundle", {"task": "detect", "classes": ["person"], "data": {"root": str(tmp_path)}})
    save_split(split_records(trained_on, val=0.3, seed=0), trained_on, bundle.path / SPLIT_FILE)
    ds = read_dataset(tmp_path / "annotations" / json_name)
    records, what = choose_records(bundle, ds, None)
    assert ([r.path.name for r in records], what) == (expected_files, described)


def test_coco_json_without_width_height_reads_the_header(tmp_path: Path, make_image: MakeImage) -> None:
    make_image(tmp_path / "a.jpg", size=(33, 17))
    payload = {"images": [{"id": 1, "file_name": "a.jpg"}], "categories": [{"id": 1, "name": "x"}],
               "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 50, 50]}]}
    (tmp_path / "annotations.json").write_text(json.dumps(payload))
    ds = read_dataset(tmp_path)
    assert ds.records[0].size == (33, 17) and ds.records[0].boxes == ((0, 0, 33, 17),)


# --------------------------------------------------------------------------- YOLO


def _yolo(root: Path, make_image: MakeImage, names: Any, labels: dict[str, str], yaml_extra: str = "") -> Path:
    """Roboflow-style YOLO export: root/{train,valid}/{images,labels}, data.yaml with ../ paths."""
    for rel in labels:
        make_image(root / rel, size=(40, 20), fmt="PNG")
    for rel, text in labels.items():
        if text is not None:
            txt = label_path(root / rel)
            txt.parent.mkdir(parents=True, exist_ok=True)
            txt.write_text(text)
    val = "val: ../valid/images\n" if any(rel.startswith("valid/") for rel in labels) else ""
    (root / "data.yaml").write_text(f"names: {json.dumps(names)}\ntrain: ../train/images\n{val}{yaml_extra}")
    return root


YOLO_OK = {
    "train/images/a.png": "0 0.5 0.5 0.5 0.5\n\n1 0.9 0.5 0.4 0.2\n",  # second box reaches past x=1
    "train/images/b.png": "",  # empty: negative
    "train/images/c.png": None,  # no label file: negative
    "train/images/d.png": "1 0.1 0.1 0.3 0.1 0.2 0.4\n",  # polygon
    "valid/images/e.png": "0 0.25 0.25 0.5 0.5\n",
}


@pytest.mark.parametrize("names", [["cat", "dog"], {0: "cat", 1: "dog"}], ids=["list", "dict"])
def test_yolo_reads_boxes_in_pixels(tmp_path: Path, make_image: MakeImage, names: Any) -> None:
    ds = read_dataset(_yolo(tmp_path, make_image, names, YOLO_OK))
    assert (ds.fmt, ds.task, ds.classes, ds.root) == ("yolo", "detect", ["cat", "dog"], tmp_path.absolute())
    a = _rec(ds, "train/images/a.png")
    assert a.size == (40, 20) and a.labels == (0, 1) and a.split == "train"
    assert a.boxes == ((10, 5, 30, 15), (28, 8, 40, 12))  # 40x20 px; the second clipped at x=40
    assert _rec(ds, "train/images/b.png").boxes == () and _rec(ds, "train/images/c.png").boxes == ()
    assert _rec(ds, "train/images/d.png").boxes == ((4, 2, 12, 8),)
    assert _rec(ds, "valid/images/e.png").split == "val"
    notes = "\n".join(ds.notes)
    assert "clipped 1 boxes" in notes and "polygon" in notes and "1 images have no label file" in notes
    assert "2 images have no boxes" in notes


def test_yolo_dict_names_with_gaps_are_reindexed(tmp_path: Path, make_image: MakeImage) -> None:
    labels = {"train/images/a.png": "5 0.5 0.5 0.5 0.5\n2 0.5 0.5 0.2 0.2\n"}
    ds = read_dataset(_yolo(tmp_path, make_image, {2: "car", 5: "bus"}, labels))
    assert ds.classes == ["car", "bus"] and ds.records[0].labels == (1, 0)


def test_yolo_image_lists_and_path_key(tmp_path: Path, make_image: MakeImage) -> None:
    data = tmp_path / "data"
    labels = {f"images/{n}.png": "0 0.5 0.5 0.5 0.5\n" for n in "abc"}
    _yolo(data, make_image, ["cat"], labels)
    (data / "train.txt").write_text("./images/a.png\n./images/b.png\n./images/c.png\n./images/gone.png\n")
    (tmp_path / "sets").mkdir()
    (tmp_path / "sets" / "data.yaml").write_text("path: ../data\nnames: [cat]\ntrain: train.txt\n")
    # the data root is the YAML's folder: a 'path:' beside it is outside, so it takes the flag
    with pytest.raises(DataError, match=r"1 path named by data.yaml resolves outside .*data/train.txt"):
        read_dataset(tmp_path / "sets" / "data.yaml")
    ds = read_dataset(tmp_path / "sets" / "data.yaml", outside_root="allow")
    assert [r.path.name for r in ds.records] == ["a.png", "b.png", "c.png"]
    assert ds.skipped == [(str(data / "images" / "gone.png"), "missing file")]
    (data / "images" / "b.png").write_bytes(b"not a png")
    (data / "images" / "c.png").unlink()
    with pytest.raises(DataError, match="3 of 4 images listed by .* are missing or unreadable"):
        read_dataset(tmp_path / "sets" / "data.yaml", outside_root="allow")


BAD_YOLO = [
    ("malformed line", {"train/images/a.png": "0 0.5 0.5 0.5 0.5\n0 0.5 0.5\n"}, "a.txt:2: expected 'class cx cy w h'"),
    ("not numbers", {"train/images/a.png": "cat 0.5 0.5 0.5 0.5\n"}, "a.txt:1: 'cat 0.5 0.5 0.5 0.5' is not numbers"),
    ("class out of range", {"train/images/a.png": "5 0.5 0.5 0.5 0.5\n"}, "a.txt:1: class 5 is not one of the 2 class ids"),
    ("pixel coordinates", {"train/images/a.png": "0 20 10 8 8\n"}, "a.txt:1: 20 10 8 8 is not normalised"),
    ("no boxes in train", {"train/images/a.png": ""}, "train split of"),
]


@pytest.mark.parametrize(("labels", "expected"), [c[1:] for c in BAD_YOLO], ids=[c[0] for c in BAD_YOLO])
def test_bad_yolo_raises_data_error_with_file_and_line(
    tmp_path: Path, make_image: MakeImage, labels: dict[str, str], expected: str
) -> None:
    with pytest.raises(DataError) as info:
        read_dataset(_yolo(tmp_path, make_image, ["cat", "dog"], labels))
    assert expected in str(info.value)


@pytest.mark.parametrize(
    ("yaml_text", "expected"),
    [
        ("names: [a]\nnc: 2\ntrain: train/images\n", "nc is 2 but 'names' has 1 classes"),
        ("names: [a]\ntrain: nowhere/images\n", "train images 'nowhere/images' not found"),
        ("names: [a]\n", "names no images"),
        ("names: 3\ntrain: train/images\n", "'names' must be a list"),
        ("names: [a, a]\ntrain: train/images\n", "class names a appear twice"),
        ("names: [a\n", "is not valid YAML"),
    ],
)
def test_bad_data_yaml(tmp_path: Path, make_image: MakeImage, yaml_text: str, expected: str) -> None:
    make_image(tmp_path / "train" / "images" / "a.png")
    (tmp_path / "data.yaml").write_text(yaml_text)
    with pytest.raises(DataError) as info:
        read_dataset(tmp_path / "data.yaml")
    assert expected in str(info.value)


# --------------------------------------------------------------------------- shared reader rules


CLIP_CASES = [
    # (raw xyxy, image 40x20) -> (kept box or None, counted as clipped, counted as degenerate)
    ("inside", (10.0, 5.0, 30.0, 15.0), (10.0, 5.0, 30.0, 15.0), False, False),
    ("past the right edge", (30.0, 5.0, 50.0, 15.0), (30.0, 5.0, 40.0, 15.0), True, False),
    ("rounding noise", (-0.25, 0.0, 8.0, 8.0), (0.0, 0.0, 8.0, 8.0), False, False),
    ("1 px wide after clipping", (39.0, 0.0, 41.0, 10.0), None, False, True),
    ("0.5 px high", (5.0, 5.0, 9.0, 5.5), None, False, True),
    ("outside entirely", (50.0, 5.0, 60.0, 15.0), None, False, True),
]


@pytest.mark.parametrize(("raw", "expected", "clipped", "degenerate"),
                         [c[1:] for c in CLIP_CASES], ids=[c[0] for c in CLIP_CASES])
def test_clip_box(raw: Box, expected: Box | None, clipped: bool, degenerate: bool) -> None:
    tally = BoxTally()
    assert clip_box(raw, 40, 20, "here", tally) == expected
    assert (tally.clipped == ["here"], tally.degenerate == ["here"]) == (clipped, degenerate)


def test_coco_and_yolo_clip_and_drop_the_same_boxes(tmp_path: Path, make_image: MakeImage) -> None:
    # the same four boxes on a 40x20 image, as COCO [x, y, w, h] and as YOLO "cx cy w h"
    coco_boxes = [[10, 5, 20, 10], [30, 5, 20, 10], [39, 0, 2, 10], [0, 0, 8, 8]]
    yolo_lines = "".join(
        f"0 {(x + w / 2) / 40} {(y + h / 2) / 20} {w / 40} {h / 20}\n" for x, y, w, h in coco_boxes
    )
    coco = read_dataset(_write(tmp_path / "coco", _coco([("a.png", 40, 20)], [(1, 1, b) for b in coco_boxes],
                                                         _cats((1, "cat"), dummy=None)), make_image))
    yolo = read_dataset(_yolo(tmp_path / "yolo", make_image, ["cat"], {"train/images/a.png": yolo_lines}))
    assert coco.records[0].boxes == ((10, 5, 30, 15), (30, 5, 40, 15), (0, 0, 8, 8))
    assert np.allclose(coco.records[0].box_array(), yolo.records[0].box_array())
    for ds in (coco, yolo):
        notes = "\n".join(ds.notes)
        assert "clipped 1 boxes" in notes and "dropped 1 degenerate boxes" in notes, notes


def _csv_listing(root: Path, mk: MakeImage) -> Path:
    root.mkdir(parents=True)
    for i in range(4):
        mk(root / f"{i}.png")
    (root / "labels.csv").write_text("path,label\n0.png,a\n1.png,b\n2.png,a\n3.png,b\n")
    return root


def _coco_listing(root: Path, mk: MakeImage) -> Path:
    images = [(f"{i}.png", 40, 20) for i in range(4)]
    _write(root, _coco(images, [(i, 1, [2, 2, 10, 10]) for i in range(1, 5)], _cats((1, "cat"), dummy=None)), mk)
    return root


def _yolo_listing(root: Path, mk: MakeImage) -> Path:
    _yolo(root, mk, ["cat"], {f"images/{i}.png": "0 0.5 0.5 0.5 0.5\n" for i in range(4)})
    (root / "train.txt").write_text("".join(f"images/{i}.png\n" for i in range(4)))
    (root / "data.yaml").write_text("names: [cat]\ntrain: train.txt\n")  # a list names missing files
    return root


@pytest.mark.parametrize("build", [_csv_listing, _coco_listing, _yolo_listing], ids=["csv", "coco", "yolo"])
def test_more_than_half_the_images_missing_is_an_error_in_every_reader(
    tmp_path: Path, make_image: MakeImage, build: Callable[[Path, MakeImage], Path]
) -> None:
    root = build(tmp_path / "data", make_image)
    images = sorted(p for p in root.rglob("*.png"))
    for p in images[:2]:
        p.unlink()
    assert len(read_dataset(root).records) == 2  # half missing: skipped with a warning
    images[2].unlink()
    with pytest.raises(DataError, match=r"3 of 4 images listed"):
        read_dataset(root)


@pytest.mark.parametrize(("n_missing", "n_listed", "expected"),
                         [(0, 0, False), (0, 4, False), (2, 4, False), (3, 4, True), (1, 1, True), (3, 5, True)])
def test_mostly_missing(n_missing: int, n_listed: int, expected: bool) -> None:
    assert mostly_missing(n_missing, n_listed) is expected


# --------------------------------------------------------------------------- detection


def _plain_coco_dir(root: Path, mk: MakeImage) -> Path:
    _write(root, _simple(), mk, name="annotations.json")
    return root


def _yolo_dir(root: Path, mk: MakeImage) -> Path:
    return _yolo(root, mk, ["cat"], {"train/images/a.png": "0 0.5 0.5 0.5 0.5\n"})


def _folders(root: Path, mk: MakeImage) -> Path:
    for cls in ("a", "b"):
        mk(root / cls / "1.png")
    return root


@pytest.mark.parametrize(
    ("build", "expected"),
    [
        (lambda r, mk: _roboflow(r, mk), "roboflow-coco"),
        (_plain_coco_dir, "coco"),
        (lambda r, mk: _plain_coco_dir(r, mk) / "annotations.json", "coco"),
        (_yolo_dir, "yolo"),
        (lambda r, mk: _yolo_dir(r, mk) / "data.yaml", "yolo"),
        (_folders, "folders"),
    ],
    ids=["roboflow", "coco dir", "coco json", "yolo dir", "yolo yaml", "class folders"],
)
def test_auto_detection(tmp_path: Path, make_image: MakeImage, build: Callable, expected: str) -> None:
    path = build(tmp_path / "d", make_image)
    assert detect_format(path) == expected
    assert read_dataset(path).fmt == expected


def test_stray_json_beside_class_folders_stays_folders(tmp_path: Path, make_image: MakeImage) -> None:
    _folders(tmp_path, make_image)
    (tmp_path / "meta.json").write_text("{}")
    assert detect_format(tmp_path) == "folders"


@pytest.mark.parametrize("task", ["classify", "multilabel"])
def test_classification_task_on_detection_data_is_an_error(
    tmp_path: Path, make_image: MakeImage, task: str
) -> None:
    with pytest.raises(DataError, match=f"is a detection dataset .*use task 'detect'.* for task '{task}'"):
        read_dataset(_roboflow(tmp_path, make_image), task=task)
    assert read_dataset(tmp_path, task="detect").task == "detect"


# --------------------------------------------------------------------------- splits


def test_presplit_detection_keeps_its_splits(quirky: Dataset) -> None:
    splits = split_records(quirky, seed=3)
    assert {s: sorted(quirky.relpath(r) for r in rs) for s, rs in splits.items()} == {
        "train": ["train/a.jpg", "train/b.jpg", "train/sub/dir/c.jpg"],
        "val": ["valid/img0.jpg"],
        "test": [],
    }


def test_unsplit_detection_gets_a_deterministic_stratified_split(tmp_path: Path, make_image: MakeImage) -> None:
    # 30 images: class 0 on 20, rare class 1 on 5 (beside a class-0 box), 5 negatives
    images = [(f"i{n:02d}.jpg", 16, 16) for n in range(30)]
    anns = [(n + 1, 1, [1, 1, 5, 5]) for n in range(20)] + [(n + 1, 2, [8, 8, 5, 5]) for n in range(15, 20)]
    payload = _coco(images, anns, _cats((1, "common"), (2, "rare"), dummy=None))
    ds = read_dataset(_write(tmp_path, payload, make_image, name="annotations.json"))
    first, second = split_records(ds, test=0.2, val=0.25, seed=0), split_records(ds, test=0.2, val=0.25, seed=0)
    assert first == second
    assert sorted(len(v) for v in first.values()) == [6, 6, 18]
    assert sorted(r.path for rs in first.values() for r in rs) == sorted(r.path for r in ds.records)
    for records in first.values():  # rarest-class strata: the rare class and negatives are spread
        assert any(1 in r.labels for r in records) and any(not r.boxes for r in records)


# --------------------------------------------------------------------------- inspect


def run_cli(argv: list[object], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_inspect_roboflow_text(capsys: pytest.CaptureFixture[str], quirky: Dataset) -> None:
    code, out, err = run_cli(["data", "inspect", quirky.root], capsys)
    assert code == 0, err
    assert "Images / boxes per class" in out and "roboflow-coco" in out
    assert "merged into one class" in out and "dropped 3 degenerate boxes" in out
    assert "boxes per image  min 0  median 1  max 4" in out


def test_inspect_json_detection_section(capsys: pytest.CaptureFixture[str], quirky: Dataset) -> None:
    code, out, _ = run_cli(["data", "inspect", quirky.root, "--json"], capsys)
    assert code == 0
    report = json.loads(out)
    det = report["detection"]
    assert report["task"] == "detect" and report["splits"] == ["train", "val"]
    assert det["table"]["starfish"]["train"] == {"images": 1, "boxes": 2}
    assert det["table"]["fish"]["total"] == {"images": 3, "boxes": 3}  # a.jpg, c.jpg, valid/img0.jpg
    assert det["boxes"] == 6 and det["crowd_boxes"] == 1
    assert det["boxes_per_image"] == {"min": 0, "median": 1.0, "max": 4}
    assert det["no_boxes"]["count"] == 1 and det["no_boxes"]["examples"] == ["train/b.jpg"]
    # areas 80, 400, 25, 36, 100 (train/a, c) and 100 (valid): all below 32² = 1024
    assert (det["box_sizes"]["small"], det["box_sizes"]["medium"], det["box_sizes"]["large"]) == (6, 0, 0)
    assert det["notes"] == quirky.notes
    assert report["skipped"]["count"] == 1  # valid/stray.jpg


def test_inspect_json_has_per_split_totals_at_the_top_level(
    capsys: pytest.CaptureFixture[str], quirky: Dataset
) -> None:
    code, out, _ = run_cli(["data", "inspect", quirky.root, "--json"], capsys)
    assert code == 0
    report = json.loads(out)
    totals = report["split_totals"]
    assert list(totals) == ["train", "val", "total"]
    assert totals["total"] == {"images": report["total_images"], "boxes": 6, "empty_images": 1}
    assert totals["train"]["empty_images"] == 1 and totals["val"]["empty_images"] == 0  # train/b.jpg
    for key in ("images", "boxes", "empty_images"):
        assert totals["train"][key] + totals["val"][key] == totals["total"][key]
    assert totals["val"]["boxes"] == 1  # valid/img0.jpg's fish
    # the console table's bottom rows show the same numbers, split by split
    code, text, _ = run_cli(["data", "inspect", quirky.root], capsys)
    all_row = next(line for line in text.splitlines() if line.strip("│ ").startswith("all"))
    cells = [c.strip() for c in all_row.strip("│ ").split("│")[1:]]
    assert cells == [str(totals[s][k]) for s in ("train", "val", "total") for k in ("images", "boxes")]


def test_inspect_reports_annotated_size_that_differs_from_the_file(
    tmp_path: Path, make_image: MakeImage, capsys: pytest.CaptureFixture[str]
) -> None:
    _write(tmp_path, _simple(), make_image, name="annotations.json")
    payload = json.loads((tmp_path / "annotations.json").read_text())
    payload["images"][0]["width"] = 400  # a resized export whose JSON kept the old size
    (tmp_path / "annotations.json").write_text(json.dumps(payload))
    code, out, _ = run_cli(["data", "inspect", tmp_path, "--json"], capsys)
    report = json.loads(out)
    assert code == 0 and report["detection"]["size_mismatch"]["count"] == 1
    assert "1 image whose annotated size differs from the file" in report["verdict"]


@pytest.mark.parametrize("build", [_plain_coco_dir, _yolo_dir], ids=["coco", "yolo"])
def test_inspect_plain_coco_and_yolo(
    tmp_path: Path, make_image: MakeImage, capsys: pytest.CaptureFixture[str], build: Callable
) -> None:
    path = build(tmp_path / "d", make_image)
    code, out, err = run_cli(["data", "inspect", path], capsys)
    assert code == 0, err
    assert "Images / boxes per class" in out
    # these tiny sets have a class with one box: the one problem, said plainly (issue 12)
    assert "1 problem: class '" in out and "' has only 1 box" in out and "a model cannot learn it" in out


def test_inspect_bad_detection_data_exits_2_with_one_line(
    tmp_path: Path, make_image: MakeImage, capsys: pytest.CaptureFixture[str]
) -> None:
    root = _roboflow(tmp_path, make_image, train='{"images": [')
    code, out, err = run_cli(["data", "inspect", root], capsys)
    assert code == 2 and out == ""
    assert err.startswith("error:") and "is not valid JSON" in err and err.count("\n") == 1


# --------------------------------------------------------------------------- demo


def test_demo_detection_is_a_readable_roboflow_export(tmp_path: Path) -> None:
    root = make_demo_detection(tmp_path / "demo", n_train=12, n_val=4, n_test=3, size=64, seed=1)
    raw = json.loads((root / "train" / RF).read_text())
    assert raw["categories"][0] == {"id": 0, "name": "shapes", "supercategory": "none"}
    ds = read_dataset(root)
    assert (ds.fmt, ds.classes) == ("roboflow-coco", list(DETECT_CLASSES))
    counts = {s: sum(r.split == s for r in ds.records) for s in ("train", "val", "test")}
    assert counts == {"train": 12, "val": 4, "test": 3}
    assert ds.skipped == [] and not any("clipped" in n or "dropped" in n for n in ds.notes)
    n_boxes = [len(r.boxes) for r in ds.records]
    assert max(n_boxes) <= 4 and 0 in n_boxes and sum(n_boxes) >= len(n_boxes)
    for r in ds.records:
        assert r.size == (64, 64)
        for x1, y1, x2, y2 in r.boxes:
            assert 0 <= x1 < x2 <= 64 and 0 <= y1 < y2 <= 64
            assert 0.15 * 64 <= max(x2 - x1, y2 - y1) <= 0.46 * 64  # 20-45 % of the side


def test_demo_detection_is_deterministic(tmp_path: Path) -> None:
    def files(root: Path) -> dict[str, bytes]:
        return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    kwargs = {"n_train": 3, "n_val": 2, "n_test": 0, "size": 64}
    a = files(make_demo_detection(tmp_path / "a", seed=5, **kwargs))
    b = files(make_demo_detection(tmp_path / "b", seed=5, **kwargs))
    c = files(make_demo_detection(tmp_path / "c", seed=6, **kwargs))
    assert a == b and a != c
    assert not any(k.startswith("test/") for k in a)  # n_test=0: no test folder
    make_demo_detection(tmp_path / "a", seed=5, **kwargs)  # a rerun replaces its own files
    assert files(tmp_path / "a") == a


def test_demo_detection_refuses_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="max_objects"):
        make_demo_detection(tmp_path, max_objects=0)


# --------------------------------------------------------------------------- data root (C2)


def test_coco_file_names_outside_the_data_folder_are_refused(tmp_path: Path, make_image: MakeImage) -> None:
    root = tmp_path / "d"
    outside = make_image(tmp_path / "secret.jpg", size=(40, 30), fmt="JPEG")
    payload = _coco([("img0.jpg", 40, 30), ("img1.jpg", 40, 30)], [(1, 1, [2, 2, 10, 10])], _cats((1, "fish")))
    _write(root, payload, make_image, name="annotations.json")  # writes the two inside images
    payload["images"] += [{"id": 3, "file_name": "../secret.jpg", "width": 40, "height": 30},
                          {"id": 4, "file_name": "/etc/passwd", "width": 40, "height": 30},
                          {"id": 5, "file_name": "../../never/there.jpg", "width": 40, "height": 30}]
    payload["annotations"].append({"id": 9, "image_id": 3, "category_id": 1, "bbox": [1, 1, 9, 9], "iscrowd": 0})
    (root / "annotations.json").write_text(json.dumps(payload))
    with pytest.raises(DataError) as info:
        read_dataset(root)
    msg = str(info.value)
    assert msg.startswith("3 paths named by file_name in annotations.json resolve outside the data folder")
    assert "/etc/passwd" in msg and "--allow-outside-root" in msg
    skipped = read_dataset(root, outside_root="skip")  # data inspect: the rest, nothing outside opened
    assert [r.path.name for r in skipped.records] == ["img0.jpg", "img1.jpg"] and len(skipped.outside_root) == 3
    allowed = read_dataset(root, outside_root="allow")  # the outside image and its box are read
    assert outside in [r.path.resolve() for r in allowed.records]


def test_roboflow_file_name_escaping_its_split_folder_but_not_the_dataset_is_fine(
    tmp_path: Path, make_image: MakeImage
) -> None:
    root = _roboflow(tmp_path / "d", make_image)
    make_image(root / "shared" / "s.jpg", size=(40, 30), fmt="JPEG")
    payload = json.loads((root / "train" / RF).read_text())
    payload["images"].append({"id": 7, "file_name": "../shared/s.jpg", "width": 40, "height": 30})
    (root / "train" / RF).write_text(json.dumps(payload))
    ds = read_dataset(root)
    assert "s.jpg" in [r.path.name for r in ds.records] and ds.outside_root == []
    payload["images"].append({"id": 8, "file_name": "../../x.jpg", "width": 40, "height": 30})
    (root / "train" / RF).write_text(json.dumps(payload))
    with pytest.raises(DataError, match="1 path named by file_name in .* resolves outside"):
        read_dataset(root)


def test_yolo_lists_dirs_and_labels_outside_the_data_folder_are_refused(tmp_path: Path, make_image: MakeImage) -> None:
    data = _yolo(tmp_path / "data", make_image, ["cat"], {f"train/images/{n}.png": "0 0.5 0.5 0.5 0.5\n" for n in "ab"})
    stray = make_image(tmp_path / "stray" / "images" / "s.png", size=(40, 20), fmt="PNG")
    (data / "data.yaml").write_text("names: [cat]\ntrain: [train/images, list.txt]\n")
    (data / "list.txt").write_text(f"{stray}\n../stray/images/s.png\n")  # one file, named twice
    with pytest.raises(DataError, match=r"1 path named by data.yaml resolves outside .*first: /.*/stray/images/s\.png\)"):
        read_dataset(data)
    # an image folder outside, as a YAML entry
    (data / "data.yaml").write_text(f"names: [cat]\ntrain: [train/images, {stray.parent}]\n")
    with pytest.raises(DataError, match="1 path named by data.yaml resolves outside"):
        read_dataset(data)
    # a label file symlinked out of the dataset is not read either
    (data / "data.yaml").write_text("names: [cat]\ntrain: train/images\n")
    secret = tmp_path / "secret.txt"
    secret.write_text("0 0.5 0.5 0.5 0.5\n")
    (data / "train" / "labels" / "b.txt").unlink()
    os.symlink(secret, data / "train" / "labels" / "b.txt")
    with pytest.raises(DataError, match=r"1 path named by data.yaml resolves outside .*first: train/labels/b\.txt \(→ .*secret\.txt\)"):
        read_dataset(data)
    assert [r.path.name for r in read_dataset(data, outside_root="skip").records] == ["a.png"]
    assert len(read_dataset(data, outside_root="allow").records) == 2


def test_yolo_roboflow_parent_paths_prefer_the_folder_inside_the_dataset(tmp_path: Path, make_image: MakeImage) -> None:
    data = _yolo(tmp_path / "data", make_image, ["cat"], {"train/images/a.png": "0 0.5 0.5 0.5 0.5\n"})
    make_image(tmp_path / "train" / "images" / "other.png", size=(40, 20), fmt="PNG")  # ../train/images exists too
    ds = read_dataset(data)
    assert [r.path.name for r in ds.records] == ["a.png"] and ds.outside_root == []
