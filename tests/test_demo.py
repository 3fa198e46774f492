"""The synthetic demo datasets: deterministic bytes, readable by read_dataset."""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from lensforge.data.demo import CLASSIFY_CLASSES, MULTILABEL_CLASSES, make_demo_dataset
from lensforge.data.formats import read_dataset
from lensforge.errors import DataError


def _digest(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_classify_demo_is_deterministic_and_readable(tmp_path: Path) -> None:
    a = make_demo_dataset(tmp_path / "a", n_per_class=3, size=40, seed=1)
    b = make_demo_dataset(tmp_path / "b", n_per_class=3, size=40, seed=1)
    assert _digest(a) == _digest(b)
    assert _digest(a) != _digest(make_demo_dataset(tmp_path / "c", n_per_class=3, size=40, seed=2))

    ds = read_dataset(a)
    assert (ds.fmt, ds.task, ds.classes) == ("folders", "classify", sorted(CLASSIFY_CLASSES))
    assert Counter(r.labels[0] for r in ds.records) == {0: 3, 1: 3, 2: 3, 3: 3}
    assert (a / "circle" / "img_0001.jpg").is_file()
    with Image.open(ds.records[0].path) as image:
        assert (image.format, image.mode, image.size) == ("JPEG", "RGB", (40, 40))


def test_multilabel_demo_has_every_subset(tmp_path: Path) -> None:
    root = make_demo_dataset(tmp_path / "m", task="multilabel", n_per_class=8, size=32)
    ds = read_dataset(root)
    assert (ds.fmt, ds.task, ds.classes) == ("csv", "multilabel", sorted(MULTILABEL_CLASSES))
    assert len(ds.records) == 24
    assert len({r.labels for r in ds.records}) == 8  # all subsets, the empty one included
    assert Counter(i for r in ds.records for i in r.labels) == {0: 12, 1: 12, 2: 12}
    assert (root / "labels.csv").read_text().startswith("path,labels\n")


def test_rerun_replaces_its_own_files_but_refuses_other_folders(tmp_path: Path) -> None:
    root = make_demo_dataset(tmp_path / "d", n_per_class=1, size=24)
    first = _digest(root)
    make_demo_dataset(root, task="multilabel", n_per_class=1, size=24)
    assert not (root / "circle").exists() and (root / "labels.csv").is_file()
    make_demo_dataset(root, n_per_class=1, size=24)
    assert _digest(root) == first

    other = tmp_path / "mine"
    other.mkdir()
    (other / "keep.txt").write_text("precious")
    with pytest.raises(DataError, match="not empty"):
        make_demo_dataset(other)
    assert (other / "keep.txt").read_text() == "precious"


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [({"task": "detect"}, "unknown demo task"), ({"n_per_class": 0}, "n_per_class >= 1")],
)
def test_bad_arguments(tmp_path: Path, kwargs: dict, expected: str) -> None:
    with pytest.raises(DataError, match=expected):
        make_demo_dataset(tmp_path / "x", **kwargs)
