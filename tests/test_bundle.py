"""Hostile and interrupted bundles (RELIABILITY.md C3, C4).

C3: a truncated model, external data or a symlink leading out of the bundle, or a safetensors
header larger than its file is, in every command that opens a bundle, one ``error:`` line
naming the file and the cause, exit code 2, and nothing outside the bundle is opened.
C4: unfinished bundles and exports are staged in ``.staging`` beside their destination, and the
next run there sweeps what a killed run left behind, never what a live one is writing.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from lensforge.cli import main
from lensforge.errors import BundleError
from lensforge.runtime import bundle as bundle_module
from lensforge.runtime.bundle import (
    MODEL_FILE,
    STAGING_DIR,
    WEIGHTS_FILE,
    atomic_directory,
    check_safetensors,
    load_bundle,
    staging_directory,
    sweep_staging,
)

pytestmark = pytest.mark.skipif(os.name != "posix", reason="FIFOs, symlinks and PIDs as on POSIX")


# -- a file outside the bundle that tells whether anything opened it ------------------------


class Tripwire:
    """A FIFO outside the bundle. A thread waits to open it for writing, which succeeds only
    once someone opens it for reading; so :meth:`opened` tells whether anything tried to read
    it. A reader gets end-of-file at once (it never hangs)."""

    def __init__(self, path: Path) -> None:
        os.mkfifo(path)
        self.path = path
        self._opened = threading.Event()
        self._released = False
        self._thread = threading.Thread(target=self._wait, daemon=True)
        self._thread.start()

    def _wait(self) -> None:
        fd = os.open(self.path, os.O_WRONLY)  # blocks until a reader appears
        if not self._released:
            self._opened.set()
        os.close(fd)  # the reader sees EOF

    def opened(self) -> bool:
        return self._opened.is_set()

    def close(self) -> None:
        self._released = True
        fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK)  # lets the waiting thread finish
        self._thread.join(10)
        os.close(fd)


# -- the hostile bundles ----------------------------------------------------------------------


def _truncated_model(b: Path, outside: Path) -> None:
    data = (b / MODEL_FILE).read_bytes()
    (b / MODEL_FILE).write_bytes(data[: len(data) // 2])


def _external_data_escaping(b: Path, outside: Path) -> None:
    """The largest initializer's bytes 'stored' in a file outside: '../outside' from the model."""
    onnx = pytest.importorskip("onnx")
    from onnx.external_data_helper import set_external_data

    model = onnx.load(str(b / MODEL_FILE))
    init = max(model.graph.initializer, key=lambda t: len(t.raw_data))
    set_external_data(init, location=os.path.relpath(outside, b), offset=0, length=len(init.raw_data))
    init.data_location = onnx.TensorProto.EXTERNAL
    init.ClearField("raw_data")
    onnx.save(model, str(b / MODEL_FILE))


def _model_symlink_out(b: Path, outside: Path) -> None:
    (b / MODEL_FILE).unlink()
    os.symlink(outside, b / MODEL_FILE)


def _weights_symlink_out(b: Path, outside: Path) -> None:
    (b / WEIGHTS_FILE).unlink()
    os.symlink(outside, b / WEIGHTS_FILE)


def _header_length(n: int) -> Callable[[Path, Path], None]:
    def edit(b: Path, outside: Path) -> None:
        data = bytearray((b / WEIGHTS_FILE).read_bytes())
        data[:8] = struct.pack("<Q", n)
        (b / WEIGHTS_FILE).write_bytes(bytes(data))

    return edit


def _truncated_weights(b: Path, outside: Path) -> None:
    data = (b / WEIGHTS_FILE).read_bytes()
    (b / WEIGHTS_FILE).write_bytes(data[: len(data) // 2])  # header intact, tensors cut off


HOSTILE: dict[str, tuple[Callable[[Path, Path], None], str, str]] = {
    # name: (breakage, the file the message names, the cause it gives)
    "truncated model": (_truncated_model, MODEL_FILE, r"could not be loaded by onnxruntime: .*Protobuf parsing failed"),
    "external data escaping": (_external_data_escaping, MODEL_FILE, r"could not be loaded by onnxruntime: .*[Ee]xternal data"),
    "model symlink out": (_model_symlink_out, MODEL_FILE, r"is a symlink that leads out of the bundle"),
    "weights symlink out": (_weights_symlink_out, WEIGHTS_FILE, r"is a symlink that leads out of the bundle"),
    "safetensors header 2**62": (_header_length(2**62), WEIGHTS_FILE,
                                 r"is corrupt: its safetensors header declares 4611686018427387904 bytes but the file holds \d+"),
    "safetensors header past the end": (_header_length(50_000_000), WEIGHTS_FILE,
                                        r"is corrupt: its safetensors header declares 50000000 bytes but the file holds"),
    "safetensors truncated": (_truncated_weights, WEIGHTS_FILE, r"is corrupt: tensor .* lies outside the file's \d+ data bytes"),
}


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory, shapes_bundle: Path) -> Iterator[dict[str, tuple[Path, Tripwire]]]:
    """Each hostile bundle once per module (commands only read them), with its tripwire."""
    made: dict[str, tuple[Path, Tripwire]] = {}
    root = tmp_path_factory.mktemp("hostile")
    for i, (name, (breakage, _, _)) in enumerate(HOSTILE.items()):
        case = root / f"case{i}"
        case.mkdir()
        tripwire = Tripwire(case / "outside")
        b = case / "bundle"
        shutil.copytree(shapes_bundle, b)
        breakage(b, tripwire.path)
        made[name] = (b, tripwire)
    yield made
    for _, tripwire in made.values():
        tripwire.close()


COMMANDS: dict[str, Callable[[Path, Path, Path], list[object]]] = {
    # name: (bundle, a scratch directory, the shapes data) -> argv
    "export onnx-fp16": lambda b, tmp, data: ["export", b, "--to", "onnx-fp16", "--out", tmp / "out"],
    "export onnx-int8": lambda b, tmp, data: ["export", b, "--to", "onnx-int8", "--out", tmp / "out", "--calib", 4],
    "export triton": lambda b, tmp, data: ["export", b, "--to", "triton", "--out", tmp / "out"],
    "export torchserve": lambda b, tmp, data: ["export", b, "--to", "torchserve", "--out", tmp / "out"],
    "export all": lambda b, tmp, data: ["export", b, "--to", "all", "--out", tmp / "out", "--calib", 4],
    "predict": lambda b, tmp, data: ["predict", b, data / "circle"],
    "evaluate": lambda b, tmp, data: ["evaluate", b, data, "--out", tmp / "eval"],
    "bench": lambda b, tmp, data: ["bench", b, "--seconds", "0.05", "--batch-sizes", "1", "--no-torch"],
}


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("case", list(HOSTILE))
def test_a_hostile_bundle_is_one_error_line_in_every_command(
    hostile: dict[str, tuple[Path, Tripwire]], shapes_dir: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str], case: str, command: str,
) -> None:
    bundle, tripwire = hostile[case]
    _, file, cause = HOSTILE[case]
    argv = [str(a) for a in COMMANDS[command](bundle, tmp_path, shapes_dir)]
    code = main(argv)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2, err
    assert "Traceback" not in err and len(errors) == 1, err
    assert str(bundle / file) in errors[0], errors[0]
    assert re.search(cause, errors[0]), errors[0]
    assert not tripwire.opened(), f"{command} opened the file outside the bundle"
    assert not (tmp_path / "out").exists()  # nothing half-written either


# -- load_bundle: the checks one by one ------------------------------------------------------


def _header(n: int, body: bytes = b"") -> bytes:
    return struct.pack("<Q", n) + body


def _tensors(header: dict[str, object], data: bytes) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


SAFETENSORS_CASES = [
    ("empty", b"", r"0 bytes, too short for a safetensors header"),
    ("seven bytes", b"\x01" * 7, r"too short for a safetensors header"),
    ("length 2**62", _header(2**62, b"{}"), r"declares 4611686018427387904 bytes but the file holds 10"),
    ("length 2**64-1", _header(2**64 - 1, b"{}"), r"declares 18446744073709551615 bytes"),
    ("length one past the end", _header(3, b"{}"), r"declares 3 bytes but the file holds 10"),
    ("header not JSON", _header(2, b"\xff\xfe"), r"header is not JSON"),
    ("header a list", _header(2, b"[]"), r"header is not a JSON object"),
    ("offsets past the data", _tensors({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4),
     r"tensor 'w' lies outside the file's 4 data bytes"),
    ("offsets reversed", _tensors({"w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}}, b"\0" * 4),
     r"tensor 'w' lies outside"),
    ("offsets negative", _tensors({"w": {"dtype": "F32", "shape": [1], "data_offsets": [-4, 0]}}, b"\0" * 4),
     r"tensor 'w' lies outside"),
    ("offsets missing", _tensors({"w": {"dtype": "F32", "shape": [1]}}, b"\0" * 4), r"tensor 'w' lies outside"),
]


@pytest.mark.parametrize(("content", "expected"), [c[1:] for c in SAFETENSORS_CASES], ids=[c[0] for c in SAFETENSORS_CASES])
def test_safetensors_headers_that_cannot_be_right_are_refused(tmp_path: Path, content: bytes, expected: str) -> None:
    path = tmp_path / WEIGHTS_FILE
    path.write_bytes(content)
    with pytest.raises(BundleError, match=expected) as info:
        check_safetensors(path)
    assert str(info.value).startswith(f"{path} is corrupt: ") and "\n" not in str(info.value)


def test_a_real_safetensors_file_passes(tmp_path: Path) -> None:
    import numpy as np
    from safetensors.numpy import save_file

    save_file({"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.zeros(0, np.float32)}, str(tmp_path / "w.safetensors"),
              metadata={"format": "np"})
    check_safetensors(tmp_path / "w.safetensors")  # no error


def test_a_symlink_inside_the_bundle_is_fine(shapes_bundle: Path, tmp_path: Path) -> None:
    b = tmp_path / "bundle"
    shutil.copytree(shapes_bundle, b)
    (b / MODEL_FILE).rename(b / "real.onnx")
    os.symlink("real.onnx", b / MODEL_FILE)
    assert load_bundle(b).model_path == b / MODEL_FILE


@pytest.mark.parametrize("name", ["lensforge.json", "split.json", WEIGHTS_FILE])
def test_every_bundle_file_is_refused_when_it_leads_out(shapes_bundle: Path, tmp_path: Path, name: str) -> None:
    b = tmp_path / "bundle"
    shutil.copytree(shapes_bundle, b)
    shutil.move(b / name, tmp_path / name)
    os.symlink(tmp_path / name, b / name)
    with pytest.raises(BundleError, match=rf"{name} is a symlink that leads out of the bundle"):
        load_bundle(b)


def test_a_symlinked_folder_out_of_the_bundle_is_refused(shapes_bundle: Path, tmp_path: Path) -> None:
    b = tmp_path / "bundle"
    shutil.copytree(shapes_bundle, b)
    (tmp_path / "elsewhere").mkdir()
    (b / MODEL_FILE).rename(tmp_path / "elsewhere" / MODEL_FILE)
    os.symlink(tmp_path / "elsewhere", b / "onnx")
    meta = json.loads((b / "lensforge.json").read_text())
    meta["model"]["file"] = f"onnx/{MODEL_FILE}"
    (b / "lensforge.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match=r"onnx/model\.onnx is a symlink that leads out of the bundle"):
        load_bundle(b)


def test_a_fifo_weights_file_is_refused_without_blocking(shapes_bundle: Path, tmp_path: Path) -> None:
    b = tmp_path / "bundle"
    shutil.copytree(shapes_bundle, b)
    (b / WEIGHTS_FILE).unlink()
    os.mkfifo(b / WEIGHTS_FILE)  # opening it to read would block forever
    with pytest.raises(BundleError, match=r"weights\.safetensors is not a regular file"):
        load_bundle(b)


# -- staging and the sweep (C4) --------------------------------------------------------------


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _leftover(parent: Path, label: str, *, host: str | None = None, pid: int, created: float) -> Path:
    """A staging entry as a run of ``pid`` on ``host`` would have left it, with a file inside."""
    entry = parent / STAGING_DIR / f"{label}~{host or bundle_module._HOST}~{pid}~{int(created)}~0badf00d"
    entry.mkdir(parents=True)
    (entry / MODEL_FILE).write_bytes(b"\0" * 1000)
    return entry


def test_the_sweep_removes_only_stale_entries(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    now = time.time()
    dead = _leftover(tmp_path, "bundle", pid=_dead_pid(), created=now)
    live = _leftover(tmp_path, "bundle-int8", pid=os.getppid(), created=now)  # our parent: alive, started earlier
    mine = _leftover(tmp_path, "bundle-fp16", pid=os.getpid(), created=now)  # this process may be writing it
    other_host = _leftover(tmp_path, "triton", host="another-host", pid=_dead_pid(), created=now)
    ancient = _leftover(tmp_path, "torchserve", host="another-host", pid=1, created=now - 2 * 86400)
    with caplog.at_level(logging.WARNING, logger="lensforge.runtime.bundle"):
        removed = sweep_staging(tmp_path)
    assert sorted(removed) == sorted([dead, ancient])
    assert live.is_dir() and mine.is_dir() and other_host.is_dir()
    assert not dead.exists() and not ancient.exists()
    [record] = caplog.records
    assert record.getMessage().startswith(f"removed 2 leftover(s) of interrupted lensforge runs (0.0 MB) from {tmp_path / STAGING_DIR}")
    assert dead.name in record.getMessage() and ancient.name in record.getMessage()


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="process start times from /proc")
def test_the_sweep_sees_a_reused_pid(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        # the entry is an hour older than the process now holding its PID: its owner is gone
        reused = _leftover(tmp_path, "bundle", pid=proc.pid, created=time.time() - 3600)
        fresh = _leftover(tmp_path, "bundle-int8", pid=proc.pid, created=time.time() + 5)
        assert sweep_staging(tmp_path) == [reused]
        assert fresh.is_dir()
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="process states from /proc")
def test_a_zombie_owner_counts_as_gone(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        while Path(f"/proc/{proc.pid}/stat").is_file() and ") Z " not in Path(f"/proc/{proc.pid}/stat").read_text():
            time.sleep(0.01)  # wait until it has exited (not yet reaped: a zombie)
        entry = _leftover(tmp_path, "bundle", pid=proc.pid, created=time.time())
        assert sweep_staging(tmp_path) == [entry]
    finally:
        proc.wait()


def test_writing_a_bundle_sweeps_a_killed_runs_leftover(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """What training, fp16/int8, Triton and TorchServe exports do (atomic_directory /
    staging_directory) after an earlier run there was killed mid-write."""
    run = tmp_path / "run"
    leftover = _leftover(run, "bundle", pid=_dead_pid(), created=time.time())
    with caplog.at_level(logging.WARNING, logger="lensforge.runtime.bundle"):
        with atomic_directory(run / "bundle") as tmp:
            assert tmp.parent == run / STAGING_DIR and tmp.name.startswith("bundle~")
            assert not leftover.exists()  # swept before the new staging began
            (tmp / MODEL_FILE).write_bytes(b"x")
    assert sorted(p.name for p in run.iterdir()) == ["bundle"]  # .staging gone once empty
    assert "removed 1 leftover(s) of interrupted lensforge runs" in caplog.text


def test_staging_is_removed_on_error_and_a_live_entry_is_kept(tmp_path: Path) -> None:
    live = _leftover(tmp_path, "bundle-int8", pid=os.getppid(), created=time.time())
    with pytest.raises(RuntimeError, match="boom"):
        with staging_directory(tmp_path, "bundle") as tmp:
            (tmp / "half").write_bytes(b"x")
            raise RuntimeError("boom")
    assert [p.name for p in (tmp_path / STAGING_DIR).iterdir()] == [live.name]


def test_overwrite_keeps_the_old_bundle_until_the_new_one_is_complete(tmp_path: Path) -> None:
    dest = tmp_path / "bundle"
    dest.mkdir()
    (dest / "old").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_directory(dest, overwrite=True) as tmp:
            (tmp / "new").write_text("new")
            raise RuntimeError("killed")
    assert [p.name for p in dest.iterdir()] == ["old"]
    with atomic_directory(dest, overwrite=True) as tmp:
        (tmp / "new").write_text("new")
    assert [p.name for p in dest.iterdir()] == ["new"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]


def test_an_explain_graph_outside_the_bundle_is_refused(shapes_bundle: Path, tmp_path: Path) -> None:
    # the torch-free explainer opens lensforge.json's explain.file: it must stay inside the bundle too
    b = tmp_path / "bundle"
    shutil.copytree(shapes_bundle, b)
    (tmp_path / "explain.onnx").write_bytes((b / MODEL_FILE).read_bytes())
    meta = json.loads((b / "lensforge.json").read_text())
    meta["explain"] = {"file": "../explain.onnx"}
    (b / "lensforge.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match=r"'explain.file' must be a relative file name inside the bundle"):
        load_bundle(b)
    meta["explain"] = {"file": "explain.onnx"}
    (b / "lensforge.json").write_text(json.dumps(meta))
    (b / "explain.onnx").unlink(missing_ok=True)  # training writes one: replace it by a link out
    os.symlink(tmp_path / "explain.onnx", b / "explain.onnx")
    with pytest.raises(BundleError, match=r"explain\.onnx is a symlink that leads out of the bundle"):
        load_bundle(b)
