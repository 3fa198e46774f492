"""Dataset readers: class folders, pre-split folders, label CSVs, COCO / Roboflow COCO and
YOLO txt detection data, all producing a ``Dataset``.

Layouts recognised by :func:`read_dataset` (auto-detected, or forced with ``fmt``):

- ``folders``:        ``root/<class>/*.jpg``                       (single-label)
- ``split-folders``:  ``root/{train,val|valid|validation,test}/<class>/*.jpg``
- ``csv``:            a CSV file (or a directory holding ``labels.csv`` or exactly one
  ``*.csv``) with an image path column and either ``label`` (one class per row),
  ``labels`` (``;``-separated, multi-label, empty = no labels) or one 0/1 column per class
  (multi-label); an optional ``split`` column makes it pre-split.
- ``roboflow-coco``:  ``root/{train,valid,test}/_annotations.coco.json``  (detection)
- ``coco``:           a COCO JSON file, or a folder with ``annotations/*.json`` or a
  top-level ``_annotations.coco.json`` / ``annotations.json``  (detection, see ``coco.py``)
- ``yolo``:           a ``data.yaml`` with ``names`` (or a folder holding one)  (detection,
  see ``yolo.py``)

Detection layouts are recognised before the classification ones and always have task
"detect"; asking for another task on them, or for "detect" on class folders or a CSV, is a
DataError.

Readers only list and label files; they never open images (``inspect`` does that). Only
regular files are listed and symlinked folders inside a dataset are not entered, so a FIFO
named ``x.jpg`` or a symlink loop cannot hang a reader. :func:`list_images` lists the images
to predict on the same way.

Every path a dataset names must resolve inside its folder (``Dataset.root``): CSV rows,
COCO ``file_name``, YOLO lists and labels, class folders and symlinked files alike (one rule,
:class:`~lensforge.data.files.RootGuard`). What leaves it is refused with a DataError naming
the first offenders, unless ``outside_root="allow"`` (``--allow-outside-root``).
"""

from __future__ import annotations

import csv
import io
import logging
import os
from collections.abc import Iterable
from pathlib import Path

from lensforge.data.coco import (
    find_coco_jsons,
    is_roboflow_layout,
    read_coco,
    read_roboflow_coco,
)
from lensforge.data.files import (
    IMAGE_EXTENSIONS,
    OUTSIDE_ROOT_POLICIES,
    RootGuard,
    first_few,
    listed_path,
    mostly_missing,
    visible,
    walk_files,
)
from lensforge.data.records import SPLIT_ALIASES, TASKS, Dataset, Record
from lensforge.data.yolo import YAML_NAMES, find_yolo_yaml, read_yolo
from lensforge.errors import DataError

log = logging.getLogger(__name__)

CLASSIFY_FORMATS = ("folders", "split-folders", "csv")
DETECT_FORMATS = ("coco", "roboflow-coco", "yolo")  # readers in coco.py and yolo.py
FORMATS = CLASSIFY_FORMATS + DETECT_FORMATS
# Accepted names of the image path column, in order of preference (compared lower-cased).
PATH_COLUMNS = ("path", "image", "file", "filename", "image_path")
SINGLE_LABEL_COLUMNS = ("label", "class", "category")
MULTI_LABEL_COLUMNS = ("labels", "tags")
SPLIT_COLUMN = "split"
LABEL_SEPARATOR = ";"
_ONE_HOT = {"0": 0, "1": 1, "0.0": 0, "1.0": 1}  # 0.0/1.0: what pandas writes for floats


def _subdirs(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.is_dir() and visible(p))


def list_images(inputs: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """Expand files and directories into image file paths, in the order given.

    A file (or anything that is not a directory, even a missing path) is kept as given, for
    the caller to read and report. A directory is searched recursively, sorted, for regular
    files with one of :data:`IMAGE_EXTENSIONS`, skipping hidden files and folders and not
    entering symlinked folders (the same listing the dataset readers use).
    """
    out: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            out.extend(walk_files(path)[0])
        else:
            out.append(path)
    return out


def _extensions_text() -> str:
    return ", ".join(sorted(IMAGE_EXTENSIONS))


# --------------------------------------------------------------------------- detection


def _find_csv(directory: Path) -> Path | None:
    """The labels CSV of a directory: ``labels.csv``, else the only top-level ``*.csv``."""
    csvs = sorted(
        p for p in directory.iterdir() if p.is_file() and visible(p) and p.suffix.lower() == ".csv"
    )
    for p in csvs:
        if p.name.lower() == "labels.csv":
            return p
    if len(csvs) == 1:
        return csvs[0]
    if len(csvs) > 1:
        raise DataError(
            f"found {len(csvs)} CSV files in {directory} ({first_few(p.name for p in csvs)}) and "
            "none is named labels.csv; pass the CSV that holds the labels as DATA, or rename "
            "it to labels.csv"
        )
    return None


def _is_split_layout(directory: Path) -> bool:
    """True when every sub-folder is a split name and at least one holds class folders."""
    subdirs = _subdirs(directory)
    if not subdirs or any(d.name.lower() not in SPLIT_ALIASES for d in subdirs):
        return False
    return any(_subdirs(d) for d in subdirs)


def detect_format(path: Path) -> str:
    """The layout of ``path``: one of :data:`FORMATS`. Raises DataError when none fits."""
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".csv":
            return "csv"
        if suffix == ".json":
            return "coco"
        if suffix in (".yaml", ".yml"):
            return "yolo"
        raise DataError(
            f"{path} is a file but not a CSV, COCO JSON or YOLO data.yaml; pass a folder of "
            "class folders, a split folder (train/val/test), a labels CSV or detection "
            "annotations"
        )
    if is_roboflow_layout(path):
        return "roboflow-coco"
    if find_yolo_yaml(path) is not None:
        return "yolo"
    if find_coco_jsons(path):
        return "coco"
    if _find_csv(path) is not None:
        return "csv"
    if _is_split_layout(path):
        return "split-folders"
    return "folders"


# --------------------------------------------------------------------------- public API


def read_dataset(
    path: str | Path, fmt: str | None = None, task: str | None = None, outside_root: str = "refuse"
) -> Dataset:
    """Read a labelled image dataset into records.

    path: a directory (class folders, split folders, a labels CSV, a COCO / Roboflow / YOLO
        dataset), a CSV file, a COCO JSON file or a YOLO ``data.yaml``.
    fmt: force a layout, one of :data:`FORMATS`; None auto-detects.
    task: "classify", "multilabel" or "detect"; None takes what the layout implies
        ("detect" for the detection formats, "classify" for folders and ``path,label``
        CSVs, "multilabel" for ``labels`` / 0-1 column CSVs).
        Folders and ``path,label`` CSVs may be forced to "multilabel" (one label per image;
        a ``label`` cell may then hold ``;``-separated labels). Forcing "classify" on
        multi-label data works only if every image has exactly one label.
    outside_root: what to do with paths that resolve outside the data folder (see
        :mod:`lensforge.data.files`): "refuse" (a DataError naming them), "allow" (read them;
        the user trusts the data) or "skip" (leave them out; ``data inspect``). Either way
        they are listed in ``Dataset.outside_root``.

    Returns a :class:`Dataset` whose record paths are absolute and whose classes are sorted
    by name (0/1-column CSVs keep the column order; detection formats order classes by
    category / class id). Raises :class:`DataError` with a one-line message for anything a
    user has to fix.
    """
    path = Path(path).expanduser()
    if outside_root not in OUTSIDE_ROOT_POLICIES:
        raise ValueError(f"outside_root must be one of {', '.join(OUTSIDE_ROOT_POLICIES)}, got {outside_root!r}")
    if fmt is not None and fmt not in FORMATS:
        raise DataError(f"unknown dataset format {fmt!r}; use one of {', '.join(FORMATS)}")
    if task is not None and task not in TASKS:
        raise DataError(
            f"unknown task {task!r} for a classification dataset; use one of {', '.join(TASKS)}"
        )
    if not path.exists():
        raise DataError(f"dataset path {path} does not exist; check the path and try again")
    path = path.absolute()
    if path.is_dir() and not any(visible(p) for p in path.iterdir()):
        raise DataError(
            f"dataset folder {path} is empty; put one sub-folder of images per class in it "
            f"(image extensions: {_extensions_text()})"
        )

    fmt = fmt or detect_format(path)
    if fmt in DETECT_FORMATS:
        return _read_detection(path, fmt, task, outside_root)
    if task == "detect":
        raise DataError(
            f"{path} is {fmt} classification data (no boxes); task 'detect' needs COCO, "
            "Roboflow COCO or YOLO annotations — or train with task 'classify'"
        )
    if fmt == "csv":
        csv_path = path if path.is_file() else _find_csv(path)
        if csv_path is None:
            raise DataError(f"no CSV file found in {path}; put a labels.csv there or pass the CSV")
        return _read_csv(csv_path, task, RootGuard(csv_path.parent, outside_root))
    if not path.is_dir():
        raise DataError(f"{path} is not a folder; the {fmt} layout needs a folder")
    if fmt == "split-folders":
        return _read_split_folders(path, task, RootGuard(path, outside_root))
    return _read_folders(path, task, RootGuard(path, outside_root))


def _read_detection(path: Path, fmt: str, task: str | None, outside_root: str) -> Dataset:
    if task not in (None, "detect"):
        raise DataError(
            f"{path} is a detection dataset ({fmt}: boxes, not image labels); use task "
            f"'detect', or class folders / a CSV for task {task!r}"
        )
    if fmt == "roboflow-coco":
        if not path.is_dir():
            raise DataError(f"{path} is not a folder; the roboflow-coco layout needs a folder")
        return read_roboflow_coco(path, outside_root)
    if fmt == "coco":
        return read_coco(path, outside_root)
    yaml_path = path if path.is_file() else find_yolo_yaml(path)
    if yaml_path is None:
        raise DataError(
            f"no {' or '.join(YAML_NAMES)} with 'names' in {path}; pass the YOLO dataset's "
            "YAML file as DATA"
        )
    return read_yolo(yaml_path, outside_root)


# --------------------------------------------------------------------------- folders


def _no_images_error(root: Path) -> DataError:
    return DataError(
        f"no images found in {root} (looked for class folders root/<class>/, split folders "
        f"root/train|val|test/<class>/ and a labels CSV; image extensions: "
        f"{_extensions_text()}); point DATA at the folder that holds one sub-folder per class"
    )


def _check_class_count(root: Path, classes: list[str], empty: list[str]) -> None:
    if len(classes) >= 2:
        return
    if not classes:
        raise _no_images_error(root)
    hint = (
        f" (empty class folders: {first_few(empty)}) — add images to them"
        if empty
        else " — add a folder per class"
    )
    raise DataError(
        f"found 1 class {classes[0]!r} in {root}; a classifier needs at least 2{hint}"
    )


def _class_images(class_dir: Path, skipped: list[tuple[Path, str]], guard: RootGuard) -> list[Path] | None:
    """The images of one class folder that may be read; None for a class folder symlinked
    out of the root, which is not even listed (it could lead anywhere, ``/`` included)."""
    if not guard.inside(class_dir):
        if not guard.admit(class_dir):
            return None
        return _list_class(class_dir, skipped)  # allowed: the folder stands for its files
    return [p for p in _list_class(class_dir, skipped) if guard.admit(p)]


def _list_class(class_dir: Path, skipped: list[tuple[Path, str]]) -> list[Path]:
    images, others = walk_files(class_dir)
    skipped.extend(others)
    return images


def _loose_images(directory: Path, skipped: list[tuple[Path, str]]) -> list[Path]:
    """Images directly in ``directory`` (not in a class folder): recorded as skipped."""
    loose, _ = walk_files(directory, recursive=False)
    skipped.extend((image, "not in a class folder") for image in loose)
    return loose


def _dataset(
    root: Path,
    classes: list[str],
    records: list[Record],
    task: str,
    fmt: str,
    skipped: list[tuple[Path, str]],
    guard: RootGuard,
) -> Dataset:
    """The reader's result; skipped paths are shown relative to ``root`` as records are."""
    ds = Dataset(root=root, classes=classes, records=records, task=task, fmt=fmt,
                 outside_root=list(guard.outside))
    ds.skipped = [(ds.relpath(Record(path=path, labels=())), why) for path, why in skipped]
    return ds


def _read_folders(root: Path, task: str | None, guard: RootGuard) -> Dataset:
    class_dirs = _subdirs(root)
    skipped: list[tuple[Path, str]] = []
    loose = _loose_images(root, skipped)
    if not class_dirs:
        if loose:
            raise DataError(
                f"found {len(loose)} images directly in {root} but no class folders; move "
                "each class into its own folder root/<class>/, or add a labels CSV"
            )
        raise _no_images_error(root)
    if loose:
        log.warning("%d images directly in %s are not in a class folder; ignored", len(loose), root)

    classes: list[str] = []
    empty: list[str] = []
    per_class: list[list[Path]] = []
    for class_dir in class_dirs:
        images = _class_images(class_dir, skipped, guard)
        if images is None:
            continue
        if images:
            classes.append(class_dir.name)
            per_class.append(images)
        else:
            empty.append(class_dir.name)
    guard.check("in the class folders", nothing_left=len(classes) < 2)
    if empty:
        log.warning("class folders with no images in %s are skipped: %s", root, ", ".join(empty))
    _check_class_count(root, classes, empty)
    records = [
        Record(path=image, labels=(index,))
        for index, images in enumerate(per_class)
        for image in images
    ]
    return _dataset(root, classes, records, task or "classify", "folders", skipped, guard)


def _read_split_folders(root: Path, task: str | None, guard: RootGuard) -> Dataset:
    split_dirs: dict[str, Path] = {}
    for d in _subdirs(root):
        name = SPLIT_ALIASES.get(d.name.lower())
        if name is None:
            raise DataError(
                f"folder {d} is not a split name; a split layout has only "
                f"{', '.join(SPLIT_ALIASES)} folders in {root} — move or remove it"
            )
        if name in split_dirs:
            raise DataError(
                f"{root} has two folders for the {name!r} split ({split_dirs[name].name}, "
                f"{d.name}); keep one"
            )
        split_dirs[name] = d
    if not split_dirs:
        raise _no_images_error(root)

    skipped: list[tuple[Path, str]] = []
    found: dict[str, list[tuple[Path, str]]] = {}  # class -> [(image, split)]
    seen_dirs: set[str] = set()
    for split, split_dir in split_dirs.items():
        if not guard.admit(split_dir):
            continue
        _loose_images(split_dir, skipped)
        for class_dir in _subdirs(split_dir):
            images = _class_images(class_dir, skipped, guard)
            if images is None:
                continue
            seen_dirs.add(class_dir.name)
            for image in images:
                found.setdefault(class_dir.name, []).append((image, split))
    classes = sorted(found)
    empty = sorted(seen_dirs - set(found))
    guard.check("in the split folders", nothing_left=len(classes) < 2)
    if empty:
        log.warning("class folders with no images in %s are skipped: %s", root, ", ".join(empty))
    _check_class_count(root, classes, empty)
    index = {name: i for i, name in enumerate(classes)}
    records = [
        Record(path=image, labels=(index[name],), split=split)
        for name in classes
        for image, split in found[name]
    ]
    records.sort(key=lambda r: r.path)
    return _dataset(root, classes, records, task or "classify", "split-folders", skipped, guard)


# --------------------------------------------------------------------------- CSV


def _decode_csv(csv_path: Path) -> str:
    data = csv_path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise DataError(
            f"{csv_path} line {line} is not valid UTF-8; save the CSV as UTF-8 and try again"
        ) from exc


def _parse_csv(csv_path: Path) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """Header (stripped) and (line number, cells) for every non-blank row."""
    text = _decode_csv(csv_path)
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    rows: list[tuple[int, list[str]]] = []
    header: list[str] | None = None
    try:
        for cells in reader:
            if not any(c.strip() for c in cells):
                continue
            if header is None:
                header = [c.strip() for c in cells]
            else:
                rows.append((reader.line_num, cells))
    except csv.Error as exc:
        raise DataError(
            f"{csv_path} line {reader.line_num} could not be parsed as CSV ({exc}); check the "
            "quoting on that line"
        ) from exc
    if header is None:
        raise DataError(f"{csv_path} is empty; it needs a header row such as 'path,label'")
    return header, rows


class _Layout:
    """Which CSV columns hold what."""

    def __init__(self, csv_path: Path, header: list[str]) -> None:
        lower = [h.lower() for h in header]
        expected = (
            f"expected a path column ({' / '.join(PATH_COLUMNS)}) and either 'label', "
            "'labels' (';'-separated) or one 0/1 column per class"
        )
        path_col = next((lower.index(name) for name in PATH_COLUMNS if name in lower), None)
        if path_col is None:
            raise DataError(
                f"{csv_path} has no image path column (found columns: {', '.join(header)}); "
                f"{expected}"
            )
        self.path_col = path_col
        self.split_col = lower.index(SPLIT_COLUMN) if SPLIT_COLUMN in lower else None
        used = {path_col, self.split_col}
        single = [i for i, h in enumerate(lower) if h in SINGLE_LABEL_COLUMNS and i not in used]
        multi = [i for i, h in enumerate(lower) if h in MULTI_LABEL_COLUMNS and i not in used]
        self.label_col = -1  # the label / labels column; -1 for the one-hot layout
        self.one_hot_cols: list[int] = []
        if single:
            self.kind = "single"
            self.label_col = single[0]
        elif multi:
            self.kind = "multi"
            self.label_col = multi[0]
        else:
            self.kind = "one-hot"
            self.one_hot_cols = [i for i in range(len(header)) if i not in used]
            if not self.one_hot_cols:
                raise DataError(
                    f"{csv_path} has no label columns (found columns: {', '.join(header)}); "
                    f"{expected}"
                )
        self.header = header


def _normalise_split(value: str, csv_path: Path, line: int) -> str:
    split = SPLIT_ALIASES.get(value.strip().lower())
    if split is None:
        raise DataError(
            f"{csv_path} line {line}: split {value!r} is not one of "
            f"{', '.join(SPLIT_ALIASES)}; fix the split column"
        )
    return split


def _row_labels(
    layout: _Layout, cells: list[str], csv_path: Path, line: int, split_single: bool
) -> list[str]:
    """The label names of one row."""
    if layout.kind == "one-hot":
        names = []
        for col in layout.one_hot_cols:
            value = cells[col].strip()
            if value not in _ONE_HOT:
                raise DataError(
                    f"{csv_path} line {line}: column {layout.header[col]!r} has {value!r}; "
                    "one-hot label columns must hold 0 or 1"
                )
            if _ONE_HOT[value]:
                names.append(layout.header[col])
        return names
    cell = cells[layout.label_col].strip()
    if layout.kind == "single" and not split_single:
        if not cell:
            raise DataError(
                f"{csv_path} line {line}: empty {layout.header[layout.label_col]!r} cell; "
                "every row of a single-label CSV needs a class name"
            )
        return [cell]
    return [piece.strip() for piece in cell.split(LABEL_SEPARATOR) if piece.strip()]


def _read_csv(csv_path: Path, task: str | None, guard: RootGuard) -> Dataset:
    header, rows = _parse_csv(csv_path)
    layout = _Layout(csv_path, header)
    base = csv_path.parent
    multilabel = layout.kind != "single" or task == "multilabel"

    entries: dict[Path, tuple[list[str], str | None, int]] = {}  # path -> labels, split, line
    order: list[Path] = []
    written: dict[Path, str] = {}  # path -> as written on its first row, for messages
    for line, cells in rows:
        if len(cells) > len(header):
            raise DataError(
                f"{csv_path} line {line} has {len(cells)} cells but the header has "
                f"{len(header)}; quote values that contain commas"
            )
        cells = cells + [""] * (len(header) - len(cells))
        raw_path = cells[layout.path_col].strip()
        if not raw_path:
            raise DataError(f"{csv_path} line {line}: empty image path; fill it in or drop the row")
        image = listed_path(raw_path, base)
        labels = _row_labels(layout, cells, csv_path, line, split_single=multilabel)
        if not guard.admit(image, shown=raw_path):
            continue  # judged before it is looked at: outside is outside, existing or not
        split = (
            _normalise_split(cells[layout.split_col], csv_path, line)
            if layout.split_col is not None
            else None
        )
        if image in entries:
            # One row per (image, label) is a common way to write multi-label data.
            old_labels, old_split, old_line = entries[image]
            if old_split != split:
                raise DataError(
                    f"{csv_path}: {raw_path} is in split {old_split!r} on line {old_line} and "
                    f"{split!r} on line {line}; keep one"
                )
            if sorted(old_labels) != sorted(labels) and not multilabel:
                raise DataError(
                    f"{csv_path}: {raw_path} has label {old_labels[0]!r} on line {old_line} and "
                    f"{labels[0]!r} on line {line}; a single-label CSV needs one row per image "
                    "(for multi-label data use a 'labels' column or task 'multilabel')"
                )
            merged = old_labels + [x for x in labels if x not in old_labels]
            entries[image] = (merged, split, old_line)
            continue
        entries[image] = (labels, split, line)
        order.append(image)
        written[image] = raw_path

    guard.check(f"listed in {csv_path.name}", nothing_left=not order)
    if not order:
        raise DataError(f"{csv_path} has a header but no rows; add one row per image")

    missing = {p for p in order if not p.is_file()}
    skipped = [
        (p, "not a regular file" if p.exists() else "missing file") for p in order if p in missing
    ]
    if missing:
        n, total = len(missing), len(order)
        first = first_few((written[p] for p, _ in skipped), 3)
        if mostly_missing(n, total):
            raise DataError(
                f"{n} of {total} images listed in {csv_path} do not exist (first: {first}); "
                f"paths are read relative to {base} — check them"
            )
        log.warning(
            "%d of %d images listed in %s do not exist; skipped (%s)", n, total, csv_path, first
        )

    if layout.kind == "one-hot":
        classes = [header[c] for c in layout.one_hot_cols]
    else:
        classes = sorted({name for p in order for name in entries[p][0]})
    task = task or ("multilabel" if multilabel else "classify")
    if task == "classify":
        bad = [(p, entries[p]) for p in order if len(entries[p][0]) != 1]
        if bad:
            p, (labels, _, line) = bad[0]
            raise DataError(
                f"{csv_path} line {line}: {written[p]} has {len(labels)} labels but task "
                f"'classify' needs exactly one per image; use task 'multilabel'"
            )
        if len(classes) < 2:
            raise DataError(
                f"found {len(classes)} class {first_few(repr(c) for c in classes)} in {csv_path}; "
                "a classifier needs at least 2 — add rows for other classes"
            )
    elif not classes:
        raise DataError(f"{csv_path} has no labels at all; a multi-label dataset needs some")

    index = {name: i for i, name in enumerate(classes)}
    records = [
        Record(
            path=p,
            labels=tuple(sorted(index[name] for name in entries[p][0])),
            split=entries[p][1],
        )
        for p in order
        if p not in missing
    ]
    return _dataset(base, classes, records, task, "csv", skipped, guard)
