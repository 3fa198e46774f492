"""Dataset readers: class folders, split folders, CSV layouts, and their error messages."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from lensforge.data.files import IMAGE_EXTENSIONS, is_image_file
from lensforge.data.formats import detect_format, list_images, read_dataset
from lensforge.errors import DataError

MakeImage = Callable[..., Path]


def _folders(root: Path, make_image: MakeImage, layout: dict[str, int]) -> Path:
    for cls, n in layout.items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            make_image(root / cls / f"{i}.png")
    return root


def _csv(root: Path, make_image: MakeImage, text: str, images: tuple[str, ...] = ()) -> Path:
    for name in images:
        make_image(root / name)
    path = root / "labels.csv"
    path.write_text(text, encoding="utf-8")
    return path


# --------------------------------------------------------------------------- folders


def test_is_image_file_is_case_insensitive() -> None:
    assert ".jpg" in IMAGE_EXTENSIONS and ".tiff" in IMAGE_EXTENSIONS
    assert is_image_file(Path("a/B.JPG")) and is_image_file(Path("x.Png"))
    assert not is_image_file(Path("notes.txt"))


def test_class_folders(tmp_path: Path, make_image: MakeImage) -> None:
    _folders(tmp_path, make_image, {"dogs": 2, "cats": 3})
    make_image(tmp_path / "cats" / "nested" / "deep.JPG")  # nested, upper-case suffix
    make_image(tmp_path / "cats" / ".hidden.png")
    make_image(tmp_path / ".cache" / "x.png")  # hidden dir is not a class
    (tmp_path / "dogs" / "notes.txt").write_text("hi")

    ds = read_dataset(tmp_path)
    assert (ds.fmt, ds.task, ds.classes) == ("folders", "classify", ["cats", "dogs"])
    assert len(ds.records) == 6
    assert sum(r.labels == (0,) for r in ds.records) == 4
    assert all(r.path.is_absolute() and r.split is None for r in ds.records)
    assert ("dogs/notes.txt", "not an image (extension .txt)") in ds.skipped
    assert not ds.presplit


def test_empty_class_folder_is_skipped_with_warning(
    tmp_path: Path, make_image: MakeImage, caplog: pytest.LogCaptureFixture
) -> None:
    _folders(tmp_path, make_image, {"a": 1, "b": 1, "empty": 0})
    with caplog.at_level(logging.WARNING, logger="lensforge.data.formats"):
        ds = read_dataset(tmp_path)
    assert ds.classes == ["a", "b"]
    assert "empty" in caplog.text


def test_split_folders(tmp_path: Path, make_image: MakeImage) -> None:
    _folders(tmp_path / "train", make_image, {"cat": 2, "dog": 2})
    _folders(tmp_path / "valid", make_image, {"cat": 1, "dog": 1})
    _folders(tmp_path / "test", make_image, {"cat": 1, "bird": 1})
    ds = read_dataset(tmp_path)
    assert ds.fmt == "split-folders" and ds.presplit
    assert ds.classes == ["bird", "cat", "dog"]
    splits = sorted((r.split, ds.classes[r.labels[0]]) for r in ds.records)
    assert splits.count(("val", "cat")) == 1 and ("test", "bird") in splits
    assert {r.split for r in ds.records} == {"train", "val", "test"}


def test_fmt_override_reads_split_folders_as_classes(tmp_path: Path, make_image: MakeImage) -> None:
    _folders(tmp_path / "train", make_image, {"cat": 1})
    _folders(tmp_path / "test", make_image, {"cat": 1})
    assert detect_format(tmp_path) == "split-folders"
    ds = read_dataset(tmp_path, fmt="folders")
    assert ds.classes == ["test", "train"] and ds.fmt == "folders"


# --------------------------------------------------------------------------- CSV


def test_csv_single_label_with_column_variant_and_split(
    tmp_path: Path, make_image: MakeImage
) -> None:
    imgs = ("img/a.jpg", "img/b.jpg", "img/c.jpg")
    text = (
        "Image_Path,Label,Split\n"
        "img/a.jpg,cat,train\nimg/b.jpg,dog,valid\nimg/c.jpg, cat ,test\n"
    )
    _csv(tmp_path, make_image, text, imgs)
    ds = read_dataset(tmp_path)  # a directory holding labels.csv
    assert (ds.fmt, ds.task, ds.classes) == ("csv", "classify", ["cat", "dog"])
    assert [(ds.relpath(r), r.labels, r.split) for r in ds.records] == [
        ("img/a.jpg", (0,), "train"),
        ("img/b.jpg", (1,), "val"),
        ("img/c.jpg", (0,), "test"),
    ]


def test_csv_multilabel_semicolons(tmp_path: Path, make_image: MakeImage) -> None:
    text = "path,labels\na.png,front;left\nb.png,\nc.png,rear\n"
    csv_path = _csv(tmp_path, make_image, text, ("a.png", "b.png", "c.png"))
    ds = read_dataset(csv_path)
    assert ds.task == "multilabel" and ds.classes == ["front", "left", "rear"]
    assert [r.labels for r in ds.records] == [(0, 1), (), (2,)]
    assert ds.label_matrix() == [[1, 1, 0], [0, 0, 0], [0, 0, 1]]


def test_csv_one_hot_columns_keep_header_order(tmp_path: Path, make_image: MakeImage) -> None:
    absolute = make_image(tmp_path / "elsewhere" / "z.png")
    text = f"filename,zebra,apple\na.png,1,0\nb.png,0.0,1.0\n{absolute},0,0\n"
    ds = read_dataset(_csv(tmp_path, make_image, text, ("a.png", "b.png")))
    assert ds.task == "multilabel" and ds.classes == ["zebra", "apple"]
    assert [r.labels for r in ds.records] == [(0,), (1,), ()]
    assert ds.records[2].path == absolute


def test_csv_task_multilabel_merges_rows_per_image(tmp_path: Path, make_image: MakeImage) -> None:
    text = "file,label\na.png,x\na.png,y\nb.png,y\n"
    ds = read_dataset(_csv(tmp_path, make_image, text, ("a.png", "b.png")), task="multilabel")
    assert ds.task == "multilabel" and [r.labels for r in ds.records] == [(0, 1), (1,)]


def test_csv_few_missing_files_are_skipped(tmp_path: Path, make_image: MakeImage) -> None:
    text = "path,label\na.png,x\nb.png,y\nc.png,x\ngone.png,y\n"
    ds = read_dataset(_csv(tmp_path, make_image, text, ("a.png", "b.png", "c.png")))
    assert len(ds.records) == 3 and ds.skipped == [("gone.png", "missing file")]


# --------------------------------------------------------------------------- bad input


def _write_bytes(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _two_classes(root: Path, make_image: MakeImage) -> Path:
    return _folders(root / "d", make_image, {"a": 1, "b": 1})


def _two_csvs(root: Path) -> Path:
    _write_bytes(root / "a.csv", b"path,label\n")
    _write_bytes(root / "b.csv", b"path,label\n")
    return root


BAD_LAYOUTS: list[tuple[str, Callable[[Path, MakeImage], Path], dict, str]] = [
    ("missing path", lambda p, mk: p / "nope", {}, "does not exist"),
    ("empty dir", lambda p, mk: p, {}, "is empty"),
    ("no images", lambda p, mk: _write_bytes(p / "a" / "x.txt", b"x").parents[1], {}, "no images"),
    ("one class", lambda p, mk: _folders(p / "d", mk, {"cats": 2}), {}, "found 1 class 'cats'"),
    (
        "one non-empty class",
        lambda p, mk: _folders(p / "d", mk, {"cats": 2, "dogs": 0}),
        {},
        "empty class folders: dogs",
    ),
    ("loose images", lambda p, mk: mk(p / "d" / "a.png").parent, {}, "no class folders"),
    ("unknown fmt", lambda p, mk: _two_classes(p, mk), {"fmt": "tfrecord"}, "unknown dataset format"),
    ("unknown task", lambda p, mk: _two_classes(p, mk), {"task": "segment"}, "unknown task"),
    ("detect on folders", lambda p, mk: _two_classes(p, mk), {"task": "detect"}, "task 'detect' needs"),
    ("csv forced, none there", lambda p, mk: _two_classes(p, mk), {"fmt": "csv"}, "no CSV file"),
    ("two csvs", lambda p, mk: _two_csvs(p), {}, "none is named labels.csv"),
    (
        "csv no path column",
        lambda p, mk: _csv(p, mk, "name,label\na.png,x\n"),
        {},
        "no image path column (found columns: name, label); expected a path column (path / image",
    ),
    (
        "csv no label column",
        lambda p, mk: _csv(p, mk, "path\na.png\n"),
        {},
        "no label columns (found columns: path)",
    ),
    (
        "csv one-hot not 0/1",
        lambda p, mk: _csv(p, mk, "path,cat,dog\na.png,1,0\nb.png,0,2\n", ("a.png", "b.png")),
        {},
        "line 3: column 'dog' has '2'",
    ),
    (
        "csv not utf-8",
        lambda p, mk: _write_bytes(p / "labels.csv", b"path,label\na.png,x\nb.png,caf\xe9\n"),
        {},
        "line 3 is not valid UTF-8",
    ),
    (
        "csv bad quoting",
        lambda p, mk: _csv(p, mk, 'path,label\na.png,x\nb.png,"y"z\n'),
        {},
        "line 3 could not be parsed",
    ),
    (
        "csv bad split",
        lambda p, mk: _csv(p, mk, "path,label,split\na.png,x,dev\n", ("a.png",)),
        {},
        "line 2: split 'dev'",
    ),
    (
        "csv conflicting labels",
        lambda p, mk: _csv(p, mk, "path,label\na.png,x\na.png,y\n", ("a.png",)),
        {},
        "needs one row per image",
    ),
    (
        "csv one class",
        lambda p, mk: _csv(p, mk, "path,label\na.png,x\nb.png,x\n", ("a.png", "b.png")),
        {},
        "found 1 class 'x'",
    ),
    (
        "csv empty label",
        lambda p, mk: _csv(p, mk, "path,label\na.png,\n", ("a.png",)),
        {},
        "line 2: empty 'label' cell",
    ),
    (
        "csv too many cells",
        lambda p, mk: _csv(p, mk, "path,label\na.png,x,y\n", ("a.png",)),
        {},
        "line 2 has 3 cells",
    ),
    (
        "csv mostly missing",
        lambda p, mk: _csv(p, mk, "path,label\na.png,x\nb.png,y\nc.png,x\nd.png,y\n", ("a.png",)),
        {},
        "3 of 4 images listed",
    ),
    (
        "csv all missing",
        lambda p, mk: _csv(p, mk, "path,label\na.png,x\nb.png,y\n"),
        {},
        "2 of 2 images listed",
    ),
    (
        "classify forced on multi-label",
        lambda p, mk: _csv(p, mk, "path,labels\na.png,x;y\nb.png,x\n", ("a.png", "b.png")),
        {"task": "classify"},
        "has 2 labels but task 'classify'",
    ),
    ("csv header only", lambda p, mk: _csv(p, mk, "path,label\n"), {}, "has a header but no rows"),
]


@pytest.mark.parametrize(
    ("build", "kwargs", "expected"),
    [case[1:] for case in BAD_LAYOUTS],
    ids=[case[0] for case in BAD_LAYOUTS],
)
def test_bad_input_raises_clear_data_error(
    tmp_path: Path, make_image: MakeImage, build: Callable, kwargs: dict, expected: str
) -> None:
    path = build(tmp_path, make_image)
    with pytest.raises(DataError) as info:
        read_dataset(path, **kwargs)
    message = str(info.value)
    assert expected in message
    assert "\n" not in message


# --------------------------------------------------------------------------- special files

needs_fifo = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")


def finishes(call: Callable[[], object], seconds: float = 20.0) -> object:
    """``call()``'s result, failing (not hanging) if it takes longer than ``seconds``.

    A call stuck opening a FIFO or walking a symlink loop is left behind in a daemon thread.
    """
    out: list[object] = []
    worker = threading.Thread(target=lambda: out.append(call()), daemon=True)
    worker.start()
    worker.join(seconds)
    assert not worker.is_alive(), f"still running after {seconds} s (blocked on a FIFO or a loop?)"
    assert out, "the call raised (see the thread's traceback above)"
    return out[0]


def _trap_folders(root: Path, make_image: MakeImage) -> Path:
    """Two class folders plus a FIFO named like an image and a symlink loop in one of them."""
    _folders(root, make_image, {"cats": 2, "dogs": 2})
    os.mkfifo(root / "cats" / "x.jpg")
    os.symlink(root, root / "cats" / "loop")
    return root


@needs_fifo
def test_readers_list_only_regular_files_and_never_follow_symlinked_folders(
    tmp_path: Path, make_image: MakeImage
) -> None:
    root = _trap_folders(tmp_path / "data", make_image)
    ds = finishes(lambda: read_dataset(root))
    assert [r.path.relative_to(root).as_posix() for r in ds.records] == [
        "cats/0.png", "cats/1.png", "dogs/0.png", "dogs/1.png"
    ]
    assert ("cats/x.jpg", "not a regular file") in ds.skipped
    assert ("cats/loop", "symlinked folder (not followed)") in ds.skipped


@needs_fifo
def test_split_folders_with_a_fifo_and_a_loop_finish(tmp_path: Path, make_image: MakeImage) -> None:
    root = tmp_path / "data"
    for split in ("train", "val"):
        _folders(root / split, make_image, {"cats": 1, "dogs": 1})
    os.mkfifo(root / "train" / "cats" / "x.jpg")
    os.symlink(root, root / "val" / "dogs" / "loop")
    ds = finishes(lambda: read_dataset(root))
    assert ds.fmt == "split-folders" and len(ds.records) == 4


def test_a_class_folder_linked_inside_the_root_is_read(tmp_path: Path, make_image: MakeImage) -> None:
    # Only folders *inside* a class folder are not followed; class folders may be links,
    # as long as they stay inside the data folder.
    root = _folders(tmp_path / "data", make_image, {"cats": 2})
    _folders(root / ".store", make_image, {"dogs": 2})  # hidden: not a class itself
    os.symlink(root / ".store" / "dogs", root / "dogs")
    ds = read_dataset(root)
    assert ds.classes == ["cats", "dogs"] and len(ds.records) == 4 and ds.outside_root == []


def test_a_class_folder_linked_out_of_the_root_is_refused_unless_allowed(
    tmp_path: Path, make_image: MakeImage
) -> None:
    elsewhere = _folders(tmp_path / "elsewhere", make_image, {"dogs": 2})
    root = _folders(tmp_path / "data", make_image, {"cats": 2, "birds": 2})
    os.symlink(elsewhere / "dogs", root / "dogs")
    with pytest.raises(DataError, match=r"1 path in the class folders resolves outside the data folder .*"
                                        r"first: dogs \(→ .*elsewhere/dogs\).*--allow-outside-root"):
        read_dataset(root)
    skipped = read_dataset(root, outside_root="skip")  # what data inspect reads: the rest
    assert skipped.classes == ["birds", "cats"] and skipped.outside_root == [f"dogs (→ {elsewhere / 'dogs'})"]
    ds = read_dataset(root, outside_root="allow")
    assert ds.classes == ["birds", "cats", "dogs"] and len(ds.records) == 6 and len(ds.outside_root) == 1


@needs_fifo
def test_csv_listing_a_fifo_skips_it(tmp_path: Path, make_image: MakeImage) -> None:
    text = "path,label\na.png,x\nb.png,y\nc.png,x\nx.jpg,y\n"
    csv_path = _csv(tmp_path, make_image, text, ("a.png", "b.png", "c.png"))
    os.mkfifo(tmp_path / "x.jpg")
    ds = finishes(lambda: read_dataset(csv_path))
    assert len(ds.records) == 3 and ds.skipped == [("x.jpg", "not a regular file")]


# --------------------------------------------------------------------------- list_images


def test_list_images_expands_folders_and_keeps_files_as_given(tmp_path: Path, make_image: MakeImage) -> None:
    folder = tmp_path / "in"
    for name in ("b.jpg", "a.PNG", "sub/c.webp", ".hidden.jpg", ".cache/d.jpg"):
        make_image(folder / name)
    (folder / "notes.txt").write_text("not an image")
    single = make_image(tmp_path / "single.png")
    gone = tmp_path / "gone.jpg"  # kept: the caller reports it
    text = tmp_path / "notes.md"  # kept: a file named explicitly is the caller's to judge
    text.write_text("x")
    assert list_images([str(single), folder, gone, text]) == [
        single, folder / "a.PNG", folder / "b.jpg", folder / "sub" / "c.webp", gone, text
    ]
    assert list_images([]) == []


@needs_fifo
def test_list_images_skips_fifos_and_symlink_loops(tmp_path: Path, make_image: MakeImage) -> None:
    root = _trap_folders(tmp_path / "data", make_image)
    found = finishes(lambda: list_images([root]))
    assert [p.relative_to(root).as_posix() for p in found] == [
        "cats/0.png", "cats/1.png", "dogs/0.png", "dogs/1.png"
    ]


# --------------------------------------------------------------------------- data root (C2)


def _outside_csv(tmp_path: Path, make_image: MakeImage, rows: list[str]) -> Path:
    """data/labels.csv with two good rows per class, plus ``rows`` (path,label lines)."""
    data = tmp_path / "data"
    good = [f"{c}{i}.png,{c}" for c in ("a", "b") for i in range(2)]
    return _csv(data, make_image, "path,label\n" + "\n".join(good + rows) + "\n",
                tuple(f"{c}{i}.png" for c in ("a", "b") for i in range(2)))


def test_csv_rows_outside_the_data_folder_are_refused_with_the_first_few_named(
    tmp_path: Path, make_image: MakeImage
) -> None:
    make_image(tmp_path / "secret.png")
    make_image(tmp_path / "data2" / "x.png")  # shares the prefix "data": commonpath, not startswith
    rows = ["/etc/passwd,a", "../secret.png,b", f"{tmp_path / 'data2' / 'x.png'},a",
            "../../nowhere/gone.png,b", "sub/../../secret.png,a"]
    csv_path = _outside_csv(tmp_path, make_image, rows)
    with pytest.raises(DataError) as info:
        read_dataset(csv_path)
    msg = str(info.value)
    assert msg.startswith("5 paths listed in labels.csv resolve outside the data folder ")
    assert "(first: /etc/passwd, ../secret.png, " in msg and ", ...)" in msg
    assert "--allow-outside-root" in msg and "\n" not in msg
    # an outside path that does not exist reads exactly like one that does (no oracle)
    alone = _outside_csv(tmp_path / "t2", make_image, ["../../nowhere/gone.png,b"])
    with pytest.raises(DataError, match=r"1 path listed in labels.csv resolves outside .*first: \.\./\.\./nowhere/gone\.png\)"):
        read_dataset(alone)


def test_csv_rows_outside_are_read_only_when_allowed(tmp_path: Path, make_image: MakeImage) -> None:
    outside = make_image(tmp_path / "secret.png")
    csv_path = _outside_csv(tmp_path, make_image, ["../secret.png,b"])
    ds = read_dataset(csv_path, outside_root="allow")
    assert outside in [r.path.resolve() for r in ds.records] and len(ds.records) == 5
    assert ds.outside_root == ["../secret.png"]
    skipped = read_dataset(csv_path, outside_root="skip")
    assert len(skipped.records) == 4 and skipped.outside_root == ["../secret.png"]
    with pytest.raises(ValueError, match="outside_root must be one of"):
        read_dataset(csv_path, outside_root="yes")


def test_absolute_and_dotted_paths_that_stay_inside_are_fine(tmp_path: Path, make_image: MakeImage) -> None:
    data = tmp_path / "data"
    rows = [f"{data / 'a0.png'},a", "sub/../a1.png,a", "./b0.png,b", "b1.png,b"]
    csv_path = _csv(data, make_image, "path,label\n" + "\n".join(rows) + "\n",
                    ("a0.png", "a1.png", "b0.png", "b1.png"))
    (data / "sub").mkdir()
    ds = read_dataset(csv_path)
    assert len(ds.records) == 4 and ds.outside_root == []


def test_symlinked_files_follow_the_same_rule(tmp_path: Path, make_image: MakeImage) -> None:
    root = tmp_path / "data"
    for cls in ("cats", "dogs"):
        for i in range(2):
            make_image(root / cls / f"{i}.png")
    outside = make_image(tmp_path / "private" / "me.png")
    os.symlink(outside, root / "cats" / "me.png")  # leads out
    os.symlink(root / "dogs" / "0.png", root / "cats" / "alias.png")  # stays in
    with pytest.raises(DataError, match=r"1 path in the class folders resolves outside .*first: cats/me\.png \(→ .*private/me\.png\)"):
        read_dataset(root)
    ds = read_dataset(root, outside_root="skip")
    assert sorted(ds.relpath(r) for r in ds.records) == ["cats/0.png", "cats/1.png", "cats/alias.png", "dogs/0.png", "dogs/1.png"]
    # a CSV row naming the link is judged by where the link leads, not by its name
    (root / "labels.csv").write_text("path,label\ncats/0.png,c\ndogs/0.png,d\ncats/me.png,c\n")
    with pytest.raises(DataError, match="1 path listed in labels.csv resolves outside"):
        read_dataset(root / "labels.csv")


def test_a_split_folder_linked_out_of_the_root_is_refused(tmp_path: Path, make_image: MakeImage) -> None:
    root = tmp_path / "data"
    _folders(root / "train", make_image, {"cats": 2, "dogs": 2})
    _folders(tmp_path / "other" / "test", make_image, {"cats": 1, "dogs": 1})
    os.symlink(tmp_path / "other" / "test", root / "test")
    with pytest.raises(DataError, match=r"1 path in the split folders resolves outside .*first: test \(→"):
        read_dataset(root)
    assert len(read_dataset(root, outside_root="allow").records) == 6
