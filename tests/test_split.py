"""Deterministic stratified splits, pre-split data, and the saved split file."""

from __future__ import annotations

import json
import logging
import os
import random
import stat
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from lensforge.data.records import Dataset, Record
from lensforge.data.split import load_split, save_split, split_records
from lensforge.errors import ConfigError, DataError

ROOT = Path("/data")  # records are never opened: split only reads paths and labels


def _ds(counts: dict[int, int], *, task: str = "classify", split: str | None = None) -> Dataset:
    records = [
        Record(ROOT / f"c{label}" / f"{i:03d}.jpg", (label,), split)
        for label, n in counts.items()
        for i in range(n)
    ]
    return Dataset(ROOT, [f"c{k}" for k in counts], records, task=task)


def _rels(ds: Dataset, splits: dict[str, list[Record]]) -> dict[str, list[str]]:
    return {name: [ds.relpath(r) for r in recs] for name, recs in splits.items()}


def test_split_sizes_and_stratification() -> None:
    ds = _ds({0: 50, 1: 30, 2: 20})
    splits = split_records(ds, test=0.2, val=0.25, seed=0)
    assert [len(splits[k]) for k in ("train", "val", "test")] == [60, 20, 20]
    assert Counter(r.labels[0] for r in splits["test"]) == {0: 10, 1: 6, 2: 4}
    assert Counter(r.labels[0] for r in splits["val"]) == {0: 10, 1: 6, 2: 4}
    every = [r for part in splits.values() for r in part]
    assert sorted(every, key=ds.relpath) == sorted(ds.records, key=ds.relpath)


def test_split_is_deterministic_whatever_the_input_order() -> None:
    ds = _ds({0: 13, 1: 9})
    shuffled = _ds({0: 13, 1: 9})
    random.Random(1).shuffle(shuffled.records)
    assert _rels(ds, split_records(ds, seed=3)) == _rels(shuffled, split_records(shuffled, seed=3))
    assert _rels(ds, split_records(ds, seed=3)) != _rels(ds, split_records(ds, seed=4))


@pytest.mark.parametrize(
    "counts",
    [
        {0: 1, 1: 1},
        {0: 1},
        {0: 5, 1: 1, 2: 1},
        {0: 2, 1: 1},
        {0: 3, 1: 3, 2: 3, 3: 3},
        {0: 40, 1: 1},
    ],
    ids=["two singletons", "one record", "singletons beside a class", "tiny", "many", "one rare"],
)
def test_tiny_classes_never_crash(counts: dict[int, int]) -> None:
    ds = _ds(counts)
    splits = split_records(ds, test=0.2, val=0.2)
    assert sum(len(v) for v in splits.values()) == len(ds.records)
    assert splits["train"]  # something always stays for training


def test_zero_fractions_keep_everything_in_train() -> None:
    splits = split_records(_ds({0: 4, 1: 4}), test=0.0, val=0.0)
    assert (len(splits["train"]), splits["val"], splits["test"]) == (8, [], [])


@pytest.mark.parametrize(("test", "val"), [(1.0, 0.2), (-0.1, 0.2), (0.2, 1.5)])
def test_bad_fractions(test: float, val: float) -> None:
    with pytest.raises(ConfigError, match="fraction must be in"):
        split_records(_ds({0: 4, 1: 4}), test=test, val=val)


def test_multilabel_stratifies_on_rarest_label() -> None:
    # Label 2 is rare (10 of 100) and always rides with the common label 0.
    records = [
        Record(ROOT / f"{i:03d}.jpg", (0, 2) if i < 10 else ((0,) if i % 2 else (1,)))
        for i in range(100)
    ]
    records += [Record(ROOT / f"neg{i}.jpg", ()) for i in range(10)]
    ds = Dataset(ROOT, ["a", "b", "rare"], records, task="multilabel")
    splits = split_records(ds, test=0.2, val=0.25, seed=0)
    assert sum(2 in r.labels for r in splits["test"]) == 2
    assert sum(r.labels == () for r in splits["test"]) == 2


def test_presplit_keeps_given_splits_and_carves_val(caplog: pytest.LogCaptureFixture) -> None:
    train = _ds({0: 10, 1: 10}, split="train").records
    ds = Dataset(ROOT, ["c0", "c1"], train)
    with caplog.at_level(logging.WARNING, logger="lensforge.data.split"):
        splits = split_records(ds, test=0.5, val=0.2)
    assert (len(splits["train"]), len(splits["val"]), splits["test"]) == (16, 4, [])
    assert Counter(r.labels[0] for r in splits["val"]) == {0: 2, 1: 2}
    assert "no test split" in caplog.text


def test_presplit_with_all_splits_is_used_as_is() -> None:
    records = [
        Record(ROOT / f"{s}{i}.jpg", (i % 2,), s)
        for s in ("train", "val", "test")
        for i in range(4)
    ]
    splits = split_records(Dataset(ROOT, ["a", "b"], records), test=0.5, val=0.5)
    assert {k: {r.split for r in v} for k, v in splits.items()} == {
        "train": {"train"},
        "val": {"val"},
        "test": {"test"},
    }


def test_save_load_round_trip(tmp_path: Path) -> None:
    ds = _ds({0: 10, 1: 10})
    splits = split_records(ds, seed=7)
    path = save_split(splits, ds, tmp_path / "run" / "split.json", seed=7)
    saved = json.loads(path.read_text())
    assert (saved["format"], saved["seed"], saved["root"]) == (1, 7, str(ROOT))
    assert saved["splits"]["test"][0].startswith("c")  # relative paths
    assert load_split(path, ds) == splits


def test_load_split_tolerates_few_missing_and_refuses_many(tmp_path: Path) -> None:
    ds = _ds({0: 15, 1: 15})
    path = save_split(split_records(ds), ds, tmp_path / "split.json")
    fewer = Dataset(ROOT, ds.classes, ds.records[1:])
    assert sum(len(v) for v in load_split(path, fewer).values()) == 29
    changed = Dataset(ROOT, ds.classes, ds.records[:20])
    with pytest.raises(DataError, match=r"10 of 30 files .* the data changed"):
        load_split(path, changed)


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (None, "does not exist"),
        ("{not json", "not valid JSON"),
        ('{"format": 9, "splits": {}}', "has format 9"),
        ('{"format": 1}', "no 'splits' mapping"),
        ('{"format": 1, "splits": {"dev": []}}', "unknown split 'dev'"),
    ],
)
def test_load_split_bad_files(tmp_path: Path, content: str | None, expected: str) -> None:
    path = tmp_path / "split.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(DataError, match=expected):
        load_split(path, _ds({0: 2, 1: 2}))


@pytest.fixture
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    """Run the test under the umask given by indirect parametrisation; restore it after."""
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
@pytest.mark.parametrize(
    ("umask", "mode"), [(0o022, 0o644), (0o027, 0o640)], indirect=["umask"], ids=["022", "027"]
)
def test_saved_split_gets_the_umask_permissions_not_private_ones(
    tmp_path: Path, umask: int, mode: int
) -> None:
    """A split saved by the training user must be readable by a server running as another."""
    ds = _ds({0: 4, 1: 4})
    path = save_split(split_records(ds), ds, tmp_path / "split.json")
    assert stat.S_IMODE(path.stat().st_mode) == mode
    path = save_split(split_records(ds), ds, path)  # replacing it keeps the same permissions
    assert stat.S_IMODE(path.stat().st_mode) == mode
    assert [p.name for p in tmp_path.iterdir()] == ["split.json"]  # no temporary file left
