"""Deterministic, stratified train/val/test splits, and saving them next to a run.

The same records and seed always give the same split, whatever order the reader listed the
files in: records are sorted by their path relative to ``Dataset.root`` first.

Stratification key:
- single-label data: the record's class;
- multi-label and detection data: the record's *rarest* label (for detection: the rarest
  class among its boxes, by frequency in the pool being split), or a separate "no labels"
  group for negatives (images without boxes). Iterative multi-label stratification would
  balance every label at once; the rarest-label key is a simple approximation that keeps
  rare labels from landing all in one split, which is what matters most for small data.
Strata with a single member cannot be stratified; they are pooled together (and, if that
pool is still a single record, merged into the largest stratum). If stratification is still
impossible (e.g. fewer test slots than strata) the pool is split unstratified with a warning.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
from collections import Counter
from pathlib import Path

from lensforge.data.records import SPLITS, Dataset, Record
from lensforge.errors import ConfigError, DataError

log = logging.getLogger(__name__)

SPLIT_FILE_FORMAT = 1
# load_split refuses a saved split when more than this share of its files is gone.
MAX_MISSING_FRACTION = 0.1
_NO_LABEL = -1  # stratum of multi-label records without any label


def _strata(records: list[Record], multilabel: bool) -> list[int]:
    """One stratification key per record (see module docstring)."""
    if not multilabel:
        return [r.labels[0] if r.labels else _NO_LABEL for r in records]
    freq = Counter(label for r in records for label in r.labels)
    # Rarest label; ties go to the smaller class index so the key does not depend on order.
    return [min(r.labels, key=lambda c: (freq[c], c)) if r.labels else _NO_LABEL for r in records]


def _merge_small_strata(keys: list[int]) -> list[int]:
    """Pool strata with one member so that every stratum has at least two."""
    counts = Counter(keys)
    small = {k for k, n in counts.items() if n < 2}
    if not small:
        return keys
    pooled = "rare"
    merged: list[int | str] = [pooled if k in small else k for k in keys]
    if len(small) == 1:
        # A pool of one is still too small: put it into the largest stratum.
        large = [k for k, _ in counts.most_common() if k not in small]
        if not large:
            return keys
        merged = [large[0] if k == pooled else k for k in merged]
    return _renumber(merged)


def _renumber(keys: list[int | str]) -> list[int]:
    mapping: dict[int | str, int] = {}
    return [mapping.setdefault(k, len(mapping)) for k in keys]


def _take(
    records: list[Record], fraction: float, seed: int, multilabel: bool, what: str
) -> tuple[list[Record], list[Record]]:
    """Split ``records`` (already sorted) into (rest, taken) with ``fraction`` in taken."""
    n = len(records)
    if fraction <= 0 or n < 2:
        if fraction > 0:
            log.warning("only %d image(s) left; the %s split is empty", n, what)
        return list(records), []
    n_take = min(max(1, round(fraction * n)), n - 1)  # both sides keep at least one image

    try:  # scikit-learn comes with the training extra, so import it only when splitting
        from sklearn.model_selection import train_test_split
    except ImportError as exc:
        raise DataError(
            "splitting data needs scikit-learn; install it with pip install 'lensforge[train]'"
        ) from exc

    keys = _merge_small_strata(_strata(records, multilabel))
    n_strata = len(set(keys))
    indices = list(range(n))
    if n_strata > 1 and n_take >= n_strata and n - n_take >= n_strata:
        rest, taken = train_test_split(
            indices, test_size=n_take, random_state=seed, shuffle=True, stratify=keys
        )
    else:
        if n_strata > 1:
            log.warning(
                "too few images (%d) for a stratified %s split over %d label groups; "
                "splitting without stratification",
                n,
                what,
                n_strata,
            )
        rest, taken = train_test_split(indices, test_size=n_take, random_state=seed, shuffle=True)
    return [records[i] for i in sorted(rest)], [records[i] for i in sorted(taken)]


def _check_fraction(name: str, value: float) -> None:
    if not 0 <= value < 1:
        raise ConfigError(f"{name} fraction must be in [0, 1), got {value}; e.g. 0.2 for 20%")


def split_records(
    ds: Dataset, test: float = 0.2, val: float = 0.2, seed: int = 0
) -> dict[str, list[Record]]:
    """Split the dataset into {"train", "val", "test"} lists of its records.

    Not pre-split: ``test`` of all records goes to test, then ``val`` of the rest to val.
    Pre-split (``ds.presplit``): the given splits are kept (``test`` is ignored); a missing
    val split is carved out of train with fraction ``val``; a missing test split stays
    empty (with a warning). Records without a split in pre-split data count as train.
    Each list is sorted by path; the result depends only on the records' paths and labels
    and on ``seed``.
    """
    _check_fraction("test", test)
    _check_fraction("val", val)
    # detection records hold one label per box: stratify them like multi-label records
    multilabel = ds.task in ("multilabel", "detect")
    records = sorted(ds.records, key=ds.relpath)
    if not ds.presplit:
        rest, test_part = _take(records, test, seed, multilabel, "test")
        train, val_part = _take(rest, val, seed, multilabel, "val")
        return {"train": train, "val": val_part, "test": test_part}

    given: dict[str, list[Record]] = {name: [] for name in SPLITS}
    unassigned = 0
    for r in records:
        if r.split in given:
            given[r.split].append(r)
        else:
            unassigned += 1
            given["train"].append(r)
    if unassigned:
        log.warning("%d pre-split records have no split; they are used for training", unassigned)
    if not given["val"]:
        log.info("no val split in %s; taking %.0f%% of train for val", ds.root, val * 100)
        given["train"], given["val"] = _take(given["train"], val, seed, multilabel, "val")
    if not given["test"]:
        log.warning("no test split in %s; the test split is empty", ds.root)
    return given


def save_split(
    splits: dict[str, list[Record]], ds: Dataset, path: str | Path, seed: int | None = None
) -> Path:
    """Write the split as JSON (relative paths), atomically; returns the file's path.

    ``{"format": 1, "seed": seed, "root": "<ds.root>", "splits": {"train": [relpath, ...],
    "val": [...], "test": [...]}}``
    """
    path = Path(path)
    payload = {
        "format": SPLIT_FILE_FORMAT,
        "seed": seed,
        "root": str(ds.root),
        "splits": {name: [ds.relpath(r) for r in splits.get(name, [])] for name in SPLITS},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _create_temp_file(path)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(payload, f, indent=1)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _create_temp_file(path: Path) -> tuple[int, Path]:
    """Open a new file beside ``path`` for writing, with the permissions any new file gets.

    Not ``tempfile.mkstemp``: its file is private (0600), so a split saved by one user could
    not be read by a server running as another. ``O_CREAT | O_EXCL`` with mode 0o666 lets the
    kernel apply the umask atomically, without reading it through ``os.umask`` (which changes
    it process-wide for a moment and is not thread-safe).
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:  # 48 random bits: practically never twice
            continue


def load_split(path: str | Path, ds: Dataset) -> dict[str, list[Record]]:
    """Map a split saved by :func:`save_split` back onto ``ds``'s records.

    Saved files no longer in the dataset are dropped with a warning, unless more than
    :data:`MAX_MISSING_FRACTION` of them are gone (then DataError: the data changed).
    Dataset records the file does not mention are left out, with a warning.
    """
    path = Path(path)
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise DataError(f"split file {path} does not exist; check the path") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"split file {path} is not valid JSON ({exc}); re-create it") from exc
    if not isinstance(payload, dict) or not isinstance(payload.get("splits"), dict):
        raise DataError(f"split file {path} has no 'splits' mapping; re-create it with save_split")
    version = payload.get("format")
    if version != SPLIT_FILE_FORMAT:
        raise DataError(
            f"split file {path} has format {version!r}; this lensforge reads format "
            f"{SPLIT_FILE_FORMAT} — upgrade lensforge or re-create the split"
        )
    by_rel = {ds.relpath(r): r for r in ds.records}
    result: dict[str, list[Record]] = {name: [] for name in SPLITS}
    missing: list[str] = []
    saved = 0
    for name, rels in payload["splits"].items():
        if name not in result or not isinstance(rels, list):
            raise DataError(
                f"split file {path} has an unknown split {name!r}; expected {', '.join(SPLITS)}"
            )
        for rel in rels:
            saved += 1
            record = by_rel.get(rel)
            if record is None:
                missing.append(rel)
            else:
                result[name].append(record)
    if missing:
        if len(missing) > MAX_MISSING_FRACTION * saved:
            raise DataError(
                f"{len(missing)} of {saved} files in split {path} are not in the dataset at "
                f"{ds.root} (first: {', '.join(missing[:3])}); the data changed — make a new "
                "split"
            )
        log.warning(
            "%d of %d files in split %s are no longer in the dataset; dropped",
            len(missing),
            saved,
            path,
        )
    used = saved - len(missing)
    if used < len(by_rel):
        log.warning(
            "%d images in %s are not in split %s; left out — make a new split to use them",
            len(by_rel) - used,
            ds.root,
            path,
        )
    return result
