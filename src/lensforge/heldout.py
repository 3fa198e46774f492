"""Which images a bundle is measured on: its saved split mapped onto its data (labels
re-indexed to the bundle's classes), or another dataset's held-out folder. Evaluation, the
export checks, bench and the run report all take their images from here."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

from lensforge.data.formats import read_dataset
from lensforge.data.records import Dataset, Record
from lensforge.data.split import load_split
from lensforge.errors import DataError
from lensforge.runtime.bundle import SPLIT_FILE, Bundle

log = logging.getLogger(__name__)


def choose_records(bundle: Bundle, ds: Dataset, split: str | None) -> tuple[list[Record], str]:
    """Which images to evaluate on, and how to describe the choice.

    The training data itself → its saved held-out split (never the training images);
    another pre-split dataset → its test (else val) split; anything else → every image.
    """
    same_data = Path(bundle.meta.get("data", {}).get("root", "")).resolve() == ds.root.resolve()
    if split == "all":
        return list(ds.records), "all images"
    if same_data and (bundle.path / SPLIT_FILE).is_file() and _shares_images(bundle.path / SPLIT_FILE, ds):
        saved = load_split(bundle.path / SPLIT_FILE, ds)
        name = split or ("test" if saved["test"] else "val")
        if not saved.get(name):
            raise DataError(f"the saved split has no {name!r} images; choose --split val/test/all")
        return saved[name], f"the {name} split saved at training time"
    if ds.presplit:
        name = split or ("test" if any(r.split == "test" for r in ds.records) else "val")
        recs = [r for r in ds.records if r.split == name]
        if not recs:
            raise DataError(f"{ds.root} has no {name!r} split")
        return recs, f"the {name} folder"
    if split not in (None, "all"):
        raise DataError(f"{ds.root} is neither the training data nor split into folders: there is no {split!r} split; "
                        "leave out --split to evaluate every image")
    return list(ds.records), "all images (this data was not used for training)"


def _shares_images(split_file: Path, ds: Dataset) -> bool:
    """Whether any image of the saved split is in ``ds``. One root can hold several datasets
    (COCO 2017: annotations/instances_train2017.json and instances_val2017.json; YOLO: two
    YAMLs in one folder): evaluating on the other one is new data, not the training data
    changed, so it must not be mapped onto the saved split."""
    try:
        payload = json.loads(split_file.read_text(encoding="utf-8"))
        saved = {rel for rels in payload["splits"].values() for rel in rels}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return True  # load_split says what is wrong with the file
    return any(ds.relpath(r) in saved for r in ds.records)


def align_classes(bundle: Bundle, ds: Dataset, records: list[Record]) -> list[Record]:
    """Re-index labels from the dataset's class list to the bundle's."""
    index = {c: i for i, c in enumerate(bundle.classes)}
    unknown = sorted(set(ds.classes) - set(index))
    used = {ds.classes[i] for r in records for i in r.labels}
    if unknown and used & set(unknown):
        raise DataError(
            f"the data has classes the model does not know: {', '.join(sorted(used & set(unknown))[:5])}; "
            f"the model knows {', '.join(bundle.classes[:10])}"
        )
    return [dataclasses.replace(r, labels=tuple(index[ds.classes[i]] for i in r.labels)) for r in records]


def saved_splits(src: Bundle) -> tuple[dict[str, list[Record]] | None, Any]:
    """The bundle's saved split mapped onto its training data (labels re-indexed to the
    bundle's classes), or (None, None) without a split.json."""
    data = src.meta.get("data", {})
    if not (src.path / SPLIT_FILE).is_file() or not data.get("root"):
        return None, None
    source = data.get("source") if data.get("source") and Path(data["source"]).exists() else data["root"]
    ds = read_dataset(source, fmt=data.get("format"), task=src.task)
    splits = load_split(src.path / SPLIT_FILE, ds)
    return {k: align_classes(src, ds, v) for k, v in splits.items()}, ds


def held_out(src: Bundle, order: tuple[str, ...]) -> tuple[list[Record], str | None]:
    """The first non-empty split of ``order`` from the bundle's saved split; ([], None) when
    there is none or the data it names is gone (logged)."""
    try:
        splits, _ = saved_splits(src)
    except DataError as e:
        log.warning("the held-out images of %s cannot be read: %s", src.path, e)
        return [], None
    for name in order:
        if splits and splits.get(name):
            return splits[name], name
    return [], None
