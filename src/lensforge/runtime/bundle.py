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
import logging
import os
import secrets
import shutil
import socket
import stat
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lensforge.data.records import TASKS
from lensforge.errors import BundleError
from lensforge.runtime.results import DEFAULT_THRESHOLD
from lensforge.runtime.preprocess import DetectSpec, InputSpec

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
META_FILE = "lensforge.json"
MODEL_FILE = "model.onnx"
EXPLAIN_FILE = "explain.onnx"  # a classifier's class activation map graph (runtime/explain.py)
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
    _check_file_stays_inside(p, META_FILE)
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
    model_file = meta.get("model", {}).get("file", MODEL_FILE)
    explain = meta.get("explain")  # the torch-free explainer opens this graph (runtime/explain.py)
    explain_file = [explain.get("file", EXPLAIN_FILE)] if isinstance(explain, dict) else []
    for name in (model_file, WEIGHTS_FILE, SPLIT_FILE, *explain_file):
        _check_file_stays_inside(p, name)
    if not bundle.model_path.is_file() or bundle.model_path.stat().st_size == 0:
        raise BundleError(f"{p} is incomplete: {bundle.model_path.name} is missing or empty")
    if os.path.lexists(p / WEIGHTS_FILE):
        check_safetensors(p / WEIGHTS_FILE)
    return bundle


def _check_file_stays_inside(bundle_dir: Path, name: str) -> None:
    """Refuse a bundle file (when there is one) that leads out of the bundle through a symlink,
    or that is not a regular file (a FIFO would block the reader, a device never ends).

    Checked before anything reads the file, so a hostile bundle never makes lensforge read
    (or copy into an export) a file from elsewhere. ``name`` is already known to be a plain
    relative path (``_check_meta``); a symlink that stays inside the bundle is fine.
    """
    path = bundle_dir / name
    if not os.path.lexists(path):
        return  # missing files are reported by whoever needs them, with their own message
    if not _inside(bundle_dir, name):
        raise BundleError(
            f"{path} is a symlink that leads out of the bundle (bundles are read only from inside their "
            "directory); copy the file into the bundle instead of linking it"
        )
    try:
        mode = path.stat().st_mode
    except OSError as e:
        raise BundleError(f"{path} cannot be read: {e.strerror}") from None
    if not stat.S_ISREG(mode):
        raise BundleError(f"{path} is not a regular file (a directory, FIFO or device); a bundle holds plain files")


SAFETENSORS_MAX_HEADER = 100_000_000  # safetensors' own limit on the JSON header (MAX_HEADER_SIZE)


def check_safetensors(path: Path) -> None:
    """Refuse a ``.safetensors`` file whose header cannot be right, before safetensors reads it.

    The format is an 8-byte little-endian header length N, N bytes of JSON
    (``{name: {"dtype", "shape", "data_offsets": [begin, end]}}``), then the tensor bytes.
    A length past the end of the file (e.g. 2**62 in a hostile or truncated file) or tensor
    offsets past the end of the data mean a truncated or forged file: one
    :class:`BundleError` naming it. Reads at most the header; needs neither torch nor safetensors.
    """
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if len(head) < 8:
                raise BundleError(f"{path} is corrupt: {size} bytes, too short for a safetensors header; "
                                  "copy or re-export the bundle")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8 or n > SAFETENSORS_MAX_HEADER:
                raise BundleError(
                    f"{path} is corrupt: its safetensors header declares {n} bytes but the file holds {size} "
                    "(truncated or forged); copy or re-export the bundle"
                )
            raw = f.read(n)
    except OSError as e:
        raise BundleError(f"{path} cannot be read: {e.strerror or e}") from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise BundleError(f"{path} is corrupt: its safetensors header is not JSON; copy or re-export the bundle") from None
    data = size - 8 - n
    if not isinstance(header, dict):
        raise BundleError(f"{path} is corrupt: its safetensors header is not a JSON object")
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        valid = (isinstance(offsets, list) and len(offsets) == 2
                 and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets))
        if not valid or not 0 <= offsets[0] <= offsets[1] <= data:
            raise BundleError(
                f"{path} is corrupt: tensor {_short(name, 60)} lies outside the file's {data} data bytes "
                f"(data_offsets {_short(offsets, 60)}; truncated or forged); copy or re-export the bundle"
            )


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
    if not _plain_relative(file):
        raise BundleError(
            f"{bad} 'model.file' must be a relative file name inside the bundle (e.g. {MODEL_FILE!r}), "
            f"got {_short(file)}"
        )
    explain = meta.get("explain")
    if isinstance(explain, dict) and not _plain_relative(explain.get("file", EXPLAIN_FILE)):
        raise BundleError(
            f"{bad} 'explain.file' must be a relative file name inside the bundle (e.g. {EXPLAIN_FILE!r}), "
            f"got {_short(explain.get('file'))}"
        )


def _plain_relative(file: Any) -> bool:
    """Whether ``file`` is a relative path with no '..' (and no NUL byte).

    The model is read from inside the bundle only: an edited bundle must not point a server at
    an arbitrary file (an absolute path or '..'; symlinks are :func:`_check_file_stays_inside`'s).
    '..' is refused even when it would come back inside: a plain name is all training writes.
    """
    return (isinstance(file, str) and bool(file) and "\x00" not in file and not Path(file).is_absolute()
            and ".." not in Path(file).parts)


def _inside(bundle_dir: Path, file: Any) -> bool:
    """Whether the plain relative path ``file`` resolves (symlinks followed) inside ``bundle_dir``."""
    if not _plain_relative(file):
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


STAGING_DIR = ".staging"  # unfinished bundles and exports, beside where they will land
# An entry this old is stale even when a process with its PID is alive: the PID was reused
# (where /proc cannot tell), or the entry is another host's on a shared disk. No export or
# training run writes one bundle for a day.
STALE_AFTER_S = 24 * 3600
_HOST = "".join(c if c.isalnum() or c in ".-" else "-" for c in socket.gethostname())[:64] or "host"


@contextlib.contextmanager
def atomic_directory(dest: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty staging directory (in ``dest.parent/.staging``); on success it becomes ``dest``.

    An error inside the block removes the staging directory, so a half-written bundle is
    never visible at ``dest``; after a ``kill -9`` the next staging in the same place sweeps
    it (:func:`sweep_staging`). With ``overwrite`` an existing ``dest`` is replaced only after
    the new one is complete.
    """
    dest = Path(dest)
    if dest.exists() and not overwrite:
        raise BundleError(f"{dest} already exists; pass --overwrite to replace it")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with staging_directory(dest.parent, dest.name) as tmp:
        yield tmp
        if dest.exists():
            old = dest.parent / STAGING_DIR / _entry_name(f"{dest.name}.old")
            os.replace(dest, old)
            os.replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dest)


@contextlib.contextmanager
def staging_directory(parent: Path, label: str) -> Iterator[Path]:
    """An empty scratch directory in ``parent/.staging``, removed when the block ends.

    Everything a run writes before it is complete goes here: on the same file system as
    ``parent`` (so ``os.replace`` into place is atomic), named after its owner (host, PID,
    creation time) so that the next run in ``parent`` can tell an interrupted run's leftovers
    from a live one's and sweep only those. ``.staging`` itself goes once it is empty.
    """
    parent = Path(parent)
    sweep_staging(parent)
    tmp = _new_entry(parent / STAGING_DIR, label)
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # already gone when it was renamed into place
        with contextlib.suppress(OSError):  # not empty: another run is staging there
            (parent / STAGING_DIR).rmdir()


def sweep_staging(parent: Path) -> list[Path]:
    """Remove the stale entries of ``parent/.staging`` (left by killed runs) and return them.

    Stale: made on this host by a process that is gone (or whose PID now belongs to a process
    started later), or older than ``STALE_AFTER_S``. A live run's entry is never touched.
    What is removed is said in one warning.
    """
    staging = Path(parent) / STAGING_DIR
    try:
        entries = list(staging.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return []
    except OSError as e:
        log.warning("cannot list %s to sweep leftovers of interrupted runs: %s", staging, e.strerror)
        return []
    now = time.time()
    removed, freed = [], 0
    for entry in entries:
        if not _is_stale(entry, now):
            continue
        size = _tree_size(entry)
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                entry.unlink()
        if not os.path.lexists(entry):
            removed.append(entry)
            freed += size
    if removed:
        log.warning(
            "removed %d leftover(s) of interrupted lensforge runs (%.1f MB) from %s: %s",
            len(removed), freed / 1e6, staging, ", ".join(sorted(e.name for e in removed)),
        )
    with contextlib.suppress(OSError):
        staging.rmdir()  # only when empty
    return removed


def _entry_name(label: str) -> str:
    """``<label>~<host>~<pid>~<created>~<random>``: who made it and when, for the sweep."""
    label = label.replace("~", "-")[:100]  # room for the owner part within a 255-byte name
    return f"{label}~{_HOST}~{os.getpid()}~{int(time.time())}~{secrets.token_hex(4)}"


def _new_entry(staging: Path, label: str) -> Path:
    for _ in range(100):
        staging.mkdir(mode=0o777, parents=True, exist_ok=True)
        try:
            return _make_temp_dir(staging, _entry_name(label))
        except FileNotFoundError:  # another run removed the empty .staging in between: again
            continue
    raise BundleError(f"cannot create a staging directory in {staging}: it keeps disappearing")


def _is_stale(entry: Path, now: float) -> bool:
    parts = entry.name.rsplit("~", 4)
    try:
        host, pid, created = parts[1], int(parts[2]), int(parts[3])
    except (IndexError, ValueError):  # not ours: only its age can tell
        try:
            return now - entry.lstat().st_mtime > STALE_AFTER_S
        except OSError:
            return False
    if now - created > STALE_AFTER_S:
        return True
    if host != _HOST or pid == os.getpid():  # another machine's PIDs mean nothing here
        return False
    return not _owner_alive(pid, created)


def _owner_alive(pid: int, created: int) -> bool:
    """Whether the process that made an entry at ``created`` (its PID ``pid``) still runs."""
    if os.name != "posix":
        return True  # no safe probe (os.kill terminates on Windows): the entry's age decides
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: alive
    except (OverflowError, ValueError):
        return False
    started = _linux_process_start(pid)
    if started is None:
        return True
    state, start = started
    # a zombie is dead; a process started after the entry was made reuses the PID
    # (2 s: start times and the entry's stamp are both whole-second-ish)
    return state != "Z" and start <= created + 2


def _linux_process_start(pid: int) -> tuple[str, float] | None:
    """(state letter, start time as a Unix time) from /proc, or None off Linux."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
        return fields[0], boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError, StopIteration):
        return None


def _tree_size(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, f)).st_size
    return total


def _make_temp_dir(parent: Path, name: str) -> Path:
    """A new empty directory ``parent/name`` with the permissions any ``mkdir`` there gets.

    Not ``tempfile.mkdtemp``: that makes a private 0700 directory, so a bundle trained by one
    user could not be read by a server running as another. ``mkdir(mode=0o777)`` lets the
    kernel apply the umask (and any default ACL) atomically, without reading the umask with
    ``os.umask``, which changes it process-wide for a moment and is not thread-safe.
    ``name`` ends in random hex (see :func:`_entry_name`), so it practically never exists.
    """
    tmp = parent / name
    tmp.mkdir(mode=0o777)
    return tmp
