"""fp32 bundle → fp16 or int8 bundle, each verified on the bundle's own held-out images.

    export_fp16   fp16 weights and compute, fp32 inputs/outputs (so the Predictor and every
                  client stay unchanged); max |Δscore| and accuracy of both recorded.
    export_int8   static QDQ quantisation calibrated on the bundle's train images (MinMax,
                  entropy or percentile ranges; ``auto`` tries each, with the classifier head
                  in int8 and in float, and keeps the best on the val split); accuracy (mAP,
                  mAP50 for detectors) of fp32 and int8 and their speed recorded, and the
                  export refused when the drop exceeds ``max_drop`` points.

Detectors: int8 quantises the backbone + FPN, the RPN's shared convolution and the box head's
two fully connected layers (``auto`` also tries those heads in float); proposals, RoIAlign,
the class / box predictors and NMS stay float32. fp16 converts the backbone + FPN.

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
import dataclasses
import io
import json
import logging
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from onnxruntime.quantization import CalibrationDataReader

from lensforge.data.records import Record
from lensforge.errors import DataError, ExportError, ImageError
from lensforge.evaluation import headline_metric
from lensforge.export import DEFAULT_CALIB
from lensforge.export.half import HALF_OPS, half_island
from lensforge.hardware import describe, has_int8_dot
from lensforge.heldout import held_out, saved_splits
from lensforge.runtime.bundle import (
    EXPLAIN_FILE,
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
from lensforge.tasks import get_task
from lensforge.tasks.base import Scored
from lensforge.ui import Reporter

log = logging.getLogger(__name__)

# Held-out images an fp16/int8 export is judged on. A 32-image check put an fp16 figure of
# 96.9 % beside fp32's 78.2 % on the 500-image test split (issue 12): on few images one image
# is 3 points. 500 makes one image 0.2 point, well under the 1-point --max-drop, and costs
# about 2 × 500 model calls: seconds for the classifiers this exports on a CPU.
CHECK_IMAGES = 500
SPEED_BATCH = 8
CALIBRATIONS = ("minmax", "entropy", "percentile")  # how static int8 sets activation ranges
METHODS = ("auto", *CALIBRATIONS, "dynamic")  # --method; "static" is still read as "minmax"
_BACKBONE = "/backbone/"  # torchvision detectors' backbone + FPN nodes, as torch.onnx names them
# what a detector's int8 graph quantises: the convolutions with the activations, residual adds,
# pools and FPN upsampling between them, so that int8 tensors flow from one convolution to the
# next. Convolutions alone left a DequantizeLinear + float Clip + QuantizeLinear on every
# full-size activation (Lite0-FPN at 512x764: int8 model 98 ms vs fp32 120 ms; with these, 81 ms).
_DETECTOR_OPS = {"Conv", "Relu", "Clip", "Add", "MaxPool", "Resize", "Gemm"}
# heads whose int8 form --method auto also tries in float: the RPN's shared 3x3 convolution
# (run on every FPN level) and the box head's two fully connected layers (8.7 → 3.7 ms at 300
# proposals). The 1x1 objectness / box-offset convolutions and the class / box predictor stay
# float: their outputs are logits and regressed offsets. Chess pieces (Roboflow, 29 test photos):
# map50 97.03 with and without these in int8 (fp32 97.31).
_DETECTOR_HEADS = ("/rpn/head/conv/", "/roi_heads/box_head/")


def _ort_method(name: str) -> Any:
    """ORT's CalibrationMethod for one of :data:`CALIBRATIONS` (imported late: CLI import cost)."""
    from onnxruntime.quantization import CalibrationMethod

    return {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
            "percentile": CalibrationMethod.Percentile}[name]


# -- public API --------------------------------------------------------------------------------


def export_fp16(bundle: str | os.PathLike[str] | Bundle, out: str | os.PathLike[str], *, max_drop: float | None = None,
                force: bool = False, overwrite: bool = False, reporter: Reporter | None = None) -> Path:
    """Write an fp16 copy of ``bundle`` to ``out``; returns ``out``.

    The graph's weights and arithmetic are float16; its input ``images`` and outputs stay
    float32, so the bundle loads in :class:`Predictor` unchanged. Detectors: the backbone + FPN
    only (:func:`~lensforge.export.half.half_island`), the box decoding and NMS stay float32.
    Verified right away on :func:`check_records` (the saved test, else val, split, up to
    :data:`CHECK_IMAGES` images): the max absolute score difference (classifiers), the
    accuracy (or mAP, mAP50 for detectors) of each model on those images, which images
    (``checked_on``) and their speed go to ``lensforge.json["export"]``. With ``max_drop``
    a drop above it raises :class:`AccuracyRefused` unless ``force``. On CPUs without native
    fp16 arithmetic ORT casts around most kernels, so expect it to be slower than fp32 there:
    it is measured.
    """
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    src = as_bundle(bundle)
    out = Path(out)
    _check_out(src, out, overwrite)
    records, split_name, split_size = check_records(src)
    # the check serve and predict make: a truncated or hostile model.onnx (external data
    # leading out of the bundle) is one BundleError here, before onnx.load reads anything
    ref = Predictor(src)
    with atomic_directory(out, overwrite=overwrite) as tmp:
        model = onnx.load(str(src.model_path))
        try:
            if src.task == "detect":  # ORT's converter breaks the box-decoding If subgraphs: see export.half
                half = half_island(model, {n.name for n in model.graph.node
                                           if _BACKBONE in n.name and n.op_type in HALF_OPS})
                converter = "lensforge.export.half (backbone + FPN in float16, the rest float32)"
            else:
                half = convert_float_to_float16(model, keep_io_types=True)
                converter = "onnxruntime.transformers.float16 (keep_io_types=True)"
        except Exception as e:  # the converters raise plain ValueError/KeyError/ValidationError on graphs they cannot handle
            raise ExportError(f"fp16 conversion of {src.model_path} failed: {type(e).__name__}: {e}") from e
        onnx.save(half, str(tmp / MODEL_FILE))
        _copy_files(src, tmp)
        new = _meta_for(src, tmp, "fp16")
        cand = Predictor(Bundle(tmp, new))
        record: dict[str, Any] = {"converter": converter, "cpu": describe()}
        if records:
            record.update(_compare(src, ref, cand, records, "fp16", reporter))
            record["checked_on"] = checked_on(split_name, record.pop("images"), split_size)
            _guard(record, "fp16", max_drop, force, hint="serve the fp32 model")
        else:
            log.warning("%s has no saved val/test images (or its data is gone): fp16 scores not checked", src.path)
            record["checked_on"] = None
        record.update(_speed(src, ref, cand, records, "fp16"))
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
    method: str = "auto",
    overwrite: bool = False,
    reporter: Reporter | None = None,
) -> Path:
    """Write an int8 copy of ``bundle`` to ``out``; returns ``out``.

    method "minmax" / "entropy" / "percentile" (:data:`CALIBRATIONS`): static QDQ graph
        (QuantizeLinear/DequantizeLinear around each quantised op), activations uint8 per
        tensor, weights int8 per output channel (ORT's recommended U8S8 for x86 CPUs), the
        activation ranges calibrated that way on up to ``calib`` images of the bundle's train
        split (or of ``calib_dir``), preprocessed exactly as the Predictor does. The first
        convolution stays float; detectors quantise the backbone and FPN convolutions only.
    method "auto" (default): every calibration, and for classifiers each with the head in
        int8 and in float and with the first block after the stem (:func:`_first_block`) in
        int8 and in float, scored on the val split (:func:`_pick`); the best is kept and the
        candidates' figures recorded (``export["auto"]``). Chosen on val, judged on test: the
        drop recorded is not flattered by the choice (when the bundle has only one held-out
        split, both are the same images, and ``auto["chosen_on"]`` says so).
    method "dynamic": weights only (``quantize_dynamic``), activations quantised at run time
        per batch; needs no calibration images. "static" is the old name of "minmax".

    ``reporter`` shows progress: calibration, each candidate scored, the final check (minutes
    for a detector on full-size photos).

    The fp32 and int8 models are then scored on :func:`check_records` (the saved test, else
    val, split, up to :data:`CHECK_IMAGES` images); accuracy (mAP for multi-label, mAP50 for
    detectors) in points, the drop, which images (``checked_on``) and the speed of both
    (measured side by side) go to ``lensforge.json["export"]``. A drop above ``max_drop``
    points raises :class:`AccuracyRefused` (an :class:`ExportError` carrying those figures)
    and writes nothing, unless ``force``; the decision and the record use the same images.
    """
    method = "minmax" if method == "static" else method
    ui = reporter or Reporter()
    if method not in METHODS:
        raise ExportError(f"unknown int8 method {method!r}; use one of {', '.join(METHODS)}")
    if method != "dynamic" and calib < 1:
        raise ExportError(f"calib must be at least 1 image, got {calib}")
    src = as_bundle(bundle)
    out = Path(out)
    _check_out(src, out, overwrite)
    calib_images = _calibration_images(src, calib, calib_dir) if method != "dynamic" else ([], "")
    records, split_name, split_size = check_records(src)
    if not records and not force:
        raise ExportError(
            f"{src.path} has no saved test/val images to check int8 accuracy on (or its data is gone); "
            "pass --force to export unchecked"
        )
    if method == "auto" and not records:  # nothing to choose on (--force): the cheapest calibration
        log.warning("%s has no held-out images to choose a calibration on: int8 calibrated by minmax", src.path)
        method = "minmax"
    ref = Predictor(src)
    # scratch beside the output, not in the system temp dir: a kill -9 leaves it where the next
    # export there sweeps it (see staging_directory)
    with staging_directory(out.parent, f"{out.name}.work") as work, _tempfiles_in(work):
        model_file, settings = _quantize(src, ref, calib_images, method, work, (records, split_name, split_size), ui)
        with atomic_directory(out, overwrite=overwrite) as tmp:
            shutil.copyfile(model_file, tmp / MODEL_FILE)
            _copy_files(src, tmp)
            new = _meta_for(src, tmp, "int8")
            cand = Predictor(Bundle(tmp, new))
            record: dict[str, Any] = {**settings, "cpu": describe(), "int8_dot": has_int8_dot()}
            if records:
                record.update(_compare(src, ref, cand, records, "int8", ui))
                record["checked_on"] = checked_on(split_name, record.pop("images"), split_size)
                hint = "--calib more images" if method != "dynamic" else "a calibrated --method"
                _guard(record, "int8", max_drop, force, hint=hint)
            else:
                record["checked_on"] = None
            record.update(_speed(src, ref, cand, records, "int8"))
            if not has_int8_dot():
                record["note"] = "no VNNI/AMX int8 dot product on this CPU: int8 runs on AVX2 u8*s8, speed measured here"
            new["export"] = record
            write_meta(tmp, new)
    log.info("int8 bundle written to %s (%s)", out, settings.get("chosen_by", settings["method"]))
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
    return _spread(records, CHECK_IMAGES), split, len(records)


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


def _guard(record: dict[str, Any], precision: str, max_drop: float | None, force: bool, hint: str) -> None:
    """Raise :class:`AccuracyRefused` when ``record``'s drop exceeds ``max_drop`` (and not ``force``)."""
    drop = record.get("drop_points")
    if max_drop is None or drop is None or drop <= max_drop or force:
        return
    name, fp32, own = record["metric"], record["fp32"], record[precision]
    raise AccuracyRefused(
        f"{precision} {name} {own:.1f} vs fp32 {fp32:.1f}: drop {drop:.1f} points > --max-drop {max_drop:g} "
        f"({describe_checked(record['checked_on'])}); pass --force to keep it, or {hint}",
        {k: record[k] for k in ("checked_on", "metric", "fp32", precision, "drop_points")},
    )


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
    """Feeds images preprocessed by the Predictor to ORT's calibrator, ``batch`` at a time
    (detectors: one image, their graph takes (1, 3, h, w)); unreadable images are skipped
    with a warning and not counted in ``used``."""

    def __init__(self, predictor: Predictor, paths: Sequence[Path], batch: int = SPEED_BATCH) -> None:
        self.predictor, self.paths = predictor, list(paths)
        self.batch = 1 if predictor.detector else batch
        self.used = 0
        self._it: Iterator[dict[str, np.ndarray]] = self.batches()

    def batches(self) -> Iterator[dict[str, np.ndarray]]:
        arrays: list[np.ndarray] = []
        self.used = 0
        for p in self.paths:
            try:
                x = self.predictor.prepare(p)
            except ImageError as e:
                log.warning("calibration image %s skipped: %s", p, e)
                continue
            arrays.append(np.asarray(getattr(x, "pixels", x), dtype=np.float32))
            self.used += 1
            if len(arrays) == self.batch:
                yield {self.predictor.input_name: np.stack(arrays)}
                arrays = []
        if arrays:
            yield {self.predictor.input_name: np.stack(arrays)}

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = self.batches()


@contextlib.contextmanager
def _quiet_ort() -> Iterator[None]:
    """ORT's histogram calibrators print() a line per batch ("Collecting tensor data and making
    histogram ...") and their thresholds: 1000 images flooded the terminal around the progress
    bar. Their stdout goes to the debug log instead (only around ORT's calls, not our bars)."""
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            yield
    finally:
        if buf.getvalue().strip():
            log.debug("onnxruntime calibration: %s", buf.getvalue().strip())


class _OneBatch(CalibrationDataReader):
    """A reader of a single batch: what each ``collect_data`` call of :func:`_calibrate` gets."""

    def __init__(self, batch: dict[str, np.ndarray]) -> None:
        self._batch: dict[str, np.ndarray] | None = batch

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch, self._batch = self._batch, None
        return batch


def _calibrate(model_in: Path, calibration: str, reader: _CalibrationReader, op_types: list[str] | None, cache: Path,
               advance: Callable[[int], None] = lambda n: None) -> None:
    """Activation ranges of ``model_in`` by ``calibration`` into ``cache`` (ORT's JSON calibration
    cache, which ``quantize_static(calibration_cache_path=...)`` then reads).

    One ``collect_data`` call per batch, not one for the whole reader as ``quantize_static``
    makes: the entropy and percentile collectors ``np.asarray`` the list of a call's batches,
    which fails when the last batch is shorter (ORT's uneven-batch problem) or when detector
    images differ in size, and they hold every activation of every batch of a call in memory
    (GBs for 1000 images). Per batch, histograms merge across calls and MinMax keeps the
    running min/max, so the result is the same as one call over equal batches.
    """
    from onnxruntime.quantization.calibrate import create_calibrator, save_tensors_data

    calibrator = create_calibrator(model_in, op_types, augmented_model_path=str(cache.with_suffix(".augmented.onnx")),
                                   calibrate_method=_ort_method(calibration))
    try:
        for batch in reader.batches():
            with _quiet_ort():
                calibrator.collect_data(_OneBatch(batch))
            advance(len(next(iter(batch.values()))))
        if reader.used == 0:
            raise ExportError(f"none of the {len(reader.paths)} calibration images could be read")
        with _quiet_ort():
            save_tensors_data(calibrator.compute_data(), cache)
    finally:
        del calibrator  # its InferenceSession holds the augmented model open


@dataclass
class _Plan:
    """What a static int8 export quantises: ``op_types`` (None: every op ORT can), ``nodes``
    (None: all of those), ``float_nodes`` always kept float, ``head`` the nodes a candidate
    may also keep float (the classifier's last Gemm/MatMul), ``first_block`` those it may keep
    float on the image side (:func:`_first_block`)."""

    op_types: list[str] | None
    nodes: list[str] | None
    float_nodes: list[str]
    head: list[str]
    first_block: list[str] = dataclasses.field(default_factory=list)


def _plan(src: Bundle, model_path: Path) -> _Plan:
    import onnx

    graph = onnx.load(str(model_path), load_external_data=False).graph
    convs = _input_convs(graph)
    consumers = _consumers(graph)
    stem = convs + _stem_pools(graph, convs, consumers)  # the float nodes
    if src.task == "detect":
        # backbone + FPN (~all of a Faster R-CNN's FLOPs at 800 px), and the heads' inner layers
        # (_DETECTOR_HEADS); the rest is proposal / RoIAlign / NMS bookkeeping ORT has no int8
        # kernels for, or logits and box offsets
        ops = [n for n in graph.node if n.op_type in _DETECTOR_OPS and n.name not in stem]
        backbone = [n.name for n in ops if _BACKBONE in n.name]
        heads = [n.name for n in ops if any(h in n.name for h in _DETECTOR_HEADS)]
        return _Plan(sorted(_DETECTOR_OPS), backbone + heads, stem, heads)
    return _Plan(None, None, stem, _head_nodes(graph), _first_block(graph, convs, consumers))


def _quantize(
    src: Bundle, ref: Predictor, calib: tuple[list[Path], str], method: str, work: Path,
    check: tuple[list[Record], str | None, int], ui: Reporter,
) -> tuple[Path, dict[str, Any]]:
    """Quantise ``src``'s model in ``work``; returns (the int8 model file, the settings to record)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    # ORT's docs suggest 7-bit weights (reduce_range) on CPUs without VNNI, against u8*s8
    # saturation in AVX2's vpmaddubsw; measured on this AVX2 machine it cost accuracy instead
    # (colour probe, 40 images: 87.5% with reduce_range vs 97.5% without, fp32 100%), so full 8 bits.
    reduce_range = False
    prepped = work / "preprocessed.onnx"
    try:
        # symbolic shape inference + graph optimisation (BN folding etc.), as the ORT docs advise;
        # not the symbolic shapes of a detector: on the Faster R-CNN graph (data-dependent box
        # counts) it ran past 100 s without finishing, while the optimisation alone takes 0.6 s
        quant_pre_process(str(src.model_path), str(prepped), skip_symbolic_shape=src.task == "detect")
        model_in = prepped
    except Exception as e:  # noqa: BLE001 - a graph the pre-processor cannot handle still quantises without it
        log.warning("quant_pre_process failed (%s: %s); quantising the model as exported", type(e).__name__, e)
        model_in = src.model_path
    plan = _plan(src, model_in)
    if model_in == prepped:  # never rewrite the bundle's own model file
        _unshare_float_initializers(model_in, plan.float_nodes + plan.first_block + plan.head)
    try:
        if method == "dynamic":
            dest = work / "dynamic.onnx"
            # ConvInteger has only a u8×u8 kernel in ORT's CPU provider, hence QUInt8 weights
            quantize_dynamic(str(model_in), str(dest), weight_type=QuantType.QUInt8, per_channel=False,
                             reduce_range=reduce_range, nodes_to_quantize=plan.nodes, nodes_to_exclude=plan.float_nodes)
            return dest, {"method": "dynamic", "weight": "QUInt8", "per_channel": False, "reduce_range": reduce_range}
        reader = _CalibrationReader(ref, calib[0])
        calibrations = list(CALIBRATIONS) if method == "auto" else [method]
        candidates = []
        for c in calibrations:
            cache = work / f"ranges-{c}.json"
            with ui.track(f"calibrating ({c})", len(reader.paths)) as advance:
                _calibrate(model_in, c, reader, plan.op_types, cache, advance)
            heads = (False, True) if method == "auto" and plan.head else (False,)
            firsts = (False, True) if method == "auto" and plan.first_block else (False,)
            candidates += [_Candidate(c, h, b, _quantize_static(model_in, plan, c, h, b, cache, work))
                           for b in firsts for h in heads]
    except ExportError:
        raise
    except Exception as e:  # ORT raises plain RuntimeError/ValueError/its own Fail types
        raise ExportError(f"int8 quantisation of {src.model_path} failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}") from e
    chosen, auto = _pick(src, ref, candidates, check, ui) if len(candidates) > 1 else (candidates[0], None)
    settings: dict[str, Any] = {
        "method": "static", "format": "QDQ", "activation": "QUInt8", "weight": "QInt8", "per_channel": True,
        "reduce_range": reduce_range, "calibrate_method": chosen.calibration, "float_head": chosen.float_head,
        "float_first_block": chosen.float_first_block,
        "float_nodes": plan.float_nodes + (plan.first_block if chosen.float_first_block else [])
        + (plan.head if chosen.float_head else []),
        "quantized": ("backbone + FPN" + ("" if chosen.float_head else " + RPN conv + box head")
                      if src.task == "detect" else "all but the float nodes"),
        "calibration": {"images": reader.used, "source": calib[1]},
    }
    if auto is not None:
        settings["auto"] = auto
        settings["chosen_by"] = auto["chosen_by"]
    return chosen.path, settings


def _quantize_static(model_in: Path, plan: _Plan, calibration: str, float_head: bool, float_first_block: bool,
                     cache: Path, work: Path) -> Path:
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    dest = work / f"int8-{calibration}{'-float-head' if float_head else ''}{'-float-first-block' if float_first_block else ''}.onnx"
    quantize_static(
        str(model_in), str(dest), None, quant_format=QuantFormat.QDQ, per_channel=True,
        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, reduce_range=False,
        calibrate_method=_ort_method(calibration), calibration_cache_path=str(cache),
        op_types_to_quantize=plan.op_types, nodes_to_quantize=plan.nodes,
        nodes_to_exclude=plan.float_nodes + (plan.first_block if float_first_block else []) + (plan.head if float_head else []),
    )
    return dest


@dataclass
class _Candidate:
    calibration: str
    float_head: bool
    float_first_block: bool
    path: Path

    @property
    def name(self) -> str:
        return (self.calibration + (" + float first block" if self.float_first_block else "")
                + (" + float head" if self.float_head else ""))


def _pick(
    src: Bundle, ref: Predictor, candidates: list[_Candidate], check: tuple[list[Record], str | None, int],
    ui: Reporter | None = None,
) -> tuple[_Candidate, dict[str, Any]]:
    """The candidate with the best held-out metric on the val split (else the check images),
    ties to the smaller mean |Δscore| against fp32 (classifiers), then to the earlier (fewer
    float nodes, MinMax first). Returns it and the ``auto`` record: each candidate's figures."""
    records, split = held_out(src, ("val",))
    if not records or split == check[1]:
        records, split = check[0], check[1]
    records = _spread(records, CHECK_IMAGES)
    if not records:
        return candidates[0], {"chosen_by": f"{candidates[0].name} (no held-out images to choose on)", "candidates": []}
    task = get_task(src.task)
    ui = ui or Reporter()
    with ui.track(f"choosing: fp32 on {split}", len(records)) as advance:
        base = task.score(ref, records, advance)
    rows = []
    for i, c in enumerate(candidates):
        cand = Predictor(Bundle(c.path.parent, {**src.meta, "model": {**src.meta.get("model", {}), "file": c.path.name}}))
        with ui.track(f"choosing: {c.name} ({i + 1}/{len(candidates)}) on {split}", len(base.records)) as advance:
            scored = task.score(cand, base.records, advance)
        points = task.points(src, scored)
        diff = _mean_abs_diff(task, base, scored, len(src.classes))
        rows.append(({"calibration": c.calibration, "float_head": c.float_head,
                      "float_first_block": c.float_first_block, "points": points,
                      "mean_abs_diff": diff}, (-(points if points is not None else -1.0), diff if diff is not None else 0.0, i)))
    best = min(range(len(rows)), key=lambda i: rows[i][1])
    fp32 = task.points(src, base)
    name = headline_metric(src)
    figures = ", ".join(f"{c.name} {r[0]['points']}" for c, r in zip(candidates, rows))
    return candidates[best], {
        "chosen_on": checked_on(split, len(base.records), len(records)),
        "metric": name, "fp32": fp32,
        "candidates": [r[0] for r in rows],
        "chosen_by": f"auto: {candidates[best].name}, best {name} on {len(base.records)} {split} images "
                     f"(fp32 {fp32}; {figures})",
    }


def _mean_abs_diff(task: Any, a: Scored, b: Scored, n_classes: int) -> float | None:
    """Mean |Δscore| between two classifiers' scores on the same images; None for detectors."""
    if not hasattr(task, "arrays") or not a.records:
        return None
    return round(float(np.abs(task.arrays(a, n_classes)[1] - task.arrays(b, n_classes)[1]).mean()), 6)


def _input_convs(graph: Any) -> list[str]:
    """The convolutions reading the image input directly: kept in float.

    Quantising the stem convolution costs the most accuracy for the least speed (3 input
    channels, a few % of the FLOPs). Measured on a probe on sklearn digits at 64 px (80 test
    images): all layers int8 83.75% vs fp32 87.5%; the stem in float 87.5%, mean |Δscore|
    0.017 → 0.012.
    """
    inputs = {i.name for i in graph.input} - {t.name for t in graph.initializer}
    return [n.name for n in graph.node if n.op_type == "Conv" and n.input and n.input[0] in inputs]


def _consumers(graph: Any) -> dict[str, list[Any]]:
    """Tensor name → the nodes that read it."""
    out: dict[str, list[Any]] = {}
    for n in graph.node:
        for i in n.input:
            out.setdefault(i, []).append(n)
    return out


def _stem_pools(graph: Any, stem: list[str], consumers: dict[str, list[Any]]) -> list[str]:
    """The max/average pools right after the float stem (a ResNet's 3x3 max-pool): kept float
    with it, so the int8 graph quantises after the pool, on a quarter of the pixels.

    Why: quantised, ORT ran the pool on uint8 NCHW and the float stem had to leave its
    blocked (NCHWc) layout for it. ResNet-50 at 224 px, batch 8, 2 threads (AVX-512 VNNI EPYC):
    the uint8 pool took 27 ms of a 256 ms int8 run, vs 4 ms for the same pool in float
    NCHWc. Max-pooling commutes with the (monotonic) uint8 quantiser, so where the quantiser
    sits does not change a score.
    """
    if len(stem) != 1:
        return []
    pools: list[str] = []
    out = next(n for n in graph.node if n.name == stem[0]).output[0]
    for _ in range(8):  # stem → activation(s) → pool: a short, single-consumer chain
        users = consumers.get(out, [])
        if len(users) != 1 or users[0].op_type not in ("Relu", "Clip", "BatchNormalization", "MaxPool", "AveragePool"):
            break
        if users[0].op_type in ("MaxPool", "AveragePool"):
            pools.append(users[0].name)
        out = users[0].output[0]
    return pools


def _unshare_float_initializers(model_path: Path, float_nodes: list[str]) -> None:
    """Give the float nodes their own copy of any initializer they share with nodes that may
    be quantised.

    torch's exporter merges equal constants (e.g. the all-zero biases of freshly folded
    batch norms); ORT's quantiser then replaces the shared tensor by its quantised version for
    every consumer, so a float node's bias came out of a DequantizeLinear at run time, which kept
    ORT from fusing that convolution with its activation in the blocked layout (ResNet-50 stem:
    32 ms vs 25 ms per batch of 8). A tensor only float nodes share (a detector's RPN
    convolution, run on every FPN level) stays as it is.
    """
    import onnx

    model = onnx.load(str(model_path))
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    floats = set(float_nodes)
    users: dict[str, list[Any]] = {}
    for n in graph.node:
        for i in n.input:
            if i in inits:
                users.setdefault(i, []).append(n)
    changed = False
    for name, nodes in users.items():
        mine = [n for n in nodes if n.name in floats]
        if not mine or len(mine) == len(nodes):
            continue
        copy = onnx.TensorProto()
        copy.CopyFrom(inits[name])
        copy.name = f"{name}_float"
        graph.initializer.append(copy)
        for n in mine:
            n.input[:] = [copy.name if i == name else i for i in n.input]
        changed = True
    if changed:
        onnx.save(model, str(model_path))


# ops a first block's chain may pass through between its convolutions (activations, pooling)
_CHAIN = {"Relu", "Clip", "BatchNormalization", "MaxPool", "AveragePool", "HardSwish", "HardSigmoid", "Sigmoid", "Mul",
          "Identity"}


def _first_block(graph: Any, stem: list[str], consumers: dict[str, list[Any]] | None = None) -> list[str]:
    """The convolutions that follow the stem up to and including the first dense one (group
    1): for MobileNet/EfficientNet the first block's depthwise + pointwise pair, for a ResNet
    the first 1x1/3x3 after the max-pool. Found by walking the graph from the stem's output
    through single-consumer activations/pooling, not by name; empty when the chain branches
    first (a residual right after the stem: nothing cheap to keep float there).

    Why: this block runs at the highest resolution on the stem's raw features, and its
    quantisation error is carried through every later layer. Measured on an EfficientNet-Lite0
    fine-tuned on real Fashion-MNIST (96 px, minmax, 1000 train images calibrating; fp32 val
    78.3 / test 77.2): all-int8 val 74.0 / test 73.8; with this block float val 77.7 / test
    78.0, while keeping any one later block float left test at 73.4-74.6 and keeping all 16
    depthwise convolutions float gave 66.6 (ORT's fused float depthwise path after a QDQ pair
    lost far more than it saved; unfused it scored 78.4, so it is not the quantisation).
    """
    if len(stem) != 1:
        return []
    nodes = {n.name: n for n in graph.node}
    consumers = consumers if consumers is not None else _consumers(graph)
    found: list[str] = []
    node = nodes[stem[0]]
    for _ in range(16):  # a few activations and at most a couple of convolutions: bounded walk
        users = consumers.get(node.output[0], [])
        if len(users) != 1:
            return []
        node = users[0]
        if node.op_type == "Conv":
            found.append(node.name)
            group = next((a.i for a in node.attribute if a.name == "group"), 1)
            if group == 1:
                return found
        elif node.op_type not in _CHAIN:
            return []
    return []


# ops between a classifier's head and its output that compute nothing a quantiser would touch
_PASS_THROUGH = {"Softmax", "Sigmoid", "Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Add", "Mul", "Div", "Sub", "Cast"}


def _head_nodes(graph: Any) -> list[str]:
    """The classifier head: the Gemm/MatMul nodes the outputs reach back to through
    :data:`_PASS_THROUGH` ops only. A linear probe folds feature standardisation into its
    weights (large, uneven columns), which per-tensor activation ranges can serve badly; so
    ``auto`` also tries it in float."""
    producer = {o: n for n in graph.node for o in n.output}
    heads: list[str] = []
    todo = [o.name for o in graph.output]
    seen: set[str] = set()
    while todo:
        node = producer.get(todo.pop())
        if node is None or node.name in seen:
            continue
        seen.add(node.name)
        if node.op_type in ("Gemm", "MatMul"):
            heads.append(node.name)
        elif node.op_type in _PASS_THROUGH:
            todo += list(node.input)
    return heads


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


def _spread(records: list[Record], n: int) -> list[Record]:
    """Up to ``n`` of ``records`` spread evenly (sorted by path, so every class keeps some)."""
    if len(records) <= n:
        return list(records)
    idx = np.unique(np.linspace(0, len(records) - 1, n).round().astype(int))
    return [records[i] for i in idx]


def _compare(src: Bundle, ref: Predictor, cand: Predictor, records: list[Record], precision: str,
             ui: Reporter | None = None) -> dict[str, Any]:
    """Both models' headline metric on ``records`` (the ones the reference could read): the
    metric's name, ``fp32``, ``precision``'s figure, ``drop_points``, ``images`` scored and
    (classifiers) ``max_abs_diff``, the max |Δscore|."""
    task = get_task(src.task)
    ui = ui or Reporter()
    with ui.track("checking: fp32", len(records)) as advance:
        base = task.score(ref, records, advance)
    if base.failed:
        log.warning("%d held-out image(s) could not be read, e.g. %s", len(base.failed), base.failed[0][0].path)
    with ui.track(f"checking: {precision}", len(base.records)) as advance:
        scored = task.score(cand, base.records, advance)
    fp32, own = task.points(src, base), task.points(src, scored)
    out: dict[str, Any] = {"images": len(base.records), "metric": headline_metric(src), "fp32": fp32, precision: own,
                           "drop_points": None if fp32 is None or own is None else round(fp32 - own, 2)}
    if hasattr(task, "arrays") and base.records:
        n = len(src.classes)
        out["max_abs_diff"] = float(np.abs(task.arrays(base, n)[1] - task.arrays(scored, n)[1]).max())
    return out


def _speed(src: Bundle, ref: Predictor, cand: Predictor, records: list[Record], precision: str) -> dict[str, Any]:
    """Model-only speed of both, side by side: classifiers images/s at batch 8, detectors
    seconds per image (the graph includes proposals and NMS) on a real held-out image."""
    if ref.detector:
        x = _detector_input(ref, records)
        secs = latency({"fp32": ref, precision: cand}, x)
        return {"seconds_per_image": secs, "speedup": round(secs["fp32"] / secs[precision], 3)}
    batch = _speed_batch(ref, records) if records else _random_batch(src)
    speed = throughput({"fp32": ref, precision: cand}, batch)
    return {"images_per_s": {"batch": SPEED_BATCH, **speed}, "speedup": round(speed[precision] / speed["fp32"], 3)}


def latency(predictors: dict[str, Predictor], x: Any, rounds: int = 5, warmup: int = 1) -> dict[str, float]:
    """Median seconds per call of each detector's model on one prepared image, the predictors
    taking turns within each round (as :func:`throughput`)."""
    for _ in range(warmup):
        for p in predictors.values():
            p.run_detector(x)
    times: dict[str, list[float]] = {k: [] for k in predictors}
    for _ in range(rounds):
        for k, p in predictors.items():
            t = time.perf_counter()
            p.run_detector(x)
            times[k].append(time.perf_counter() - t)
    return {k: round(statistics.median(v), 4) for k, v in times.items()}


def _detector_input(ref: Predictor, records: list[Record]) -> Any:
    for r in records[:SPEED_BATCH]:
        try:
            return ref.prepare(r.path)
        except ImageError:
            continue
    spec = ref.bundle.detect_spec
    return np.random.default_rng(0).random((3, spec.min_size, spec.min_size), dtype=np.float32)


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
    # the explain graph comes along in fp32 (meta["explain"] is copied with the rest of the metadata;
    # without its file the new bundle would claim a graph it lacks and /explain would answer 409): maps
    # and their scores stay the fp32 model's, the label /predict gives may differ where the two disagree
    info = src.meta.get("explain")
    name = info.get("file", EXPLAIN_FILE) if isinstance(info, dict) else None
    if name and (src.path / name).is_file():
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
