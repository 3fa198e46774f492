"""``lensforge bench``: how fast a bundle and its fp16/int8 siblings run here, side by side.

For every format (one bundle each, labelled by its ``"precision"``), batch size and thread
count, two modes are timed in one process:

    model   ``Predictor.run`` on an already preprocessed float32 (N, 3, S, S) batch
    e2e     JPEG bytes → decode → preprocess → run → result objects (``predict_batch``)

Detectors run one image per onnxruntime call (images keep their own sizes), so they are timed
at batch 1 only: model = ``Predictor.run_detector`` on one real image's prepared float32
(3, h, w) input (a realistic box count for the post-processing), e2e = ``predict_batch`` of
its one image's bytes (exactly what ``Predictor.predict`` runs).

Within each (batch, threads, mode) cell the formats take turns run by run, so a noisy
neighbour on the machine slows all of them alike. Each format's accuracy comes from its
``lensforge.json`` when every format's figure there was measured on the same images (an
export's ``checked_on``, training's test metrics and their image count); otherwise every
format is scored again on one image set, the baseline's test split up to
``quantize.CHECK_IMAGES`` (so no table puts a 32-image figure beside a 500-image one), and
where that is impossible each row says its own images and no difference is computed across
image sets. The report names the images (``accuracy_on``) and recommends the fastest
end-to-end setting whose accuracy is within :data:`ACCURACY_TOLERANCE` points of fp32's
(detectors: their test mAP at IoU 0.5). No torch needed; a torch eager row is added only where
torch (with timm or torchvision) and the weights allow.

The exports ``lensforge export`` writes by default (:func:`export_places`: ``<bundle>-fp16``,
``<bundle>-int8``, ``<run>/exports/fp16``, ``<run>/exports/int8``) are found and compared with
the bundle unless ``discover=False``; one that is not an export of this bundle is left out with
a note. The time announced at the start is re-estimated from the first batch size measured
(slow models run at least 4 times per cell, whatever ``seconds`` says), and a load average
above the machine's core count is reported: the numbers of a busy machine are low and noisy.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import io
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lensforge.data.formats import list_images
from lensforge.errors import BundleError, ConfigError, DataError, ImageError
from lensforge.evaluation import metric_points, score_records
from lensforge.hardware import cpu_count, describe, load_average
from lensforge.heldout import held_out
from lensforge.runtime.bundle import Bundle, load_bundle
from lensforge.runtime.predictor import Predictor
from lensforge.runtime.runners import runner_for
from lensforge.tasks import get_task
from lensforge.ui import Reporter

log = logging.getLogger(__name__)

MODES = ("model", "e2e")
BATCH_SIZES = (1, 8, 32)  # classifiers' default; detectors always run at 1
SLICES = 4  # each format's time in a cell comes in 4 bursts (so also at least 4 timed runs)
MAX_RUNS = 400  # per format and cell: a fast model stops here, whatever ``seconds`` says
SWITCH_PAUSE = 0.02  # s between bursts, for onnxruntime's spinning worker threads to go to sleep
ACCURACY_TOLERANCE = 1.0  # points: formats further below fp32 are never recommended
GENERATED_IMAGES = 8  # 640×480 JPEGs when neither --images nor the bundle's test split is readable
TORCH_LABEL = "torch eager"
EXPORTED = ("fp16", "int8")  # precisions `lensforge export` writes as bundles (bench compares them)

BundleLike = str | os.PathLike[str] | Bundle


@dataclass(frozen=True)
class BenchRow:
    """One format × batch size × thread count × mode.

    img_s: images per second (batch size / median batch time).
    p50_ms, p99_ms: per-image latency in milliseconds (batch latency / batch size).
    batch_p50_ms, batch_p99_ms: latency of the whole batch in milliseconds.
    runs: timed runs behind the percentiles.
    accuracy: the format's accuracy (mAP for multi-label, mAP at IoU 0.5 for detectors) in
        points 0-100 from its ``lensforge.json``; None when it records none.
    accuracy_delta: points vs the fp32 bundle on the same images (``accuracy - fp32 accuracy``
        where all rows share ``accuracy_on``; else from the format's export record, which
        scored both models on its images); None when unknown.
    accuracy_on: the images ``accuracy`` was measured on, in words ("80 test images").
    """

    format: str
    batch: int
    threads: int
    mode: str  # "model" or "e2e"
    img_s: float
    p50_ms: float
    p99_ms: float
    batch_p50_ms: float
    batch_p99_ms: float
    runs: int
    accuracy: float | None
    accuracy_delta: float | None
    accuracy_on: str | None = None


@dataclass
class BenchReport:
    """All rows of one bench run, the machine they ran on, and what to deploy."""

    rows: list[BenchRow]
    machine: str  # hardware.describe(): CPU model, threads, SIMD
    recommendation: str  # one line, e.g. "int8, batch 8, 2 threads: 3.1× fp32 (batch 8) at −0.3 pt"
    metric: str = "accuracy"  # or "mAP" (multi-label), "mAP50" (detectors)
    images: str = ""  # what the end-to-end mode decoded, in words
    notes: list[str] = field(default_factory=list)
    accuracy_on: str | None = None  # the images every row's accuracy comes from; None: they differ (see rows)

    def row(self, format: str, batch: int, threads: int, mode: str) -> BenchRow | None:
        """The row of one cell, or None when it was not measured."""
        return next((r for r in self.rows if (r.format, r.batch, r.threads, r.mode) == (format, batch, threads, mode)), None)

    @property
    def formats(self) -> list[str]:
        return list(dict.fromkeys(r.format for r in self.rows))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data (``lensforge bench --json``)."""
        return {
            "machine": self.machine, "metric": self.metric, "images": self.images, "accuracy_on": self.accuracy_on,
            "recommendation": self.recommendation, "notes": list(self.notes),
            "rows": [asdict(r) for r in self.rows],
        }


@dataclass
class _Format:
    """One row group: a bundle (or the torch rebuild of the baseline's weights)."""

    label: str
    bundle: Bundle
    accuracy: float | None  # points
    vs_fp32: float | None  # accuracy difference to fp32 in points, on the same images where recorded
    torch: bool = False
    on: str | None = None  # the images ``accuracy`` comes from, in words


# -- public API --------------------------------------------------------------------------------


def benchmark(
    bundles: Sequence[BundleLike],
    *,
    batch_sizes: Sequence[int] | None = None,
    threads: Sequence[int] | None = None,
    seconds: float = 2.0,
    images: Sequence[str | os.PathLike[str]] | None = None,
    reporter: Reporter | None = None,
    torch_eager: bool = True,
    discover: bool = True,
) -> BenchReport:
    """Measure each bundle's speed, model only and end to end, side by side.

    bundles: one bundle per format (e.g. ``run/bundle``, ``run/bundle-fp16``, ``run/bundle-int8``),
        each labelled by its ``"precision"`` (default "fp32"). All are loaded before any
        timing, so a broken one raises :class:`BundleError` at once. Classifiers or detectors,
        not both (:class:`ConfigError`).
    batch_sizes: images per run; default 1, 8 and 32. Detectors run one image per call, so
        they are timed at batch 1 whatever is asked (other sizes leave a note in the report).
    threads: onnxruntime intra-op thread counts; default ``cpu_count()`` and also 1 when
        there is more than one core. A fresh Predictor is made per thread count.
    seconds: timing budget per format and cell (batch × threads × mode), in seconds; each
        cell still runs at least 4 and at most 400 times.
    images: image files or folders for the end-to-end mode; default the first bundle's
        test split, else 8 generated 640×480 JPEGs. Read into memory first: disk is not timed.
    torch_eager: add a "torch eager" row when torch is installed and the baseline bundle's
        ``weights.safetensors`` rebuilds its model (skipped with a note otherwise); a detector's
        torch row takes the same prepared input as its Predictor.
    discover: also compare the fp16/int8 exports of the first bundle found where ``lensforge
        export`` writes them (:func:`discover_exports`); the report's notes say which.

    Total time is about ``formats × len(batch_sizes) × len(threads) × 2 × seconds``, more for
    models slower than ``seconds / 4`` per call: the estimate is said again after the first
    batch size is measured.
    """
    ui = reporter or Reporter()
    asked = batch_sizes
    batch_sizes, thread_counts = _check_args(bundles, BATCH_SIZES if asked is None else asked, threads, seconds)
    loaded = [b if isinstance(b, Bundle) else load_bundle(b) for b in bundles]
    notes: list[str] = []
    if discover:
        found, skipped = discover_exports(loaded[0])
        given = {b.path.resolve() for b in loaded}
        found = [b for b in found if b.path.resolve() not in given]
        loaded += found
        notes += skipped
        if found:
            notes.append(f"exports of {loaded[0].path.name} found and compared: "
                         f"{', '.join(_place(b, loaded[0]) for b in found)} (--no-discover: only the bundles given)")
    single = _one_per_call(loaded)
    if single:
        if asked is not None and batch_sizes != [1]:
            notes.append(f"batch sizes {', '.join(str(n) for n in batch_sizes if n != 1)} not timed: detectors run "
                         "one image per onnxruntime call (images keep their own sizes), so every row is batch 1")
        batch_sizes = [1]
    formats = _formats(loaded, ui)
    base = formats[0]  # _formats puts the fp32 baseline first
    if len({(repr(f.bundle.meta.get("input")), len(f.bundle.classes)) for f in formats}) > 1:
        ui.warn("these bundles differ in input size or classes: they are not one model in several formats")

    probe, *_ = (Predictor(f.bundle, threads=1) for f in formats)  # all load now: BundleError before any timing
    encoded, described = _encoded_images(probe, images, max(batch_sizes), ui)
    torch_run: Callable[[np.ndarray, int], Any] | None = None
    if torch_eager:
        torch_run, why_not = _torch_eager(base.bundle)
        if torch_run is None:
            notes.append(f"{TORCH_LABEL}: skipped ({why_not})")
        else:
            formats.append(_Format(TORCH_LABEL, base.bundle, base.accuracy, 0.0, torch=True, on=base.on))
    prepared = [probe.prepare(b) for b in encoded]

    cells = [(t, n, mode) for t in thread_counts for n in batch_sizes for mode in MODES]
    ui.step(
        f"Benchmarking {', '.join(f.label for f in formats)} at batch {', '.join(map(str, batch_sizes))} "
        f"× {', '.join(map(str, thread_counts))} thread(s), model only and end to end "
        f"(about {len(cells) * len(formats) * seconds:.0f} s); end to end on {described}"
    )
    busy = _busy()
    if busy:
        ui.warn(busy)
    rows: list[BenchRow] = []
    per_image: dict[tuple[str, str], float] = {}  # (format, mode) → seconds per image, measured
    with ui.track("Benchmarking", len(cells)) as advance, _torch_threads_kept():
        for t in thread_counts:
            runners = _runners(formats, t, torch_run)  # BundleError for a model ORT cannot load
            for n in batch_sizes:
                batch_bytes = [encoded[i % len(encoded)] for i in range(n)]
                items = [prepared[i % len(prepared)] for i in range(n)]
                batch = items[0] if single else np.stack(items)  # a detector call takes one (3, h, w) image
                started = time.perf_counter()
                for mode in MODES:
                    times = _measure(_calls(runners, mode, batch, batch_bytes), seconds)
                    rows += [_row(f, n, t, mode, times[f.label]) for f in formats]
                    per_image.update({(f.label, mode): float(np.median(times[f.label])) / n for f in formats})
                    advance(1)
                rest = cells[len(rows) // len(formats):]
                if len(rows) == len(formats) * len(MODES) and rest:  # the first batch size: say again how long
                    left = _seconds_left(rest, [f.label for f in formats], per_image, seconds, measured_threads=t)
                    ui.step(f"batch {n} × {t} thread(s) took {time.perf_counter() - started:.1f} s: "
                            f"about {left:.0f} s more for the other {len(rest)} cells")
    busy = busy or _busy()  # the load at the end counts as well: other work may have started meanwhile
    if busy:
        notes.append(busy)
    ons = {f.on for f in formats}
    return BenchReport(rows, describe(), _recommend(rows, formats), _metric(base.bundle)[1], described, notes,
                       accuracy_on=ons.pop() if len(ons) == 1 else None)


# -- finding the exports of a bundle -----------------------------------------------------------


def export_places(bundle: str | os.PathLike[str]) -> list[Path]:
    """Where ``lensforge export BUNDLE`` writes fp16/int8 bundles by default: ``--to onnx-fp16``
    and ``--to onnx-int8`` beside the bundle (``<bundle>-fp16``, ``<bundle>-int8``), ``--to all``
    in the run's ``exports/`` folder (``exports/fp16``, ``exports/int8``). Keep in step with
    ``lensforge.cli.commands.default_export_dir`` (tests/test_cli.py checks it)."""
    b = Path(bundle).resolve()
    return [*(b.with_name(f"{b.name}-{p}") for p in EXPORTED), *(b.parent / "exports" / p for p in EXPORTED)]


def discover_exports(bundle: BundleLike) -> tuple[list[Bundle], list[str]]:
    """The fp16/int8 exports of ``bundle`` found at :func:`export_places`, and a note for each
    directory there that is not one (another model's export, a broken bundle), which is left out."""
    src = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
    found, notes = [], []
    for place in export_places(src.path):
        if not place.is_dir():
            continue
        try:
            candidate = load_bundle(place)
        except BundleError as e:
            notes.append(f"{_place(place, src)} left out: not a bundle ({e})")
            continue
        why_not = _not_an_export_of(candidate, src)
        if why_not:
            notes.append(f"{_place(candidate, src)} left out: {why_not}")
        else:
            found.append(candidate)
    return found, notes


def _not_an_export_of(candidate: Bundle, src: Bundle) -> str | None:
    """Why ``candidate`` is not an fp16/int8 export of ``src`` (None when it is): it must say so
    (``precision``, an ``export`` record, ``source_bundle`` naming ``src``, or byte-identical
    training weights when the run was moved since) and have the same task, classes and input."""
    precision = _precision(candidate)
    if precision not in EXPORTED or not isinstance(candidate.meta.get("export"), dict):
        return f"not an fp16/int8 export (precision {precision}, no export record)"
    source = candidate.meta.get("source_bundle")
    if not source or (Path(source).resolve() != src.path.resolve() and not _same_weights(candidate, src)):
        return f"exported from {source or 'an unknown bundle'}, not from {src.path}"
    for what, key in (("task and classes", "task"), ("task and classes", "classes"), ("input settings", "input")):
        if candidate.meta.get(key) != src.meta.get(key):
            return f"its {what} are not the bundle's (an export of an earlier model left there?)"
    return None


def _same_weights(a: Bundle, b: Bundle) -> bool:
    """Whether both bundles hold the same ``weights.safetensors`` (an export copies its source's)."""
    fa, fb = a.path / "weights.safetensors", b.path / "weights.safetensors"
    if not (fa.is_file() and fb.is_file()) or fa.stat().st_size != fb.stat().st_size:
        return False
    return _sha256(fa) == _sha256(fb)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _place(b: Bundle | Path, src: Bundle, short: bool = False) -> str:
    """A path as the user would name it: relative to the run directory when inside it, else
    the whole path (``short``: the directory's name)."""
    path = (b.path if isinstance(b, Bundle) else b).resolve()
    try:
        return str(path.relative_to(src.path.resolve().parent))
    except ValueError:
        return path.name if short else str(path)


# -- how long, and is the machine free ---------------------------------------------------------


def _burst_seconds(call: float, seconds: float) -> float:
    """Wall time of one burst (:func:`_measure`): calls until ``seconds / SLICES`` has passed,
    at least one, at most ``MAX_RUNS / SLICES``; plus the pause before it."""
    return SWITCH_PAUSE + min(max(call, seconds / SLICES + call / 2), (MAX_RUNS // SLICES) * call)


def _seconds_left(
    cells: Sequence[tuple[int, int, str]], formats: Sequence[str], per_image: dict[tuple[str, str], float],
    seconds: float, measured_threads: int = 1,
) -> float:
    """Expected seconds for ``cells`` (threads, batch, mode), from each format's time per image in
    each mode measured at ``measured_threads``: a call of batch n takes n times as long, and one on
    fewer threads as if the work split perfectly (an upper bound: the estimate errs long, not
    short); each format also makes one untimed warm-up call per cell."""
    total = 0.0
    for t, n, mode in cells:
        for f in formats:
            call = per_image[(f, mode)] * n * max(1.0, measured_threads / t)
            total += call + SLICES * _burst_seconds(call, seconds)
    return total


def _busy() -> str | None:
    """A note when the load average is above the machine's core count (the load counts every
    runnable task of the system, so it is compared with all its CPUs): other work then takes
    CPU time from the models, and every number comes out lower and noisier."""
    load, cores = load_average(), os.cpu_count() or 1
    if load is None or load <= cores:
        return None
    return (f"the machine is busy (load average {load:.1f} on {cores} cores): other work competes for the CPUs, "
            "so these numbers are lower and noisier than on an idle machine; run again when it is quieter")


# -- formats and their accuracy ----------------------------------------------------------------


def _check_args(
    bundles: Sequence[BundleLike], batch_sizes: Sequence[int], threads: Sequence[int] | None, seconds: float
) -> tuple[list[int], list[int]]:
    if not bundles:
        raise ConfigError("give at least one bundle to benchmark")
    if threads is None:
        threads = [cpu_count(), 1] if cpu_count() > 1 else [1]
    for name, values in (("batch sizes", batch_sizes), ("thread counts", threads)):
        ok = all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in values)
        if not values or not ok:
            raise ConfigError(f"{name} must be whole numbers of at least 1 (e.g. 1,8,32), got {list(values)}")
    if not (isinstance(seconds, (int, float)) and math.isfinite(seconds) and seconds > 0):
        raise ConfigError(f"seconds must be a positive number of seconds per cell, got {seconds!r}")
    return list(dict.fromkeys(batch_sizes)), list(dict.fromkeys(threads))


def _one_per_call(bundles: list[Bundle]) -> bool:
    """Whether these graphs take one image per call (detectors) rather than a batch; one run
    times one kind (a fixed-size batch and one image of its own size do not compare), so a mix
    is a ConfigError."""
    single = [b for b in bundles if not runner_for(b.task).batched]
    if single and len(single) < len(bundles):
        other = next(b for b in bundles if runner_for(b.task).batched)
        kind = runner_for(single[0].task).kind  # "detector": one image of its own size per call
        raise ConfigError(f"{single[0].path} is a {kind} but {other.path} is not (task {other.task!r}): bench "
                          "compares formats of one model; bench them in separate runs")
    return bool(single)


def _metric(b: Bundle) -> tuple[str, str]:
    """(key in ``lensforge.json``'s metrics, name in the report) of the number a format is judged
    by here: the task's compared metric (mAP at IoU 0.5 for detectors: training records both;
    the COCO mAP@[.5:.95] headline stays in ``lensforge.json``)."""
    task = get_task(b.task)
    return task.compare_key, task.compare_label


def _formats(bundles: list[Bundle], ui: Reporter | None = None) -> list[_Format]:
    """Label each bundle by its precision (the bundle name is added when two share one); the
    fp32 baseline first (the first bundle when none is fp32). Each format's accuracy on one
    image set: the recorded figures where they share one, else all scored again on the
    baseline's held-out images (:func:`_scored_on_same_images`); where neither is possible,
    each keeps its own figure and images, and a difference to fp32 only comes from an export
    record that scored both models on the same images."""
    precisions = [_precision(b) for b in bundles]
    labels = [p if precisions.count(p) == 1 else f"{p} ({_place(b, bundles[0], short=True)})" for p, b in zip(precisions, bundles)]
    order = sorted(range(len(bundles)), key=lambda i: precisions[i] != "fp32")  # stable: given order otherwise
    ordered = [bundles[i] for i in order]
    recorded = [_accuracy(b) for b in ordered]
    images = [_figure_images(b) for b in ordered]
    same = len(set(images)) == 1 and images[0] is not None
    ons = [_describe_images(i) for i in images]
    if not same and len(ordered) > 1:
        scored = _scored_on_same_images(ordered, ui or Reporter())
        if scored is not None:
            accs, on = scored
            recorded, ons, same = [(a, None) for a in accs], [on] * len(ordered), True
    base_acc = recorded[0][0]
    out = []
    for rank, (b, (acc, fp32_same_images), on) in enumerate(zip(ordered, recorded, ons)):
        if rank == 0:
            diff: float | None = 0.0
        elif acc is not None and fp32_same_images is not None:
            diff = acc - fp32_same_images  # the export measured both models on the same images
        elif same:
            diff = None if acc is None or base_acc is None else acc - base_acc
        else:
            diff = None  # figures from different images are not compared
        out.append(_Format(labels[order[rank]], b, acc, None if diff is None else round(diff, 2), on=on))
    return out


def _figure_images(b: Bundle) -> tuple[str, int] | None:
    """(split, image count) behind :func:`_accuracy`'s figure of ``b``: an export record's
    ``checked_on``, or the count in training's metrics of that split; None when unknown (an
    older record saying it in words only, or no figure)."""
    def count(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v > 0

    export = b.meta.get("export")
    if isinstance(export, dict) and isinstance(export.get(_precision(b)), (int, float)):
        c = export.get("checked_on")
        return (str(c["split"]), c["images"]) if isinstance(c, dict) and c.get("split") and count(c.get("images")) else None
    metrics, key = b.meta.get("metrics"), _metric(b)[0]
    for split in ("test", "val"):
        m = metrics.get(split) if isinstance(metrics, dict) else None
        if isinstance(m, dict) and isinstance(m.get(key), (int, float)) and not isinstance(m.get(key), bool):
            return (split, m["n"]) if count(m.get("n")) else None
    return None


def _describe_images(images: tuple[str, int] | None) -> str | None:
    return None if images is None else f"{images[1]} {images[0]} images"


def _scored_on_same_images(bundles: list[Bundle], ui: Reporter) -> tuple[list[float | None], str] | None:
    """Every bundle's accuracy (points) on the same held-out images of the first: its test
    (else val) split up to ``quantize.CHECK_IMAGES``, images no bundle could read left out;
    and those images in words. None where that cannot be done: a detector (scored from its
    record only), or no saved held-out images. A bundle with other classes gets None."""
    if not runner_for(bundles[0].task).batched:
        return None
    from lensforge.export.quantize import check_records, checked_on, describe_checked

    base = bundles[0]
    records, split, size = check_records(base)
    if not records:
        return None
    ui.step(f"The recorded {_metric(base)[1]} figures come from different images: scoring every format on "
            f"{describe_checked(checked_on(split, len(records), size))}")
    done, y, s, _ = score_records(Predictor(base), records)
    if not done:
        return None
    accs: list[float | None] = [metric_points(base, y, s)]
    for b in bundles[1:]:
        if list(b.classes) != list(base.classes) or b.task != base.task:
            accs.append(None)
            continue
        got, yb, sb, failed = score_records(Predictor(b), done)
        accs.append(metric_points(b, yb, sb) if not failed else None)  # same images or no figure
    return accs, describe_checked(checked_on(split, len(done), size))


def _precision(b: Bundle) -> str:
    return str(b.meta.get("precision") or "fp32")


def _accuracy(b: Bundle) -> tuple[float | None, float | None]:
    """(this bundle's accuracy, fp32's accuracy on the same images), in points 0-100.

    An fp16/int8 bundle's own ``export`` record (both models scored on the same held-out
    images) comes first; else ``metrics.test`` (then ``metrics.val``) written by training,
    where values are fractions 0-1 (the :func:`_metric` key: ``map50`` for detectors).
    Missing or malformed entries give None.
    """
    def number(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    export = b.meta.get("export")
    if isinstance(export, dict) and number(export.get(_precision(b))):
        ref = export.get("fp32")
        return float(export[_precision(b)]), float(ref) if number(ref) else None
    metrics, key = b.meta.get("metrics"), _metric(b)[0]
    for split in ("test", "val"):
        m = metrics.get(split) if isinstance(metrics, dict) else None
        if isinstance(m, dict) and number(m.get(key)):
            return round(100 * float(m[key]), 2), None
    return None, None


# -- images ------------------------------------------------------------------------------------


def _encoded_images(
    probe: Predictor, images: Sequence[str | os.PathLike[str]] | None, want: int, ui: Reporter
) -> tuple[list[bytes], str]:
    """Up to ``want`` encoded images that decode, and where they came from, in words."""
    if images is not None:

        paths = list_images(images)[:want]
        readable = _readable(probe, paths, ui)
        if not readable:
            raise DataError(f"none of the images given ({', '.join(map(str, images))[:200]}) could be read")
        return readable, f"{len(readable)} given image(s)"

    records, split = held_out(probe.bundle, ("test", "val"))
    readable = _readable(probe, [r.path for r in records[:want]], ui)
    if readable:
        return readable, f"{len(readable)} image(s) of the bundle's {split} split"
    return generated_jpegs(), f"{GENERATED_IMAGES} generated 640×480 JPEGs"


def _readable(probe: Predictor, paths: Sequence[Path], ui: Reporter) -> list[bytes]:
    out = []
    for p in paths:
        try:
            data = Path(p).read_bytes()
            probe.prepare(data)
        except (OSError, ImageError) as e:
            ui.warn(f"{p} left out of the benchmark: {e}")
            continue
        out.append(data)
    return out


def generated_jpegs(n: int = GENERATED_IMAGES, size: tuple[int, int] = (640, 480)) -> list[bytes]:
    """``n`` photo-like JPEGs (quality 90) of ``size`` (width, height): smooth gradients, a
    soft texture and mild noise, which decode at about the cost of real photos (white noise
    would not)."""
    from PIL import Image

    w, h = size
    x = np.linspace(0.0, 1.0, w, dtype=np.float32)[None, :]
    y = np.linspace(0.0, 1.0, h, dtype=np.float32)[:, None]
    out = []
    for seed in range(n):
        rng = np.random.default_rng(seed)
        a, b, c = rng.uniform(0.5, 1.5, 3)
        texture = 20 * np.sin(40 * a * x) * np.cos(25 * b * y)
        rgb = np.stack([40 + 170 * a * x + 0 * y, 30 + 190 * b * y + 0 * x, 120 + 80 * c * (x - y)], axis=-1)
        rgb = rgb + texture[..., None] + rng.normal(0.0, 6.0, (h, w, 3)).astype(np.float32)
        buf = io.BytesIO()
        Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


# -- timing ------------------------------------------------------------------------------------


# (model only, end to end): the model takes a classifier's (N, 3, S, S) batch or one detector
# input (3, h, w); end to end takes the encoded images
Runner = tuple[Callable[[np.ndarray], Any], Callable[[list[bytes]], Any]]


def _runners(
    formats: list[_Format], threads: int, torch_run: Callable[[np.ndarray, int], Any] | None
) -> dict[str, Runner]:
    """A fresh Predictor per format for this thread count; the torch row decodes and
    preprocesses with the baseline's Predictor and runs the torch model in between (per image
    for detectors, as ``Predictor.run_many`` does)."""
    out: dict[str, Runner] = {}
    for f in formats:
        if f.torch:
            continue
        p = Predictor(f.bundle, threads=threads)
        out[f.label] = (p.run if p.runner.batched else p.run_detector, p.predict_batch)
    if torch_run is not None:
        ref = Predictor(formats[0].bundle, threads=threads)

        def model(batch: np.ndarray) -> Any:
            return torch_run(batch, threads)

        def e2e(sources: list[bytes]) -> list[Any]:
            xs = [ref.prepare(b) for b in sources]
            outputs = list(model(np.stack(xs))) if ref.runner.batched else [model(x) for x in xs]
            return [ref.result(o, x) for o, x in zip(outputs, xs)]

        out[TORCH_LABEL] = (model, e2e)
    return out


def _calls(runners: dict[str, Runner], mode: str, batch: np.ndarray, sources: list[bytes]) -> dict[str, Callable[[], Any]]:
    """One argument-free call per format: the model on ``batch``, or end to end on ``sources``."""
    if mode == "model":
        return {k: functools.partial(r[0], batch) for k, r in runners.items()}
    return {k: functools.partial(r[1], sources) for k, r in runners.items()}


def _measure(calls: dict[str, Callable[[], Any]], seconds: float) -> dict[str, list[float]]:
    """Seconds per call of each entry; the entries take turns, in :data:`SLICES` bursts each.

    One untimed warm-up call each (a new batch shape allocates). Then, :data:`SLICES` times,
    every entry in turn runs a burst of about ``seconds / SLICES`` (at least one call, at most
    ``MAX_RUNS / SLICES``), after a pause of :data:`SWITCH_PAUSE`: onnxruntime's worker
    threads spin-wait for a while after each run, and measured run by run (A, B, A, B...)
    the spinning threads of one model halve the speed of the next on a 2-core machine.
    Bursts still spread slow drifts in machine load over every entry alike; the order
    rotates each slice so no entry always goes first.
    """
    names = list(calls)
    for name in names:
        calls[name]()
    times: dict[str, list[float]] = {k: [] for k in names}
    per_slice = max(1, MAX_RUNS // SLICES)
    for s in range(SLICES):
        for j in range(len(names)):
            name = names[(s + j) % len(names)]
            fn, runs = calls[name], times[name]
            time.sleep(SWITCH_PAUSE)
            end, n = time.perf_counter() + seconds / SLICES, 0
            while n < per_slice and (n == 0 or time.perf_counter() < end):
                start = time.perf_counter()
                fn()
                runs.append(time.perf_counter() - start)
                n += 1
    return times


def _row(f: _Format, batch: int, threads: int, mode: str, times: list[float]) -> BenchRow:
    p50, p99 = (float(np.percentile(times, q)) * 1000 for q in (50, 99))
    p50, p99 = max(p50, 1e-6), max(p99, p50, 1e-6)  # a timer tick of 0 would make img/s infinite
    return BenchRow(
        f.label, batch, threads, mode, img_s=round(1000 * batch / p50, 1),
        p50_ms=round(p50 / batch, 3), p99_ms=round(p99 / batch, 3),
        batch_p50_ms=round(p50, 3), batch_p99_ms=round(p99, 3), runs=len(times),
        accuracy=f.accuracy, accuracy_delta=f.vs_fp32, accuracy_on=f.on,
    )


# -- the recommendation ------------------------------------------------------------------------


def _recommend(rows: list[BenchRow], formats: list[_Format]) -> str:
    """The fastest end-to-end bundle setting within ACCURACY_TOLERANCE points of fp32, in one
    line, with its speed ratio to fp32 at the same batch and threads."""
    base = formats[0]
    bundles = [f for f in formats if not f.torch]
    known = any(f.vs_fp32 is not None for f in bundles[1:])
    ok = {f.label: f for f in bundles if f is base or (f.vs_fp32 is not None and f.vs_fp32 >= -ACCURACY_TOLERANCE)}
    e2e = [r for r in rows if r.mode == "e2e" and r.format in ok]
    best = max(e2e, key=lambda r: r.img_s)
    where = f"batch {best.batch}, {best.threads} thread{'s' if best.threads > 1 else ''}"
    if best.format == base.label:
        why = ""
        kept = [label for label in ok if label != base.label]
        if kept:  # they keep the accuracy but are slower on this machine (fp16 without native fp16 maths)
            why = f" (fastest here; {', '.join(kept)} kept the accuracy but ran slower)"
        elif len(bundles) > 1:
            why = (f" (no other format is within {ACCURACY_TOLERANCE:g} pt of its accuracy)" if known
                   else " (no accuracy recorded for the other formats: fastest fp32)")
        return f"{base.label}, {where}: {best.img_s:,.1f} img/s end to end{why}"
    ref = next(r for r in e2e if (r.format, r.batch, r.threads) == (base.label, best.batch, best.threads))
    return (f"{best.format}, {where}: {best.img_s / ref.img_s:.1f}× {base.label} (batch {best.batch}) "
            f"at {signed_points(ok[best.format].vs_fp32 or 0.0)} pt")


def signed_points(points: float) -> str:
    """+0.0 / −0.3 (a real minus sign, as in the table)."""
    return f"{'−' if points < 0 else '+'}{abs(points):.1f}"


# -- the optional torch eager row --------------------------------------------------------------


def _torch_eager(bundle: Bundle) -> tuple[Callable[[np.ndarray, int], Any] | None, str]:
    """The bundle's model rebuilt in torch from ``weights.safetensors`` and the model info in
    ``lensforge.json`` (no pretrained download), as ``run(x, threads)``; or (None, why not).

    ``x`` is what one ``Predictor`` model call takes (classifiers: float32 (N, 3, S, S) →
    scores (N, C); detectors: one prepared image → (boxes, scores, labels), as
    ``Predictor.run_detector``). Never raises: the row is a comparison, not something the
    bench depends on."""
    task = get_task(bundle.task)
    missing = [m for m in task.torch_needs if importlib.util.find_spec(m) is None]
    if missing:
        return None, f"{' and '.join(missing)} not installed (pip install 'lensforge[train]' for this row)"
    try:
        import torch  # the train extra (checked above)

        model = task.torch_model(bundle)
    except Exception as e:  # any failure (unknown backbone, shapes) only drops the row
        log.info("torch eager row skipped", exc_info=True)
        return None, f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:160]}"

    def run(x: np.ndarray, threads: int) -> Any:
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        with torch.inference_mode():
            return task.torch_call(model, x)

    return run, ""


@contextlib.contextmanager
def _torch_threads_kept() -> Iterator[None]:
    """Give torch back its thread count afterwards (when torch is loaded at all)."""
    torch = sys.modules.get("torch")
    before = torch.get_num_threads() if torch is not None else None
    try:
        yield
    finally:
        torch = sys.modules.get("torch")
        if torch is not None and before is not None and torch.get_num_threads() != before:
            torch.set_num_threads(before)
