"""``lensforge demo``: generated data → inspect → train → evaluate → predict, in minutes on a
laptop CPU. The first thing a new user runs, and a smoke test of the whole spine.

The demo is a console walk-through: it prints, through the CLI's renderers
(:mod:`lensforge.cli.render`), on the console it is given."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lensforge.ui import Reporter

if TYPE_CHECKING:
    from rich.console import Console

    from lensforge.metrics.base import Metrics

# Small images and few epochs keep the demo under 3 minutes on 2 cores; the pretrained
# backbone makes that enough to pass the stated bar.
DEMO_IMAGE_SIZE = 112
DEMO_DATA_SIZE = 128  # generated side; 112 / 128 = timm's crop_pct 0.875, so resizing is a no-op
# per task: (images per class, epochs, backbone learning rate). Multi-label shapes overlap
# and each label is on half the images, so that demo gets more images and a faster schedule.
DEMO_SETTINGS = {"classify": (80, 6, 5e-4), "multilabel": (120, 8, 2e-3)}
GOAL = {"classify": ("accuracy", 0.9), "multilabel": ("mAP", 0.9), "detect": ("map50", 0.5)}
# detection: (train, val, test images, side in px, epochs, learning rate); sized so the whole
# demo stays under 5 minutes on 2 cores with the offline Lite0-FPN detector
DETECT_DEMO = {"n_train": 160, "n_val": 40, "n_test": 40, "size": 128, "epochs": 5, "lr": 5e-4}


def run_demo(
    root: Path, task: str = "classify", epochs: int | None = None,
    reporter: Reporter | None = None, console: Console | None = None,
) -> int:
    """Returns 0 when the test-split metric reaches the stated goal, 1 otherwise."""
    from lensforge.cli.console import console as cli_console
    from lensforge.cli.render import print_metrics
    from lensforge.config import TrainConfig
    from lensforge.data.demo import make_demo_dataset
    from lensforge.runtime.predictor import Predictor
    from lensforge.training import train

    ui = reporter or Reporter()
    out = console or cli_console
    t0 = time.perf_counter()
    data_dir = root / "data"
    if task == "detect":
        return _run_detect_demo(root, data_dir, epochs, ui, out, t0)
    ui.step(f"1/4 Generating a synthetic {task} dataset in {data_dir}")
    per_class, demo_epochs, lr = DEMO_SETTINGS[task]
    make_demo_dataset(data_dir, task=task, size=DEMO_DATA_SIZE, n_per_class=per_class)

    ds = _inspect(data_dir, ui)

    ui.step("3/4 Training (EfficientNet-Lite0, ImageNet weights from the offline package)")
    cfg = TrainConfig(
        data=str(data_dir), out=str(root / "run"), overwrite=True, image_size=DEMO_IMAGE_SIZE,
        epochs=epochs or demo_epochs, batch_size=32, lr=lr, warmup_epochs=0.5, patience=0,
    )
    result = train(cfg, reporter=ui)
    test = result.metrics["test"]
    out.print()
    print_metrics(test, out)

    ui.step("4/4 Predicting three test images with the ONNX bundle (no torch)")
    predictor = Predictor(result.bundle_dir)
    from lensforge.data.split import load_split

    sample = load_split(result.bundle_dir / "split.json", ds)["test"][:3]
    for r in sample:
        res = predictor.predict(r.path)
        truth = ", ".join(ds.classes[i] for i in r.labels) or "(none)"
        got = ", ".join(res.labels) or "(none)"
        out.print(f"  {r.path.name}: predicted [bold]{got}[/]  (true: {truth}; top score {res.top(1)[0][1]:.3f})")

    return _verdict(out, result, test, metric_name=GOAL[result.task][0], t0=t0,
                    try_command=f"lensforge predict {result.bundle_dir} {data_dir}")



def _run_detect_demo(root: Path, data_dir: Path, epochs: int | None, ui: Reporter, out: Console, t0: float) -> int:
    from lensforge.cli.render import print_metrics
    from lensforge.config import TrainConfig
    from lensforge.data.demo import make_demo_detection
    from lensforge.runtime.draw import save_annotated
    from lensforge.runtime.predictor import Predictor
    from lensforge.training import train

    d = DETECT_DEMO
    ui.step(f"1/4 Generating a synthetic detection dataset (Roboflow COCO export) in {data_dir}")
    make_demo_detection(data_dir, n_train=d["n_train"], n_val=d["n_val"], n_test=d["n_test"], size=d["size"])
    ds = _inspect(data_dir, ui)

    ui.step("3/4 Training a Faster R-CNN (EfficientNet-Lite0 + FPN, ImageNet weights from the offline package)")
    cfg = TrainConfig(
        data=str(data_dir), out=str(root / "run-detect"), overwrite=True, image_size=d["size"],
        epochs=epochs or d["epochs"], batch_size=4, lr=d["lr"], warmup_epochs=0.5, patience=0,
    )
    result = train(cfg, reporter=ui)
    test = result.metrics.get("test") or result.metrics["val"]
    out.print()
    print_metrics(test, out)

    ui.step("4/4 Detecting objects in three test images with the ONNX bundle (no torch), drawing them")
    predictor = Predictor(result.bundle_dir)
    annotated = root / "annotated"
    annotated.mkdir(parents=True, exist_ok=True)
    taken: set[Path] = set()
    for r in [r for r in ds.records if r.split == "test"][:3]:
        res = predictor.predict(r.path).above()
        found = ", ".join(f"{label} {score:.2f}" for label, score in zip(res.labels, res.scores)) or "(nothing)"
        path = save_annotated(r.path, res, annotated, taken=taken)
        out.print(f"  {r.path.name}: {len(r.boxes)} true object(s); found {found} → {path}")

    return _verdict(out, result, test, metric_name="AP50", t0=t0,
                    try_command=f"lensforge predict {result.bundle_dir} {data_dir / 'test'} --annotate {annotated}")


def _inspect(data_dir: Path, ui: Reporter) -> Any:
    """Step 2 of both demos: read the generated data and say what inspect makes of it."""
    from lensforge.data.formats import read_dataset
    from lensforge.data.inspect import inspect_dataset

    ds = read_dataset(data_dir)
    report = inspect_dataset(ds, verify=True)
    ui.step(f"2/4 Inspected: {report.get('verdict', '')}".rstrip(": "))
    return ds


def _verdict(out: Console, result: Any, test: Metrics, metric_name: str, t0: float, try_command: str) -> int:
    """The last lines of both demos: the test metric against GOAL; 0 when it is reached."""
    metric, goal = GOAL[result.task]
    value = test.get(metric) or 0.0
    ok = value >= goal
    verdict = "[green]PASS[/]" if ok else "[red]BELOW GOAL[/]"
    out.print(f"\n{verdict} test {metric_name} {value:.3f} (goal ≥ {goal}) in {time.perf_counter() - t0:.0f} s. "
              f"Bundle: {result.bundle_dir}")
    out.print(f"Try: {try_command}")
    return 0 if ok else 1
