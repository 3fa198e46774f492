"""Detector training: records with boxes → Faster R-CNN (Lightning) → verified ONNX bundle.

Shares the classification spine: the run directory, split, config, checkpoints, early
stopping, resume, Ctrl-C and progress all come from :func:`lensforge.training.finetune.fit`;
only the dataset, the LightningModule and the bundle's contents differ.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from PIL import Image
from torch import nn

from lensforge.config import TrainConfig
from lensforge.data.image import decode_image
from lensforge.data.records import Dataset, Record
from lensforge.errors import ConfigError, DataError, ImageError
from lensforge.runtime.preprocess import DetectSpec
from lensforge.runtime.results import DetectionResult
from lensforge.ui import Reporter

log = logging.getLogger(__name__)

JITTER = (0.75, 0.875, 1.125, 1.25)  # training scale jitter, as fractions of image_size (the eval size comes last)
MAX_RATIO = 5 / 3  # longer-side cap relative to the shorter side (torchvision's 800 / 1333)
MIN_PARITY_IOU = 0.99  # every confident torch box must have an ONNX twin overlapping at least this much


def detect_spec(cfg: TrainConfig) -> DetectSpec:
    """The evaluation-time input sizes a detector trained with ``cfg`` uses (and its bundle holds)."""
    size = int(cfg.image_size or 512)
    from lensforge.models.detector import IMAGENET_MEAN, IMAGENET_STD

    return DetectSpec(min_size=size, max_size=round(size * MAX_RATIO), mean=IMAGENET_MEAN, std=IMAGENET_STD)


def build_detector(cfg: TrainConfig, num_classes: int) -> nn.Module:
    """The Faster R-CNN ``cfg`` asks for, with scale jitter for training. Called before any
    file is written, so a wrong name or weights file leaves nothing behind."""
    from lensforge.models.detector import create_detector, resolve_detector

    cfg.backbone = resolve_detector(cfg.backbone)  # the saved config names the detector itself (lite0_fpn, ...)
    spec = detect_spec(cfg)
    sizes = tuple(sorted({_round32(spec.min_size * f) for f in JITTER} - {spec.min_size})) + (spec.min_size,)
    # torchvision picks a random min_size per batch while training and the last one in eval
    return create_detector(cfg.backbone, num_classes, pretrained=cfg.pretrained, weights=cfg.weights,
                           min_size=sizes, max_size=round(max(sizes) * MAX_RATIO))


def _round32(x: float) -> int:
    return max(32, int(round(x / 32)) * 32)


class DetectionImages(torch.utils.data.Dataset):
    """Decoded images (kept in memory, shrunk to what the model can use) with their boxes.

    Items: ``(image float32 (3, h, w) in [0, 1], target)`` where target holds ``boxes``
    float32 (N, 4) xyxy in the item's pixels, ``labels`` int64 (N,) = class index + 1
    (torchvision's 0 is background) and ``index`` (the record's position). Crowd boxes are
    not trained on. ``train`` adds a horizontal flip with probability 0.5, drawn from torch's
    generator: seeded by ``lensforge.train``'s seed, and re-seeded per DataLoader worker (a
    numpy generator would be copied into every worker and flip in lockstep).
    """

    def __init__(self, records: Sequence[Record], images: Sequence[np.ndarray], factors: Sequence[float],
                 train: bool) -> None:
        self.records, self.images, self.factors, self.train = list(records), list(images), list(factors), train

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        r, img = self.records[i], self.images[i]
        keep = ~r.crowd_array()
        boxes = r.box_array()[keep] * np.float32(self.factors[i])
        labels = np.asarray(r.labels, dtype=np.int64)[keep] + 1
        x = torch.from_numpy(img).permute(2, 0, 1).float().div_(255)
        if self.train and torch.rand(()) < 0.5:
            x = x.flip(-1)
            w = img.shape[1]
            boxes = boxes.copy()
            boxes[:, [0, 2]] = w - boxes[:, [2, 0]]
        return x, {"boxes": torch.from_numpy(boxes).reshape(-1, 4), "labels": torch.from_numpy(labels),
                   "index": torch.tensor(i)}


def collate(batch: list[tuple[torch.Tensor, dict[str, torch.Tensor]]]) -> tuple[list[torch.Tensor], list[dict]]:
    """Detection batches are lists: every image keeps its own size."""
    return [b[0] for b in batch], [b[1] for b in batch]


def load_detection_images(
    records: Sequence[Record], spec: DetectSpec, scale: float, advance: Callable[[int], None] = lambda n=1: None,
) -> tuple[list[Record], list[np.ndarray], list[float], list[tuple[Record, str]]]:
    """Decode ``records`` once, shrunk so the shorter side is at most ``spec.min_size * scale``
    (the largest training scale): (kept records, HxWx3 uint8 images, original→image factor,
    (record, reason) for unreadable ones)."""
    big = DetectSpec(min_size=round(spec.min_size * scale), max_size=round(spec.max_size * scale),
                     mean=spec.mean, std=spec.std)
    kept, images, factors, bad = [], [], [], []
    resized: list[str] = []  # annotated size differs from the file: the boxes may not fit the pixels
    for r in records:
        try:
            img = decode_image(r.path, min_size=big.min_size)
        except ImageError as e:
            bad.append((r, str(e)))
            advance(1)
            continue
        ow, oh = img.info.get("original_size") or img.size
        if r.size is not None and tuple(r.size) != (ow, oh):
            resized.append(f"{r.path.name} (annotated {r.size[0]}x{r.size[1]}, file {ow}x{oh})")
        s = big.scale_for(*img.size)
        if s < 1:
            img = img.resize((max(1, round(img.width * s)), max(1, round(img.height * s))), Image.Resampling.BILINEAR,
                             reducing_gap=3.0)
        kept.append(r)
        images.append(np.array(img))  # writable: torch.from_numpy warns on read-only arrays
        factors.append(img.width / ow)
        advance(1)
    if resized:
        # boxes are in the annotation's pixels, scaled here by the file's size: a resized or
        # EXIF-rotated file (whose JSON states the stored, unrotated size) trains on boxes
        # that miss their objects
        log.warning("%d image(s) differ in size from their annotations, e.g. %s; their boxes may not fit the "
                    "pixels — `lensforge data inspect` lists them", len(resized), ", ".join(resized[:3]))
    return kept, images, factors, bad


class DetectorModule(L.LightningModule):
    """Faster R-CNN's own losses (RPN + box head) summed; AdamW over the trainable
    parameters with warmup + cosine; COCO mAP on the validation split every epoch."""

    def __init__(self, model: nn.Module, cfg: TrainConfig, classes: Sequence[str], val: DetectionImages | None,
                 steps_per_epoch: int) -> None:
        super().__init__()
        self.model, self.cfg, self.classes = model, cfg, tuple(classes)
        self.val = val
        self.steps_per_epoch = max(1, steps_per_epoch)
        self._results: dict[int, DetectionResult] = {}
        self.eval_max_size = detect_spec(cfg).max_size  # what the exported graph caps the longer side at
        self._train_max_size: int | None = None

    def training_step(self, batch: tuple[list[torch.Tensor], list[dict]], _: int) -> torch.Tensor:
        images, targets = batch
        losses = self.model(images, [{"boxes": t["boxes"], "labels": t["labels"]} for t in targets])
        loss = sum(losses.values())
        self.log("train_loss", loss, on_step=False, on_epoch=True, batch_size=len(images))
        return loss

    def validation_step(self, batch: tuple[list[torch.Tensor], list[dict]], _: int) -> None:
        images, targets = batch
        for out, t in zip(self.model(images), targets):
            i = int(t["index"])
            factor = np.float32(self.val.factors[i]) if self.val is not None else np.float32(1)
            self._results[i] = DetectionResult(out["boxes"].numpy() / factor, out["scores"].numpy(),
                                               out["labels"].numpy() - 1, self.classes)

    def on_validation_epoch_start(self) -> None:
        # torchvision resizes with one max_size in training and eval; build_detector raises it
        # for the scale jitter, but validation (and so the best checkpoint) must see images as
        # the exported graph and the Predictor will: wide images capped at the bundle's max_size
        self._train_max_size = self.model.transform.max_size
        self.model.transform.max_size = self.eval_max_size

    def on_validation_epoch_end(self) -> None:
        if self._train_max_size is not None:
            self.model.transform.max_size = self._train_max_size
            self._train_max_size = None
        if not self._results or self.val is None:
            return
        from lensforge.metrics.detection import coco_metrics

        order = sorted(self._results)
        m = coco_metrics([self.val.records[i] for i in order], [self._results[i] for i in order], self.classes)
        self._results.clear()
        self.log("val_map", float(m["map"] or 0.0), prog_bar=True)
        self.log("val_map50", float(m["map50"] or 0.0), prog_bar=True)

    def configure_optimizers(self) -> Any:
        from lensforge.training.finetune import warmup_cosine

        params = [p for p in self.model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)
        return warmup_cosine(opt, self.cfg, self.steps_per_epoch)


def train_detector_in(run_dir: Path, cfg: TrainConfig, ds: Dataset, model: nn.Module, ui: Reporter) -> Any:
    """Fit, export, verify, tune the score threshold and write the bundle and report."""
    from lensforge.training.finetune import fit
    from lensforge.training.run import TrainResult, _write_history, make_split, versions
    from lensforge.hardware import describe

    if cfg.resume:
        check_resumable(run_dir, cfg, ds.classes)
    # the classes are saved too: a resumed run must rebuild the same box head
    cfg.save(run_dir / "config.yaml", versions=versions(), machine=describe(), classes=list(ds.classes))
    splits = make_split(ds, cfg, run_dir)
    n_boxes = sum(int((~r.crowd_array()).sum()) for r in splits["train"])  # crowd boxes are not trained on
    ui.step(
        f"{ds.fmt} data, detect: {len(ds.classes)} classes, {len(ds.records)} images → train {len(splits['train'])} "
        f"({n_boxes} boxes) / val {len(splits['val'])} / test {len(splits['test'])} (seed {cfg.seed})"
    )
    if n_boxes == 0:
        raise DataError("the training split has no boxes (iscrowd regions are not trained on): a detector cannot "
                        "learn from negatives only; annotate some training images")
    spec = detect_spec(cfg)
    loaded: dict[str, DetectionImages] = {}
    skipped = 0
    for name in ("train", "val"):
        with ui.track(f"Decoding {name} images", len(splits[name])) as advance:
            recs, imgs, factors, bad = load_detection_images(splits[name], spec, max(JITTER) if name == "train" else 1.0,
                                                             advance)
        loaded[name] = DetectionImages(recs, imgs, factors, train=name == "train")
        skipped += len(bad)
    if skipped:
        ui.warn(f"skipped {skipped} unreadable image(s); `lensforge data inspect {cfg.data}` lists them")
    if not len(loaded["train"]):
        raise DataError("no readable training images")

    train_loader = torch.utils.data.DataLoader(
        loaded["train"], batch_size=cfg.batch_size, shuffle=True, collate_fn=collate, num_workers=cfg.workers,
        drop_last=len(loaded["train"]) > cfg.batch_size, generator=torch.Generator().manual_seed(cfg.seed),
    )
    val_set = loaded["val"] if len(loaded["val"]) else None
    val_loader = (torch.utils.data.DataLoader(val_set, batch_size=cfg.batch_size, collate_fn=collate,
                                              num_workers=cfg.workers) if val_set is not None else None)
    module = DetectorModule(model, cfg, ds.classes, val_set, len(train_loader))
    ui.step(f"Fine-tuning {cfg.backbone} detector at {spec.min_size}px for up to {cfg.epochs} epochs")
    _, fitted = fit(model, train_loader, val_loader, cfg, run_dir, False, reporter=ui,
                    resume_from=run_dir / "checkpoints" / "last.ckpt" if cfg.resume else None,
                    module=module, monitor="val_map", precision="32-true")  # roi_align/NMS stay fp32
    _write_history(fitted.history, run_dir)

    bundle_dir = run_dir / "bundle"
    parity, metrics, scored = write_detector_bundle(model, ds, splits, loaded["val"], cfg, spec, bundle_dir, ui,
                                                    fitted.history)
    held_out = "test" if "test" in scored else "val" if "val" in scored else None
    if held_out:
        from lensforge.evaluation import write_detection_report

        records, results = scored[held_out]
        report = {**metrics[held_out], "evaluated_on": f"the {held_out} split saved at training time"}
        write_detection_report(run_dir / "eval", records, results, report)
    return TrainResult("detect", run_dir, bundle_dir, metrics, parity, skipped, fitted.history)


def check_resumable(run_dir: Path, cfg: TrainConfig, classes: Sequence[str]) -> None:
    """Refuse to resume a detection run with another detector, input size or class list than
    its ``config.yaml`` records: the checkpoint would not load (another box head) or the run
    would go on at other sizes than it started with (``lensforge.train(..., resume=True)``
    from Python does not reload the saved config as the CLI does)."""
    import yaml

    try:
        doc = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return  # nothing to compare with: Lightning's checkpoint load is the remaining check
    if not isinstance(doc, dict):
        return
    saved = doc.get("config") if isinstance(doc.get("config"), dict) else {}
    now = {"backbone": cfg.backbone, "image_size": cfg.image_size}
    differ = [f"{k} {saved[k]!r} (now {v!r})" for k, v in now.items() if k in saved and saved[k] != v]
    before = doc.get("classes")
    if isinstance(before, list) and before != list(classes):
        differ.append(f"classes {', '.join(map(str, before[:8]))} (the data now has {', '.join(classes[:8])})")
    if differ:
        raise ConfigError(
            f"cannot resume {run_dir}: it was started with {'; '.join(differ)}; resume with the run's own settings "
            f"(`lensforge train {cfg.data} --out {run_dir} --resume` reloads them), or start a new run with --out"
        )


def write_detector_bundle(
    model: nn.Module, ds: Dataset, splits: dict[str, list[Record]], val: DetectionImages, cfg: TrainConfig,
    spec: DetectSpec, bundle_dir: Path, ui: Reporter, history: list[dict[str, Any]],
) -> tuple[float, dict[str, Any], dict[str, tuple[list[Record], list[DetectionResult]]]]:
    """Export (fixed eval size, dynamic image shape), verify against torch, score val/test
    through the Predictor, pick the F-beta threshold on val, write the bundle atomically."""
    from safetensors.torch import save_file

    from lensforge.evaluation import score_detections
    from lensforge.export.onnx import export_detector, verify_detector
    from lensforge.metrics.detection import best_threshold, detection_metrics
    from lensforge.models.detector import ExportableDetector
    from lensforge.runtime.bundle import MODEL_FILE, SPLIT_FILE, WEIGHTS_FILE, atomic_directory, write_meta
    from lensforge.runtime.predictor import Predictor
    from lensforge.runtime.results import DEFAULT_THRESHOLD
    from lensforge.data.split import save_split
    from lensforge.training.run import _headline, run_meta

    model = model.eval()
    model.transform.min_size = (spec.min_size,)  # the graph resizes like evaluation did
    model.transform.max_size = spec.max_size
    graph = ExportableDetector(model).eval()
    checks = parity_images(val, splits["train"], spec)
    with atomic_directory(bundle_dir, overwrite=True) as tmp:
        ui.step("Exporting the detector to ONNX and checking it against torch")
        export_detector(graph, checks[0], tmp / MODEL_FILE)
        parity = verify_detector(graph, tmp / MODEL_FILE, checks, min_iou=MIN_PARITY_IOU)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp / WEIGHTS_FILE))
        save_split(splits, ds, tmp / SPLIT_FILE, seed=cfg.seed)
        meta: dict[str, Any] = {
            "task": "detect",
            "classes": ds.classes,
            "input": spec.to_dict(),
            "model": {"file": MODEL_FILE, "input": "images", "outputs": ["boxes", "scores", "labels"],
                      "backbone": cfg.backbone, "num_classes": len(ds.classes)},
            "score_threshold": DEFAULT_THRESHOLD,
            "parity": parity,
            **run_meta(ds, splits, cfg, history),
        }
        write_meta(tmp, meta)
        predictor = Predictor(tmp)
        scored: dict[str, tuple[list[Record], list[DetectionResult]]] = {}
        for name in ("val", "test"):
            if splits[name]:
                with ui.track(f"Scoring {name} split with ONNX Runtime", len(splits[name])) as advance:
                    records, results, failed = score_detections(predictor, splits[name], advance)
                if failed:
                    ui.warn(f"{len(failed)} {name} image(s) could not be read and are not in the {name} metrics")
                scored[name] = (records, results)
        if "val" in scored:
            threshold, best = best_threshold(*scored["val"], beta=cfg.beta)
            meta["score_threshold"] = threshold
            meta["threshold_tuning"] = {"beta": cfg.beta, "iou": 0.5, "split": "val", **best}
        else:
            ui.warn(f"no validation images: the score threshold stays at {DEFAULT_THRESHOLD}")
        metrics = {name: detection_metrics(recs, res, ds.classes, meta["score_threshold"], beta=cfg.beta)
                   for name, (recs, res) in scored.items()}
        meta["metrics"] = {k: _headline(v) for k, v in metrics.items()}
        write_meta(tmp, meta)
    final = {name: (recs, [dataclasses.replace(r, threshold=meta["score_threshold"]) for r in res])
             for name, (recs, res) in scored.items()}
    return float(parity["max_score_diff"]), metrics, final


def parity_images(val: DetectionImages, train: Sequence[Record], spec: DetectSpec, n: int = 4) -> list[torch.Tensor]:
    """Up to ``n`` float32 (1, 3, h, w) images in [0, 1] to trace and verify the export on:
    validation images, else training images at the evaluation size (as the classifier export
    does), random pixels only when none can be read. A trained detector finds nothing on
    noise, so a check on noise alone would compare no box at all."""
    from lensforge.runtime.preprocess import detector_input

    images = list(val.images[:n])
    if not images:
        images = load_detection_images(list(train)[: 2 * n], spec, 1.0)[1][:n]
    pictures = [Image.fromarray(img) for img in images]
    if pictures:  # and one wide picture: sizes other than the usual square must agree too
        first = pictures[0]
        pictures.append(first.resize((first.width, max(32, first.height * 3 // 5)), Image.Resampling.BILINEAR))
    # exactly as the Predictor feeds the graph: resized to the model's size, in [0, 1]
    checks = [torch.from_numpy(detector_input(p, spec))[None] for p in pictures]
    if not checks:
        checks = [torch.rand(1, 3, spec.min_size, round(spec.min_size * 4 / 3), generator=torch.Generator().manual_seed(0))]
    return checks
