"""lensforge.batch: SOURCE listing, rows, output files and the refusals before any work (the
local engine; the Ray engine on a real two-node cluster is in test_ray.py)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from serving import conv_bundle

import lensforge
from lensforge.batch import list_sources, plan_actors, predict_many, predict_rows
from lensforge.errors import ConfigError, DataError, ImageError
from lensforge.runtime import Predictor


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A loopback port bound but not listening, held for the test: connections are refused
    and no other process can start listening there meanwhile."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return conv_bundle(tmp_path_factory.mktemp("batch") / "bundle", size=32, classes=3)


@pytest.fixture
def images(tmp_path: Path) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = []
    for i in range(7):
        p = tmp_path / "imgs" / ("sub" if i % 2 else "") / f"{i}.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (20 + i, 30, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    return sorted(paths)


def test_every_kind_of_source_lists_the_same_images(tmp_path: Path, images: list[Path]) -> None:
    root = tmp_path / "imgs"
    want = sorted(str(p) for p in images)
    (tmp_path / "list.txt").write_text("# the images\n" + "\n".join(str(p.relative_to(tmp_path)) for p in images) + "\n\n")
    pq.write_table(pa.table({"uri": [str(p) for p in images], "label": list(range(7))}), tmp_path / "t.parquet")
    (tmp_path / "t.csv").write_text("id,path\n" + "".join(f"{i},{p.relative_to(tmp_path)}\n" for i, p in enumerate(images)))
    assert sorted(list_sources(root)) == want
    assert sorted(list_sources(f"{root}/**/*.png")) == want
    assert sorted(list_sources(tmp_path / "list.txt")) == want  # relative lines start in the list's folder
    assert sorted(list_sources(str(tmp_path / "t.parquet"))) == want
    assert sorted(list_sources(f"file://{tmp_path / 't.parquet'}")) == want
    assert sorted(list_sources(tmp_path / "t.csv")) == want
    assert list_sources([images[0], images[1]]) == [str(images[0]), str(images[1])]


@pytest.mark.parametrize("make, message", [
    (lambda d: d / "empty", "no images found"),
    (lambda d: d / "missing", "does not exist"),
    (lambda d: d / "*.jpg", "no images found"),
    (lambda d: d / "t.parquet", "no column of image paths"),
])
def test_a_source_without_images_is_refused(tmp_path: Path, make, message: str) -> None:
    (tmp_path / "empty").mkdir()
    pq.write_table(pa.table({"name": ["a.jpg"]}), tmp_path / "t.parquet")
    with pytest.raises(DataError, match=message):
        list_sources(make(tmp_path))


def test_rows_equal_the_predictor_and_bad_images_are_rows(tmp_path: Path, bundle: Path, images: list[Path]) -> None:
    bad = tmp_path / "imgs" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 not a jpeg")
    missing = str(tmp_path / "imgs" / "gone.png")
    predictor = Predictor(bundle, threads=1)
    paths = [str(images[0]), str(bad), missing, *map(str, images[1:])]
    rows = predict_rows(predictor, paths, batch_size=3)
    assert [r["path"] for r in rows] == paths
    assert rows[1]["error"] and rows[2]["error"] and rows[1]["scores"] == [] and rows[2]["labels"] == []
    for row in [rows[0], *rows[3:]]:
        res = predictor.predict(row["path"])
        assert row["error"] is None and row["labels"] == res.labels
        np.testing.assert_array_equal(np.float32(row["scores"]), res.scores)


@pytest.mark.parametrize("suffix", [".parquet", ".jsonl"])
def test_local_engine_writes_one_row_per_image(tmp_path: Path, bundle: Path, images: list[Path], suffix: str) -> None:
    (tmp_path / "imgs" / "broken.png").write_bytes(b"\x89PNG garbage")
    out = tmp_path / f"results{suffix}"
    seen: list[int] = []
    run = lensforge.predict_many(bundle, tmp_path / "imgs", output=out, batch_size=2, threads=1,
                                 progress=lambda done, total: seen.append(done))
    rows = pq.read_table(out).to_pylist() if suffix == ".parquet" else [json.loads(x) for x in out.read_text().splitlines()]
    assert run.images == len(rows) == 8 and run.failed == 1 and seen[-1] == 8 and not run.rows
    assert [r["path"] for r in rows if r["error"]] == [str(tmp_path / "imgs" / "broken.png")]
    assert not out.with_name(out.name + ".partial").exists()
    kept = predict_many(bundle, tmp_path / "imgs", threads=1)  # no output: the rows come back
    assert [r["path"] for r in kept.rows] == [r["path"] for r in rows]
    if suffix == ".parquet":
        assert json.loads(pq.read_schema(out).metadata[b"lensforge.classes"]) == ["class_0", "class_1", "class_2"]


@pytest.mark.parametrize("cpus, actors, threads, expected", [
    (4, None, None, (4, 1)), (4, 2, None, (2, 2)), (4, None, 2, (2, 2)), (3, 2, None, (2, 1)), (1, None, None, (1, 1)),
])
def test_plan_actors_never_oversubscribes(cpus: int, actors: int | None, threads: int | None,
                                          expected: tuple[int, int]) -> None:
    assert plan_actors(cpus, actors, threads) == expected


def test_plan_actors_refuses_more_than_the_cluster_has() -> None:
    with pytest.raises(ConfigError, match="need 6 CPUs; the Ray cluster offers 4"):
        plan_actors(4, 3, 2)


def test_ray_missing_names_the_extra(monkeypatch: pytest.MonkeyPatch, bundle: Path, images: list[Path]) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError, as without the extra
    with pytest.raises(ConfigError, match=r'needs Ray Data.*pip install "lensforge\[scale\]"'):
        predict_many(bundle, images[0].parent, engine="ray")


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lensforge.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("extra, source, message", [
    (["--engine", "ray", "--address", "127.0.0.1:{port}", "--output", "r.parquet"], "imgs",
     "Ray address 127.0.0.1:{port} does not answer"),
    (["--engine", "ray", "--address", "ray://127.0.0.1:{port}", "--output", "r.parquet"], "imgs", "does not answer"),
    (["--engine", "ray", "--output", "r.parquet"], "empty", "no images found"),
    (["--engine", "local"], "imgs", "--engine writes its rows to a file"),
    (["--engine", "ray", "--output", "r.csv"], "imgs", "must end in .parquet or .jsonl"),
    (["--engine", "local", "--output", "r.parquet", "--annotate", "x"], "imgs", "--annotate"),
    (["--engine", "local", "--output", "r.parquet", "--actors", "2"], "imgs", "are for --engine ray"),
])
def test_cli_refuses_bad_batch_input_in_one_line(tmp_path: Path, bundle: Path, images: list[Path], extra: list[str],
                                                 source: str, message: str, closed_port: int) -> None:
    (tmp_path / "empty").mkdir()
    port = str(closed_port)
    extra = [e.replace("{port}", port) for e in extra]
    proc = _cli("predict", str(bundle), source, *extra, cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert message.replace("{port}", port) in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "r.parquet").exists() and not (tmp_path / "x").exists()


def test_cli_local_engine_writes_parquet(tmp_path: Path, bundle: Path, images: list[Path]) -> None:
    proc = _cli("predict", str(bundle), "imgs", "--engine", "local", "--output", "r.parquet", "--threads", "1", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert pq.read_table(tmp_path / "r.parquet").num_rows == 7 and "7 image(s)" in proc.stdout


def test_the_readme_batch_commands_parse() -> None:
    """The README's `predict --engine` lines use only options the CLI has (keeps the README true)."""
    import shlex

    from lensforge.cli import build_parser

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    lines = [line.split("  #")[0] for line in readme.splitlines() if line.startswith("lensforge predict") and "--engine" in line]
    assert len(lines) >= 3
    for line in lines:
        args = build_parser().parse_args(shlex.split(line)[1:])
        assert args.engine in ("local", "ray") and args.output.endswith((".parquet", ".jsonl")), line


def test_detector_rows_hold_the_boxes_above_the_threshold(tmp_path: Path, images: list[Path]) -> None:
    from lensforge.batch import RowWriter
    from lensforge.runtime import DetectionResult

    found = DetectionResult(np.float32([[1, 2, 10, 12], [0, 0, 5, 5]]), np.float32([0.9, 0.2]), np.int64([1, 0]),
                            ("cat", "dog"), threshold=0.5, image_size=(30, 20))

    class Detector:  # the two things predict_rows asks of a Predictor
        detector = True

        def predict_many(self, sources: list[str], batch_size: int) -> object:  # as Predictor's: errors in place
            return ((s, found if Path(s).is_file() else ImageError("unreadable", f"cannot read {s}")) for s in sources)

    rows = predict_rows(Detector(), [str(images[0]), str(tmp_path / "gone.jpg")])  # type: ignore[arg-type]
    assert rows[0] == {"path": str(images[0]), "labels": ["dog"], "scores": [pytest.approx(0.9)],
                       "boxes": [[1.0, 2.0, 10.0, 12.0]], "error": None}
    with RowWriter(tmp_path / "d.parquet", detector=True, classes=("cat", "dog")) as writer:
        writer.write_rows(rows)
    assert (writer.done, writer.failed) == (2, 1)
    back = pq.read_table(tmp_path / "d.parquet").to_pylist()
    assert back[0]["boxes"] == [[1.0, 2.0, 10.0, 12.0]] and back[1]["boxes"] == [] and back[1]["error"]
