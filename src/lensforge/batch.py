"""Batch prediction: a folder, a glob, a list of paths or a table of URIs → one row per image,
written to Parquet or JSON lines.

Two engines produce the same rows from the same :class:`~lensforge.runtime.Predictor`:

- ``local``: this process, the Predictor's own batched stream (decoding overlaps inference);
- ``ray``: Ray Data over a Ray cluster. The paths become a dataset, ``map_batches`` runs them
  through an actor pool holding one Predictor per actor, and the driver streams the rows
  into the output file. Ray schedules, retries and restarts; nothing here is cluster code.

Every input becomes exactly one row ``{path, labels, scores[, boxes], error}``: an image
that cannot be read or decoded is a row with ``error`` set, never a failed job.

Ray and pyarrow are imported inside the functions that need them, so the serving install
(``pip install lensforge``) needs neither; they come with the ``scale`` extra.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import socket
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self
from urllib.parse import unquote, urlparse

from lensforge.data.files import is_image_file
from lensforge.data.formats import list_images
from lensforge.errors import ConfigError, DataError, ImageError
from lensforge.hardware import cpu_count
from lensforge.runtime.bundle import WEIGHTS_FILE, load_bundle
from lensforge.runtime.predictor import Predictor

__all__ = ["ENGINES", "BatchRun", "list_sources", "predict_many", "predict_rows"]

log = logging.getLogger(__name__)

ENGINES = ("local", "ray")
OUTPUT_FORMATS = (".parquet", ".jsonl")
# the column of a Parquet/CSV source that holds the image paths or URIs (first one present wins)
PATH_COLUMNS = ("path", "uri", "url", "image", "image_path", "filepath", "file", "filename")
TABLE_SUFFIXES = (".parquet", ".csv")
SCALE_EXTRA = 'pip install "lensforge[scale]"'
LOCAL_CHUNK = 256  # paths the local engine reads per step: bounded memory on a million-image list
MAX_BLOCKS = 20_000  # Ray Data tasks per job at most (millions of images: blocks grow past 8 batches)
CONNECT_TIMEOUT_S = 5.0  # a Ray address that does not accept a TCP connection by then is refused


@dataclass
class BatchRun:
    """What a :func:`predict_many` call did.

    output: the file written (None: the rows are in ``rows``).
    images: rows produced (one per input); failed: rows whose ``error`` is set.
    engine, actors, threads: how it ran (actors is 1 for the local engine; threads are
        onnxruntime intra-op threads per Predictor).
    rows: the rows themselves when no output file was given, else empty.
    """

    output: Path | None
    images: int
    failed: int
    seconds: float
    engine: str
    actors: int
    threads: int
    rows: list[dict[str, Any]] = field(default_factory=list)

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


# -- sources ----------------------------------------------------------------------------------


def list_sources(source: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> list[str]:
    """The image paths or URIs a SOURCE names, in a stable order.

    SOURCE: a directory (searched recursively for image files), a glob (``imgs/**/*.jpg``),
    a text file of paths (one a line; ``#`` comments), a Parquet or CSV table with a column
    named one of :data:`PATH_COLUMNS` (local or any URI pyarrow opens: ``s3://``, ``gs://``...),
    a single image, or a list of any of these. Relative paths in a list or table are taken
    from the list's own folder. Raises :class:`DataError` when nothing is found.
    """
    items = [source] if isinstance(source, (str, os.PathLike)) else list(source)
    out: list[str] = []
    for item in items:
        out.extend(_expand(os.fspath(item)))
    if not out:
        raise DataError(f"no images found in {', '.join(os.fspath(i) for i in items)}: give a folder of images, "
                        "a glob, a text file of paths, or a Parquet/CSV table with a 'path' or 'uri' column")
    return out


def _expand(text: str) -> list[str]:
    if _is_uri(text):
        if text.lower().endswith(TABLE_SUFFIXES):
            return _table_paths(text)
        return [text]  # one remote image
    path = Path(text).expanduser()
    if path.is_dir():
        return [str(p) for p in list_images([path])]
    if glob.has_magic(text):
        return sorted(p for p in glob.glob(str(path), recursive=True) if os.path.isfile(p))
    if not path.exists():
        raise DataError(f"SOURCE {text} does not exist")
    if path.suffix.lower() in TABLE_SUFFIXES:
        return _table_paths(str(path))
    if is_image_file(path):
        return [str(path)]
    return _text_paths(path)


def _text_paths(path: Path) -> list[str]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read {path} as a list of image paths (one a line): {e}") from None
    entries = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    return [_resolve(e, path.parent) for e in entries]


def _table_paths(where: str) -> list[str]:
    pa = _pyarrow("a Parquet/CSV SOURCE")
    import pyarrow.csv as pacsv
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    try:
        fs, inner = pafs.FileSystem.from_uri(where) if _is_uri(where) else (pafs.LocalFileSystem(), os.path.abspath(where))
        if where.lower().endswith(".parquet"):
            table = pq.read_table(inner, filesystem=fs)
        else:
            with fs.open_input_stream(inner) as f:
                table = pacsv.read_csv(f)
    except (OSError, pa.ArrowException) as e:
        raise DataError(f"cannot read the table {where}: {str(e).splitlines()[0]}") from None
    column = next((c for c in PATH_COLUMNS if c in table.column_names), None)
    if column is None:
        raise DataError(f"{where} has no column of image paths: name one of {', '.join(PATH_COLUMNS)} "
                        f"(it has {', '.join(table.column_names) or 'no columns'})")
    base = None if _is_uri(where) else Path(where).parent
    return [_resolve(str(v), base) for v in table.column(column).to_pylist() if v is not None and str(v).strip()]


def _resolve(entry: str, base: Path | None) -> str:
    if _is_uri(entry) or base is None or os.path.isabs(entry):
        return entry
    return str(base / entry)


def _is_uri(text: str) -> bool:
    return len(urlparse(text).scheme) > 1  # "C:\x" is a Windows drive, not a scheme; file:// goes through pyarrow


# -- rows ---------------------------------------------------------------------------------------


def predict_rows(predictor: Predictor, paths: Sequence[str], batch_size: int = 16) -> list[dict[str, Any]]:
    """Rows for ``paths``, in order: one ``{path, labels, scores[, boxes], error}`` each.

    Classifiers: ``labels`` are the predicted labels, ``scores`` one float per class in the
    bundle's class order. Detectors: one label, score and box (xyxy, original-image pixels)
    per detection at or above the bundle's threshold. A path that cannot be read or decoded
    gets empty lists and its reason in ``error``.
    """
    sources = [_fetch(p) for p in paths]
    readable = [s for s in sources if not isinstance(s, ImageError)]
    results = predictor.predict_many(readable, batch_size=batch_size) if readable else iter(())
    rows = []
    for path, src in zip(paths, sources):
        res = src if isinstance(src, ImageError) else next(results)[1]
        rows.append(_row(path, res, predictor.detector))
    return rows


def _fetch(path: str) -> str | bytes | ImageError:
    """A local path as is (the safe decoder opens it: regular files only, so a FIFO cannot
    block an actor); a URI read to bytes through pyarrow."""
    if not _is_uri(path):
        return path
    if urlparse(path).scheme == "file":
        return unquote(urlparse(path).path)
    try:
        import pyarrow.fs as pafs

        fs, inner = pafs.FileSystem.from_uri(path)
        with fs.open_input_stream(inner) as f:
            return f.read()
    except Exception as e:  # noqa: BLE001 - pyarrow raises OSError or ArrowInvalid per backend; each is this row's error
        return ImageError("unreadable", f"{path}: cannot read: {str(e).splitlines()[0] if str(e) else type(e).__name__}")


def _row(path: str, res: Any, detector: bool) -> dict[str, Any]:
    row: dict[str, Any] = {"path": path, "labels": [], "scores": [], "error": None}
    if detector:
        row["boxes"] = []
    if isinstance(res, Exception):
        row["error"] = str(res)
    elif detector:
        kept = res.above()
        row.update(labels=kept.labels, scores=kept.scores.tolist(), boxes=kept.boxes.tolist())
    else:
        row.update(labels=res.labels, scores=res.scores.tolist())
    return row


def row_schema(detector: bool) -> Any:
    """The Parquet schema of the rows (float32 scores, as the model returns them)."""
    pa = _pyarrow("Parquet output")
    fields = [pa.field("path", pa.string()), pa.field("labels", pa.list_(pa.string())),
              pa.field("scores", pa.list_(pa.float32()))]
    if detector:
        fields.append(pa.field("boxes", pa.list_(pa.list_(pa.float32(), 4))))
    return pa.schema([*fields, pa.field("error", pa.string())])


# -- output -------------------------------------------------------------------------------------


class RowWriter:
    """Rows → a Parquet file (one row group per write) or JSON lines, chosen by the suffix, or
    kept in memory when there is no file; counts rows and failures for the run's summary.
    A file is written to ``<name>.partial`` and renamed when the ``with`` block completes: a
    stopped job leaves no output that looks finished."""

    def __init__(self, path: Path | None, detector: bool, classes: Sequence[str]) -> None:
        self.path = path
        self.kept: list[dict[str, Any]] = []
        self.done = self.failed = 0
        self.parquet = path is not None and path.suffix.lower() == ".parquet"
        if path is None:
            return
        self.partial = path.with_name(path.name + ".partial")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            if self.parquet:
                import pyarrow.parquet as pq

                self.schema = row_schema(detector).with_metadata({"lensforge.classes": json.dumps(list(classes))})
                self._pq = pq.ParquetWriter(str(self.partial), self.schema)
            else:
                self._file = open(self.partial, "w", encoding="utf-8")  # noqa: SIM115 - closed in close()
        except OSError as e:
            raise DataError(f"cannot write --output {path}: {e.strerror or e}") from None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        self.close(complete=kind is None)

    def write_rows(self, rows: list[dict[str, Any]]) -> None:
        self.done += len(rows)
        self.failed += sum(r["error"] is not None for r in rows)
        if self.path is None:
            self.kept.extend(rows)
        elif self.parquet:
            import pyarrow as pa

            self._pq.write_table(pa.Table.from_pylist(rows, schema=self.schema))
        else:
            self._file.writelines(json.dumps(r) + "\n" for r in rows)

    def write_table(self, table: Any) -> None:
        """A pyarrow table of rows (what Ray hands back)."""
        if not self.parquet:
            self.write_rows(table.to_pylist())
            return
        self.done += table.num_rows
        self.failed += table.num_rows - table.column("error").null_count
        self._pq.write_table(table.select(self.schema.names).cast(self.schema))

    def close(self, complete: bool) -> None:
        if self.path is None:
            return
        (self._pq if self.parquet else self._file).close()
        if complete:
            os.replace(self.partial, self.path)
        else:
            self.partial.unlink(missing_ok=True)


def check_output(output: str | os.PathLike[str] | None) -> Path | None:
    if output is None:
        return None
    path = Path(output)
    if path.suffix.lower() not in OUTPUT_FORMATS:
        raise ConfigError(f"--output {path} must end in .parquet or .jsonl (one row per image)")
    if path.suffix.lower() == ".parquet":
        _pyarrow("Parquet output")
    return path


# -- the API ------------------------------------------------------------------------------------


def predict_many(
    bundle: str | os.PathLike[str],
    source: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    *,
    engine: str = "local",
    output: str | os.PathLike[str] | None = None,
    address: str | None = None,
    actors: int | None = None,
    threads: int | None = None,
    batch_size: int = 32,
    providers: Sequence[str] | None = None,
    optimization: str = "all",
    progress: Callable[[int, int], None] | None = None,
) -> BatchRun:
    """Predict every image of ``source`` with ``bundle``; one row each (see :func:`predict_rows`).

    engine: "local" (this process) or "ray" (a Ray cluster; needs the ``scale`` extra).
    output: a ``.parquet`` or ``.jsonl`` file to stream the rows into; None keeps them in
        :attr:`BatchRun.rows` (fine for thousands, not for millions).
    address: the Ray cluster: "host:port" (GCS), "ray://host:port" (Ray Client), "auto"
        (the cluster this machine belongs to); None starts a private local Ray. When this
        process has already called ``ray.init``, that connection is used as it is.
    actors: Ray actors, one Predictor each (default: as many as ``threads`` allows);
    threads: onnxruntime threads per Predictor. With Ray each actor reserves that many CPUs,
        so actors x threads never exceeds the cluster's cores (default: cores // actors).
    batch_size: images per Ray batch and per onnxruntime run.
    progress: local engine: called as ``progress(done, total)``; Ray shows its own bars.

    Rows keep the source order with the local engine; Ray writes them as batches finish.
    Every problem with the arguments is raised before any image is read.
    """
    if engine not in ENGINES:
        raise ConfigError(f"unknown engine {engine!r}; use one of {', '.join(ENGINES)}")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
    out = check_output(output)
    loaded = load_bundle(bundle)
    if engine == "ray":
        _ray()  # a missing extra is refused before the source is listed
        if address:
            check_address(address)
    paths = list_sources(source)
    options = {"providers": list(providers) if providers else None, "optimization": optimization}
    if engine == "local":
        return _run_local(loaded, paths, out, threads, batch_size, options, progress)
    return _run_ray(loaded, paths, out, address, actors, threads, batch_size, options)


def _run_local(bundle: Any, paths: list[str], out: Path | None, threads: int | None, batch_size: int,
               options: dict[str, Any], progress: Callable[[int, int], None] | None) -> BatchRun:
    threads = threads or cpu_count()
    predictor = Predictor(bundle, threads=threads, **options)
    t0 = time.perf_counter()
    with RowWriter(out, predictor.detector, predictor.classes) as rows_out:
        for start in range(0, len(paths), LOCAL_CHUNK):
            rows_out.write_rows(predict_rows(predictor, paths[start:start + LOCAL_CHUNK], batch_size))
            if progress:
                progress(rows_out.done, len(paths))
    return BatchRun(out, rows_out.done, rows_out.failed, time.perf_counter() - t0, "local", 1, threads, rows_out.kept)


# -- Ray ----------------------------------------------------------------------------------------


def _ray() -> Any:
    try:
        import ray
        import ray.data
    except ImportError:
        raise ConfigError(f"--engine ray needs Ray Data, which is not installed: {SCALE_EXTRA}") from None
    return ray


def _pyarrow(what: str) -> Any:
    try:
        import pyarrow
    except ImportError:
        raise ConfigError(f"{what} needs pyarrow, which is not installed: {SCALE_EXTRA} (or write .jsonl)") from None
    return pyarrow


def check_address(address: str) -> None:
    """Refuse a Ray address that does not accept a connection now, in one line and within
    seconds (``ray.init`` itself keeps retrying for a minute). "auto" is Ray's to find."""
    if address == "auto":
        return
    target = address.removeprefix("ray://")
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ConfigError(f"--address {address!r} is not host:port, ray://host:port or auto")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as e:
        raise ConfigError(f"Ray address {address} does not answer ({e.strerror or e}): start the cluster "
                          "(ray start --head) or give the address `ray status` prints") from None


def _connect(address: str | None) -> Any:
    ray = _ray()
    if ray.is_initialized():
        return ray
    try:
        # "local": a private Ray for this process, never a cluster it happens to find on the machine
        ray.init(address=address or "local", logging_level=logging.WARNING, include_dashboard=False if address is None else None)
    except ConnectionError as e:
        raise ConfigError(f"cannot connect to Ray at {address}: {str(e).splitlines()[0]}") from None
    return ray


class PredictActor:
    """One Ray actor: one Predictor, built once from the bundle files shipped by the driver
    (so the workers need no shared filesystem), then fed batches of paths."""

    def __init__(self, files: dict[str, bytes], threads: int, batch_size: int, options: dict[str, Any]) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="lensforge-bundle-")
        for name, data in files.items():
            Path(self._dir.name, name).write_bytes(data)
        self.predictor = Predictor(self._dir.name, threads=threads, **options)
        self.batch_size = batch_size

    def __call__(self, batch: dict[str, Any]) -> Any:
        import pyarrow as pa

        rows = predict_rows(self.predictor, [str(p) for p in batch["path"]], self.batch_size)
        return pa.Table.from_pylist(rows, schema=row_schema(self.predictor.detector))


def bundle_files(bundle: Any) -> dict[str, bytes]:
    """The bundle's top-level files a Predictor may read (the training weights stay behind)."""
    return {p.name: p.read_bytes() for p in sorted(bundle.path.iterdir())
            if p.is_file() and p.name != WEIGHTS_FILE and not p.name.startswith(".")}


def plan_actors(cpus: int, actors: int | None, threads: int | None) -> tuple[int, int]:
    """(actors, onnxruntime threads per actor) with actors x threads <= the cluster's CPUs:
    by default one thread per actor and an actor per CPU (many small sessions outrun one wide
    one on small images)."""
    if cpus < 1:
        raise ConfigError("the Ray cluster offers no CPUs to run actors on")
    if actors is None:
        threads = threads or 1
        actors = max(1, cpus // threads)
    threads = threads or max(1, cpus // actors)
    if actors * threads > cpus:
        raise ConfigError(f"{actors} actor(s) x {threads} thread(s) need {actors * threads} CPUs; the Ray cluster "
                          f"offers {cpus}: lower --actors or --threads")
    return actors, threads


def _run_ray(bundle: Any, paths: list[str], out: Path | None, address: str | None, actors: int | None,
             threads: int | None, batch_size: int, options: dict[str, Any]) -> BatchRun:
    ray = _connect(address)
    actors, threads = plan_actors(int(ray.cluster_resources().get("CPU", 0)), actors, threads)
    probe = Predictor(bundle, threads=1, **options)  # fails here, once, on a bundle or provider problem
    log.info("Ray: %d image(s), %d actor(s) x %d thread(s), batches of %d", len(paths), actors, threads, batch_size)
    t0 = time.perf_counter()
    # blocks of ~8 batches: a task is long enough to hide Ray's per-task cost, short enough that a lost
    # node costs little redone work and rows reach the output steadily
    blocks = min(max(len(paths) // (batch_size * 8), actors * 4), MAX_BLOCKS)
    ds = ray.data.from_items([{"path": p} for p in paths], override_num_blocks=blocks).map_batches(
        PredictActor, batch_size=batch_size, batch_format="numpy", num_cpus=threads,
        compute=ray.data.ActorPoolStrategy(size=actors),
        fn_constructor_kwargs={"files": bundle_files(bundle), "threads": threads, "batch_size": batch_size, "options": options},
    )
    with RowWriter(out, probe.detector, probe.classes) as rows_out:
        for table in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            rows_out.write_table(table)
    return BatchRun(out, rows_out.done, rows_out.failed, time.perf_counter() - t0, "ray", actors, threads, rows_out.kept)
