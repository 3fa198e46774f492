"""``train(config)``: data → split → model → fit (or probe) → ONNX → verified bundle."""

from __future__ import annotations

import dataclasses
import logging
import os
import platform
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lensforge import __version__
from lensforge.config import TrainConfig
from lensforge.data.formats import read_dataset
from lensforge.data.records import Dataset, Record, targets
from lensforge.data.split import load_split, save_split, split_records
from lensforge.errors import ConfigError, DataError, ImageError, TrainingInterrupted
from lensforge.export.onnx import export_onnx, verify_onnx
from lensforge.hardware import cpu_count, describe
from lensforge.models import Classifier, ScoresModel, create_backbone
from lensforge.runtime.bundle import MODEL_FILE, SPLIT_FILE, WEIGHTS_FILE, atomic_directory, write_meta
from lensforge.runtime.preprocess import InputSpec
from lensforge.runtime.results import DEFAULT_THRESHOLD
from lensforge.training.dataset import RecordDataset, eval_transform, load_images, train_transform
from lensforge.ui import Reporter

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    task: str  # "classify", "multilabel" or "detect"
    run_dir: Path
    bundle_dir: Path
    metrics: dict[str, Any]  # {"val": {...}, "test": {...}}
    parity: float  # max |ONNX - torch| score difference on real validation images
    skipped_images: int
    history: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0  # wall time of the whole train() call


def default_run_dir(ds_path: Path, task: str, probe: bool) -> Path:
    name = (ds_path.stem if ds_path.is_file() else ds_path.name) or "data"
    return Path("runs") / f"{name}-{task}{'-probe' if probe else ''}"


def versions() -> dict[str, str]:
    import lightning
    import onnxruntime
    import timm

    return {
        "lensforge": __version__, "python": platform.python_version(), "torch": str(torch.__version__),
        "timm": str(timm.__version__), "lightning": str(lightning.__version__), "onnxruntime": str(onnxruntime.__version__),
    }


def is_run_dir(path: Path) -> bool:
    """Whether ``path`` looks like a directory ``train`` made (the only kind --overwrite replaces)."""
    return (path / "config.yaml").is_file() or (path / "bundle" / "lensforge.json").is_file()


def prepare_run_dir(cfg: TrainConfig, run_dir: Path) -> Path | None:
    """Make ``run_dir`` ready. With --overwrite an earlier run is moved aside, not deleted:
    the caller deletes it once the new run has succeeded, or puts it back if it failed.
    Returns the moved-aside run, if any."""
    if cfg.resume:
        if not (run_dir / "checkpoints" / "last.ckpt").is_file():
            raise ConfigError(f"nothing to resume: {run_dir / 'checkpoints' / 'last.ckpt'} does not exist")
        return None
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"--out {run_dir} is a file; choose a directory")
    if run_dir.exists() and any(run_dir.iterdir()):
        if not cfg.overwrite:
            raise ConfigError(f"run directory {run_dir} already exists; pass --overwrite to replace it, --resume to continue it, or --out DIR")
        if not is_run_dir(run_dir):
            raise ConfigError(f"refusing to replace {run_dir}: it is not a lensforge run directory (no config.yaml); choose another --out")
        previous = run_dir.with_name(f".{run_dir.name}.previous-{os.getpid()}")
        os.replace(run_dir, previous)
        run_dir.mkdir(parents=True)
        return previous
    run_dir.mkdir(parents=True, exist_ok=True)
    return None


def make_split(ds: Dataset, cfg: TrainConfig, run_dir: Path) -> dict[str, list[Record]]:
    split_file = run_dir / SPLIT_FILE
    if cfg.resume and split_file.is_file():
        return load_split(split_file, ds)
    splits = split_records(ds, test=cfg.test_fraction, val=cfg.val_fraction, seed=cfg.seed)
    if not splits["train"]:
        raise DataError(f"no training images left after splitting {ds.root}; add images or lower --split")
    save_split(splits, ds, split_file, seed=cfg.seed)
    return splits


def train(cfg: TrainConfig | None = None, reporter: Reporter | None = None, **overrides: Any) -> TrainResult:
    """Train a classifier or detector and write its run directory and bundle.

    ``lensforge.train(data="images/", epochs=5)`` works as well as passing a TrainConfig.
    Returns where everything went and the validation/test metrics.
    """
    t0 = time.perf_counter()
    # a copy: the caller's config is never changed (a loop over datasets must not inherit a task)
    cfg = dataclasses.replace(cfg or TrainConfig()).override(**overrides).validate()
    ui = reporter or Reporter()
    torch.set_num_threads(cpu_count())

    ds = read_dataset(cfg.data, fmt=cfg.format, task=cfg.task,
                      outside_root="allow" if cfg.allow_outside_root else "refuse")
    cfg.task = ds.task
    cfg.resolve(ds.task)
    import lightning as L

    L.seed_everything(cfg.seed, verbose=False)
    # the model (name, weights file) is checked before anything is written, so a typo
    # leaves no run directory behind
    if ds.task == "detect":
        from lensforge.training.detect import build_detector, train_detector_in

        if cfg.probe:
            raise ConfigError("--probe fits a classifier head on frozen features; detectors are fine-tuned (drop --probe)")
        detector = build_detector(cfg, len(ds.classes))
        work = lambda run_dir: train_detector_in(run_dir, cfg, ds, detector, ui)  # noqa: E731
    else:
        backbone, bb_cfg = create_backbone(cfg.backbone, pretrained=cfg.pretrained, weights=cfg.weights, image_size=cfg.image_size)
        spec = InputSpec.for_size(
            cfg.image_size, crop_pct=float(bb_cfg.get("crop_pct", 0.875)),
            mean=tuple(bb_cfg.get("mean", (0.485, 0.456, 0.406))), std=tuple(bb_cfg.get("std", (0.229, 0.224, 0.225))),
            interpolation=bb_cfg.get("interpolation") if bb_cfg.get("interpolation") in ("bilinear", "bicubic") else "bilinear",
        )
        work = lambda run_dir: _train_in(run_dir, cfg, ds, backbone, spec, ui)  # noqa: E731
    run_dir = Path(cfg.out) if cfg.out else default_run_dir(Path(cfg.data), ds.task, cfg.probe)
    fresh = not run_dir.exists()
    previous = prepare_run_dir(cfg, run_dir)
    try:
        result = work(run_dir)
    except TrainingInterrupted:
        _discard(previous)  # the new run is resumable, and replacing the old one was asked for
        raise
    except BaseException:
        if previous is not None:  # put the earlier run back as it was
            shutil.rmtree(run_dir, ignore_errors=True)
            os.replace(previous, run_dir)
        elif fresh and not (run_dir / "checkpoints").is_dir():  # nothing worth keeping
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    _discard(previous)
    result.seconds = time.perf_counter() - t0
    return result


def _discard(path: Path | None) -> None:
    if path is not None:
        shutil.rmtree(path, ignore_errors=True)


def _train_in(run_dir: Path, cfg: TrainConfig, ds: Dataset, backbone: torch.nn.Module, spec: InputSpec, ui: Reporter) -> TrainResult:
    task = ds.task
    multilabel = task == "multilabel"
    cfg.save(run_dir / "config.yaml", versions=versions(), machine=describe())
    splits = make_split(ds, cfg, run_dir)
    ui.step(
        f"{ds.fmt} data, {task}: {len(ds.classes)} classes, {len(ds.records)} images → "
        f"train {len(splits['train'])} / val {len(splits['val'])} / test {len(splits['test'])} (seed {cfg.seed})"
    )
    model = Classifier(backbone, len(ds.classes), head=cfg.head, dropout=cfg.dropout)

    loaded: dict[str, tuple[list[Record], list | None]] = {}
    skipped = 0
    for name in ("train", "val"):
        with ui.track(f"Decoding {name} images", len(splits[name])) as advance:
            good, images, bad = load_images(splits[name], spec, advance)
        loaded[name] = (good, images)
        skipped += len(bad)
    if skipped:
        ui.warn(f"skipped {skipped} unreadable image(s); `lensforge data inspect {cfg.data}` lists them")
    if not loaded["train"][0]:
        raise DataError("no readable training images")

    def dataset(name: str, transform: Any) -> RecordDataset:
        recs, imgs = loaded[name]
        return RecordDataset(recs, len(ds.classes), multilabel, transform, spec, imgs)

    def loader(d: RecordDataset, shuffle: bool) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(
            d, batch_size=cfg.batch_size, shuffle=shuffle, num_workers=cfg.workers,
            drop_last=shuffle and len(d) > cfg.batch_size, persistent_workers=cfg.workers > 0,
            generator=torch.Generator().manual_seed(cfg.seed) if shuffle else None,
        )

    val_set = dataset("val", eval_transform(spec))
    history: list[dict[str, Any]] = []
    if cfg.probe:
        fit_linear_probe(model, dataset("train", eval_transform(spec)), val_set, ds, cfg, spec, run_dir, multilabel, ui)
    else:
        from lensforge.training.finetune import fit

        ui.step(f"Fine-tuning {cfg.backbone} at {spec.size}px for up to {cfg.epochs} epochs")
        _, fitted = fit(
            model, loader(dataset("train", train_transform(spec)), True), loader(val_set, False) if len(val_set) else None,
            cfg, run_dir, multilabel, reporter=ui,
            resume_from=run_dir / "checkpoints" / "last.ckpt" if cfg.resume else None,
        )
        history = fitted.history
        _write_history(history, run_dir)

    bundle_dir = run_dir / "bundle"
    parity, metrics, scored = write_bundle(model, ds, splits, val_set, cfg, spec, bundle_dir, multilabel, ui, history)
    held_out = "test" if "test" in scored else "val" if "val" in scored else None
    if held_out:
        from lensforge.evaluation import write_report
        from lensforge.runtime.bundle import load_bundle

        done, y, s, failed = scored[held_out]
        if failed:
            ui.warn(f"{len(failed)} {held_out} image(s) could not be read and are not in the {held_out} metrics")
        report = {**metrics[held_out], "evaluated_on": f"the {held_out} split saved at training time"}
        write_report(run_dir / "eval", load_bundle(bundle_dir), done, y, s, report)
    return TrainResult(task, run_dir, bundle_dir, metrics, parity, skipped, history)


def fit_linear_probe(
    model: Classifier, train_set: RecordDataset, val_set: RecordDataset, ds: Dataset, cfg: TrainConfig,
    spec: InputSpec, run_dir: Path, multilabel: bool, ui: Reporter,
) -> None:
    from lensforge.training.probe import cached_features, extract_features, fit_probe, set_linear_head

    loader = torch.utils.data.DataLoader(train_set, batch_size=64, shuffle=False, num_workers=cfg.workers)
    key = [cfg.backbone, str(cfg.weights), str(cfg.pretrained), repr(spec)] + [_file_key(r.path) for r in train_set.records]

    def compute() -> np.ndarray:
        with ui.track("Extracting features", len(train_set)) as advance:
            return extract_features(model.backbone, loader, advance)

    feats = cached_features(feature_cache_dir(), key, compute)
    y = targets(train_set.records, len(ds.classes), multilabel)
    ui.step(f"Fitting logistic regression on {feats.shape[0]} × {feats.shape[1]} features")
    weight, bias = fit_probe(feats, y, len(ds.classes), multilabel, cfg.probe_c, cfg.seed)
    set_linear_head(model, weight, bias)


def feature_cache_dir() -> Path:
    """Where probe features are kept between runs: $LENSFORGE_CACHE, else ~/.cache/lensforge."""
    root = os.environ.get("LENSFORGE_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lensforge"
    return Path(root) / "features"


def _file_key(path: Path) -> str:
    """A changed image (size or mtime) gets new features."""
    st = path.stat()
    return f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"


def _write_history(history: list[dict[str, Any]], run_dir: Path) -> None:
    from lensforge.metrics.plots import plot_training_curves

    curves = [{"epoch": r["epoch"], **{k: v for k, v in r.items() if k.startswith(("train_", "val_"))}} for r in history]
    if any(len(row) > 1 for row in curves):  # a run stopped before its first epoch ended has nothing to draw
        plot_training_curves(curves, run_dir / "training_curves.png")


def write_bundle(
    model: Classifier, ds: Dataset, splits: dict[str, list[Record]], val_set: RecordDataset, cfg: TrainConfig,
    spec: InputSpec, bundle_dir: Path, multilabel: bool, ui: Reporter, history: list[dict[str, Any]],
) -> tuple[float, dict[str, Any], dict[str, Any]]:
    """Export, verify, tune thresholds, measure, and write the bundle atomically.

    Returns (parity, metrics per split, ONNX Runtime outputs per split as returned by
    ``score_records``) so the caller can write the evaluation report without re-running."""
    from safetensors.torch import save_file

    from lensforge.evaluation import score_records
    from lensforge.metrics.classification import tune_thresholds
    from lensforge.runtime.predictor import Predictor

    model = model.eval()
    scores_model = ScoresModel(model, multilabel).eval()
    n_check = min(16, len(val_set)) or 0
    if n_check:
        batch = torch.stack([val_set[i][0] for i in range(n_check)])
    else:  # no validation images: check on training images through the same eval transform
        batch = torch.stack([eval_transform(spec)(_first_image(splits["train"], spec))])
    with atomic_directory(bundle_dir, overwrite=True) as tmp:
        ui.step("Exporting to ONNX and checking it against torch")
        export_onnx(scores_model, batch[:1], tmp / MODEL_FILE)
        parity = verify_onnx(scores_model, tmp / MODEL_FILE, batch, cfg.max_parity)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp / WEIGHTS_FILE))
        save_split(splits, ds, tmp / SPLIT_FILE, seed=cfg.seed)
        meta: dict[str, Any] = {
            "task": "multilabel" if multilabel else "classify",
            "classes": ds.classes,
            "input": spec.to_dict(),
            "model": {"file": MODEL_FILE, "input": "images", "output": "scores", "backbone": cfg.backbone,
                      "head": cfg.head, "probe": cfg.probe, "num_classes": len(ds.classes)},
            "thresholds": None,
            "parity": {"max_abs_diff": parity, "images": int(len(batch)), "compared": "scores, ONNX Runtime vs torch fp32"},
            **run_meta(ds, splits, cfg, history),
        }
        write_meta(tmp, meta)
        predictor = Predictor(tmp)
        metrics: dict[str, Any] = {}
        evaluated: dict[str, Any] = {}
        for name in ("val", "test"):
            if splits[name]:
                with ui.track(f"Scoring {name} split with ONNX Runtime", len(splits[name])) as advance:
                    evaluated[name] = score_records(predictor, splits[name], len(ds.classes), multilabel, advance)
        if multilabel:
            if "val" in evaluated:
                y, s = evaluated["val"][1], evaluated["val"][2]
                thresholds = tune_thresholds(y, s, beta=cfg.beta)
            else:
                ui.warn(f"no validation images: multi-label thresholds stay at {DEFAULT_THRESHOLD}")
                thresholds = np.full(len(ds.classes), DEFAULT_THRESHOLD, np.float32)
            meta["thresholds"] = [float(t) for t in thresholds]
            meta["threshold_beta"] = cfg.beta
        from lensforge.evaluation import compute_metrics

        for name, (_, y, s, _failed) in evaluated.items():
            metrics[name] = compute_metrics(y, s, ds.classes, multilabel, meta["thresholds"])
        meta["metrics"] = {k: _headline(v) for k, v in metrics.items()}
        write_meta(tmp, meta)
    return parity, metrics, evaluated


def run_meta(ds: Dataset, splits: dict[str, list[Record]], cfg: TrainConfig, history: list[dict[str, Any]]) -> dict[str, Any]:
    """What every bundle's lensforge.json records about the run that made it."""
    return {
        # source: what the user gave (a COCO JSON or data.yaml may have any name; root is its folder)
        "data": {"root": str(ds.root.resolve()), "source": str(Path(cfg.data).resolve()), "format": ds.fmt,
                 "split_file": SPLIT_FILE,
                 "counts": {k: len(v) for k, v in splits.items()}, "notes": ds.notes},
        "training": {"epochs_run": len(history), "history": history},
        "versions": versions(),
        "config": cfg.to_dict(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _headline(m: dict[str, Any]) -> dict[str, Any]:
    """The numbers worth keeping in lensforge.json (tables go to the eval directory)."""
    return {k: v for k, v in m.items() if isinstance(v, (int, float))}


def _first_image(records: list[Record], spec: InputSpec) -> Any:
    from lensforge.data.image import decode_image

    for r in records:
        try:
            return decode_image(r.path, min_size=spec.resize)
        except ImageError:
            continue
    raise DataError("no readable image to verify the export with")
