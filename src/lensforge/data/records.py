"""The one record type every dataset format produces.

A dataset is a list of :class:`Record` plus the class list. Readers for class folders, CSV
tables (and later COCO / YOLO) all produce these; splitting, training, inspection and
evaluation read nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

SPLITS = ("train", "val", "test")
TASKS = ("classify", "multilabel")  # what a Dataset, a config and a bundle can hold


@dataclass(frozen=True)
class Record:
    """One labelled image.

    path: absolute path of the image file.
    labels: indices into ``Dataset.classes``; exactly one for single-label data, zero or
        more for multi-label data.
    split: "train", "val" or "test" when the data came pre-split, else None.
    """

    path: Path
    labels: tuple[int, ...]
    split: str | None = None


@dataclass
class Dataset:
    """Records plus what they mean.

    root: the directory (or the CSV file's directory) paths are relative to in reports and
        in the saved split.
    task: "classify" (one label per image) or "multilabel".
    fmt: the format the reader detected, e.g. "folders", "split-folders", "csv".
    skipped: (path, reason) for entries the reader could not use (missing files, ...).
    """

    root: Path
    classes: list[str]
    records: list[Record]
    task: str = "classify"
    fmt: str = "folders"
    skipped: list[tuple[str, str]] = field(default_factory=list)

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
