"""COCO and Roboflow COCO detection datasets, read into a ``Dataset`` (task "detect").

Layouts (auto-detected by :func:`lensforge.data.formats.detect_format`):

- ``roboflow-coco``: ``DATA/{train,valid,test}/_annotations.coco.json``, each split's images
  beside its JSON (``valid`` becomes split "val"; ``val`` / ``validation`` are accepted;
  any split may be absent). Images in a split folder that its JSON does not list are
  skipped (``Dataset.skipped``): Roboflow puts exactly the listed images there.
- ``coco``: one COCO JSON file; or a folder holding ``annotations/*.json`` (only the
  ``instances_*.json`` files when there are any, as in COCO 2017), or one top-level COCO
  JSON (``_annotations.coco.json`` / ``annotations.json``, or the only ``*.json`` when the
  format is forced). The *base* folder is the JSON's folder, or its parent when that folder
  is named ``annotations``; ``Dataset.root`` is the base. Each ``file_name`` (sub-folders
  allowed, ``\\`` read as ``/``) is looked up under the base, ``base/images/`` or one
  sub-folder of ``base/images/`` (COCO 2017's ``images/val2017/``): whichever holds most of
  the first images listed. The split comes from the JSON's name (``instances_train2017``
  → "train", likewise ``val`` / ``valid`` / ``test``), else there is none and
  ``split_records`` makes one.

What the reader decides, each written to ``Dataset.notes`` with counts and first examples:

- a category with no boxes that is the ``supercategory`` of another category (Roboflow's
  dataset-named category id 0) is not a class;
- category ids need not be contiguous: classes are the remaining categories ordered by id,
  indexed 0..C-1;
- categories sharing a name (a real export had ids 6 and 7 both "starfish") are merged into
  one class, at the position of the lower id;
- boxes reaching outside their image are clipped to it; boxes whose width or height is at
  most :data:`~lensforge.data.boxes.MIN_BOX_SIDE` px after clipping (or negative / not finite) are dropped;
- images without boxes are kept as negatives; ``iscrowd`` boxes are kept with
  ``crowd=True``.

Image sizes come from the JSON's ``width`` / ``height`` (the image's header is read only when
they are missing); ``lensforge data inspect`` compares them with the files. Missing image
files: a JSON whose images are all, or mostly (more than half), missing is an error (the
images were not extracted where the JSON expects them); a few missing ones are skipped with
a warning, as the CSV reader does.

Every ``file_name`` must resolve inside ``Dataset.root`` (``../../x.jpg``, absolute paths and
symlinks out are refused, or skipped / allowed: :class:`~lensforge.data.files.RootGuard`);
such a file is neither opened nor stat-ed.
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lensforge.data.boxes import MIN_BOX_SIDE, BoxTally, clip_box
from lensforge.data.files import (
    RootGuard,
    first_few,
    listed_path,
    mostly_missing,
    rel_posix,
    visible,
    walk_files,
)
from lensforge.data.image import probe_image
from lensforge.data.records import SPLIT_ALIASES, Box, Dataset, Record
from lensforge.errors import DataError

log = logging.getLogger(__name__)

ROBOFLOW_JSON = "_annotations.coco.json"
TOP_LEVEL_JSONS = (ROBOFLOW_JSON, "annotations.json")  # auto-detected in a dataset folder
_ROOT_PROBE = 20  # first file_names checked when choosing a JSON's image folder
_EXAMPLES = 3


@dataclass
class _CocoFile:
    """One validated COCO JSON: its images, annotations and categories as given."""

    path: Path
    split: str | None
    image_root: Path
    images: list[dict[str, Any]]
    annotations: list[dict[str, Any]]
    categories: list[dict[str, Any]]
    listed_dir: bool = False  # the image folder holds exactly this JSON's images (Roboflow)


# --------------------------------------------------------------------------- public API


def read_roboflow_coco(root: Path, outside_root: str = "refuse") -> Dataset:
    """Read a Roboflow COCO export ``root/{train,valid,test}/_annotations.coco.json``.

    Returns a detect Dataset rooted at ``root``, every record with its split. See the module
    docstring for what is fixed and noted; raises :class:`DataError` for what is not.
    outside_root: "refuse", "allow" or "skip" (see :func:`lensforge.data.formats.read_dataset`).
    """
    guard = RootGuard(root, outside_root)
    files: list[_CocoFile] = []
    seen: dict[str, Path] = {}
    for d in sorted(p for p in root.iterdir() if p.is_dir() and visible(p)):
        split = SPLIT_ALIASES.get(d.name.lower())
        if split is not None and not guard.admit(d):
            continue  # a split folder symlinked out of the dataset
        json_path = d / ROBOFLOW_JSON
        if split is None:
            if json_path.is_file():
                raise DataError(
                    f"folder {d} holds {ROBOFLOW_JSON} but {d.name!r} is not a split name; "
                    f"rename it to train, valid or test"
                )
            log.warning("folder %s is not a split (train/valid/test); ignored", d)
            continue
        if not json_path.is_file():
            if walk_files(d)[0]:
                raise DataError(
                    f"split folder {d} has images but no {ROBOFLOW_JSON}; export it again "
                    "from Roboflow in COCO format, or remove the folder"
                )
            continue
        if split in seen:
            raise DataError(
                f"{root} has two folders for the {split!r} split ({seen[split].name}, "
                f"{d.name}); keep one"
            )
        seen[split] = d
        files.append(_load_file(json_path, split, guard, image_root=d, listed_dir=True))
    if not files:
        raise DataError(
            f"no {ROBOFLOW_JSON} found in {root}/train, valid or test; export the dataset "
            "from Roboflow in 'COCO' format and unzip it here"
        )
    return _build(root, files, "roboflow-coco", guard)


def read_coco(path: Path, outside_root: str = "refuse") -> Dataset:
    """Read a plain COCO dataset: a JSON file, or a folder (module docstring: layouts).

    Returns a detect Dataset rooted at the base folder; records carry the split named by
    the JSON file, if any. outside_root: as for :func:`read_roboflow_coco`.
    """
    if path.is_file():
        jsons = [path]
    else:
        jsons = find_coco_jsons(path, forced=True)
        if not jsons:
            raise DataError(
                f"no COCO annotation file found in {path} (looked for annotations/*.json, "
                f"{' or '.join(TOP_LEVEL_JSONS)} or a single *.json); pass the JSON file as DATA"
            )
    base = _base_dir(jsons[0])
    splits = [_split_from_name(p) for p in jsons]
    if len(jsons) > 1:
        unnamed = [p.name for p, s in zip(jsons, splits) if s is None]
        if unnamed:
            raise DataError(
                f"cannot tell which split {first_few(unnamed)} in {jsons[0].parent} holds; name "
                "each annotation file after its split (e.g. instances_train.json, "
                "instances_val.json) or pass one JSON file as DATA"
            )
        dup = [s for s, n in Counter(splits).items() if n > 1]
        if dup:
            raise DataError(
                f"several annotation files in {jsons[0].parent} are for the {dup[0]!r} split; "
                "keep one per split or pass one JSON file as DATA"
            )
    guard = RootGuard(base, outside_root)
    files = [_load_file(p, s, guard, image_root=None, base=base) for p, s in zip(jsons, splits)]
    return _build(base, files, "coco", guard)


def find_coco_jsons(directory: Path, forced: bool = False) -> list[Path]:
    """The COCO JSON files of a dataset folder (module docstring), [] when there are none.

    ``forced`` (the user said the data is COCO) also accepts a single top-level ``*.json``
    of any name; auto-detection only takes the well-known names, so a stray JSON beside
    class folders does not turn them into a COCO dataset.
    """
    ann_dir = directory / "annotations"
    if ann_dir.is_dir():
        jsons = sorted(p for p in ann_dir.glob("*.json") if p.is_file() and visible(p))
        instances = [p for p in jsons if p.name.startswith("instances_")]
        if instances or jsons:
            return instances or jsons
    for name in TOP_LEVEL_JSONS:
        if (directory / name).is_file():
            return [directory / name]
    if forced:
        top = sorted(p for p in directory.glob("*.json") if p.is_file() and visible(p))
        if len(top) == 1:
            return top
    return []


def is_roboflow_layout(directory: Path) -> bool:
    """True when a split folder (train / valid / test) of ``directory`` holds the JSON."""
    return any(
        (d / ROBOFLOW_JSON).is_file()
        for d in directory.iterdir()
        if d.is_dir() and d.name.lower() in SPLIT_ALIASES
    )


# --------------------------------------------------------------------------- loading


def _base_dir(json_path: Path) -> Path:
    parent = json_path.parent
    return parent.parent if parent.name.lower() == "annotations" else parent


def _split_from_name(json_path: Path) -> str | None:
    """"instances_train2017.json" → "train": the split a COCO file's name states, if one."""
    stem = json_path.name.lower().removesuffix(".json").removesuffix(".coco")
    tokens = [t.rstrip("0123456789") for t in stem.replace("-", "_").replace(".", "_").split("_")]
    found = {SPLIT_ALIASES[t] for t in tokens if t in SPLIT_ALIASES}
    return found.pop() if len(found) == 1 else None


def _load_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_bytes())
    except json.JSONDecodeError as exc:
        raise DataError(
            f"{path} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg}); "
            "export the annotations again"
        ) from exc
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 JSON; export the annotations again") from exc
    if not isinstance(data, dict):
        raise DataError(
            f"{path} holds a JSON {type(data).__name__}, not a COCO object with images, "
            "annotations and categories; pass a COCO detection file"
        )
    return data


def _is_id(value: Any) -> bool:
    return isinstance(value, (int, str)) and not isinstance(value, bool)


def _load_file(
    path: Path,
    split: str | None,
    guard: RootGuard,
    image_root: Path | None,
    base: Path | None = None,
    listed_dir: bool = False,
) -> _CocoFile:
    """Parse and check the structure of one COCO JSON (not yet its files or boxes)."""
    data = _load_json(path)
    lists: dict[str, list[Any]] = {}
    for key in ("images", "annotations", "categories"):
        value = data.get(key)
        if not isinstance(value, list):
            what = "has no" if value is None else "has a non-list"
            raise DataError(
                f"{path} {what} {key!r} list; a COCO detection file needs 'images', "
                "'annotations' and 'categories' (captions or keypoints files are not "
                "detection data)"
            )
        bad = next((i for i, item in enumerate(value) if not isinstance(item, dict)), None)
        if bad is not None:
            raise DataError(f"{path}: {key}[{bad}] is not a JSON object; fix the file")
        lists[key] = value
    for i, cat in enumerate(lists["categories"]):
        if not _is_id(cat.get("id")) or not isinstance(cat.get("name"), str):
            raise DataError(
                f"{path}: categories[{i}] needs an 'id' and a 'name' (got {_short(cat)}); fix "
                "the file"
            )
    for i, img in enumerate(lists["images"]):
        if not _is_id(img.get("id")) or not isinstance(img.get("file_name"), str):
            raise DataError(
                f"{path}: images[{i}] needs an 'id' and a 'file_name' (got {_short(img)}); fix "
                "the file"
            )
    for i, ann in enumerate(lists["annotations"]):
        for key in ("image_id", "category_id"):
            if not _is_id(ann.get(key)):
                raise DataError(
                    f"{path}: annotation {_ann_id(ann, i)} has no valid {key!r}; fix or remove it"
                )
    if image_root is None:
        image_root = _choose_image_root(base or path.parent, lists["images"], guard)
    return _CocoFile(
        path, split, image_root, lists["images"], lists["annotations"], lists["categories"],
        listed_dir,
    )


def _short(obj: Any) -> str:
    text = json.dumps(obj, default=str)
    return text if len(text) <= 80 else text[:77] + "..."


def _ann_id(ann: dict[str, Any], index: int) -> str:
    return str(ann["id"]) if _is_id(ann.get("id")) else f"#{index}"


def _choose_image_root(base: Path, images: list[dict[str, Any]], guard: RootGuard) -> Path:
    """The folder (base, base/images or one of its sub-folders) holding most listed images."""
    candidates = [base]
    if (base / "images").is_dir():
        candidates.append(base / "images")
        candidates.extend(
            sorted(p for p in (base / "images").iterdir() if p.is_dir() and visible(p))
        )
    names = [img["file_name"] for img in images[:_ROOT_PROBE]]
    if len(candidates) == 1 or not names:
        return base
    found = [sum(guard.may_open(p) and p.is_file() for p in (listed_path(n, c) for n in names)) for c in candidates]
    return candidates[found.index(max(found))]  # ties: the first, i.e. the plainest


# --------------------------------------------------------------------------- classes


def _classes(files: list[_CocoFile], notes: list[str]) -> tuple[list[str], dict[Any, int]]:
    """Class names and {category id: class index} over all files (module docstring)."""
    cats: dict[Any, dict[str, Any]] = {}
    for f in files:
        for cat in f.categories:
            old = cats.get(cat["id"])
            if old is not None and old["name"] != cat["name"]:
                raise DataError(
                    f"category id {cat['id']} is {old['name']!r} in one annotation file and "
                    f"{cat['name']!r} in {f.path}; export all splits with the same classes"
                )
            cats.setdefault(cat["id"], cat)
    used = Counter(ann["category_id"] for f in files for ann in f.annotations)
    parents = {
        cat.get("supercategory") for cat in cats.values() if isinstance(cat.get("supercategory"), str)
    }
    dummies = [
        cid
        for cid, cat in cats.items()
        if not used[cid]
        and cat["name"] in parents
        and any(c.get("supercategory") == cat["name"] and k != cid for k, c in cats.items())
    ]
    for cid in dummies:
        notes.append(
            f"category {cid} {cats[cid]['name']!r} has no boxes and is the supercategory of the "
            "others (Roboflow's dataset category); not used as a class"
        )
    ids = sorted((cid for cid in cats if cid not in dummies), key=_id_order)
    classes: list[str] = []
    index: dict[Any, int] = {}
    by_name: dict[str, list[Any]] = defaultdict(list)
    for cid in ids:
        name = cats[cid]["name"]
        if name not in classes:
            classes.append(name)
        index[cid] = classes.index(name)
        by_name[name].append(cid)
    for name, cids in by_name.items():
        if len(cids) > 1:
            notes.append(
                f"categories {', '.join(map(str, cids))} are all named {name!r}; merged into one "
                f"class ({sum(used[c] for c in cids)} annotations)"
            )
    if not classes:
        where = ", ".join(str(f.path) for f in files)
        raise DataError(f"{where} defines no categories; a detection dataset needs at least one")
    return classes, index


def _id_order(cid: Any) -> tuple[int, Any]:
    # COCO ids are integers; string ids (rare) sort after them, by text
    return (0, cid) if isinstance(cid, int) else (1, str(cid))


# --------------------------------------------------------------------------- records


def _convert_box(
    bbox: Any, width: int, height: int, where: str, tally: BoxTally
) -> Box | None:
    """COCO [x, y, w, h] → clipped xyxy, or None when degenerate (counted in ``tally``)."""
    if (
        not isinstance(bbox, list)
        or len(bbox) != 4
        or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbox)
    ):
        raise DataError(
            f"{where} has bbox {_short(bbox)}; a COCO bbox is [x, y, width, height] in pixels "
            "— fix or remove the annotation"
        )
    x, y, w, h = (float(v) for v in bbox)
    if not all(math.isfinite(v) for v in (x, y, w, h)) or w <= 0 or h <= 0:
        tally.degenerate.append(where)
        return None
    return clip_box((x, y, x + w, y + h), width, height, where, tally)


def _image_size(img: dict[str, Any], path: Path) -> tuple[int, int] | None:
    """(width, height) from the JSON, else from the file's header; None if unreadable."""
    w, h = img.get("width"), img.get("height")
    if isinstance(w, int) and isinstance(h, int) and w > 0 and h > 0:
        return w, h
    info = probe_image(path)
    return info.oriented_size if info.ok else None


def _file_records(
    f: _CocoFile,
    root: Path,
    class_index: dict[Any, int],
    tally: BoxTally,
    skipped: list[tuple[Path, str]],
    guard: RootGuard,
) -> list[Record]:
    rel_json = rel_posix(f.path, root)
    images: dict[Any, dict[str, Any]] = {}
    paths: dict[Path, Any] = {}
    for img in f.images:
        if img["id"] in images:
            raise DataError(f"{f.path}: image id {img['id']} is listed twice; ids must be unique")
        path = listed_path(img["file_name"], f.image_root)
        if path in paths:
            raise DataError(
                f"{f.path}: images {paths[path]} and {img['id']} are both {img['file_name']!r}; "
                "merge them into one image entry"
            )
        images[img["id"]] = img
        if guard.admit(path):  # else: not looked at; its annotations go with it
            paths[path] = img["id"]
    by_image: dict[Any, list[tuple[int, dict[str, Any]]]] = defaultdict(list)
    for i, ann in enumerate(f.annotations):
        aid = _ann_id(ann, i)
        if ann["image_id"] not in images:
            raise DataError(
                f"{f.path}: annotation {aid} refers to image id {ann['image_id']}, which is not "
                "in 'images'; fix or remove the annotation"
            )
        # the dummy category has no boxes by definition, so every used id is in class_index
        if ann["category_id"] not in class_index:
            raise DataError(
                f"{f.path}: annotation {aid} refers to category id {ann['category_id']}, which "
                "is not in 'categories'; fix or remove the annotation"
            )
        by_image[ann["image_id"]].append((i, ann))

    missing = [(p, iid) for p, iid in paths.items() if not p.is_file()]
    if mostly_missing(len(missing), len(paths)):
        first = first_few([images[iid]["file_name"] for _, iid in missing])
        raise DataError(
            f"{len(missing)} of {len(paths)} images listed in {f.path} are missing (first: "
            f"{first}); file_name is read relative to {f.image_root} — put the images there"
        )
    if missing:
        log.warning(
            "%d of %d images listed in %s are missing; skipped", len(missing), len(paths), f.path
        )
        skipped.extend((p, f"missing file (listed in {rel_json})") for p, _ in missing)
    missing_paths = {p for p, _ in missing}

    records = []
    for path, iid in paths.items():
        if path in missing_paths:
            continue
        img = images[iid]
        size = _image_size(img, path)
        if size is None:
            skipped.append((path, f"no width/height in {rel_json} and the header is unreadable"))
            continue
        boxes: list[Box] = []
        labels: list[int] = []
        crowd: list[bool] = []
        for i, ann in by_image.get(iid, []):
            where = f"{rel_json} annotation {_ann_id(ann, i)} ({img['file_name']})"
            box = _convert_box(ann.get("bbox"), size[0], size[1], where, tally)
            if box is None:
                continue
            boxes.append(box)
            labels.append(class_index[ann["category_id"]])
            crowd.append(bool(ann.get("iscrowd", 0)))
        records.append(
            Record(
                path=path,
                labels=tuple(labels),
                split=f.split,
                boxes=tuple(boxes),
                crowd=tuple(crowd) if any(crowd) else (),
                size=size,
            )
        )
    if f.listed_dir:
        listed = set(paths)
        extra = [p for p in walk_files(f.image_root)[0] if p not in listed]
        skipped.extend((p, f"not listed in {rel_json}") for p in extra)
    return records


def _build(root: Path, files: list[_CocoFile], fmt: str, guard: RootGuard) -> Dataset:
    """Records of every file, checked and noted; the one place a COCO Dataset is made."""
    notes: list[str] = []
    classes, class_index = _classes(files, notes)
    tally = BoxTally()
    skipped: list[tuple[Path, str]] = []
    records: list[Record] = []
    for f in files:
        records.extend(_file_records(f, root, class_index, tally, skipped, guard))
    records.sort(key=lambda r: r.path)
    guard.check(f"named by file_name in {first_few([f.path.name for f in files])}", nothing_left=not records)

    seen: dict[Path, str | None] = {}
    for r in records:
        if r.path in seen:
            raise DataError(
                f"{r.path} is listed in the {seen[r.path]} and {r.split} annotation files; an "
                "image may be in one split only"
            )
        seen[r.path] = r.split
    splits = {f.split for f in files}
    train = [r for r in records if r.split == "train" or "train" not in splits]
    if not any(len(r.boxes) > sum(r.crowd) for r in train):  # iscrowd regions are not trained on
        where = "train split" if "train" in splits else "dataset"
        dropped = f" ({len(tally.degenerate)} degenerate boxes dropped)" if tally.degenerate else ""
        raise DataError(
            f"the {where} of {root} has no boxes (iscrowd regions do not count){dropped}; annotate some images (or check "
            f"that {first_few(str(f.path) for f in files)} is the right file)"
        )
    if tally.clipped:
        notes.append(
            f"clipped {len(tally.clipped)} boxes reaching outside their image (first: "
            f"{first_few(tally.clipped, _EXAMPLES)})"
        )
    if tally.degenerate:
        notes.append(
            f"dropped {len(tally.degenerate)} degenerate boxes (width or height <= "
            f"{MIN_BOX_SIDE:g} px after clipping, or negative) (first: "
            f"{first_few(tally.degenerate, _EXAMPLES)})"
        )
    negatives = sum(not r.boxes for r in records)
    if negatives:
        notes.append(f"{negatives} images have no boxes; kept as negatives (images without objects)")
    crowd = sum(sum(r.crowd) for r in records)
    if crowd:
        notes.append(f"{crowd} boxes are iscrowd regions; kept with crowd=True (not trained on)")
    missing = [p for p, why in skipped if why.startswith("missing")]
    if missing:
        notes.append(f"skipped {len(missing)} missing image files")
    unlisted = [p for p, why in skipped if why.startswith("not listed")]
    if unlisted:
        notes.append(f"skipped {len(unlisted)} images not listed in their split's {ROBOFLOW_JSON}")
    for note in notes:
        log.info("%s: %s", root, note)
    ds = Dataset(root=root, classes=classes, records=records, task="detect", fmt=fmt, notes=notes,
                 outside_root=list(guard.outside))
    ds.skipped = [(ds.relpath(Record(path=p, labels=())), why) for p, why in skipped]
    return ds
