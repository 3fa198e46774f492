"""What ``lensforge data inspect DATA`` reports: counts, sizes and problems of a dataset.

:func:`inspect_dataset` reads every file once (:func:`~lensforge.data.image.probe_image` for
format, size, mode and corruption, then SHA-256 of its bytes for exact duplicates; only
regular files are read, so a FIFO named like an image cannot block) and returns a JSON-ready
dict; :func:`print_inspection` renders that dict with rich.

Problems (they count in the verdict): unreadable files, exact duplicates (and duplicates
that cross splits = leakage, or carry different labels), entries the reader skipped, classes
missing from a split or with no images, and strong class imbalance. Odd images (grayscale,
CMYK, 16-bit, palette, alpha, EXIF-rotated, tiny, animated) are notes: lensforge decodes
them all to RGB, but they are worth knowing about.
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

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from lensforge.data.image import ImageInfo, probe_image
from lensforge.data.records import SPLITS, Dataset, Record
from lensforge.errors import ImageError

MAX_EXAMPLES = 10
TINY_SIDE = 32  # shorter side below this many pixels is "tiny"
IMBALANCE_WARN = 10.0  # max/min class count at or above this is reported as a problem
# Upper bounds (exclusive) of the shorter-side buckets; the last bucket is open-ended.
SIZE_BUCKETS = (32, 64, 128, 256, 512, 1024)
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
) -> dict[str, Any]:
    """Inspect every image of ``ds`` once and return a JSON-ready report.

    splits: {"train"/"val"/"test": records} (e.g. from ``split_records``) for the
        class x split table and the leakage check; None uses the records' own split (if the
        data came pre-split), else the table has no split columns.
    verify: fully decode each image to find truncated / corrupt files (slower); False only
        reads headers.
    progress: called as ``progress(done, total)`` after each file.

    Keys: format, task, root, classes, total_images, splits, counts {per_class, per_split,
    table, no_label}, imbalance_ratio, image_sizes, file_formats, unreadable, duplicates,
    odd_images, skipped, issues (list of one-line problems) and verdict (one line).
    """
    membership = _split_of(ds, splits)
    records = sorted(ds.records, key=ds.relpath)
    total = len(records)
    by_hash: dict[str, list[Record]] = defaultdict(list)
    infos: list[ImageInfo] = []
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
    }
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
    counts = report["counts"]
    empty = [c for c, n in counts["per_class"].items() if n == 0]
    if empty:
        issues.append(f"classes with no images: {', '.join(empty)}")
    ratio = report["imbalance_ratio"]
    if ratio is not None and ratio >= IMBALANCE_WARN:
        per_class = counts["per_class"]
        big = max(per_class, key=per_class.get)
        small = min(per_class, key=per_class.get)
        issues.append(
            f"class imbalance {ratio:.1f}:1 ({big} {per_class[big]} vs {small} {per_class[small]})"
        )
    if report["task"] == "classify":
        for split, n in counts["per_split"].items():
            absent = [c for c, row in counts["table"].items() if n and not row[split]]
            if absent and not empty:
                issues.append(f"{split} split has no images of: {', '.join(absent)}")
    return issues


def _verdict(report: dict[str, Any]) -> str:
    issues = report["issues"]
    if not issues:
        return (
            f"OK: {_plural(len(report['classes']), 'class', 'classes')}, "
            f"{_plural(report['total_images'], 'image')}, no problems"
        )
    return f"{_plural(len(issues), 'problem')}: {'; '.join(issues)}"


# --------------------------------------------------------------------------- rendering


def _examples(items: list[Any], n: int = 3) -> str:
    texts = [
        item if isinstance(item, str) else f"{item['path']} ({item.get('code') or item['reason']})"
        for item in items[:n]
    ]
    more = " ..." if len(items) > n else ""
    return escape(", ".join(texts) + more)


def print_inspection(report: dict[str, Any], console: Console) -> None:
    """Render an :func:`inspect_dataset` report as rich tables, ending with the verdict."""
    head = Table.grid(padding=(0, 2))
    head.add_row("[bold]dataset[/]", escape(report["root"]))
    head.add_row("[bold]format[/]", f"{report['format']}  (task {report['task']})")
    head.add_row("[bold]images[/]", str(report["total_images"]))
    if report["file_formats"]:
        head.add_row(
            "[bold]files[/]", ", ".join(f"{k} {v}" for k, v in report["file_formats"].items())
        )
    if report["imbalance_ratio"] is not None:
        ratio = f"{report['imbalance_ratio']:.2f} (largest / smallest class)"
        head.add_row("[bold]imbalance[/]", ratio)
    console.print(head)

    counts = report["counts"]
    classes = Table(title="Images per class", title_justify="left")
    classes.add_column("class")
    for split in report["splits"]:
        classes.add_column(split, justify="right")
    classes.add_column("total", justify="right")
    for name, n in counts["per_class"].items():
        row = [str(counts["table"][name][s]) for s in report["splits"]]
        classes.add_row(escape(name), *row, str(n))
    if report["task"] == "multilabel":
        blanks = [""] * len(report["splits"])
        classes.add_row("[dim](no label)[/]", *blanks, str(counts["no_label"]))
    classes.add_row(
        "[bold]images[/]",
        *[str(counts["per_split"][s]) for s in report["splits"]],
        str(report["total_images"]),
    )
    console.print(classes)

    sizes = report["image_sizes"]
    if sizes:
        table = Table(title="Image sizes (px)", title_justify="left")
        for col in ("", "min", "median", "max"):
            table.add_column(col, justify="right")
        for axis in ("width", "height"):
            s = sizes[axis]
            table.add_row(axis, str(s["min"]), f"{s['median']:g}", str(s["max"]))
        console.print(table)
        buckets = "  ".join(f"{k}: {v}" for k, v in sizes["shorter_side"].items() if v)
        console.print(f"shorter side  {buckets}")

    problems = Table(title="Problems", title_justify="left")
    problems.add_column("problem")
    problems.add_column("count", justify="right")
    problems.add_column("examples")
    dup = report["duplicates"]
    rows = [
        ("unreadable / truncated", report["unreadable"]["count"], report["unreadable"]["examples"]),
        (
            "duplicates across splits",
            dup["cross_split_groups"],
            [
                " = ".join(f"{d['path']} ({d['split']})" for d in g)
                for g in dup["cross_split_examples"]
            ],
        ),
        ("duplicate groups", dup["groups"], [" = ".join(g) for g in dup["examples"]]),
        (
            "duplicates, different labels",
            dup["conflicting_label_groups"],
            [" = ".join(d["path"] for d in g) for g in dup["conflicting_label_examples"]],
        ),
        ("skipped by reader", report["skipped"]["count"], report["skipped"]["examples"]),
    ]
    for name, n, examples in rows:
        if n:
            problems.add_row(name, f"[red]{n}[/]", _examples(examples))
    if problems.row_count:
        console.print(problems)

    notes = Table(title="Odd images (decoded to RGB, worth a look)", title_justify="left")
    notes.add_column("kind")
    notes.add_column("count", justify="right")
    notes.add_column("examples")
    for kind, entry in report["odd_images"].items():
        if entry["count"]:
            notes.add_row(ODD_KINDS[kind], str(entry["count"]), _examples(entry["examples"]))
    if notes.row_count:
        console.print(notes)

    style = "green" if not report["issues"] else "yellow"
    console.print(f"[bold {style}]{escape(report['verdict'])}[/]")
