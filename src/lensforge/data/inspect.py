"""What ``lensforge data inspect DATA`` reports: counts, sizes and problems of a dataset.

:func:`inspect_dataset` reads every file once (:func:`~lensforge.data.image.probe_image` for
format, size, mode and corruption, then SHA-256 of its bytes for exact duplicates; only
regular files are read, so a FIFO named like an image cannot block) and returns a JSON-ready
dict; the CLI renders it (``lensforge.cli.render.print_inspection``).

Problems (they count in the verdict): unreadable files, exact duplicates (and duplicates
that cross splits = leakage, or carry different labels), entries the reader skipped, classes
missing from a split or with no images, classes with fewer than :data:`RARE_CLASS` images (boxes
for detection), and strong class imbalance. ``advice`` says what to do about a rare class and
what training will do with pre-split data that has no val split. Odd images (grayscale,
CMYK, 16-bit, palette, alpha, EXIF-rotated, tiny, animated) are notes: lensforge decodes
them all to RGB, but they are worth knowing about.

Paths the dataset names that resolve outside its folder (``Dataset.outside_root``, see
:mod:`lensforge.data.files`) are a problem too: ``outside_root`` {count, examples, allowed}.
Unless ``--allow-outside-root`` was given they were not read, so nothing here describes them.

Detection datasets (task "detect") get a ``detection`` section too (:func:`_detection`):
images and boxes per class and split, boxes per image, COCO box-size buckets, images
without boxes, crowd boxes, the reader's notes (clipped / dropped boxes, merged classes),
and images whose size in the annotations differs from the file (a problem: the boxes would
be off).
"""

from __future__ import annotations

import bisect
import hashlib
import os
import stat
import statistics
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lensforge.config import TrainConfig  # the val fraction training takes from train (a dataclass, no torch)
from lensforge.data.image import ImageInfo, probe_image
from lensforge.data.records import SPLITS, Dataset, Record
from lensforge.errors import ImageError

MAX_EXAMPLES = 10
TINY_SIDE = 32  # shorter side below this many pixels is "tiny"
IMBALANCE_WARN = 10.0  # max/min class count at or above this is reported as a problem
# A class with fewer boxes (detection) or images than this is a problem of its own: it cannot be in
# train, val and test at once, and a few examples teach a model nothing (a Roboflow export with a
# one-box class is common). Spelled out with advice, not only folded into the imbalance ratio.
RARE_CLASS = 5
# Upper bounds (exclusive) of the shorter-side buckets; the last bucket is open-ended.
SIZE_BUCKETS = (32, 64, 128, 256, 512, 1024)
# COCO's object-size buckets by box area in px: small < 32², medium < 96², large the rest.
BOX_AREA_BUCKETS = {"small": 32**2, "medium": 96**2}
ODD_KINDS = {
    "grayscale": "grayscale (L / 1 / LA)",
    "cmyk": "CMYK",
    "16bit": "16-bit or float pixels",
    "palette": "palette (P)",
    "alpha": "with alpha channel",
    "exif_rotated": "EXIF-rotated (orientation != 1)",
    "tiny": f"tiny (shorter side < {TINY_SIDE} px)",
    "animated": "animated (several frames)",
}
_CHUNK = 1 << 20

Progress = Callable[[int, int], None]


def _sha256(path: Path) -> str | None:
    """SHA-256 of a regular file's bytes; None for anything else (FIFO, device, directory).

    Opened with O_NONBLOCK and checked with fstat on the open descriptor (as ``probe_image``
    does), so a FIFO named like an image can never block the scan.
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    fd = os.open(path, flags)
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        digest = hashlib.sha256()
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _odd_kinds(info: ImageInfo) -> list[str]:
    """The ODD_KINDS keys that apply to a readable image."""
    mode = info.mode or ""
    kinds = []
    if mode in ("1", "L", "LA", "La"):
        kinds.append("grayscale")
    if mode == "CMYK":
        kinds.append("cmyk")
    if info.is_16bit or mode == "F":
        kinds.append("16bit")
    if mode in ("P", "PA"):
        kinds.append("palette")
    if mode in ("RGBA", "RGBa", "LA", "La", "PA"):
        kinds.append("alpha")
    if info.exif_orientation not in (None, 1):
        kinds.append("exif_rotated")
    if info.width and info.height and min(info.width, info.height) < TINY_SIDE:
        kinds.append("tiny")
    if (info.frames or 1) > 1:
        kinds.append("animated")
    return kinds


def _split_of(ds: Dataset, splits: dict[str, list[Record]] | None) -> dict[Record, str | None]:
    if splits is not None:
        membership: dict[Record, str | None] = {r: None for r in ds.records}
        for name, records in splits.items():
            for r in records:
                membership[r] = name
        return membership
    return {r: r.split for r in ds.records}


def _size_stats(infos: list[ImageInfo]) -> dict[str, Any] | None:
    """min / median / max of width and height as displayed (after EXIF rotation)."""
    sizes = [i.oriented_size for i in infos if i.width and i.height]
    if not sizes:
        return None
    stats: dict[str, Any] = {}
    for axis, name in enumerate(("width", "height")):
        values = [size[axis] for size in sizes]
        stats[name] = {
            "min": min(values),
            "median": float(statistics.median(values)),
            "max": max(values),
        }
    edges = (0, *SIZE_BUCKETS)
    names = [f"{lo}-{hi - 1}" for lo, hi in zip(edges, SIZE_BUCKETS)] + [f"{SIZE_BUCKETS[-1]}+"]
    buckets = dict.fromkeys(names, 0)
    for size in sizes:
        buckets[names[bisect.bisect_right(SIZE_BUCKETS, min(size))]] += 1
    stats["shorter_side"] = buckets
    return stats


def inspect_dataset(
    ds: Dataset,
    splits: dict[str, list[Record]] | None = None,
    verify: bool = True,
    progress: Progress | None = None,
    outside_allowed: bool = False,
) -> dict[str, Any]:
    """Inspect every image of ``ds`` once and return a JSON-ready report.

    splits: {"train"/"val"/"test": records} (e.g. from ``split_records``) for the
        class x split table and the leakage check; None uses the records' own split (if the
        data came pre-split), else the table has no split columns.
    verify: fully decode each image to find truncated / corrupt files (slower); False only
        reads headers.
    progress: called as ``progress(done, total)`` after each file.
    outside_allowed: whether ``ds`` was read with ``outside_root="allow"`` (its outside
        paths are then among the records), for the report's wording.

    Keys: format, task, root, classes, total_images, splits, counts {per_class, per_split,
    table, no_label}, imbalance_ratio, image_sizes, file_formats, unreadable, duplicates,
    odd_images, skipped, outside_root {count, examples, allowed}, rare_classes {class: count}
    (fewer than :data:`RARE_CLASS`), advice (one-line suggestions), issues (list of one-line
    problems) and verdict (one line). For detection, counts are of boxes (not images), there
    is a ``detection`` key as well (:func:`_detection`) and ``split_totals`` {split or
    "total": {images, boxes, empty_images}}: the bottom rows of the console table.
    outside_root's ``allowed``: whether those paths were read (``--allow-outside-root``).
    """
    membership = _split_of(ds, splits)
    records = sorted(ds.records, key=ds.relpath)
    total = len(records)
    by_hash: dict[str, list[Record]] = defaultdict(list)
    infos: list[ImageInfo] = []
    info_of: dict[Record, ImageInfo] = {}
    unreadable: list[dict[str, str]] = []
    odd: dict[str, list[str]] = {kind: [] for kind in ODD_KINDS}
    file_formats: Counter[str] = Counter()

    for done, record in enumerate(records, start=1):
        rel = ds.relpath(record)
        try:
            # Probe first: it never blocks and reports a FIFO or device as "unreadable"; a file
            # that cannot be read is not hashed (corrupt ones are: copies are still copies).
            info = probe_image(record.path, verify=verify)
            digest = _sha256(record.path) if info.error_code != "unreadable" else None
        except ImageError as exc:
            unreadable.append({"path": rel, "code": exc.code, "reason": str(exc)})
        except OSError as exc:
            unreadable.append({"path": rel, "code": "unreadable", "reason": str(exc)})
        else:
            if digest is not None:
                by_hash[digest].append(record)
            if info.error_code:
                unreadable.append(
                    {"path": rel, "code": info.error_code, "reason": info.error or info.error_code}
                )
            else:
                infos.append(info)
                info_of[record] = info
                file_formats[info.format or "unknown"] += 1
                for kind in _odd_kinds(info):
                    odd[kind].append(rel)
        if progress is not None:
            progress(done, total)

    split_names = [s for s in SPLITS if any(membership[r] == s for r in records)]
    counts = _counts(ds, records, membership, split_names)
    duplicates = _duplicates(ds, by_hash, membership)
    per_class = counts["per_class"]
    nonzero = [n for n in per_class.values() if n]
    imbalance = None  # undefined when a class has no images (reported as its own issue)
    if nonzero and len(nonzero) == len(per_class):
        imbalance = round(max(nonzero) / min(nonzero), 2)
    report: dict[str, Any] = {
        "format": ds.fmt,
        "task": ds.task,
        "root": str(ds.root),
        "classes": list(ds.classes),
        "total_images": total,
        "splits": split_names,
        "counts": counts,
        "imbalance_ratio": imbalance,
        "image_sizes": _size_stats(infos),
        "file_formats": dict(sorted(file_formats.items())),
        "unreadable": {"count": len(unreadable), "examples": unreadable[:MAX_EXAMPLES]},
        "duplicates": duplicates,
        "odd_images": {
            kind: {"count": len(paths), "examples": paths[:MAX_EXAMPLES]}
            for kind, paths in odd.items()
        },
        "skipped": {
            "count": len(ds.skipped),
            "examples": [{"path": p, "reason": why} for p, why in ds.skipped[:MAX_EXAMPLES]],
        },
        "outside_root": {
            "count": len(ds.outside_root),
            "examples": ds.outside_root[:MAX_EXAMPLES],
            "allowed": outside_allowed,
        },
    }
    if ds.task == "detect":
        report["detection"] = _detection(ds, records, membership, split_names, info_of)
        report["split_totals"] = report["detection"].pop("split_totals")
    report["rare_classes"] = {c: n for c, n in per_class.items() if 0 < n < RARE_CLASS}
    report["advice"] = _advice(report, presplit=ds.presplit and splits is None)
    report["issues"] = _issues(report)
    report["verdict"] = _verdict(report)
    return report


def _counts(
    ds: Dataset,
    records: list[Record],
    membership: dict[Record, str | None],
    split_names: list[str],
) -> dict[str, Any]:
    table = {c: {s: 0 for s in split_names} for c in ds.classes}
    per_class = {c: 0 for c in ds.classes}
    per_split = {s: 0 for s in split_names}
    no_label = 0
    for r in records:
        split = membership[r]
        if split in per_split:
            per_split[split] += 1
        if not r.labels:
            no_label += 1
        for i in r.labels:
            name = ds.classes[i]
            per_class[name] += 1
            if split in table[name]:
                table[name][split] += 1
    return {"per_class": per_class, "per_split": per_split, "table": table, "no_label": no_label}


def _spread(values: list[int]) -> dict[str, float] | None:
    if not values:
        return None
    return {"min": min(values), "median": float(statistics.median(values)), "max": max(values)}


def _detection(
    ds: Dataset,
    records: list[Record],
    membership: dict[Record, str | None],
    split_names: list[str],
    info_of: dict[Record, ImageInfo],
) -> dict[str, Any]:
    """The detection section of the report.

    Keys: table {class: {split: {images, boxes}}} (split "total" included), boxes (count),
    boxes_per_image {min, median, max} and per split, box_sizes {small, medium, large} by box
    area (COCO buckets) overall and per_class, no_boxes {count, per_split, examples}, crowd
    boxes, size_mismatch {count, examples} (annotated size vs the file's size as displayed),
    notes (the reader's, verbatim).
    """
    columns = [*split_names, "total"]
    table = {c: {s: {"images": 0, "boxes": 0} for s in columns} for c in ds.classes}
    sizes = {c: dict.fromkeys(("small", "medium", "large"), 0) for c in ds.classes}
    per_image: dict[str, list[int]] = {s: [] for s in columns}
    no_boxes: dict[str, int] = dict.fromkeys(columns, 0)
    negatives: list[str] = []
    mismatch: list[dict[str, Any]] = []
    crowd = 0
    for r in records:
        cols = [membership[r], "total"] if membership[r] in split_names else ["total"]
        boxes = r.box_array()
        for col in cols:
            per_image[col].append(len(boxes))
            no_boxes[col] += not len(boxes)
        if not len(boxes):
            negatives.append(ds.relpath(r))
        for label in set(r.labels):
            for col in cols:
                table[ds.classes[label]][col]["images"] += 1
        areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        for label, area in zip(r.labels, areas.tolist()):
            name = ds.classes[label]
            for col in cols:
                table[name][col]["boxes"] += 1
            bucket = "small" if area < BOX_AREA_BUCKETS["small"] else (
                "medium" if area < BOX_AREA_BUCKETS["medium"] else "large")
            sizes[name][bucket] += 1
        crowd += int(r.crowd_array().sum())
        info = info_of.get(r)
        if r.size is not None and info is not None and tuple(r.size) != info.oriented_size:
            mismatch.append({"path": ds.relpath(r), "annotated": list(r.size),
                             "file": list(info.oriented_size)})
    overall = {k: sum(s[k] for s in sizes.values()) for k in ("small", "medium", "large")}
    return {
        "split_totals": {c: {"images": len(per_image[c]), "boxes": sum(per_image[c]), "empty_images": no_boxes[c]}
                         for c in columns},
        "table": table,
        "boxes": sum(per_image["total"]),
        "boxes_per_image": _spread(per_image["total"]),
        "boxes_per_image_per_split": {s: _spread(per_image[s]) for s in split_names},
        "box_sizes": {**overall, "per_class": sizes},
        "no_boxes": {"count": no_boxes["total"], "per_split": {s: no_boxes[s] for s in split_names},
                     "examples": negatives[:MAX_EXAMPLES]},
        "crowd_boxes": crowd,
        "size_mismatch": {"count": len(mismatch), "examples": mismatch[:MAX_EXAMPLES]},
        "notes": list(ds.notes),
    }


def _duplicates(
    ds: Dataset, by_hash: dict[str, list[Record]], membership: dict[Record, str | None]
) -> dict[str, Any]:
    groups = [sorted(rs, key=ds.relpath) for rs in by_hash.values() if len(rs) > 1]
    groups.sort(key=lambda rs: ds.relpath(rs[0]))
    cross = [g for g in groups if len({membership[r] for r in g}) > 1]
    conflicting = [g for g in groups if len({tuple(sorted(r.labels)) for r in g}) > 1]
    return {
        "groups": len(groups),
        "files": sum(len(g) for g in groups),
        "examples": [[ds.relpath(r) for r in g] for g in groups[:MAX_EXAMPLES]],
        "cross_split_groups": len(cross),
        "cross_split_examples": [
            [{"path": ds.relpath(r), "split": membership[r]} for r in g]
            for g in cross[:MAX_EXAMPLES]
        ],
        "conflicting_label_groups": len(conflicting),
        "conflicting_label_examples": [
            [{"path": ds.relpath(r), "labels": [ds.classes[i] for i in r.labels]} for r in g]
            for g in conflicting[:MAX_EXAMPLES]
        ],
    }


def _plural(n: int, word: str, plural: str | None = None) -> str:
    return f"{n} {word if n == 1 else (plural or word + 's')}"


def _issues(report: dict[str, Any]) -> list[str]:
    """One short line per kind of problem found."""
    issues = []
    if report["unreadable"]["count"]:
        issues.append(_plural(report["unreadable"]["count"], "unreadable file"))
    dup = report["duplicates"]
    if dup["cross_split_groups"]:
        issues.append(
            f"{_plural(dup['cross_split_groups'], 'duplicate group')} across splits (leakage)"
        )
    within = dup["groups"] - dup["cross_split_groups"]
    if within:
        issues.append(f"{_plural(within, 'group')} of identical files")
    if dup["conflicting_label_groups"]:
        issues.append(
            f"{_plural(dup['conflicting_label_groups'], 'duplicate group')} with different labels"
        )
    if report["skipped"]["count"]:
        skipped = _plural(report["skipped"]["count"], "entry", "entries")
        issues.append(f"{skipped} skipped by the reader")
    outside = report["outside_root"]
    if outside["count"]:
        n = _plural(outside["count"], "path")
        issues.append(f"{n} outside the data folder ({'read: --allow-outside-root' if outside['allowed'] else 'not read; train and evaluate refuse them unless --allow-outside-root'})")
    counts = report["counts"]
    empty = [c for c, n in counts["per_class"].items() if n == 0]
    unit = "boxes" if report["task"] == "detect" else "images"
    if empty:
        issues.append(f"classes with no {unit}: {', '.join(empty)}")
    one = "box" if report["task"] == "detect" else "image"
    for name, n in report["rare_classes"].items():  # the advice says what to do about each
        issues.append(f"class {name!r} has only {_plural(n, one, unit)}")
    ratio = report["imbalance_ratio"]
    if ratio is not None and ratio >= IMBALANCE_WARN:
        per_class = counts["per_class"]
        big = max(per_class, key=per_class.get)
        small = min(per_class, key=per_class.get)
        issues.append(
            f"class imbalance {ratio:.1f}:1 ({big} {per_class[big]} vs {small} {per_class[small]})"
        )
    if report["task"] in ("classify", "detect"):
        for split, n in counts["per_split"].items():
            absent = [c for c, row in counts["table"].items() if n and not row[split]]
            if absent and not empty:
                issues.append(f"{split} split has no {unit} of: {', '.join(absent)}")
    det = report.get("detection")
    if det and det["size_mismatch"]["count"]:
        n = det["size_mismatch"]["count"]
        issues.append(f"{_plural(n, 'image')} whose annotated size differs from the file")
    return issues


def _advice(report: dict[str, Any], presplit: bool) -> list[str]:
    """What to do about what was found, and what training will do with this data, one line each."""
    unit, units = ("box", "boxes") if report["task"] == "detect" else ("image", "images")
    advice = [
        f"class {name!r} has {_plural(n, unit, units)}: a model cannot learn it from so few; drop or merge it "
        f"(e.g. remove it from the annotations, or relabel its {units} as a related class)"
        for name, n in report["rare_classes"].items()
    ]
    if presplit and "train" in report["splits"] and "val" not in report["splits"]:
        advice.append(
            f"no val split: training will take {TrainConfig.val_fraction:.0%} of train for validation "
            "(lensforge train --split TEST,VAL changes it; with pre-split data only VAL is used)"
        )
    return advice


def _verdict(report: dict[str, Any]) -> str:
    issues = report["issues"]
    if not issues:
        boxes = f", {_plural(report['detection']['boxes'], 'box', 'boxes')}" if "detection" in report else ""
        return (
            f"OK: {_plural(len(report['classes']), 'class', 'classes')}, "
            f"{_plural(report['total_images'], 'image')}{boxes}, no problems"
        )
    return f"{_plural(len(issues), 'problem')}: {'; '.join(issues)}"
