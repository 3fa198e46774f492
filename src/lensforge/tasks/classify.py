"""Image classification: single-label (softmax, accuracy) and multi-label (sigmoid, per-label
thresholds tuned for F-beta, mAP). One backbone + head; fine-tuned with Lightning or fitted
as a linear probe on frozen features; exported as ``images (N, 3, S, S) → scores (N, C)``."""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from lensforge.data.records import Dataset, Record, targets
from lensforge.errors import DataError, ImageError
from lensforge.runtime.results import DEFAULT_THRESHOLD
from lensforge.tasks.base import Built, Parity, Scored, Task, TrainData

if TYPE_CHECKING:
    from lensforge.config import TrainConfig
    from lensforge.metrics.base import Metrics
    from lensforge.runtime.bundle import Bundle
    from lensforge.ui import Reporter

PARITY_IMAGES = 16  # validation images the export is checked on


class Classify(Task):
    name = "classify"
    multilabel: ClassVar[bool] = False
    compare_key = compare_label = "accuracy"
    defaults: ClassVar[dict[str, Any]] = {"image_size": 224, "batch_size": 32, "lr": 5e-4, "weight_decay": 0.05,
                                          "beta": 1.0}

    # -- model -----------------------------------------------------------------------------

    def build(self, cfg: TrainConfig, ds: Dataset) -> Built:
        from lensforge.models import Classifier, create_backbone
        from lensforge.runtime.preprocess import InputSpec

        backbone, bb_cfg = create_backbone(cfg.backbone, pretrained=cfg.pretrained, weights=cfg.weights,
                                           image_size=cfg.image_size)
        interpolation = bb_cfg.get("interpolation")
        spec = InputSpec.for_size(
            cfg.image_size, crop_pct=float(bb_cfg.get("crop_pct", 0.875)),
            mean=tuple(bb_cfg.get("mean", (0.485, 0.456, 0.406))), std=tuple(bb_cfg.get("std", (0.229, 0.224, 0.225))),
            interpolation=interpolation if interpolation in ("bilinear", "bicubic") else "bilinear",
        )
        model = Classifier(backbone, len(ds.classes), head=cfg.head, dropout=cfg.dropout)
        return Built(model, spec)

    def torch_model(self, bundle: Bundle) -> Any:
        """The bundle's graph rebuilt in torch from its weights (bench's eager row, export parity)."""
        from lensforge.models.classifier import load_bundle_model

        return load_bundle_model(bundle)

    def torch_call(self, model: Any, batch: Any) -> Any:
        import torch

        return model(torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32))).numpy()

    # -- training --------------------------------------------------------------------------

    def load(self, splits: dict[str, list[Record]], built: Built, cfg: TrainConfig, ds: Dataset,
             ui: Reporter) -> TrainData:
        from lensforge.training.dataset import (
            RecordDataset,
            eval_transform,
            load_images,
            train_transform,
        )

        loaded = {}
        skipped = 0
        for name in ("train", "val"):
            with ui.track(f"Decoding {name} images", len(splits[name])) as advance:
                good, images, bad = load_images(splits[name], built.spec, advance)
            loaded[name] = (good, images)
            skipped += len(bad)
        n = len(ds.classes)
        train = RecordDataset(loaded["train"][0], n, self.multilabel, train_transform(built.spec), built.spec,
                              loaded["train"][1])
        val = RecordDataset(loaded["val"][0], n, self.multilabel, eval_transform(built.spec), built.spec,
                            loaded["val"][1])
        return TrainData(train, val, skipped)

    def fit(self, built: Built, data: TrainData, cfg: TrainConfig, ds: Dataset, run_dir: Path,
            ui: Reporter) -> list[dict[str, Any]]:
        if cfg.probe:
            from lensforge.training.probe import fit_linear_probe

            fit_linear_probe(built.model, data, ds, cfg, built.spec, ui)
            return []
        from lensforge.training.finetune import ClassifierModule, fit

        ui.step(f"Fine-tuning {cfg.backbone} at {built.spec.size}px for up to {cfg.epochs} epochs")
        module = ClassifierModule(built.model, self.multilabel, cfg, steps_per_epoch=len(data.train_loader))
        _, fitted = fit(module, data.train_loader, data.val_loader, cfg, run_dir, reporter=ui,
                        resume_from=run_dir / "checkpoints" / "last.ckpt" if cfg.resume else None,
                        monitor="val_map" if self.multilabel else "val_acc", channels_last=True)
        return fitted.history

    # -- the bundle ------------------------------------------------------------------------

    def export(self, built: Built, data: TrainData, splits: dict[str, list[Record]], cfg: TrainConfig,
               path: Path) -> Parity:
        import torch

        from lensforge.export.onnx import export_onnx, verify_onnx
        from lensforge.models import ScoresModel
        from lensforge.training.dataset import eval_transform

        scores_model = ScoresModel(built.model.eval(), self.multilabel).eval()
        n_check = min(PARITY_IMAGES, len(data.val))
        if n_check:
            batch = torch.stack([data.val[i][0] for i in range(n_check)])
        else:  # no validation images: check on training images through the same eval transform
            batch = torch.stack([eval_transform(built.spec)(_first_image(splits["train"], built.spec))])
        export_onnx(scores_model, batch[:1], path)
        diff = verify_onnx(scores_model, path, batch, cfg.max_parity)
        return Parity(diff, {"max_abs_diff": diff, "images": int(len(batch)),
                             "compared": "scores, ONNX Runtime vs torch fp32"})

    def export_explain(self, built: Built, path: Path) -> dict[str, Any] | None:
        from lensforge.explain.export import export_explain

        return export_explain(built.model, self.multilabel, built.spec.size, path)

    def model_meta(self, built: Built, cfg: TrainConfig, classes: Sequence[str]) -> dict[str, Any]:
        return {"input": "images", "output": "scores", "backbone": cfg.backbone, "head": cfg.head,
                "probe": cfg.probe, "num_classes": len(classes)}

    def initial_meta(self) -> dict[str, Any]:
        return {"thresholds": None}

    # -- scoring ---------------------------------------------------------------------------

    def arrays(self, scored: Scored, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
        """(targets: class indices (N,) or 0/1 (N, C), scores float32 (N, C)) of ``scored``."""
        s = (np.stack([r.scores for r in scored.results]) if scored.results
             else np.zeros((0, n_classes), np.float32))
        return targets(scored.records, n_classes, self.multilabel), s

    def metrics(self, scored: Scored, classes: Sequence[str], meta: dict[str, Any]) -> Metrics:
        return self.array_metrics(*self.arrays(scored, len(classes)), classes, meta)

    def array_metrics(self, y: np.ndarray, s: np.ndarray, classes: Sequence[str], meta: dict[str, Any]) -> Metrics:
        """The metrics of targets ``y`` and scores ``s`` (see :meth:`arrays`)."""
        from lensforge.metrics.classification import single_label_metrics

        return single_label_metrics(y, s, list(classes))

    def write_report(self, out: Path, bundle: Bundle, scored: Scored, metrics: Metrics) -> list[Path]:
        from lensforge.metrics import plots

        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps(metrics.to_dict(), indent=2) + "\n")
        y, s = self.arrays(scored, len(bundle.classes))
        with (out / "predictions.csv").open("w", newline="") as f:
            self.write_predictions(csv.writer(f), scored.records, y, s, bundle)
        written = [self.main_plot(out, bundle, y, s, metrics),
                   plots.plot_per_class_bars(metrics["per_class"], out / "per_class.png", metric="f1")]
        return [Path(p) for p in written]

    def write_predictions(self, w: Any, records: list[Record], y: np.ndarray, s: np.ndarray, bundle: Bundle) -> None:
        classes = bundle.classes
        w.writerow(["path", "true", "predicted", "score", "correct"])
        for r, yt, sc in zip(records, y, s):
            k = int(sc.argmax())
            w.writerow([str(r.path), classes[int(yt)], classes[k], f"{sc[k]:.5f}", int(k == int(yt))])

    def main_plot(self, out: Path, bundle: Bundle, y: np.ndarray, s: np.ndarray, metrics: Metrics) -> Path:
        from lensforge.metrics import plots

        return plots.plot_confusion_matrix(np.asarray(metrics["confusion_matrix"]), bundle.classes,
                                           out / "confusion_matrix.png")


class Multilabel(Classify):
    """Several labels per image: sigmoid scores, one threshold per label tuned on validation."""

    name = "multilabel"
    multilabel = True
    compare_key = compare_label = "mAP"

    def tune(self, val: Scored | None, classes: Sequence[str], cfg: TrainConfig, ui: Reporter) -> dict[str, Any]:
        from lensforge.metrics.classification import tune_thresholds

        if val is None:
            ui.warn(f"no validation images: multi-label thresholds stay at {DEFAULT_THRESHOLD}")
            thresholds = np.full(len(classes), DEFAULT_THRESHOLD, np.float32)
        else:
            thresholds = tune_thresholds(*self.arrays(val, len(classes)), beta=cfg.beta)
        return {"thresholds": [float(t) for t in thresholds], "threshold_beta": cfg.beta}

    def array_metrics(self, y: np.ndarray, s: np.ndarray, classes: Sequence[str], meta: dict[str, Any]) -> Metrics:
        from lensforge.metrics.classification import multilabel_metrics

        th = meta.get("thresholds")
        return multilabel_metrics(y, s, np.asarray(th if th is not None else [DEFAULT_THRESHOLD] * len(classes),
                                                   np.float32), list(classes))

    def write_predictions(self, w: Any, records: list[Record], y: np.ndarray, s: np.ndarray, bundle: Bundle) -> None:
        classes = bundle.classes
        th = bundle.thresholds if bundle.thresholds is not None else np.full(len(classes), DEFAULT_THRESHOLD)
        w.writerow(["path", "true", "predicted", *classes])
        for r, yt, sc in zip(records, y, s):
            w.writerow([str(r.path), ";".join(classes[j] for j in np.flatnonzero(yt)),
                        ";".join(classes[j] for j in np.flatnonzero(sc >= th)), *[f"{v:.5f}" for v in sc]])

    def main_plot(self, out: Path, bundle: Bundle, y: np.ndarray, s: np.ndarray, metrics: Metrics) -> Path:
        from lensforge.metrics import plots

        return plots.plot_pr_curves(y, s, bundle.classes, out / "pr_curves.png", thresholds=bundle.thresholds)


def _first_image(records: list[Record], spec: Any) -> Any:
    from lensforge.data.image import decode_image

    for r in records:
        try:
            return decode_image(r.path, min_size=spec.resize)
        except ImageError:
            continue
    raise DataError("no readable image to verify the export with")
