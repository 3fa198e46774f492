"""fp32 bundle → fp16 or int8 bundle, each verified on the bundle's own held-out images.

    export_fp16   fp16 weights and compute, fp32 inputs/outputs (so the Predictor and every
                  client stay unchanged); max |Δscore| and accuracy of both recorded.
    export_int8   static QDQ quantisation calibrated on the bundle's train images; accuracy
                  (or mAP) of fp32 and int8 and their speed recorded, and the export refused
                  when the drop exceeds ``max_drop`` points.

Both are judged on the same images (:func:`check_records`): the saved test split (else val),
up to :data:`CHECK_IMAGES`, and the record says which (``"checked_on": {"split": "test",
"images": 500, "of": 812}``), so the fp32 and fp16/int8 figures a table shows side by side,
and the int8 keep/refuse decision, come from one image set that is large enough to decide.

Both write a new bundle (``atomic_directory``: nothing appears on failure) with
``"precision"``, ``"source_bundle"`` and an ``"export"`` record in ``lensforge.json``.
No torch here: this runs on a serving install.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from onnxruntime.quantization import CalibrationDataReader

from lensforge.data.records import Record
from lensforge.errors import DataError, ExportError, ImageError
from lensforge.evaluation import headline_metric, metric_points, score_records
from lensforge.export import DEFAULT_CALIB
from lensforge.hardware import describe, has_int8_dot
from lensforge.heldout import held_out, saved_splits
from lensforge.runtime.bundle import (
    META_FILE,
    MODEL_FILE,
    SPLIT_FILE,
    WEIGHTS_FILE,
    Bundle,
    as_bundle,
    atomic_directory,
    staging_directory,
    write_meta,
)
from lensforge.runtime.predictor import Predictor

log = logging.getLogger(__name__)

# Held-out images an fp16/int8 export is judged on. A 32-image check put an fp16 figure of
# 96.9 % beside fp32's 78.2 % on the 500-image test split (issue 12): on few images one image
# is 3 points. 500 makes one image 0.2 point, well under the 1-point --max-drop, and costs
# about 2 × 500 model calls: seconds for the classifiers this exports on a CPU.
CHECK_IMAGES = 500
SPEED_BATCH = 8
METHODS = ("static", "dynamic")


# -- public API --------------------------------------------------------------------------------


def _refuse_detectors(src: Bundle) -> None:
    if src.task == "detect":
        raise ExportError(
            f"{src.path} is a detector: fp16 and int8 conversion is built for classifiers (accuracy-checked); "
            "serve the verified fp32 model.onnx, or export it with --to triton / --to torchserve"
        )


def export_fp16(bundle: str | os.PathLike[str] | Bundle, out: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
    """Write an fp16 copy of ``bundle`` to ``out``; returns ``out``.

    The graph's weights and arithmetic are float16; its input ``images`` and output ``scores``
    stay float32 (N, 3, S, S) → (N, C), so the bundle loads in :class:`Predictor` unchanged.
    Verified right away on :func:`check_records` (the saved test, else val, split, up to
    :data:`CHECK_IMAGES` images): the max absolute score difference, the accuracy (or mAP) of
    each model on those images, which images (``checked_on``) and their speed (model only,
    batch 8) go to ``lensforge.json["export"]``. On CPUs without native fp16 arithmetic
    ORT casts around most kernels, so expect it to be slower than fp32 there: it is measured.
    """
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    src = as_bundle(bundle)
    out = Path(out)
    _refuse_detectors(src)
    _check_out(src, out, overwrite)
    records, split_name, split_size = check_records(src)
    # the check serve and predict make: a truncated or hostile model.onnx (external data
    # leading out of the bundle) is one BundleError here, before onnx.load reads anything
    ref = Predictor(src)
    with atomic_directory(out, overwrite=overwrite) as tmp:
        model = onnx.load(str(src.model_path))
        try:
            half = convert_float_to_float16(model, keep_io_types=True)
        except Exception as e:  # the converter raises plain ValueError/KeyError on graphs it cannot handle
            raise ExportError(f"fp16 conversion of {src.model_path} failed: {type(e).__name__}: {e}") from e
        onnx.save(half, str(tmp / MODEL_FILE))
        _copy_files(src, tmp)
        new = _meta_for(src, tmp, "fp16")
        cand = Predictor(Bundle(tmp, new))
        record: dict[str, Any] = {"converter": "onnxruntime.transformers.float16 (keep_io_types=True)", "cpu": describe()}
        if records:
            y, s32, s16 = _scores_pair(ref, cand, src, records)
            name = headline_metric(src)
            record.update({
                "checked_on": checked_on(split_name, len(s32), split_size),
                "max_abs_diff": float(np.abs(s32 - s16).max()) if len(s32) else None,
                "metric": name,
                "fp32": metric_points(src, y, s32),
                "fp16": metric_points(src, y, s16),
            })
            batch = _speed_batch(ref, records)
        else:
            log.warning("%s has no saved val/test images (or its data is gone): fp16 scores not checked", src.path)
            record["checked_on"] = None
            batch = _random_batch(src)
        record["images_per_s"] = {"batch": SPEED_BATCH, **throughput({"fp32": ref, "fp16": cand}, batch)}
        new["export"] = record
        write_meta(tmp, new)
    log.info("fp16 bundle written to %s", out)
    return out


def export_int8(
    bundle: str | os.PathLike[str] | Bundle,
    out: str | os.PathLike[str],
    *,
    calib: int = DEFAULT_CALIB,
    calib_dir: str | os.PathLike[str] | None = None,
    max_drop: float = 1.0,
    force: bool = False,
    method: str = "static",
    overwrite: bool = False,
) -> Path:
    """Write an int8 copy of ``bundle`` to ``out``; returns ``out``.

    method "static": QDQ graph (QuantizeLinear/DequantizeLinear around each quantised op),
        activations uint8 per tensor, weights int8 per output channel (ORT's recommended
        U8S8 for x86 CPUs), MinMax ranges from up to ``calib`` images of the bundle's train
        split (or of ``calib_dir``), preprocessed exactly as the Predictor does.
    method "dynamic": weights only (``quantize_dynamic``), activations quantised at run time
        per batch; needs no calibration images.

    The fp32 and int8 models are then scored on :func:`check_records` (the saved test, else
    val, split, up to :data:`CHECK_IMAGES` images); accuracy (mAP for multi-label) in points,
    the drop, which images (``checked_on``) and the speed of both (model only, batch 8,
    measured side by side) go to ``lensforge.json["export"]``. A drop above ``max_drop``
    points raises :class:`AccuracyRefused` (an :class:`ExportError` carrying those figures)
    and writes nothing, unless ``force``; the decision and the record use the same images.
    """
    if method not in METHODS:
        raise ExportError(f"unknown int8 method {method!r}; use one of {', '.join(METHODS)}")
    if method == "static" and calib < 1:
        raise ExportError(f"calib must be at least 1 image, got {calib}")
    src = as_bundle(bundle)
    out = Path(out)
    _refuse_detectors(src)
    _check_out(src, out, overwrite)
    calib_images = _calibration_images(src, calib, calib_dir) if method == "static" else ([], "")
    records, split_name, split_size = check_records(src)
    if not records and not force:
        raise ExportError(
            f"{src.path} has no saved test/val images to check int8 accuracy on (or its data is gone); "
            "pass --force to export unchecked"
        )
    ref = Predictor(src)
    # scratch beside the output, not in the system temp dir: a kill -9 leaves it where the next
    # export there sweeps it (see staging_directory)
    with staging_directory(out.parent, f"{out.name}.work") as work, _tempfiles_in(work):
        model_file = work / MODEL_FILE
        settings = _quantize(src, ref, calib_images, method, model_file)
        with atomic_directory(out, overwrite=overwrite) as tmp:
            shutil.copyfile(model_file, tmp / MODEL_FILE)
            _copy_files(src, tmp)
            new = _meta_for(src, tmp, "int8")
            cand = Predictor(Bundle(tmp, new))
            record: dict[str, Any] = {**settings, "cpu": describe(), "int8_dot": has_int8_dot()}
            if records:
                y, s32, s8 = _scores_pair(ref, cand, src, records)
                fp32, int8 = metric_points(src, y, s32), metric_points(src, y, s8)
                drop = None if fp32 is None or int8 is None else round(fp32 - int8, 2)
                name = headline_metric(src)
                record.update({
                    "checked_on": checked_on(split_name, len(s32), split_size),
                    "metric": name, "fp32": fp32, "int8": int8, "drop_points": drop,
                    "max_abs_diff": float(np.abs(s32 - s8).max()) if len(s32) else None,
                })
                if drop is not None and drop > max_drop and not force:
                    hint = "--calib more images" if method == "static" else "method static with calibration images"
                    raise AccuracyRefused(
                        f"int8 {name} {int8:.1f} vs fp32 {fp32:.1f}: drop {drop:.1f} points > --max-drop {max_drop:g} "
                        f"({describe_checked(record['checked_on'])}); pass --force to keep it, or {hint}",
                        {k: record[k] for k in ("checked_on", "metric", "fp32", "int8", "drop_points")},
                    )
                batch = _speed_batch(ref, records)
            else:
                record["checked_on"] = None
                batch = _random_batch(src)
            speed = throughput({"fp32": ref, "int8": cand}, batch)
            record["images_per_s"] = {"batch": SPEED_BATCH, **speed}
            record["speedup"] = round(speed["int8"] / speed["fp32"], 3)
            if not has_int8_dot():
                record["note"] = "no VNNI/AMX int8 dot product on this CPU: int8 runs on AVX2 u8*s8, speed measured here"
            new["export"] = record
            write_meta(tmp, new)
    log.info("int8 bundle written to %s", out)
    return out


class AccuracyRefused(ExportError):
    """The int8 accuracy guard refused the export; ``record`` holds the figures it decided on
    (``checked_on``, ``metric``, ``fp32``, ``int8``, ``drop_points``), for reports."""

    def __init__(self, message: str, record: dict[str, Any]) -> None:
        super().__init__(message)
        self.record = record


def check_records(src: Bundle) -> tuple[list[Record], str | None, int]:
    """The held-out images fp16/int8 exports are judged on: (records, split name, size of that
    split). The saved test split, else val; beyond :data:`CHECK_IMAGES`, that many spread
    evenly over it (the split is sorted by path, so evenly spread keeps every class)."""
    records, split = held_out(src, ("test", "val"))
    if len(records) <= CHECK_IMAGES:
        return records, split, len(records)
    idx = np.unique(np.linspace(0, len(records) - 1, CHECK_IMAGES).round().astype(int))
    return [records[i] for i in idx], split, len(records)


def checked_on(split: str | None, images: int, of: int) -> dict[str, Any]:
    """An export record's ``checked_on``: the split, the images scored (unreadable ones left
    out) and how many the split holds."""
    return {"split": split, "images": images, "of": of}


def describe_checked(checked: Any) -> str:
    """``checked_on`` in words: "500 of the 812 test images", "80 test images"; "unchecked"
    for none, and older records' text as it is."""
    if isinstance(checked, str):
        return checked
    if not isinstance(checked, dict) or not checked.get("images"):
        return "unchecked"
    n, of, split = checked["images"], checked.get("of"), checked.get("split")
    return f"{n} of the {of} {split} images" if isinstance(of, int) and of > n else f"{n} {split} images"


def throughput(predictors: dict[str, Predictor], batch: np.ndarray, rounds: int = 10, warmup: int = 2) -> dict[str, float]:
    """Images/s of each predictor's model alone on ``batch`` (float32 (N, 3, S, S)).

    Measured side by side: the predictors take turns within each round, so a noisy
    neighbour on the machine slows all of them alike; the median round counts.
    """
    for _ in range(warmup):
        for p in predictors.values():
            p.run(batch)
    times: dict[str, list[float]] = {k: [] for k in predictors}
    for _ in range(rounds):
        for k, p in predictors.items():
            t = time.perf_counter()
            p.run(batch)
            times[k].append(time.perf_counter() - t)
    return {k: round(len(batch) / statistics.median(v), 1) for k, v in times.items()}


# -- quantisation --------------------------------------------------------------------------------


class _CalibrationReader(CalibrationDataReader):
    """Feeds images preprocessed by the Predictor to ORT's calibrator, ``batch`` at a time;
    unreadable images are skipped with a warning and not counted in ``used``."""

    def __init__(self, predictor: Predictor, paths: Sequence[Path], batch: int = SPEED_BATCH) -> None:
        self.predictor, self.paths, self.batch = predictor, list(paths), batch
        self.used = 0
        self._it: Iterator[dict[str, np.ndarray]] = self._batches()

    def _batches(self) -> Iterator[dict[str, np.ndarray]]:
        arrays: list[np.ndarray] = []
        for p in self.paths:
            try:
                arrays.append(self.predictor.prepare(p))
            except ImageError as e:
                log.warning("calibration image %s skipped: %s", p, e)
                continue
            self.used += 1
            if len(arrays) == self.batch:
                yield {self.predictor.input_name: np.stack(arrays)}
                arrays = []
        if arrays:
            yield {self.predictor.input_name: np.stack(arrays)}

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)

    def rewind(self) -> None:
        self.used, self._it = 0, self._batches()


def _quantize(
    src: Bundle, ref: Predictor, calib: tuple[list[Path], str], method: str, dest: Path
) -> dict[str, Any]:
    """Quantise ``src``'s model into ``dest``; returns the settings to record."""
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    calib_paths, calib_source = calib
    # ORT's docs suggest 7-bit weights (reduce_range) on CPUs without VNNI, against u8*s8
    # saturation in AVX2's vpmaddubsw; measured on this AVX2 machine it cost accuracy instead
    # (colour probe, 40 images: 87.5% with reduce_range vs 97.5% without, fp32 100%), so full 8 bits.
    reduce_range = False
    prepped = dest.with_name("preprocessed.onnx")
    try:
        # symbolic shape inference + graph optimisation (BN folding etc.), as the ORT docs advise
        quant_pre_process(str(src.model_path), str(prepped), skip_symbolic_shape=False)
        model_in = prepped
    except Exception as e:  # noqa: BLE001 - a graph the pre-processor cannot handle still quantises without it
        log.warning("quant_pre_process failed (%s: %s); quantising the model as exported", type(e).__name__, e)
        model_in = src.model_path
    try:
        if method == "dynamic":
            # ConvInteger has only a u8×u8 kernel in ORT's CPU provider, hence QUInt8 weights
            quantize_dynamic(str(model_in), str(dest), weight_type=QuantType.QUInt8, per_channel=False,
                             reduce_range=reduce_range)
            return {"method": "dynamic", "weight": "QUInt8", "per_channel": False, "reduce_range": reduce_range}
        reader = _CalibrationReader(ref, calib_paths)
        float_nodes = _input_convs(Path(model_in))
        quantize_static(
            str(model_in), str(dest), reader, quant_format=QuantFormat.QDQ, per_channel=True,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, reduce_range=reduce_range,
            calibrate_method=CalibrationMethod.MinMax, nodes_to_exclude=float_nodes,
        )
    except ExportError:
        raise
    except Exception as e:  # ORT raises plain RuntimeError/ValueError/its own Fail types
        raise ExportError(f"int8 quantisation of {src.model_path} failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}") from e
    if reader.used == 0:
        raise ExportError(f"none of the {len(calib_paths)} calibration images could be read")
    return {
        "method": "static", "format": "QDQ", "activation": "QUInt8", "weight": "QInt8", "per_channel": True,
        "reduce_range": reduce_range, "calibrate_method": "MinMax", "float_nodes": float_nodes,
        "calibration": {"images": reader.used, "source": calib_source},
    }


def _input_convs(model_path: Path) -> list[str]:
    """The convolutions reading the image input directly: kept in float.

    Quantising the stem convolution costs the most accuracy for the least speed (3 input
    channels, a few % of the FLOPs). Measured on a probe on sklearn digits at 64 px (80 test
    images): all layers int8 83.75% vs fp32 87.5%; the stem in float 87.5%, mean |Δscore|
    0.017 → 0.012. Keeping the classifier head in float instead changed nothing (83.75%).
    """
    import onnx

    graph = onnx.load(str(model_path), load_external_data=False).graph
    inputs = {i.name for i in graph.input} - {t.name for t in graph.initializer}
    return [n.name for n in graph.node if n.op_type == "Conv" and n.input and n.input[0] in inputs]


def _calibration_images(
    src: Bundle, calib: int, calib_dir: str | os.PathLike[str] | None
) -> tuple[list[Path], str]:
    """(up to ``calib`` image paths, where they came from): spread evenly over the train split
    (sorted by path, so evenly spread means every class), or over ``calib_dir``'s images."""
    source = "train split"
    if calib_dir is not None:
        from lensforge.data.formats import list_images

        d = Path(calib_dir)
        if not d.is_dir():
            raise ExportError(f"calibration folder {d} is not a directory")
        found = list_images([d])
        source = str(d)
        if not found:
            raise ExportError(f"calibration folder {d} holds no images")
    else:
        try:
            splits, _ = saved_splits(src)
        except DataError as e:
            raise ExportError(f"the bundle's training images cannot be read ({e}); pass calib_dir=...") from None
        found = [r.path for r in (splits or {}).get("train", [])]
        if not found:
            raise ExportError(f"{src.path} has no split.json with train images; pass calib_dir=...")
    idx = np.unique(np.linspace(0, len(found) - 1, min(calib, len(found))).round().astype(int))
    return [Path(found[i]) for i in idx], source


# -- held-out images, scores, metrics -----------------------------------------------------------


def _scores_pair(ref: Predictor, cand: Predictor, src: Bundle, records: list[Record]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Targets and both models' scores on the records both could read."""
    done, y, s_ref, failed = score_records(ref, records)
    if failed:
        log.warning("%d held-out image(s) could not be read, e.g. %s", len(failed), failed[0][0].path)
    _, _, s_cand, _ = score_records(cand, done)
    return y, s_ref, s_cand


def _speed_batch(ref: Predictor, records: list[Record]) -> np.ndarray:
    """A batch of 8 real held-out images (repeated if there are fewer)."""
    arrays = []
    for r in records[:SPEED_BATCH]:
        try:
            arrays.append(ref.prepare(r.path))
        except ImageError:
            continue
    if not arrays:
        return _random_batch(ref.bundle)
    return np.stack([arrays[i % len(arrays)] for i in range(SPEED_BATCH)])


def _random_batch(src: Bundle) -> np.ndarray:
    s = src.input_spec.size
    return np.random.default_rng(0).standard_normal((SPEED_BATCH, 3, s, s), dtype=np.float32)


# -- bundle plumbing -----------------------------------------------------------------------------


@contextlib.contextmanager
def _tempfiles_in(folder: Path) -> Iterator[None]:
    """Point :mod:`tempfile` at ``folder`` for the block.

    ORT's quantiser and pre-processor write their scratch models (tens of MB) to
    ``tempfile.TemporaryDirectory()`` and take no directory argument; a ``kill -9`` would
    leave them in the system temp dir, where nothing can tell whose they are. Inside our
    staging folder the next run sweeps them. Process-wide for the block's duration: an
    export is the only work of the process that runs it (CLI, tests, notebooks).
    """
    before = tempfile.tempdir
    tempfile.tempdir = str(folder)
    try:
        yield
    finally:
        tempfile.tempdir = before


def _check_out(src: Bundle, out: Path, overwrite: bool) -> None:
    """Refuse before any slow work: an existing ``out`` without overwrite, or ``out`` = the source."""
    if out.exists() and out.resolve() == src.path.resolve():
        raise ExportError(f"the output {out} is the source bundle itself; choose another directory")
    if out.exists() and not overwrite:
        raise ExportError(f"{out} already exists; pass --overwrite to replace it")


def _copy_files(src: Bundle, tmp: Path) -> None:
    for name in (SPLIT_FILE, WEIGHTS_FILE):  # the torch weights stay fp32: they are for further training
        if (src.path / name).is_file():
            shutil.copyfile(src.path / name, tmp / name)


def _meta_for(src: Bundle, tmp: Path, precision: str) -> dict[str, Any]:
    """The source's metadata for the new model, written at once so a Predictor can load it."""
    meta = json.loads(json.dumps(src.meta))  # a deep copy of plain JSON
    meta.pop("format_version", None)
    meta.pop("export", None)
    meta.setdefault("model", {})["file"] = MODEL_FILE
    meta["precision"] = precision
    meta["source_bundle"] = str(src.path.resolve())
    write_meta(tmp, meta)
    return json.loads((tmp / META_FILE).read_text())
