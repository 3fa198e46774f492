"""``export all``: every export target at once, then one parity table on the same images.

    out_root/fp16/          fp16 bundle            (export_fp16)
    out_root/int8/          int8 bundle            (export_int8; a refusal by the accuracy
                                                    guard is reported in the table)
    out_root/triton/        Triton model repository (export_triton)
    out_root/torchserve/    <name>.mar             (export_torchserve)

The parity table compares each artefact with the bundle's own ONNX model (fp32, onnxruntime)
on up to 64 images of the bundle's val (else test) split, preprocessed once by the fp32
Predictor: max |score − fp32 score|, top-1 agreement with fp32 and accuracy (mAP for
multi-label) on those images. The torch row rebuilds the model from ``weights.safetensors``
where torch and timm are installed. The Triton row runs the repository's model file as
Triton would (the config's input and output names); the TorchServe row unpacks the .mar and
runs its handler in-process, as TorchServe would, on the encoded images.

The parity images are few on purpose (a wrong cast shows on any image); whether fp16/int8 keep
the accuracy was decided on many more (the test split, up to ``quantize.CHECK_IMAGES``), and
those figures are reported beside the table (``ParityReport.decided``), each with its images.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from lensforge.data.records import Record, targets
from lensforge.errors import ExportError, ImageError
from lensforge.evaluation import headline_metric, metric_points
from lensforge.export import DEFAULT_CALIB
from lensforge.export._serving import model_name
from lensforge.export.quantize import AccuracyRefused, export_fp16, export_int8
from lensforge.export.torchserve import export_torchserve
from lensforge.export.triton import CONFIG_FILE, MODEL_FILE, export_triton
from lensforge.hardware import cpu_count
from lensforge.heldout import held_out
from lensforge.runtime.bundle import WEIGHTS_FILE, Bundle, as_bundle, staging_directory
from lensforge.runtime.predictor import Predictor
from lensforge.ui import Reporter

log = logging.getLogger(__name__)

TARGETS = ("fp16", "int8", "triton", "torchserve")
PARITY_IMAGES = 64  # enough to see a wrong cast or a bad int8 range, seconds on any CPU
RANDOM_IMAGES = 8  # without held-out images: scores of random inputs still compare the graphs
BATCH = 16


@dataclass
class ParityRow:
    """One model in the parity table. Differences are against the bundle's ONNX model (fp32).

    max_abs_diff: max |score − fp32 score| over the images (and classes compared).
    top1_agreement: fraction of images whose best class equals fp32's (0-1).
    accuracy: accuracy (mAP for multi-label) in points on the images with labels, 0-100.
    compared: which scores were compared ("all scores", or "top-5 per image" for the handler).
    note: why a number is missing (an export refused, torch not installed...).
    """

    target: str
    artifact: str | None = None
    max_abs_diff: float | None = None
    top1_agreement: float | None = None
    accuracy: float | None = None
    compared: str = "all scores"
    note: str | None = None


@dataclass
class ParityReport:
    """rows: the parity table, every row on the same ``images`` of ``split``.
    decided: per exported precision ("fp16", "int8"), the figures its export was judged by,
        from its ``lensforge.json`` (or the refusal): ``checked_on`` ({split, images, of}),
        ``metric``, ``fp32``, the precision's own figure, ``drop_points``, ``kept``."""

    bundle: Path
    out_root: Path
    images: int  # how many images every row was computed on
    source: str  # which images, in words
    metric: str  # "accuracy" or "mAP"
    rows: list[ParityRow] = field(default_factory=list)
    split: str | None = None  # the parity images' split; None for random inputs
    decided: dict[str, dict[str, Any]] = field(default_factory=dict)

    def row(self, target: str) -> ParityRow:
        for r in self.rows:
            if r.target == target:
                return r
        raise KeyError(f"no row {target!r}; rows: {', '.join(r.target for r in self.rows)}")

    def to_dict(self) -> dict[str, Any]:
        return {"bundle": str(self.bundle), "out_root": str(self.out_root), "images": self.images,
                "split": self.split, "source": self.source, "metric": self.metric,
                "rows": [asdict(r) for r in self.rows], "decided": self.decided}


def export_all(
    bundle: str | os.PathLike[str] | Bundle,
    out_root: str | os.PathLike[str],
    *,
    calib: int = DEFAULT_CALIB,
    calib_dir: str | os.PathLike[str] | None = None,
    method: str = "auto",
    max_drop: float = 1.0,
    force: bool = False,
    name: str | None = None,
    overwrite: bool = False,
    reporter: Reporter | None = None,
) -> ParityReport:
    """Export ``bundle`` to every target under ``out_root`` and measure each against fp32.

    calib, calib_dir, method, max_drop, force: as :func:`export_int8`; name: the Triton /
    TorchServe model name (default: the run directory's name). Without ``force`` an int8 export refused
    by its accuracy guard (or for want of calibration images) is a row with the refusal as
    its note, and the other targets are still written; with ``force`` any failure raises.
    overwrite: replace existing target directories; without it an existing one is refused
    before any work is done.
    """
    ui = reporter or Reporter()
    src = as_bundle(bundle)
    if src.task == "detect":
        raise ExportError(f"{src.path} is a detector: --to all compares classifiers' scores; export a detector "
                          "with --to onnx-int8 (checked on held-out mAP50), --to triton or --to torchserve")
    out_root = Path(out_root)
    existing = [str(out_root / t) for t in TARGETS if (out_root / t).exists()]
    if existing and not overwrite:
        raise ExportError(f"{', '.join(existing)} already exist(s); pass overwrite=True (--overwrite) to replace them")
    name = model_name(src, name)
    if importlib.util.find_spec("model_archiver") is None:  # fail before minutes of fp16/int8 work
        raise ExportError("torch-model-archiver is not installed: pip install torch-model-archiver")

    ui.step(f"Exporting fp16 to {out_root / 'fp16'}")
    fp16 = export_fp16(src, out_root / "fp16", overwrite=overwrite, reporter=ui)
    ui.step(f"Exporting int8 to {out_root / 'int8'}")
    int8: Path | None = None
    int8_note = None
    decided = {"fp16": _decided(fp16, "fp16")}
    try:
        int8 = export_int8(src, out_root / "int8", calib=calib, calib_dir=Path(calib_dir) if calib_dir else None,
                           method=method, max_drop=max_drop, force=force, overwrite=overwrite, reporter=ui)
        decided["int8"] = _decided(int8, "int8")
    except ExportError as e:
        if force:
            raise
        int8_note = f"not exported: {e}"
        ui.warn(f"int8 {int8_note}")
        if isinstance(e, AccuracyRefused):
            decided["int8"] = {**e.record, "kept": False}
    ui.step(f"Writing the Triton model repository to {out_root / 'triton'}")
    triton_dir = export_triton(src, out_root / "triton", name=name, overwrite=overwrite)
    ui.step(f"Building the TorchServe archive in {out_root / 'torchserve'}")
    mar = export_torchserve(src, out_root / "torchserve", name=name, overwrite=overwrite)

    ui.step("Comparing every target with the fp32 ONNX model")
    ref = Predictor(src)
    records, batch, split, source = _parity_images(src, ref)
    y = targets(records, len(src.classes), src.task == "multilabel") if records else None
    s32 = _run_in_batches(ref.run, batch)
    report = ParityReport(src.path, out_root, len(batch), source, headline_metric(src), split=split, decided=decided)

    def row(target: str, artifact: Path | None, scores: np.ndarray | None, note: str | None = None) -> ParityRow:
        r = ParityRow(target, None if artifact is None else str(artifact), note=note)
        if scores is not None:
            r.max_abs_diff = float(np.abs(scores - s32).max()) if len(s32) else None
            r.top1_agreement = _agreement(scores, s32)
            r.accuracy = metric_points(src, y, scores) if y is not None else None
        return r

    torch_scores, torch_note = _torch_scores(src, batch)
    report.rows.append(row("torch", src.path / WEIGHTS_FILE, torch_scores, torch_note))
    report.rows.append(row("onnx fp32", src.model_path, s32))
    report.rows.append(row("fp16", fp16, _run_in_batches(Predictor(fp16).run, batch)))
    if int8 is not None:
        report.rows.append(row("int8", int8, _run_in_batches(Predictor(int8).run, batch)))
    else:
        report.rows.append(row("int8", None, None, int8_note))
    report.rows.append(row("triton", triton_dir / "1" / MODEL_FILE, _triton_scores(triton_dir, batch)))
    report.rows.append(_handler_row(src, mar, records, s32, y))
    return report


# -- the images --------------------------------------------------------------------------------


def _decided(bundle: Path, precision: str) -> dict[str, Any]:
    """The figures an exported bundle's ``export`` record was judged by (see ParityReport.decided)."""
    record = json.loads((bundle / "lensforge.json").read_text()).get("export", {})
    fp32, own = record.get("fp32"), record.get(precision)
    drop = record.get("drop_points")
    if drop is None and isinstance(fp32, (int, float)) and isinstance(own, (int, float)):
        drop = round(fp32 - own, 2)
    decided = {"checked_on": record.get("checked_on"), "metric": record.get("metric"), "fp32": fp32, precision: own,
               "drop_points": drop, "kept": True}
    # how int8 was made: the calibration --method auto chose, and on which figures
    decided.update({k: record[k] for k in ("calibrate_method", "float_head", "float_first_block", "chosen_by")
                    if k in record})
    return decided


def _parity_images(src: Bundle, ref: Predictor) -> tuple[list[Record], np.ndarray, str | None, str]:
    """(records read, float32 (N, 3, S, S) batch preprocessed by the fp32 Predictor, their split, description).

    Without held-out images: random inputs, which still compare the graphs (no accuracy)."""
    records, split = held_out(src, ("val", "test"))
    done: list[Record] = []
    arrays: list[np.ndarray] = []
    for r in records[:PARITY_IMAGES]:
        try:
            arrays.append(ref.prepare(r.path))
        except ImageError as e:
            log.warning("parity image %s skipped: %s", r.path, e)
            continue
        done.append(r)
    if arrays:
        return done, np.stack(arrays), split, f"{len(done)} of the {len(records)} {split} images" if len(records) > len(done) else f"the {len(done)} {split} images"
    s = src.input_spec.size
    rng = np.random.default_rng(0)
    return [], rng.standard_normal((RANDOM_IMAGES, 3, s, s), dtype=np.float32), None, "random inputs: no saved val/test images"


def _run_in_batches(run: Any, batch: np.ndarray) -> np.ndarray:
    return np.concatenate([run(batch[i : i + BATCH]) for i in range(0, len(batch), BATCH)])


def _agreement(scores: np.ndarray, ref: np.ndarray) -> float | None:
    return float(np.mean(scores.argmax(1) == ref.argmax(1))) if len(ref) else None


# -- the rows that need more than a Predictor --------------------------------------------------


def _torch_scores(src: Bundle, batch: np.ndarray) -> tuple[np.ndarray | None, str | None]:
    """Scores of the torch model rebuilt from weights.safetensors, or (None, why not)."""
    missing = [m for m in ("torch", "timm", "safetensors") if importlib.util.find_spec(m) is None]
    if missing:
        return None, f"{', '.join(missing)} not installed: pip install lensforge[train] to compare with torch"
    if not (src.path / WEIGHTS_FILE).is_file():
        return None, f"{WEIGHTS_FILE} is not in the bundle"
    import torch

    from lensforge.models import load_bundle_model

    try:
        scores_model = load_bundle_model(src)
    except Exception as e:  # noqa: BLE001 - ModelError, weights that do not fit...: a note, not a failed export
        return None, f"could not rebuild the torch model: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    with torch.no_grad():
        return _run_in_batches(lambda x: scores_model(torch.from_numpy(x)).numpy(), batch), None


def _triton_scores(model_dir: Path, batch: np.ndarray) -> np.ndarray:
    """Run the repository's model file with the input and output names its config declares."""
    text = (model_dir / CONFIG_FILE).read_text()
    names = {k: re.search(rf'^{k} \[\s*\{{\s*name: "((?:[^"\\]|\\.)*)"', text, re.MULTILINE) for k in ("input", "output")}
    if not all(names.values()):
        raise ExportError(f"{model_dir / CONFIG_FILE} declares no input or output name")
    inp, out = (m.group(1).replace('\\"', '"').replace("\\\\", "\\") for m in names.values())  # type: ignore[union-attr]
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = cpu_count()  # as the fp32 Predictor: same kernels, same bytes, same scores
    opts.inter_op_num_threads = 1
    session = ort.InferenceSession(str(model_dir / "1" / MODEL_FILE), opts, providers=["CPUExecutionProvider"])
    return _run_in_batches(lambda x: session.run([out], {inp: x})[0], batch)


def _handler_row(src: Bundle, mar: Path, records: list[Record], s32: np.ndarray, y: np.ndarray | None) -> ParityRow:
    """The .mar's handler, unpacked and run in-process on the encoded images.

    It answers the top 5 {label: score} per image, so only those entries are compared; with
    at most 5 classes that is every score, and accuracy is computed as for the other rows."""
    r = ParityRow("torchserve", str(mar), compared="top-5 per image")
    if not records:
        r.note = "no held-out images to send to the handler"
        return r
    index = {c: i for i, c in enumerate(src.classes)}
    # unpacked beside the archive, not in the system temp dir: a kill -9 leaves it where the next export sweeps it
    with staging_directory(mar.parent, f"{mar.name}.unpacked") as model_dir:
        with zipfile.ZipFile(mar) as z:
            z.extractall(model_dir)
        manifest = json.loads((model_dir / "MAR-INF" / "MANIFEST.json").read_text())
        context = FakeContext(model_dir, manifest)
        handler = load_handler(model_dir, manifest)
        handler.initialize(context)
        answers: list[dict[str, Any]] = []
        for i in range(0, len(records), BATCH):
            answers += handler.handle([{"data": rec.path.read_bytes()} for rec in records[i : i + BATCH]], context)
    bad = [a for a in answers if "error" in a]
    if bad:
        raise ExportError(f"the TorchServe handler refused {len(bad)} image(s) the Predictor read: {bad[0]['message']}")
    diffs = [abs(score - s32[n, index[label]]) for n, a in enumerate(answers) for label, score in a.items()]
    r.max_abs_diff = float(max(diffs))
    top1 = np.array([index[next(iter(a))] for a in answers])
    r.top1_agreement = float(np.mean(top1 == s32.argmax(1)))
    if len(src.classes) <= len(answers[0]):  # the top 5 are all the scores
        full = np.zeros_like(s32)
        for n, a in enumerate(answers):
            for label, score in a.items():
                full[n, index[label]] = score
        r.compared, r.accuracy = "all scores", (metric_points(src, y, full) if y is not None else None)
    elif src.task != "multilabel" and y is not None:
        r.accuracy = round(100 * float(np.mean(top1 == y)), 2)
    else:
        r.note = "the handler answers the top 5 only: no mAP"
    return r


# -- TorchServe, in-process --------------------------------------------------------------------


class FakeContext:
    """The parts of TorchServe's ``Context`` a handler uses (model_dir, manifest, per-request status)."""

    def __init__(self, model_dir: Path, manifest: dict[str, Any]) -> None:
        self.system_properties = {"model_dir": str(model_dir), "gpu_id": None, "batch_size": BATCH}
        self.manifest = manifest
        self.statuses: dict[int, int] = {}

    def set_response_status(self, code: int = 200, phrase: str = "", idx: int = 0) -> None:
        self.statuses[idx] = code


def load_handler(model_dir: Path, manifest: dict[str, Any]) -> Any:
    """Import an unpacked archive's handler file the way TorchServe does and instantiate its one class."""
    handler_file = model_dir / manifest["model"]["handler"]
    spec = importlib.util.spec_from_file_location(handler_file.stem, handler_file)
    if spec is None or spec.loader is None:
        raise ExportError(f"{handler_file} is not an importable Python file")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    classes = [v for v in vars(module).values() if isinstance(v, type) and v.__module__ == module.__name__]
    if len(classes) != 1:  # TorchServe requires exactly one class in a class-style handler
        raise ExportError(f"{handler_file} defines {len(classes)} classes; a TorchServe handler module defines one")
    return classes[0]()
