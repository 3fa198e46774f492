"""Detector training pieces: the model with its training sizes, decoded images with boxes,
the LightningModule, the images the export is checked on, and the rebuild from a bundle.

Everything else (run directory, split, checkpoints, early stopping, resume, Ctrl-C, progress,
the bundle writer) is the one pipeline every task shares; :mod:`lensforge.tasks.detect` plugs
these pieces into it.
"""

from __future__ import annotations

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
from lensforge.data.records import Record
from lensforge.errors import ConfigError, ImageError, ModelError
from lensforge.metrics.detection import coco_metrics
from lensforge.models.detector import IMAGENET_MEAN, IMAGENET_STD, ExportableDetector, create_detector, resolve_detector
from lensforge.runtime.bundle import WEIGHTS_FILE, Bundle
from lensforge.runtime.preprocess import DetectSpec, detector_input
from lensforge.runtime.results import DetectionResult
from lensforge.training.distributed import whole_set
from lensforge.training.finetune import steps_per_epoch, warmup_cosine

log = logging.getLogger(__name__)

JITTER = (0.75, 0.875, 1.125, 1.25)  # training scale jitter, as fractions of image_size (the eval size comes last)
MAX_RATIO = 5 / 3  # longer-side cap relative to the shorter side (torchvision's 800 / 1333)
MIN_PARITY_IOU = 0.99  # every confident torch box must have an ONNX twin overlapping at least this much


def detect_spec(cfg: TrainConfig) -> DetectSpec:
    """The evaluation-time input sizes a detector trained with ``cfg`` uses (and its bundle holds)."""
    size = int(cfg.image_size or 512)
    return DetectSpec(min_size=size, max_size=round(size * MAX_RATIO), mean=IMAGENET_MEAN, std=IMAGENET_STD)


def build_detector(cfg: TrainConfig, num_classes: int) -> nn.Module:
    """The Faster R-CNN ``cfg`` asks for, with scale jitter for training. Called before any
    file is written, so a wrong name or weights file leaves nothing behind."""
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
        self.log("train_loss", loss, on_step=False, on_epoch=True, batch_size=len(images), sync_dist=True)
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
        # under DDP this process scored one padded shard (the index in each target says which
        # images): mAP is of the whole validation set, each image once
        results = whole_set(list(self._results), list(self._results.values()), len(self.val))
        self._results.clear()
        m = coco_metrics(self.val.records, results, self.classes)
        self.log("val_map", float(m["map"] or 0.0), prog_bar=True)
        self.log("val_map50", float(m["map50"] or 0.0), prog_bar=True)

    def configure_optimizers(self) -> Any:
        params = [p for p in self.model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)
        return warmup_cosine(opt, self.cfg, steps_per_epoch(self, self.steps_per_epoch))


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


def parity_images(val: DetectionImages, train: Sequence[Record], spec: DetectSpec, n: int = 4) -> list[torch.Tensor]:
    """Up to ``n`` float32 (1, 3, h, w) images in [0, 1] to trace and verify the export on:
    validation images, else training images at the evaluation size (as the classifier export
    does), random pixels only when none can be read. A trained detector finds nothing on
    noise, so a check on noise alone would compare no box at all."""
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


def load_bundle_detector(bundle: Bundle) -> ExportableDetector:
    """The detector of a bundle, rebuilt from its saved training config (random init, no
    download) and ``weights.safetensors``, wrapped in ``ExportableDetector``: the graph the
    bundle's ONNX model was exported from, taking the Predictor's prepared input. Raises
    ModelError when the bundle lacks the weights or config, ``load_state_dict``'s errors when
    they do not fit."""
    from safetensors.torch import load_file

    weights = bundle.path / WEIGHTS_FILE
    if not weights.is_file():
        raise ModelError(f"{bundle.path} has no {WEIGHTS_FILE}")
    config = bundle.meta.get("config")
    if not isinstance(config, dict):
        raise ModelError(f"{bundle.path}'s lensforge.json holds no training config to rebuild the detector from")
    cfg = TrainConfig.from_dict(config).resolve("detect")
    cfg.pretrained, cfg.weights = False, None  # the safetensors replace every tensor: nothing to fetch or read first
    model = build_detector(cfg, len(bundle.classes))
    model.load_state_dict(load_file(str(weights)))
    return ExportableDetector(model.eval()).eval()
