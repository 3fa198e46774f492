"""Listing a dataset's files, and the one rule for which files a reader may open.

Every dataset reader (class folders, CSV, COCO, Roboflow COCO, YOLO) lists and resolves
paths with the helpers here, so they all agree on what an image file is and where it may be.

**Data stays inside its folder** (RELIABILITY.md C2). A dataset is a folder (the *data
root*: ``Dataset.root``); the paths it names — CSV rows, COCO ``file_name``, YOLO lists and
label files, class folders, symlinked files and folders — must resolve inside it. A path is
inside when its real path (``os.path.realpath``: symlinks followed, ``..`` folded) has the
root's real path as its ``os.path.commonpath`` (not a string prefix: ``/data/images2`` is
not inside ``/data/images``). Paths are judged the same way whether they exist or not, and
an outside path is never opened (nor stat-ed by the readers) unless the user allows it
(``--allow-outside-root``): a downloaded dataset whose CSV names ``/etc/passwd`` or
``../../home/me/photos/x.jpg`` must not make ``train`` read, and learn from, other files.

:class:`RootGuard` applies the rule with one of three policies (:data:`OUTSIDE_ROOT_POLICIES`):
``refuse`` (train, evaluate: a :class:`DataError` naming the first offenders and their count),
``allow`` (the user said so; offenders are still listed) and ``skip`` (``data inspect``:
offenders are listed, not read, and the rest is inspected).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from lensforge.errors import DataError

# Lower-case suffixes of the files we list as candidate images; matching is case-insensitive.
IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
)

OUTSIDE_ROOT_POLICIES = ("refuse", "allow", "skip")
ALLOW_FLAG = "--allow-outside-root"
_EXAMPLES = 3


def is_image_file(path: Path) -> bool:
    """Whether ``path`` has one of :data:`IMAGE_EXTENSIONS` (case-insensitive)."""
    return path.suffix.lower() in IMAGE_EXTENSIONS


def visible(path: Path) -> bool:
    """False for hidden entries (name starting with a dot)."""
    return not path.name.startswith(".")


def first_few(items: Iterable[str], n: int = 3) -> str:
    """The first ``n`` items, comma-separated, with ", ..." when there are more."""
    items = list(items)
    text = ", ".join(items[:n])
    return text + (", ..." if len(items) > n else "")


def mostly_missing(n_missing: int, n_listed: int) -> bool:
    """Whether a reader should refuse its dataset because more than half of the ``n_listed``
    images it names are missing (or unreadable): that means the images were not put where the
    CSV / COCO JSON / YOLO lists expect them, not that a few files went astray. Fewer missing
    ones are skipped with a warning."""
    return n_missing > 0 and 2 * n_missing > n_listed


def rel_posix(path: Path, root: Path) -> str:
    """``path`` relative to ``root`` in POSIX form when it is lexically below it, else as is."""
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()


def listed_path(value: str, base: Path) -> Path:
    """A path as written in a dataset file (CSV cell, COCO ``file_name``, YOLO list line),
    relative to ``base`` unless absolute; ``\\`` in relative paths is read as ``/`` (files
    written on Windows). Not resolved and not checked: :class:`RootGuard` does that."""
    value = value.strip()
    if "\\" in value and not Path(value).is_absolute():
        value = value.replace("\\", "/")
    p = Path(value).expanduser()
    return p if p.is_absolute() else base / p


def walk_files(directory: Path, recursive: bool = True) -> tuple[list[Path], list[tuple[Path, str]]]:
    """(images, [(other entry, why it is not listed)]) below ``directory``, each sorted.

    The one way lensforge lists image files (readers and ``list_images``). Only regular
    files count (a symlink to one is listed; the readers' :class:`RootGuard` then decides
    whether it may be opened): a FIFO or device named ``x.jpg`` would block or never end when
    read. Symlinked directories are reported, not entered: that keeps a symlink loop from
    walking forever without having to track every directory seen. ``directory`` itself is
    entered even when it is a symlink. Hidden entries are skipped.
    """
    images: list[Path] = []
    others: list[tuple[Path, str]] = []
    stack = [directory]
    while stack:
        current = stack.pop()
        for entry in current.iterdir():
            if not visible(entry):
                continue
            if entry.is_symlink() and entry.is_dir():
                others.append((entry, "symlinked folder (not followed)"))
            elif entry.is_dir():
                if recursive:
                    stack.append(entry)
            elif not entry.is_file():
                others.append((entry, "not a regular file"))
            elif is_image_file(entry):
                images.append(entry)
            else:
                others.append((entry, f"not an image (extension {entry.suffix or 'none'})"))
    return sorted(images), sorted(others)


def is_inside(real_path: str, real_root: str) -> bool:
    """Whether ``real_path`` is ``real_root`` or below it (both already real, absolute)."""
    try:
        return os.path.commonpath([real_root, real_path]) == real_root
    except ValueError:  # different drives (Windows), or a relative path slipped in
        return False


class RootGuard:
    """Decides which paths a reader may open: those whose real path is inside ``root``.

    policy: ``refuse`` (outside paths are not admitted; :meth:`check` raises a DataError
        naming them), ``allow`` (admitted, still listed) or ``skip`` (not admitted, listed;
        :meth:`check` raises only when nothing else is left).

    ``outside`` lists each offender once, as shown to the user: the path as written (or
    relative to the root), plus where a symlink leads.
    """

    def __init__(self, root: Path, policy: str = "refuse") -> None:
        if policy not in OUTSIDE_ROOT_POLICIES:
            raise ValueError(f"outside_root must be one of {', '.join(OUTSIDE_ROOT_POLICIES)}, got {policy!r}")
        self.root = Path(root)
        self.policy = policy
        self.real_root = os.path.realpath(self.root)
        self.outside: list[str] = []
        self._seen: set[str] = set()
        self._real_dirs: dict[str, str] = {}

    def real(self, path: Path) -> str:
        """``os.path.realpath(path)``, with each folder resolved once (big datasets hold many
        files per folder; only the file itself needs an lstat to see if it is a symlink)."""
        text = os.path.abspath(os.fspath(path)) if ".." not in Path(path).parts else None
        if text is None:  # ".." after a symlink is not lexical: leave it to realpath
            return os.path.realpath(path)
        parent, name = os.path.split(text)
        real_parent = self._real_dirs.get(parent)
        if real_parent is None:
            real_parent = self._real_dirs[parent] = os.path.realpath(parent)
        if os.path.islink(text):
            return os.path.realpath(text)
        return os.path.join(real_parent, name)

    def inside(self, path: Path) -> bool:
        return is_inside(self.real(path), self.real_root)

    def may_open(self, path: Path) -> bool:
        """Whether ``path`` may be opened, without recording it (probing candidates)."""
        return self.policy == "allow" or self.inside(path)

    def admit(self, path: Path, shown: str | None = None) -> bool:
        """Whether the reader may open ``path``; an outside path is recorded (once) either way.

        shown: how to name the path to the user (e.g. as written in the CSV); default: the
        path relative to the root, or absolute.
        """
        real = self.real(path)
        if is_inside(real, self.real_root):
            return True
        text = shown if shown is not None else rel_posix(Path(path), self.root)
        if real != os.path.abspath(os.path.join(self.root, text)) and real != text:
            text = f"{text} (→ {real})"  # a symlink, or a relative path: say where it leads
        if text not in self._seen:
            self._seen.add(text)
            self.outside.append(text)
        return self.policy == "allow"

    def check(self, what: str, nothing_left: bool = False) -> None:
        """Raise the DataError for the recorded offenders under policy ``refuse`` (or under
        ``skip`` when ``nothing_left`` is true: no data to go on with). what: where the paths
        came from, e.g. "listed in labels.csv"."""
        if not self.outside or self.policy == "allow":
            return
        if self.policy == "refuse" or nothing_left:
            raise DataError(outside_message(self.outside, self.real_root, what))


def outside_message(outside: list[str], real_root: str, what: str) -> str:
    """The one-line refusal: how many, the first few, and what to do."""
    n = len(outside)
    return (
        f"{n} path{'s' if n != 1 else ''} {what} resolve{'s' if n == 1 else ''} outside the data "
        f"folder {real_root} (first: {first_few(outside, _EXAMPLES)}); lensforge reads only files "
        f"inside the dataset's folder — move them in, or pass {ALLOW_FLAG} if you trust this data"
    )
