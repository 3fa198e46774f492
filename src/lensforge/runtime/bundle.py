"""The bundle: the directory training writes and everything after it reads.

    model.onnx           classify/multilabel: images float32 (N, 3, S, S) → scores float32 (N, C)
                         detect: images float32 (1, 3, H, W) in [0, 1] → boxes float32 (K, 4) xyxy
                         input pixels, scores float32 (K,), labels int64 (K,) 0-based class ids
    weights.safetensors  the torch weights, for further training (never pickled)
    lensforge.json       task, classes, input spec, thresholds, metrics, parity, versions, config
    split.json           which images were train / val / test (so evaluate never tests on training data)

No torch here: serving installs read bundles too.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lensforge.data.records import TASKS
from lensforge.errors import BundleError
from lensforge.runtime.results import DEFAULT_THRESHOLD
from lensforge.runtime.preprocess import DetectSpec, InputSpec

FORMAT_VERSION = 1
META_FILE = "lensforge.json"
MODEL_FILE = "model.onnx"
WEIGHTS_FILE = "weights.safetensors"
SPLIT_FILE = "split.json"


@dataclass(frozen=True)
class Bundle:
    """A loaded bundle's metadata; ``path`` is its directory."""

    path: Path
    meta: dict[str, Any]

    @property
    def task(self) -> str:
        return str(self.meta["task"])

    @property
    def classes(self) -> list[str]:
        return list(self.meta["classes"])

    @property
    def input_spec(self) -> InputSpec:
        """Classification models' preprocessing (see :attr:`detect_spec` for detectors)."""
        if self.task == "detect":
            raise BundleError(f"{self.path} holds a detector; it has a detect_spec, not a classifier input spec")
        return InputSpec.from_dict(self.meta["input"])

    @property
    def detect_spec(self) -> DetectSpec:
        if self.task != "detect":
            raise BundleError(f"{self.path} holds a {self.task} model, not a detector")
        return DetectSpec.from_dict(self.meta["input"])

    @property
    def score_threshold(self) -> float:
        """Detectors: the score from which a box counts as found (tuned for F-beta on validation)."""
        return float(self.meta.get("score_threshold", DEFAULT_THRESHOLD))

    @property
    def thresholds(self) -> np.ndarray | None:
        th = self.meta.get("thresholds")
        return None if th is None else np.asarray(th, dtype=np.float32)

    @property
    def model_path(self) -> Path:
        return self.path / self.meta.get("model", {}).get("file", MODEL_FILE)

    @property
    def name(self) -> str:
        return self.path.name


def as_bundle(bundle: str | os.PathLike[str] | Bundle) -> Bundle:
    """A loaded bundle, whether given as one or as its directory."""
    return bundle if isinstance(bundle, Bundle) else load_bundle(bundle)


def display_name(path: Path) -> str:
    """What a bundle is called in servers and exports: its directory's name, or the run
    directory's when the bundle sits at ``<run>/bundle`` (``runs/shapes/bundle`` → ``shapes``)."""
    path = Path(path).resolve()
    return path.parent.name if path.name == "bundle" else path.name


def load_bundle(path: str | os.PathLike[str]) -> Bundle:
    """Read and check a bundle directory; every problem is a one-line :class:`BundleError`."""
    p = Path(path)
    if p.is_file() and p.name == META_FILE:
        p = p.parent
    if not p.is_dir():
        raise BundleError(f"bundle not found: {p} is not a directory (train one with: lensforge train DATA)")
    meta_path = p / META_FILE
    if not meta_path.is_file():
        hint = ""
        if (p / "bundle" / META_FILE).is_file():
            hint = f" (did you mean {p / 'bundle'}?)"
        raise BundleError(f"{p} is not a lensforge bundle: {META_FILE} is missing{hint}")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"{meta_path} is corrupt: {e}") from None
    if not isinstance(meta, dict):
        raise BundleError(f"{meta_path} is corrupt: expected a JSON object")
    version = meta.get("format_version")
    if not isinstance(version, int):
        raise BundleError(f"{meta_path} has no format_version; it was not written by lensforge")
    if version > FORMAT_VERSION:
        raise BundleError(
            f"{p} was written by a newer lensforge (bundle format {version}, this one reads up to "
            f"{FORMAT_VERSION}); upgrade with: pip install -U lensforge"
        )
    missing = [k for k in ("task", "classes", "input") if k not in meta]
    if missing:
        raise BundleError(f"{meta_path} is incomplete: missing {', '.join(missing)}")
    if meta["task"] not in TASKS:
        raise BundleError(f"{p} holds a {meta['task']!r} model; this lensforge handles {', '.join(TASKS)}")
    _check_meta(meta, meta_path)
    bundle = Bundle(p, meta)
    if not bundle.model_path.is_file() or bundle.model_path.stat().st_size == 0:
        raise BundleError(f"{p} is incomplete: {bundle.model_path.name} is missing or empty")
    return bundle


def _check_meta(meta: dict[str, Any], meta_path: Path) -> None:
    """Check the fields readers index into, so a hand-edited file fails here, in one line."""
    bad = f"{meta_path} is invalid:"
    classes = meta["classes"]
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
        raise BundleError(f"{bad} 'classes' must be a non-empty list of class names, got {_short(classes)}")
    if len(set(classes)) != len(classes):
        twice = sorted({c for c in classes if classes.count(c) > 1})
        raise BundleError(f"{bad} 'classes' lists {', '.join(map(repr, twice))} more than once")

    th = meta.get("thresholds")
    if th is not None:
        numbers = isinstance(th, list) and all(isinstance(t, (int, float)) and not isinstance(t, bool) for t in th)
        if not numbers or len(th) != len(classes) or not all(0 <= t <= 1 for t in th):  # NaN fails 0 <= t
            raise BundleError(
                f"{bad} 'thresholds' must be a list of {len(classes)} numbers in [0, 1] (one per class), "
                f"got {_short(th)}"
            )

    detect = meta["task"] == "detect"
    fields = "min_size, max_size, mean, std" if detect else "size, resize, mean, std"
    if not isinstance(meta["input"], dict):
        raise BundleError(f"{bad} 'input' must be an object ({fields}), got {_short(meta['input'])}")
    st = meta.get("score_threshold")
    if st is not None and (not isinstance(st, (int, float)) or isinstance(st, bool) or not 0 <= st <= 1):
        raise BundleError(f"{bad} 'score_threshold' must be a number in [0, 1], got {_short(st)}")
    try:
        (DetectSpec if detect else InputSpec).from_dict(meta["input"])
    except KeyError as e:
        raise BundleError(f"{bad} the input spec has no {e} entry") from None
    except (TypeError, ValueError, OverflowError) as e:  # OverflowError: int(Infinity)
        raise BundleError(f"{bad} the input spec is wrong: {e}") from None

    for key in ("model", "data"):  # readers call .get() on both
        if key in meta and not isinstance(meta[key], dict):
            raise BundleError(f"{bad} {key!r} must be an object, got {_short(meta[key])}")
    file = meta.get("model", {}).get("file", MODEL_FILE)
    if not _inside(meta_path.parent, file):
        raise BundleError(
            f"{bad} 'model.file' must be a relative file name inside the bundle (e.g. {MODEL_FILE!r}), "
            f"got {_short(file)}"
        )


def _inside(bundle_dir: Path, file: Any) -> bool:
    """Whether ``file`` names a path inside ``bundle_dir``.

    The model is read from inside the bundle only: an edited bundle must not point a server at
    an arbitrary file (an absolute path, '..', or a symlink that leads out of the bundle).
    '..' is refused even when it would come back inside: a plain name is all training writes.
    """
    if not isinstance(file, str) or not file or Path(file).is_absolute() or ".." in Path(file).parts:
        return False
    try:
        root = bundle_dir.resolve()
        return (root / file).resolve().is_relative_to(root)
    except (OSError, ValueError, RuntimeError):  # ValueError: a NUL byte; RuntimeError: a symlink loop
        return False


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def write_meta(directory: Path, meta: dict[str, Any]) -> None:
    meta = {"format_version": FORMAT_VERSION, **meta}
    (directory / META_FILE).write_text(json.dumps(meta, indent=2, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


@contextlib.contextmanager
def atomic_directory(dest: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary directory beside ``dest``; on success it becomes ``dest``.

    A crash or error inside the block removes the temporary directory, so a half-written
    bundle is never visible at ``dest``. With ``overwrite`` an existing ``dest`` is replaced
    only after the new one is complete.
    """
    dest = Path(dest)
    if dest.exists() and not overwrite:
        raise BundleError(f"{dest} already exists; pass --overwrite to replace it")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = _make_temp_dir(dest.parent, prefix=f".{dest.name}.tmp-")
    try:
        yield tmp
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
            os.replace(dest, old)
            os.replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _make_temp_dir(parent: Path, prefix: str) -> Path:
    """A new empty directory in ``parent`` with the permissions any ``mkdir`` there gets.

    Not ``tempfile.mkdtemp``: that makes a private 0700 directory, so a bundle trained by one
    user could not be read by a server running as another. ``mkdir(mode=0o777)`` lets the
    kernel apply the umask (and any default ACL) atomically, without reading the umask with
    ``os.umask``, which changes it process-wide for a moment and is not thread-safe.
    """
    while True:
        tmp = parent / f"{prefix}{secrets.token_hex(6)}"
        try:
            tmp.mkdir(mode=0o777)
        except FileExistsError:  # 48 random bits: practically never twice
            continue
        return tmp
