"""The bundle: the directory training writes and everything after it reads.

    model.onnx           images float32 (N, 3, S, S) → scores float32 (N, C)
    weights.safetensors  the torch weights, for further training (never pickled)
    lensforge.json       task, classes, input spec, thresholds, metrics, parity, versions, config
    split.json           which images were train / val / test (so evaluate never tests on training data)

No torch here: serving installs read bundles too.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from lensforge.errors import BundleError
from lensforge.runtime.preprocess import InputSpec

FORMAT_VERSION = 1
META_FILE = "lensforge.json"
MODEL_FILE = "model.onnx"
WEIGHTS_FILE = "weights.safetensors"
SPLIT_FILE = "split.json"
TASKS = ("classify", "multilabel")


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
        return InputSpec.from_dict(self.meta["input"])

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
    bundle = Bundle(p, meta)
    try:
        bundle.input_spec
    except (KeyError, TypeError, ValueError) as e:
        raise BundleError(f"{meta_path} has an invalid input spec: {e}") from None
    if not bundle.model_path.is_file() or bundle.model_path.stat().st_size == 0:
        raise BundleError(f"{p} is incomplete: {bundle.model_path.name} is missing or empty")
    return bundle


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
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
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
