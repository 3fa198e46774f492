"""Dataset inspection: counts, broken / duplicate / odd images, the verdict and its rendering."""

from __future__ import annotations

import json
import os
import shutil
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image
from rich.console import Console

from lensforge.cli.render import print_inspection
from lensforge.data.formats import read_dataset
from lensforge.data.inspect import RARE_CLASS, inspect_dataset
from lensforge.data.records import Dataset, Record
from lensforge.data.split import split_records

MakeImage = Callable[..., Path]
SIZE = (40, 36)  # above the "tiny" threshold


def _render(report: dict) -> str:
    console = Console(record=True, width=160, color_system=None)
    print_inspection(report, console)
    return console.export_text()


@pytest.fixture
def messy(tmp_path: Path, make_image: MakeImage) -> Path:
    """Pre-split folders with one of every problem the inspector should find."""
    root = tmp_path / "messy"
    for split in ("train", "val", "test"):
        for cls in ("ants", "bees"):
            for i in range(2):
                make_image(root / split / cls / f"{i}.jpg", size=SIZE)
    truncated = make_image(root / "train" / "ants" / "truncated.jpg", size=(64, 64))
    truncated.write_bytes(truncated.read_bytes()[:400])
    shutil.copy(root / "train" / "bees" / "0.jpg", root / "test" / "bees" / "leak.jpg")
    make_image(root / "train" / "ants" / "cmyk.jpg", size=SIZE, mode="CMYK")
    make_image(root / "train" / "bees" / "deep.png", size=SIZE, mode="I;16")
    exif = Image.Exif()
    exif[0x0112] = 6  # EXIF orientation: rotate 90 degrees to display
    make_image(root / "val" / "ants" / "rotated.jpg", size=(40, 60), exif=exif)
    make_image(root / "val" / "bees" / "tiny.png", size=(8, 8))
    return root


def test_inspect_finds_every_problem(messy: Path) -> None:
    calls: list[tuple[int, int]] = []
    ds = read_dataset(messy)
    report = inspect_dataset(ds, progress=lambda done, total: calls.append((done, total)))
    json.dumps(report)  # JSON-ready

    assert calls[-1] == (18, 18) and len(calls) == 18  # each file once
    assert report["format"] == "split-folders" and report["total_images"] == 18
    assert report["splits"] == ["train", "val", "test"]
    assert report["counts"]["table"] == {
        "ants": {"train": 4, "val": 3, "test": 2},
        "bees": {"train": 3, "val": 3, "test": 3},
    }
    assert report["counts"]["per_split"] == {"train": 7, "val": 6, "test": 5}

    unreadable = report["unreadable"]
    assert unreadable["count"] == 1
    assert unreadable["examples"][0]["path"] == "train/ants/truncated.jpg"
    assert unreadable["examples"][0]["code"] == "corrupt"

    dup = report["duplicates"]
    assert (dup["groups"], dup["files"], dup["cross_split_groups"]) == (1, 2, 1)
    assert dup["cross_split_examples"][0] == [
        {"path": "test/bees/leak.jpg", "split": "test"},
        {"path": "train/bees/0.jpg", "split": "train"},
    ]

    odd = {k: entry["examples"] for k, entry in report["odd_images"].items() if entry["count"]}
    assert odd == {
        "cmyk": ["train/ants/cmyk.jpg"],
        "16bit": ["train/bees/deep.png"],
        "exif_rotated": ["val/ants/rotated.jpg"],
        "tiny": ["val/bees/tiny.png"],
    }
    # Sizes as displayed: the rotated 40x60 JPEG counts as 60 wide.
    assert report["image_sizes"]["width"]["max"] == 60
    assert report["image_sizes"]["shorter_side"]["0-31"] == 1

    assert report["issues"] == ["1 unreadable file", "1 duplicate group across splits (leakage)"]
    assert report["verdict"].startswith("2 problems: 1 unreadable file; 1 duplicate group")

    text = _render(report)
    for expected in ("truncated.jpg (corrupt)", "leak.jpg (test)", "CMYK", "EXIF", "2 problems:"):
        assert expected in text


def test_clean_dataset_is_ok(tmp_path: Path, make_image: MakeImage) -> None:
    for cls in ("cats", "dogs"):
        for i in range(RARE_CLASS):  # as few as a class may have without being a problem
            make_image(tmp_path / cls / f"{i}.png", size=SIZE)
    ds = read_dataset(tmp_path)
    report = inspect_dataset(ds, splits=split_records(ds, test=0.2, val=0.0), verify=False)
    assert report["verdict"] == "OK: 2 classes, 10 images, no problems"
    assert report["splits"] == ["train", "test"]
    assert report["counts"]["per_split"] == {"train": 8, "test": 2}
    assert report["imbalance_ratio"] == 1.0
    assert report["file_formats"] == {"PNG": 10}
    assert report["rare_classes"] == {} and report["advice"] == []
    assert "OK: 2 classes, 10 images, no problems" in _render(report)


def test_imbalance_missing_class_and_skipped(tmp_path: Path, make_image: MakeImage) -> None:
    paths = [make_image(tmp_path / f"{i}.png", size=SIZE) for i in range(12)]
    records = [Record(p, (0,), "train") for p in paths[:10]] + [Record(paths[10], (1,), "train")]
    records.append(Record(paths[11], (0,), "test"))
    ds = Dataset(tmp_path, ["common", "rare"], records, skipped=[("x.txt", "not an image")])
    report = inspect_dataset(ds)
    assert report["imbalance_ratio"] == 11.0
    assert report["issues"] == [
        "1 entry skipped by the reader",
        "class 'rare' has only 1 image",
        "class imbalance 11.0:1 (common 11 vs rare 1)",
        "test split has no images of: rare",
    ]
    assert "x.txt (not an image)" in _render(report)


def test_multilabel_counts_and_conflicting_duplicates(
    tmp_path: Path, make_image: MakeImage
) -> None:
    a = make_image(tmp_path / "a.png", size=SIZE)
    b = tmp_path / "b.png"
    shutil.copy(a, b)
    c = make_image(tmp_path / "c.png", size=SIZE, mode="RGBA")
    d = make_image(tmp_path / "d.png", size=SIZE, mode="L")
    records = [Record(a, (0,)), Record(b, (0, 1)), Record(c, ()), Record(d, (1,))]
    report = inspect_dataset(Dataset(tmp_path, ["x", "y"], records, task="multilabel", fmt="csv"))
    assert report["counts"]["per_class"] == {"x": 2, "y": 2}
    assert report["counts"]["no_label"] == 1
    assert report["splits"] == []
    assert report["duplicates"]["conflicting_label_groups"] == 1
    assert report["odd_images"]["alpha"]["examples"] == ["c.png"]
    assert report["odd_images"]["grayscale"]["examples"] == ["d.png"]
    assert report["issues"] == [
        "1 group of identical files",
        "1 duplicate group with different labels",
        "class 'x' has only 2 images",
        "class 'y' has only 2 images",
    ]
    assert "(no label)" in _render(report)


def test_missing_file_is_reported_not_raised(tmp_path: Path, make_image: MakeImage) -> None:
    ok = make_image(tmp_path / "ok.png", size=SIZE)
    ds = Dataset(tmp_path, ["a", "b"], [Record(ok, (0,)), Record(tmp_path / "gone.png", (1,))])
    report = inspect_dataset(ds)
    assert report["unreadable"]["count"] == 1
    assert report["unreadable"]["examples"][0]["path"] == "gone.png"


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
def test_fifos_and_symlink_loops_never_block_inspection(tmp_path: Path, make_image: MakeImage) -> None:
    root = tmp_path / "data"
    for cls in ("cats", "dogs"):
        for i in range(2):
            make_image(root / cls / f"{i}.png", size=SIZE)
    os.mkfifo(root / "cats" / "x.jpg")
    os.symlink(root, root / "cats" / "loop")
    # A record that still names the FIFO, as a CSV or a dataset changed after reading can.
    ds = read_dataset(root)
    ds.records.append(Record(root / "cats" / "x.jpg", (0,)))

    reports: list[dict] = []
    # In a thread: a scan that opens the FIFO blocks forever, so fail after a timeout instead.
    worker = threading.Thread(target=lambda: reports.append(inspect_dataset(ds)), daemon=True)
    worker.start()
    worker.join(20)
    assert not worker.is_alive(), "inspect_dataset blocked on a FIFO"
    report = reports[0]
    assert report["total_images"] == 5 and report["duplicates"]["groups"] == 0
    (bad,) = report["unreadable"]["examples"]
    assert (bad["path"], bad["code"]) == ("cats/x.jpg", "unreadable")
    assert "not a regular file" in bad["reason"]
    assert {s["path"] for s in report["skipped"]["examples"]} == {"cats/x.jpg", "cats/loop"}


def test_inspect_lists_paths_outside_the_data_folder_without_reading_them(
    tmp_path: Path, make_image: MakeImage, capsys: pytest.CaptureFixture[str]
) -> None:
    from lensforge.cli import main

    root = tmp_path / "data"
    for cls in ("cats", "dogs"):
        for i in range(2):
            make_image(root / cls / f"{i}.png", size=SIZE)
    outside = make_image(tmp_path / "private" / "me.png", size=SIZE)
    os.symlink(outside, root / "cats" / "me.png")
    os.symlink(tmp_path / "private", root / "private")  # a class folder leading out

    assert main(["data", "inspect", str(root), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["total_images"] == 4  # the outside file was neither probed nor hashed
    assert report["outside_root"] == {
        "count": 2, "allowed": False,
        "examples": [f"cats/me.png (→ {outside})", f"private (→ {tmp_path / 'private'})"],
    }
    assert any("2 paths outside the data folder (not read" in issue for issue in report["issues"])

    assert main(["data", "inspect", str(root)]) == 0
    text = capsys.readouterr().out
    assert "outside the data folder" in text and "cats/me.png" in text

    assert main(["data", "inspect", str(root), "--json", "--allow-outside-root"]) == 0
    allowed = json.loads(capsys.readouterr().out)
    assert allowed["total_images"] == 6 and allowed["outside_root"]["allowed"] is True
    assert allowed["classes"] == ["cats", "dogs", "private"]


def test_train_refuses_data_outside_its_folder(
    tmp_path: Path, make_image: MakeImage, capsys: pytest.CaptureFixture[str]
) -> None:
    """The refusal comes from reading the data, before any model or run directory exists."""
    from lensforge.cli import main
    from lensforge.config import TrainConfig

    data = tmp_path / "data"
    rows = [f"{c}{i}.png,{c}" for c in ("a", "b") for i in range(2)]
    for row in rows:
        make_image(data / row.split(",")[0], size=SIZE)
    for i in range(3):
        make_image(tmp_path / "home" / f"p{i}.png", size=SIZE)
    rows += [f"../home/p{i}.png,a" for i in range(3)] + ["/etc/passwd,b"]
    (data / "labels.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
    out = tmp_path / "run"
    code = main(["train", str(data), "--out", str(out), "--no-pretrained"])
    err = capsys.readouterr().err
    assert code == 2 and not out.exists()
    assert "4 paths listed in labels.csv resolve outside the data folder" in err
    assert "first: ../home/p0.png, ../home/p1.png, ../home/p2.png, ...)" in err
    assert "--allow-outside-root" in err and "Traceback" not in err
    assert TrainConfig(data=str(data), allow_outside_root=True).validate().allow_outside_root is True


# -- rare classes and what training will do with the data (issue 12) ---------------------------


def _coco_with_a_one_box_class(root: Path, make_image: MakeImage) -> Path:
    """A Roboflow-style COCO file: 'pawn' on six images, 'black-king' on one box only."""
    images, annotations = [], []
    for i in range(6):
        make_image(root / f"{i}.jpg", size=(64, 64))
        images.append({"id": i, "file_name": f"{i}.jpg", "width": 64, "height": 64})
        annotations.append({"id": i, "image_id": i, "category_id": 1, "bbox": [4, 4, 20, 20], "area": 400, "iscrowd": 0})
    annotations.append({"id": 99, "image_id": 0, "category_id": 2, "bbox": [30, 30, 20, 20], "area": 400, "iscrowd": 0})
    coco = {"images": images, "annotations": annotations,
            "categories": [{"id": 1, "name": "pawn"}, {"id": 2, "name": "black-king"}]}
    (root / "annotations.json").write_text(json.dumps(coco))
    return root / "annotations.json"


def test_a_class_with_one_box_is_said_plainly_with_advice(tmp_path: Path, make_image: MakeImage) -> None:
    report = inspect_dataset(read_dataset(_coco_with_a_one_box_class(tmp_path, make_image)), verify=False)
    assert report["rare_classes"] == {"black-king": 1}
    assert "class 'black-king' has only 1 box" in report["issues"]
    assert report["advice"] == [
        "class 'black-king' has 1 box: a model cannot learn it from so few; drop or merge it "
        "(e.g. remove it from the annotations, or relabel its boxes as a related class)"
    ]
    text = " ".join(_render(report).split())
    assert "class 'black-king' has 1 box: a model cannot learn it from so few; drop or merge it" in text
    assert "class 'black-king' has only 1 box" in report["verdict"]


@pytest.mark.parametrize(("splits", "says"), [(("train", "test"), True), (("train", "val"), False), (("train", "val", "test"), False)])
def test_pre_split_data_without_val_says_training_takes_it_from_train(
    tmp_path: Path, make_image: MakeImage, splits: tuple[str, ...], says: bool
) -> None:
    for split in splits:
        for cls in ("ants", "bees"):
            for i in range(3):
                make_image(tmp_path / split / cls / f"{i}.jpg", size=SIZE)
    report = inspect_dataset(read_dataset(tmp_path), verify=False)
    note = ("no val split: training will take 20% of train for validation "
            "(lensforge train --split TEST,VAL changes it; with pre-split data only VAL is used)")
    assert (note in report["advice"]) is says
    assert (note in " ".join(_render(report).split())) is says
    assert report["verdict"].startswith("OK")  # a fact about training, not a problem of the data
