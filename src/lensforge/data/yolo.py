"""YOLO txt detection datasets (Ultralytics / Roboflow "YOLOv5-v11" exports) → ``Dataset``.

Layout: a ``data.yaml`` (auto-detected as ``DATA/data.yaml`` / ``data.yml``, or passed
directly) with

- ``names``: a list of class names, or a ``{id: name}`` mapping (ids need not be
  contiguous; classes are ordered by id and indexed 0..C-1); an ``nc`` that disagrees is an
  error;
- ``train`` / ``val`` / ``test``: an image folder, a ``.txt`` file listing images, or a list
  of those, relative to ``path:`` (itself relative to the YAML's folder) or to the YAML's
  folder. Like Ultralytics, a missing ``../x`` entry is also tried as ``x``: Roboflow writes
  ``train: ../train/images`` beside the dataset's folders.

Labels: the image path with its last ``images`` folder replaced by ``labels`` and the suffix
by ``.txt``; one object per line, ``class cx cy w h`` normalised to the image (0-1). A
polygon line (``class x1 y1 x2 y2 ...``, YOLO segmentation) becomes its bounding box. An
image without a label file, or with an empty one, is a negative. Boxes reaching outside the
image are clipped, and ones at most :data:`~lensforge.data.boxes.MIN_BOX_SIDE` px wide or high are dropped (both
noted, as the COCO reader does).

Unlike the other readers this one opens every image, header only
(:func:`~lensforge.data.image.probe_image`), because pixel boxes need the image size;
an image whose header cannot be read is skipped. ``Dataset.root`` is the YAML's folder.

Every image folder, image list, image and label file must resolve inside that folder
(:class:`~lensforge.data.files.RootGuard`): a list naming ``/etc/passwd`` or a label file
symlinked out is refused (or skipped / allowed), and such a file is not opened. For
Roboflow's ``../train/images`` the folder inside the dataset wins over one beside it.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lensforge.data.boxes import MIN_BOX_SIDE, BoxTally, clip_box
from lensforge.data.files import (
    RootGuard,
    first_few,
    is_image_file,
    listed_path,
    mostly_missing,
    rel_posix,
    walk_files,
)
from lensforge.data.image import probe_image
from lensforge.data.records import SPLITS, Box, Dataset, Record
from lensforge.errors import DataError

log = logging.getLogger(__name__)

YAML_NAMES = ("data.yaml", "data.yml")
COORD_TOLERANCE = 1e-3  # normalised values up to 1.001 are rounding, not pixel coordinates
_EXAMPLES = 3


@dataclass
class _LabelTally(BoxTally):
    """Box clipping plus what only YOLO label files have, for the notes."""

    polygon: list[str] = field(default_factory=list)
    no_label: list[str] = field(default_factory=list)


def find_yolo_yaml(directory: Path) -> Path | None:
    """``directory/data.yaml`` (or ``.yml``) when it has ``names``, else None."""
    for name in YAML_NAMES:
        path = directory / name
        if path.is_file():
            try:
                data = yaml.safe_load(path.read_text(encoding="utf-8"))
            except (yaml.YAMLError, UnicodeDecodeError):
                return path  # malformed: let read_yolo say what is wrong
            if isinstance(data, dict) and "names" in data:
                return path
    return None


def read_yolo(yaml_path: Path, outside_root: str = "refuse") -> Dataset:
    """Read the YOLO dataset described by ``yaml_path`` (module docstring).

    Returns a detect Dataset: boxes xyxy float pixels of the image as displayed, clipped;
    ``size`` (width, height) from each image's header; ``split`` from the YAML key.
    Raises :class:`DataError` naming the file (and line) for anything malformed.
    outside_root: "refuse", "allow" or "skip" (see :func:`lensforge.data.formats.read_dataset`).
    """
    guard = RootGuard(yaml_path.parent, outside_root)
    data = _load_yaml(yaml_path)
    classes, class_index = _names(yaml_path, data)
    base = _base(yaml_path, data)
    notes: list[str] = []
    skipped: list[tuple[Path, str]] = []
    tally = _LabelTally()
    records: list[Record] = []
    where_split: dict[Path, str] = {}
    for split in SPLITS:
        if data.get(split) in (None, ""):
            continue
        for image in _split_images(yaml_path, base, split, data[split], guard):
            if image in where_split:
                raise DataError(
                    f"{image} is in both the {where_split[image]} and {split} images of "
                    f"{yaml_path}; point each split at its own images"
                )
            where_split[image] = split
            if not guard.admit(image):
                continue  # judged before it is looked at: outside is outside, existing or not
            if not image.is_file():
                skipped.append((image, "missing file"))
                continue
            info = probe_image(image)
            if not info.ok:
                skipped.append((image, f"unreadable image ({info.error_code})"))
                continue
            size = info.oriented_size
            txt = label_path(image)
            if txt.exists() and not guard.admit(txt):
                continue  # a label file symlinked out of the dataset: not read
            boxes, labels = _read_labels(image, size, class_index, tally)
            records.append(
                Record(path=image, labels=labels, split=split, boxes=boxes, size=size)
            )
    guard.check(f"named by {yaml_path.name}", nothing_left=not records)
    if not where_split:
        raise DataError(
            f"{yaml_path} names no images: add 'train:' (and 'val:') entries pointing at the "
            "image folders"
        )
    if mostly_missing(len(skipped), len(where_split)):
        raise DataError(
            f"{len(skipped)} of {len(where_split)} images listed by {yaml_path} are missing or "
            f"unreadable (first: {first_few(str(p) for p, _ in skipped)}); check the image paths"
        )
    records.sort(key=lambda r: r.path)
    train = [r for r in records if r.split == "train"] or records  # val-only data: evaluation
    if not any(r.boxes for r in train):
        raise DataError(
            f"the train split of {yaml_path} has no boxes; check that the label .txt files "
            "are in 'labels' folders beside the 'images' folders"
        )
    _notes(tally, skipped, notes, yaml_path.parent)
    negatives = sum(not r.boxes for r in records)
    if negatives:
        notes.append(f"{negatives} images have no boxes; kept as negatives (images without objects)")
    ds = Dataset(
        root=yaml_path.parent, classes=classes, records=records, task="detect", fmt="yolo",
        notes=notes, outside_root=list(guard.outside),
    )
    ds.skipped = [(ds.relpath(Record(path=p, labels=())), why) for p, why in skipped]
    return ds


# --------------------------------------------------------------------------- data.yaml


def _load_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise DataError(f"{path} is not valid YAML ({exc}); fix the file") from exc
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text; save it as UTF-8") from exc
    if not isinstance(data, dict) or "names" not in data:
        raise DataError(
            f"{path} has no 'names'; a YOLO data.yaml lists the class names (names: [a, b]) "
            "and the image folders (train:, val:)"
        )
    return data


def _names(path: Path, data: dict[str, Any]) -> tuple[list[str], dict[int, int]]:
    """Class names and {YOLO class id: class index}."""
    names = data["names"]
    if isinstance(names, list):
        mapping = dict(enumerate(names))
    elif isinstance(names, dict):
        mapping = {}
        for key, name in names.items():
            try:
                mapping[int(key)] = name
            except (TypeError, ValueError):
                raise DataError(
                    f"{path}: names key {key!r} is not a class id; use names: {{0: a, 1: b}} or "
                    "a list"
                ) from None
    else:
        raise DataError(f"{path}: 'names' must be a list or an {{id: name}} mapping")
    if not mapping:
        raise DataError(f"{path}: 'names' is empty; list the class names")
    nc = data.get("nc")
    if nc is not None and nc != len(mapping):
        raise DataError(f"{path}: nc is {nc} but 'names' has {len(mapping)} classes; make them agree")
    ids = sorted(mapping)
    classes = [str(mapping[i]) for i in ids]
    dups = sorted({c for c in classes if classes.count(c) > 1})
    if dups:
        raise DataError(f"{path}: class names {', '.join(dups)} appear twice in 'names'; rename them")
    return classes, {cid: i for i, cid in enumerate(ids)}


def _base(yaml_path: Path, data: dict[str, Any]) -> Path:
    value = data.get("path")
    if not value:
        return yaml_path.parent
    base = _normalised(listed_path(str(value), yaml_path.parent))
    return base if base.is_dir() else yaml_path.parent  # a stale absolute path from elsewhere


def _normalised(path: Path) -> Path:
    """``a/b/../c`` → ``a/c`` without resolving symlinks, so record paths read cleanly."""
    return Path(os.path.normpath(path))


def _entry_path(yaml_path: Path, base: Path, split: str, value: str, guard: RootGuard) -> Path:
    path = _normalised(listed_path(value, base))
    if value.startswith("../") and not (guard.inside(path) and path.exists()):
        alt = _normalised(listed_path(value[3:], base))  # Roboflow's "../train/images"
        if guard.inside(alt) and alt.exists():
            return alt
    if not guard.may_open(path):
        return path  # the caller's guard.admit records it; whether it exists is not asked
    if not path.exists():
        raise DataError(
            f"{yaml_path}: {split} images {value!r} not found (looked at {path}); paths are "
            f"relative to {base}"
        )
    return path


def _split_images(yaml_path: Path, base: Path, split: str, value: Any, guard: RootGuard) -> list[Path]:
    entries = value if isinstance(value, list) else [value]
    images: list[Path] = []
    for entry in entries:
        if not isinstance(entry, str):
            raise DataError(f"{yaml_path}: {split} entry {entry!r} is not a path")
        path = _entry_path(yaml_path, base, split, entry, guard)
        if not guard.admit(path):
            continue  # an image folder or list outside the dataset: not listed, not read
        if path.is_dir():
            images.extend(walk_files(path)[0])
        elif path.suffix.lower() == ".txt":
            lines = path.read_text(encoding="utf-8").splitlines()
            # as Ultralytics reads them: relative lines ("./images/a.jpg") from the list's folder
            images.extend(
                _normalised(listed_path(line, path.parent))
                for line in lines
                if line.strip() and is_image_file(Path(line.strip()))
            )
        elif is_image_file(path):
            images.append(path)
        else:
            raise DataError(
                f"{yaml_path}: {split} entry {entry!r} is not an image folder, image list "
                "(.txt) or image"
            )
    return sorted(set(images))


# --------------------------------------------------------------------------- labels


def label_path(image: Path) -> Path:
    """``.../images/a/b.jpg`` → ``.../labels/a/b.txt`` (the last ``images`` folder)."""
    parts = list(image.parts)
    for i in range(len(parts) - 2, -1, -1):
        if parts[i] == "images":
            parts[i] = "labels"
            break
    return Path(*parts).with_suffix(".txt")


def _read_labels(
    image: Path, size: tuple[int, int], class_index: dict[int, int], tally: _LabelTally
) -> tuple[tuple[Box, ...], tuple[int, ...]]:
    txt = label_path(image)
    if not txt.is_file():
        tally.no_label.append(str(image))
        return (), ()
    boxes: list[Box] = []
    labels: list[int] = []
    text = txt.read_text(encoding="utf-8", errors="replace")
    for n, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        where = f"{txt}:{n}"
        values = _numbers(fields, where)
        cls = values[0]
        if cls != int(cls) or int(cls) not in class_index:
            raise DataError(
                f"{where}: class {fields[0]} is not one of the {len(class_index)} class ids in "
                f"data.yaml ({first_few(map(str, sorted(class_index)))}); fix the label or 'names'"
            )
        coords = values[1:]
        if len(coords) >= 4 and (min(coords) < 0 or max(coords) > 1 + COORD_TOLERANCE):
            raise DataError(
                f"{where}: {' '.join(fields[1:])} is not normalised; YOLO boxes are "
                "'class cx cy w h' with values in 0-1 (divide pixels by the image size)"
            )
        if len(coords) == 4:
            cx, cy, w, h = coords
            x1, y1, x2, y2 = cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2
        elif len(coords) >= 6 and len(coords) % 2 == 0:
            xs, ys = coords[0::2], coords[1::2]
            x1, y1, x2, y2 = min(xs), min(ys), max(xs), max(ys)
            tally.polygon.append(where)
        else:
            raise DataError(
                f"{where}: expected 'class cx cy w h' (5 numbers) or a polygon "
                f"'class x1 y1 x2 y2 ...', got {len(fields)} values; fix the line"
            )
        box = _to_pixels((x1, y1, x2, y2), size, where, tally)
        if box is not None:
            boxes.append(box)
            labels.append(class_index[int(cls)])
    return tuple(boxes), tuple(labels)


def _numbers(fields: list[str], where: str) -> list[float]:
    try:
        values = [float(v) for v in fields]
    except ValueError:
        raise DataError(
            f"{where}: {' '.join(fields)!r} is not numbers; YOLO label lines are "
            "'class cx cy w h'"
        ) from None
    if not all(math.isfinite(v) for v in values):
        raise DataError(f"{where}: {' '.join(fields)!r} holds nan or inf; fix the line")
    return values


def _to_pixels(
    norm: tuple[float, float, float, float],
    size: tuple[int, int],
    where: str,
    tally: BoxTally,
) -> Box | None:
    """Normalised xyxy → pixel xyxy clipped to the image; None (counted) when degenerate."""
    w, h = size
    raw = (norm[0] * w, norm[1] * h, norm[2] * w, norm[3] * h)
    return clip_box(raw, w, h, where, tally)


def _notes(
    tally: _LabelTally, skipped: list[tuple[Path, str]], notes: list[str], root: Path
) -> None:
    texts = (
        (tally.clipped, "clipped {n} boxes reaching outside their image"),
        (tally.degenerate, f"dropped {{n}} degenerate boxes (width or height <= {MIN_BOX_SIDE:g} px)"),
        (tally.polygon, "read {n} polygon lines as their bounding boxes"),
        (tally.no_label, "{n} images have no label file; read as negatives"),
    )
    for wheres, text in texts:
        if wheres:
            first = first_few([rel_posix(Path(where), root) for where in wheres], _EXAMPLES)
            notes.append(f"{text.format(n=len(wheres))} (first: {first})")
    if skipped:
        notes.append(f"skipped {len(skipped)} missing or unreadable images")
    for note in notes:
        log.info("%s", note)
