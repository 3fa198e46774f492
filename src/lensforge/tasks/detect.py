"""Object detection: boxes per image. Faster R-CNN family (torchvision's, or the offline
EfficientNet-Lite0 + FPN) fine-tuned with Lightning; COCO mAP plus precision / recall /
F-beta at IoU 0.5, with the score threshold tuned for F-beta on validation; exported as
``images (1, 3, H, W) in [0, 1] → boxes, scores, labels``."""

from __future__ import annotations

import csv
import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from lensforge.data.records import Dataset, Record
from lensforge.errors import ConfigError, DataError
from lensforge.runtime.results import DEFAULT_THRESHOLD
from lensforge.runtime.runners import DETECT_OUTPUTS, pixels
from lensforge.tasks.base import Built, Parity, Scored, Task, TrainData

if TYPE_CHECKING:
    from lensforge.config import TrainConfig
    from lensforge.metrics.base import Metrics
    from lensforge.runtime.bundle import Bundle
    from lensforge.ui import Reporter

MIN_PARITY_IOU = 0.99  # every confident torch box must have an ONNX twin overlapping at least this much


class Detect(Task):
    name = "detect"
    score_batch = 8
    torch_needs = ("torch", "torchvision", "timm")  # lite0_fpn's backbone is timm's
    compare_key, compare_label = "map50", "mAP50"  # formats are compared at IoU 0.5; the COCO mAP@[.5:.95] headline stays in lensforge.json
    # Detectors see whole images (not 224-px crops), need a few images per step on a CPU, and
    # fine-tune a detection head that large learning rates destabilise; recall matters more
    # than precision when looking for objects (F2).
    defaults: ClassVar[dict[str, Any]] = {"image_size": 512, "batch_size": 4, "lr": 3e-4, "weight_decay": 1e-4,
                                          "beta": 2.0}

    def check_config(self, cfg: TrainConfig) -> None:
        if cfg.probe:
            raise ConfigError("--probe fits a classifier head on frozen features; detectors are fine-tuned (drop --probe)")

    def build(self, cfg: TrainConfig, ds: Dataset) -> Built:
        from lensforge.training.detect import build_detector, detect_spec

        model = build_detector(cfg, len(ds.classes))  # resolves cfg.backbone to the detector's own name
        return Built(model, detect_spec(cfg))

    def torch_model(self, bundle: Bundle) -> Any:
        """The bundle's detector rebuilt in torch (``ExportableDetector``: the exported graph's inputs and outputs)."""
        from lensforge.training.detect import load_bundle_detector

        return load_bundle_detector(bundle)

    def torch_call(self, model: Any, batch: Any) -> Any:
        """One prepared image, batched to (1, 3, h, w) as the graph takes it → (boxes, scores, labels)."""
        import torch

        x = np.ascontiguousarray(pixels(batch), dtype=np.float32)[None]
        return tuple(t.numpy() for t in model(torch.from_numpy(x)))

    def describe(self, ds: Dataset, splits: dict[str, list[Record]], cfg: TrainConfig) -> str:
        n_boxes = train_boxes(splits)
        return (f"{ds.fmt} data, detect: {len(ds.classes)} classes, {len(ds.records)} images → train "
                f"{len(splits['train'])} ({n_boxes} boxes) / val {len(splits['val'])} / test {len(splits['test'])} "
                f"(seed {cfg.seed})")

    def check_resume(self, run_dir: Path, cfg: TrainConfig, classes: Sequence[str]) -> None:
        from lensforge.training.detect import check_resumable

        check_resumable(run_dir, cfg, classes)

    def load(self, splits: dict[str, list[Record]], built: Built, cfg: TrainConfig, ds: Dataset,
             ui: Reporter) -> TrainData:
        from lensforge.training.detect import (
            JITTER,
            DetectionImages,
            collate,
            load_detection_images,
        )

        if train_boxes(splits) == 0:
            raise DataError("the training split has no boxes (iscrowd regions are not trained on): a detector cannot "
                            "learn from negatives only; annotate some training images")
        loaded: dict[str, DetectionImages] = {}
        skipped = 0
        for name in ("train", "val"):
            with ui.track(f"Decoding {name} images", len(splits[name])) as advance:
                recs, imgs, factors, bad = load_detection_images(
                    splits[name], built.spec, max(JITTER) if name == "train" else 1.0, advance)
            loaded[name] = DetectionImages(recs, imgs, factors, train=name == "train")
            skipped += len(bad)
        return TrainData(loaded["train"], loaded["val"], skipped, collate=collate)  # images keep their sizes: lists

    def fit(self, built: Built, data: TrainData, cfg: TrainConfig, ds: Dataset, run_dir: Path,
            ui: Reporter) -> list[dict[str, Any]]:
        from lensforge.training.detect import DetectorModule
        from lensforge.training.finetune import fit

        module = DetectorModule(built.model, cfg, ds.classes, data.val if len(data.val) else None,
                                len(data.train_loader))
        ui.step(f"Fine-tuning {cfg.backbone} detector at {built.spec.min_size}px for up to {cfg.epochs} epochs")
        _, fitted = fit(module, data.train_loader, data.val_loader, cfg, run_dir, reporter=ui,
                        resume_from=run_dir / "checkpoints" / "last.ckpt" if cfg.resume else None,
                        monitor="val_map", precision="32-true")  # roi_align/NMS stay fp32
        return fitted.history

    def export(self, built: Built, data: TrainData, splits: dict[str, list[Record]], cfg: TrainConfig,
               path: Path) -> Parity:
        from lensforge.export.onnx import export_detector, verify_detector
        from lensforge.models.detector import ExportableDetector
        from lensforge.training.detect import parity_images

        model = built.model.eval()
        model.transform.min_size = (built.spec.min_size,)  # the graph resizes like evaluation did
        model.transform.max_size = built.spec.max_size
        graph = ExportableDetector(model).eval()
        checks = parity_images(data.val, splits["train"], built.spec)
        export_detector(graph, checks[0], path)
        record = verify_detector(graph, path, checks, min_iou=MIN_PARITY_IOU)
        return Parity(float(record["max_score_diff"]), record)

    def model_meta(self, built: Built, cfg: TrainConfig, classes: Sequence[str]) -> dict[str, Any]:
        return {"input": "images", "outputs": list(DETECT_OUTPUTS), "backbone": cfg.backbone,
                "num_classes": len(classes)}

    def initial_meta(self) -> dict[str, Any]:
        return {"score_threshold": DEFAULT_THRESHOLD}

    # -- scoring ---------------------------------------------------------------------------

    def tune(self, val: Scored | None, classes: Sequence[str], cfg: TrainConfig, ui: Reporter) -> dict[str, Any]:
        from lensforge.metrics.detection import best_threshold

        if val is None:
            ui.warn(f"no validation images: the score threshold stays at {DEFAULT_THRESHOLD}")
            return {}
        threshold, best = best_threshold(val.records, val.results, beta=cfg.beta)
        return {"score_threshold": threshold, "threshold_tuning": {"beta": cfg.beta, "iou": 0.5, "split": "val", **best}}

    def metrics(self, scored: Scored, classes: Sequence[str], meta: dict[str, Any]) -> Metrics:
        from lensforge.metrics.detection import detection_metrics

        threshold = float(meta.get("score_threshold", DEFAULT_THRESHOLD))
        beta = float(meta.get("threshold_tuning", {}).get("beta", self.defaults["beta"]))
        return detection_metrics(scored.records, scored.results, classes, threshold, beta=beta)

    def at_threshold(self, scored: Scored, meta: dict[str, Any]) -> Scored:
        """The results carrying the bundle's tuned threshold (what drawings and tables show)."""
        threshold = float(meta.get("score_threshold", DEFAULT_THRESHOLD))
        return dataclasses.replace(scored, results=[dataclasses.replace(r, threshold=threshold) for r in scored.results])

    def write_report(self, out: Path, bundle: Bundle, scored: Scored, metrics: Metrics) -> list[Path]:
        """metrics.json, predictions.csv (one row per detection at or above the threshold) and
        the plots: PR curves, per-class AP, F-beta against the threshold, and a grid of images
        with ground truth beside predictions."""
        from lensforge.metrics import detection_plots as dp

        out.mkdir(parents=True, exist_ok=True)
        data = metrics.to_dict()
        (out / "metrics.json").write_text(json.dumps(data, indent=2) + "\n")
        threshold = float(data["threshold"])
        with (out / "predictions.csv").open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["path", "label", "score", "x1", "y1", "x2", "y2"])
            for r, res in zip(scored.records, scored.results):
                kept = res.above(threshold)
                for label, score, box in zip(kept.labels, kept.scores, kept.boxes):
                    w.writerow([str(r.path), label, f"{score:.5f}", *(f"{v:.1f}" for v in box)])
        written = [
            dp.plot_detection_pr_curves(data, out / "pr_curves.png"),
            dp.plot_ap_bars(data, out / "per_class_ap.png"),
            dp.plot_fbeta_curve(data, out / "fbeta_threshold.png"),
            dp.plot_detection_grid(scored.records, scored.results, out / "examples.png", threshold=threshold),
        ]
        return [Path(p) for p in written]


def train_boxes(splits: dict[str, list[Record]]) -> int:
    """Boxes a detector learns from in the training split (crowd regions are not trained on)."""
    return sum(int((~r.crowd_array()).sum()) for r in splits["train"])
