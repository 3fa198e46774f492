"""The one record type every dataset format produces.

A dataset is a list of :class:`Record` plus the class list. Readers for class folders, CSV
tables, COCO / Roboflow exports and YOLO txt all produce these; splitting, training,
inspection and evaluation read nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

SPLITS = ("train", "val", "test")
# Folder names and CSV / JSON-name values accepted for each split (compared lower-cased).
SPLIT_ALIASES = {
    "train": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "test": "test",
}
TASKS = ("classify", "multilabel", "detect")  # what a Dataset, a config and a bundle can hold

Box = tuple[float, float, float, float]  # x1, y1, x2, y2 in pixels of the image as displayed (EXIF applied)


@dataclass(frozen=True)
class Record:
    """One labelled image.

    path: absolute path of the image file.
    labels: indices into ``Dataset.classes``; exactly one for single-label data, zero or
        more for multi-label data; for detection, the class of each box (same length as
        ``boxes``, possibly empty: an image with no objects is a negative example).
    split: "train", "val" or "test" when the data came pre-split, else None.
    boxes: detection only: one xyxy box per object, float pixels of the image as displayed
        (EXIF orientation applied), already clipped to the image.
    crowd: detection only: COCO ``iscrowd`` flag per box (empty means none is a crowd).
        Crowd boxes are not trained on; evaluation treats them as COCO does (ignored regions).
    size: (width, height) of the image when the format states it (COCO, YOLO after reading).
    """

    path: Path
    labels: tuple[int, ...]
    split: str | None = None
    boxes: tuple[Box, ...] = ()
    crowd: tuple[bool, ...] = ()
    size: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if self.boxes and len(self.boxes) != len(self.labels):
            raise ValueError(f"{self.path}: {len(self.boxes)} boxes but {len(self.labels)} labels; need one label per box")
        if self.crowd and len(self.crowd) != len(self.boxes):
            raise ValueError(f"{self.path}: {len(self.crowd)} crowd flags for {len(self.boxes)} boxes")

    def box_array(self) -> np.ndarray:
        """float32 (N, 4) xyxy boxes (N may be 0)."""
        return np.asarray(self.boxes, dtype=np.float32).reshape(-1, 4)

    def crowd_array(self) -> np.ndarray:
        """bool (N,) crowd flag per box."""
        return np.asarray(self.crowd, dtype=bool) if self.crowd else np.zeros(len(self.boxes), dtype=bool)


@dataclass
class Dataset:
    """Records plus what they mean.

    root: the directory (or the CSV file's directory) paths are relative to in reports and
        in the saved split.
    task: "classify" (one label per image), "multilabel" or "detect" (boxes per image).
    fmt: the format the reader detected, e.g. "folders", "split-folders", "csv", "coco",
        "roboflow-coco", "yolo".
    skipped: (path, reason) for entries the reader could not use (missing files, ...).
    """

    root: Path
    classes: list[str]
    records: list[Record]
    task: str = "classify"
    fmt: str = "folders"
    skipped: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what the reader fixed or decided (clipped boxes, merged classes), for inspect and train to show
    outside_root: list[str] = field(default_factory=list)  # paths the data names that resolve outside ``root`` (see data/files.py), as shown to the user

    @property
    def presplit(self) -> bool:
        return any(r.split is not None for r in self.records)

    def relpath(self, record: Record) -> str:
        """The record's path relative to ``root`` (POSIX form), as saved in split files."""
        try:
            return record.path.relative_to(self.root).as_posix()
        except ValueError:
            return record.path.as_posix()

    def label_matrix(self, records: list[Record] | None = None) -> list[list[int]]:
        """0/1 rows (one per record, one column per class), for multi-label metrics."""
        return targets(records if records is not None else self.records, len(self.classes), True).tolist()


def targets(records: Sequence[Record], num_classes: int, multilabel: bool) -> np.ndarray:
    """int64 (N,) class indices, or (N, C) 0/1 rows for multi-label: what losses and
    metrics take."""
    if not multilabel:
        return np.array([r.labels[0] for r in records], dtype=np.int64)
    y = np.zeros((len(records), num_classes), dtype=np.int64)
    for i, r in enumerate(records):
        y[i, list(r.labels)] = 1
    return y
