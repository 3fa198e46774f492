"""The ``lensforge`` command line: one small function per subcommand builds its parser.

``train``'s options are made from :class:`~lensforge.config.TrainConfig`'s fields (see
:func:`add_config_options`): the option name from the field (``image_size`` →
``--image-size``), its type from the annotation, its help from the field's comment and its
default from the field or, where the field is None, from each task's ``defaults``. A new
setting is one line in ``config.py``; the few options that are not one field stay explicit.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from collections.abc import Callable
from typing import Any

from lensforge import __version__
from lensforge.cli import commands
from lensforge.config import ACCELERATORS, HEADS, PRECISIONS, TrainConfig, field_help
from lensforge.data.formats import FORMATS
from lensforge.data.records import TASKS
from lensforge.export import DEFAULT_CALIB
from lensforge.tasks import get_task

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
  lensforge report runs/photos-classify        one HTML page: metrics, plots, the worst mistakes
  lensforge export runs/photos-classify/bundle --to onnx-int8
  lensforge bench runs/photos-classify/bundle     which format, batch and threads to serve with
  lensforge serve runs/photos-classify/bundle --port 8000
"""


# -- argument types ---------------------------------------------------------------------------


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


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


def unit_float(text: str) -> float:
    value = finite_float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


def int_list(text: str) -> list[int]:
    """"1,8,32" → [1, 8, 32], each at least 1."""
    return [positive_int(part) for part in text.split(",") if part.strip()]


# -- train: options from TrainConfig ----------------------------------------------------------

# Fields that are not generated: the positional DATA, --split (both fractions in one option),
# the one-off actions (explicit below) and the free-form notes (YAML only).
NOT_GENERATED = frozenset({"data", "test_fraction", "val_fraction", "overwrite", "resume", "finish", "extra"})
# Values the option accepts, where the annotation (str) says less than the config checks.
CHOICES = {"task": TASKS, "format": FORMATS, "head": HEADS, "precision": PRECISIONS, "accelerator": ACCELERATORS}
# Settings argparse refuses before anything runs (usage error, exit 2), as it always has; the
# others are range-checked by TrainConfig.validate, which says the valid range.
STRICT_TYPES: dict[str, Callable[[str], Any]] = {
    "image_size": positive_int, "epochs": positive_int, "batch_size": positive_int, "beta": positive_float,
    "threads": positive_int,
}
# How the help names the tasks that share a default.
TASK_GROUPS = {("classify", "multilabel"): "classifiers", ("detect",): "detectors",
               ("classify",): "single-label", ("multilabel",): "multi-label"}


def _value_type(annotation: Any) -> type:
    """``int | None`` → int; ``bool`` → bool; anything else a plain type."""
    if isinstance(annotation, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    if isinstance(annotation, type) and annotation in (bool, int, float, str):
        return annotation
    raise TypeError(f"no command-line option for a {annotation} field: list it in NOT_GENERATED")


def default_text(name: str, default: Any) -> str:
    """" (default: X)" from the field, or " (default: A for classifiers, B for detectors)" where
    the field is None and the tasks fill it (``get_task(t).defaults``); "" for other None fields,
    whose help says what None means."""
    if default is not None and default != "":  # an empty default (e.g. --track: none) says nothing
        return f" (default: {default})"
    by_value: dict[Any, list[str]] = {}
    for task in TASKS:
        if name in get_task(task).defaults:
            by_value.setdefault(get_task(task).defaults[name], []).append(task)
    if not by_value:
        return ""
    shown = [f"{value} for {TASK_GROUPS.get(tuple(tasks), ' and '.join(tasks))}" for value, tasks in by_value.items()]
    return f" (default: {', '.join(shown)})"


def add_config_options(p: argparse.ArgumentParser) -> list[str]:
    """One option per :class:`TrainConfig` field not in NOT_GENERATED, in the fields' order;
    returns their names. Every option defaults to None: the config (file, or a resumed run's)
    keeps its value unless the option is given."""
    helps = field_help(TrainConfig)
    hints = typing.get_type_hints(TrainConfig)
    names = []
    for f in dataclasses.fields(TrainConfig):
        if f.name in NOT_GENERATED:
            continue
        flag, kind, default = "--" + f.name.replace("_", "-"), _value_type(hints[f.name]), f.default
        if kind is bool and default is True:  # on by default: the option turns it off
            p.add_argument("--no-" + flag[2:], dest=f.name, action="store_const", const=False, help=helps[f.name])
        elif kind is bool:
            p.add_argument(flag, dest=f.name, action="store_const", const=True, help=helps[f.name])
        else:
            p.add_argument(flag, dest=f.name, type=STRICT_TYPES.get(f.name, kind), choices=CHOICES.get(f.name),
                           help=helps[f.name] + default_text(f.name, default))
        names.append(f.name)
    return names


# -- one function per subcommand --------------------------------------------------------------


def add_demo(sub: Any) -> None:
    d = sub.add_parser("demo", help="generate a small dataset, train, evaluate and predict on it",
                       description="Generate a synthetic shapes dataset, then run inspect → train → evaluate → predict.")
    d.add_argument("--dir", default="lensforge-demo", help="where data and runs go (default: ./lensforge-demo)")
    d.add_argument("--task", choices=TASKS, default="classify")
    d.add_argument("--epochs", type=positive_int, default=None, help="override the demo's epoch count")
    d.set_defaults(func=commands.cmd_demo)


def add_data(sub: Any) -> None:
    data_parser = sub.add_parser("data", help="look at a dataset", description="Look at a dataset before training.")
    data_parser.set_defaults(func=lambda _args: (data_parser.print_help(), 2)[1])
    data = data_parser.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    i = data.add_parser("inspect", help="formats, classes, counts, broken/duplicate/odd images",
                        description="Report what lensforge sees in a dataset: format, classes, counts per split, image "
                                    "sizes, unreadable and duplicate files (also across splits), and odd images.")
    i.add_argument("data", help="dataset directory, CSV file, COCO JSON or YOLO data.yaml")
    i.add_argument("--format", choices=FORMATS, help="skip auto-detection")
    i.add_argument("--task", choices=TASKS, help="read a path,label CSV as multi-label")
    i.add_argument("--json", action="store_true", help="print the report as JSON")
    i.add_argument("--output", metavar="FILE", help="also write the JSON report to FILE (its folder is made; a pipeline's output)")
    i.add_argument("--fast", action="store_true", help="read image headers only (no full decode: misses truncation)")
    i.add_argument("--allow-outside-root", action="store_true", help=field_help(TrainConfig)["allow_outside_root"])
    i.set_defaults(func=commands.cmd_inspect)


def add_train(sub: Any) -> None:
    helps = field_help(TrainConfig)
    t = sub.add_parser("train", help="fine-tune a classifier or detector (or fit a linear probe) and write a bundle",
                       description="Train on DATA (class folders, train/val/test folders, a CSV, a COCO / Roboflow COCO "
                                   "export or a YOLO data.yaml) and write a run "
                                   "directory with a bundle: model.onnx, weights.safetensors, lensforge.json. "
                                   "Options override --config; the resolved config is saved in the run.")
    t.add_argument("data", nargs="?", help=helps["data"] + " (default: the --config file's data)")
    t.add_argument("--config", help="YAML file with any TrainConfig keys (command-line options win)")
    fields = add_config_options(t)
    t.add_argument("--split", help="TEST[,VAL] fractions for data that is not pre-split "
                                   f"(default {TrainConfig.test_fraction},{TrainConfig.val_fraction})")
    t.add_argument("--overwrite", action="store_true", help=helps["overwrite"])
    t.add_argument("--resume", action="store_true", help=helps["resume"])
    t.add_argument("--finish", action="store_true", help=helps["finish"])
    shown = t.add_mutually_exclusive_group()
    shown.add_argument("-q", "--quiet", action="store_true",
                       help="only warnings, errors and the final summary (no progress, no epoch table)")
    # SUPPRESS: `lensforge -v train ...` (the global flag) must not be reset by this one's default
    shown.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                       help="also the library's and Lightning's log messages")
    t.set_defaults(func=commands.cmd_train, config_fields=fields)


def add_runtime_options(p: argparse.ArgumentParser) -> None:
    """ONNX Runtime choices shared by every command that runs a bundle."""
    p.add_argument("--provider", action="append", metavar="NAME",
                   help="execution provider: cpu (default), cuda, tensorrt, openvino, dml, coreml, ... (repeat or comma-separate for an order)")
    p.add_argument("--fallback", action="store_true", help="drop unavailable providers instead of failing")
    p.add_argument("--optimization", choices=("disable", "basic", "extended", "all"), default="all",
                   help="ONNX Runtime graph optimisation level (default all)")
    p.add_argument("--cache-optimized", action="store_true", help="save the optimised graph next to the bundle and reuse it")
    p.add_argument("--threads", type=positive_int, help="onnxruntime threads (default: all cores)")


def add_evaluate(sub: Any) -> None:
    e = sub.add_parser("evaluate", help="metrics, plots and per-image predictions of a bundle on data",
                       description="Evaluate BUNDLE on DATA with ONNX Runtime. On the training data it uses the test "
                                   "split saved at training time, so test images never leak into training.")
    e.add_argument("bundle")
    e.add_argument("data")
    e.add_argument("--split", choices=("train", "val", "test", "all"), help="which saved split (default test)")
    e.add_argument("--out", help="output directory (default: <run>/eval)")
    e.add_argument("--json", action="store_true", help="print metrics as JSON")
    e.add_argument("--allow-outside-root", action="store_true", help=field_help(TrainConfig)["allow_outside_root"])
    add_runtime_options(e)
    e.set_defaults(func=commands.cmd_evaluate)


def add_export(sub: Any) -> None:
    x = sub.add_parser("export", help="fp16 / int8 ONNX, a Triton model repository, a TorchServe archive, or Kubernetes / KServe manifests",
                       description="Export BUNDLE to another target. Every export is checked against the model it "
                                   "came from; int8 is refused when it loses more than --max-drop points of accuracy.")
    x.add_argument("bundle")
    x.add_argument("--to", required=True, choices=commands.EXPORT_TARGETS)
    x.add_argument("--out", help="output directory (default: beside the bundle)")
    x.add_argument("--name", help="model name for Triton / TorchServe / KServe (default: the bundle's directory name)")
    x.add_argument("--calib", type=positive_int, default=DEFAULT_CALIB,
                   help=f"int8: calibration images from the training split (default {DEFAULT_CALIB}, or all there are)")
    x.add_argument("--calib-dir", help="int8: calibrate on the images in this folder instead")
    x.add_argument("--max-drop", type=finite_float, default=1.0,
                   help="int8 / fp16: refuse if accuracy (mAP50 for detectors) drops more points than this (default 1.0)")
    x.add_argument("--force", action="store_true", help="int8 / fp16: keep the model even past --max-drop")
    x.add_argument("--method", choices=("auto", "minmax", "entropy", "percentile", "dynamic", "static"), default="auto",
                   help="int8: activation calibration of the static QDQ model, or dynamic (weights only); auto "
                        "(default) tries each and keeps the best on the val split (static = minmax)")
    x.add_argument("--overwrite", action="store_true", help="replace an existing output")
    k = x.add_argument_group("kserve (Kubernetes Deployment + Service + PDB, KServe InferenceService, HPA)")
    k.add_argument("--image", default="lensforge-serve:latest",
                   help="serving image built from the repo's Dockerfile, as the cluster pulls it (default lensforge-serve:latest)")
    k.add_argument("--memory", metavar="QUANTITY",
                   help="memory request and limit, e.g. 2Gi (default: estimated from the model size and the decode budget)")
    k.add_argument("--cpus", type=positive_int, default=2, help="CPU request and limit per pod, and serve --threads (default 2)")
    k.add_argument("--replicas", type=positive_int, default=2, help="pods (and the autoscaler's minimum; default 2)")
    x.set_defaults(func=commands.cmd_export)


def add_bench(sub: Any) -> None:
    b = sub.add_parser("bench", help="speed table: formats x batch sizes x threads, with accuracy and a recommendation",
                       description="Measure BUNDLE (and the fp16 / int8 exports lensforge export made of it) side by side: images/s and "
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
    b.add_argument("--no-discover", action="store_true",
                   help="only the bundles given (default: also BUNDLE's fp16/int8 exports where lensforge export "
                        "writes them: BUNDLE-fp16, BUNDLE-int8, RUN/exports/fp16, RUN/exports/int8)")
    b.add_argument("--json", action="store_true", help="print the report as JSON")
    b.set_defaults(func=commands.cmd_bench)


def add_serve(sub: Any) -> None:
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
    sv.add_argument("--max-wait-ms", type=positive_float, default=5.0, help="dynamic batching: wait up to this long to fill a batch while other requests are on their way (default 5; a lone request runs at once)")
    sv.add_argument("--max-queue", type=positive_int, default=64, help="queued images per model before 503 (default 64)")
    sv.add_argument("--max-inflight", type=positive_int, metavar="N",
                    help="requests inside each worker at once; one more gets 503 + Retry-After before its body is "
                         "read, health checks never (default: 2 x --max-queue per model)")
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
    add_detection_options(sv)  # applied to every dialect's detector answers; refused by a classifier-only server
    sv.set_defaults(func=commands.cmd_serve)


def add_predict(sub: Any) -> None:
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
    add_detection_options(pr)
    pr.add_argument("--show", type=positive_int, default=20, help="rows in the console table (default 20)")
    # batch mode (lensforge.batch): SOURCE may also be a glob, a text file of paths or a Parquet/CSV of paths/URIs
    pr.add_argument("--engine", choices=("local", "ray"),
                    help="batch prediction: 'local' (this process) or 'ray' (Ray Data on a Ray cluster, the scale "
                         "extra); one row per image to --output .parquet or .jsonl, unreadable images as rows with an error")
    pr.add_argument("--address", metavar="ADDR",
                    help="--engine ray: the cluster, host:port, ray://host:port or auto (default: a private local Ray)")
    pr.add_argument("--actors", type=positive_int, metavar="N",
                    help="--engine ray: actors, one Predictor each (default: one per CPU; --threads sets ORT threads per actor)")
    pr.set_defaults(func=commands.cmd_predict)


def add_explain(sub: Any) -> None:
    ex = sub.add_parser("explain", help="heat maps of what a model looks at (CAM, Grad-CAM, ViT attention, per-box maps)",
                        description="Write each image with a heat map of the evidence for its top label (or --label) "
                                    "overlaid at its own resolution, with a colour bar, the label and the score. "
                                    "cam (the exact class activation map, CNNs) and attention / rollout (ViTs: the last "
                                    "layer's CLS attention, averaged then per head; attention rollout) run on ONNX "
                                    "Runtime alone from the bundle's explain.onnx; gradcam and gradcam++ need torch "
                                    "(the train extra). For a detector: each confident box with its EigenCAM map (torch).")
    ex.add_argument("bundle")
    ex.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR")
    ex.add_argument("--label", help="explain this class (default: the top one)")
    ex.add_argument("--method", choices=("auto", "cam", "gradcam", "gradcam++", "attention", "rollout", "eigencam"),
                    default="auto",
                    help="auto: cam where the head is pooling + linear, attention for ViTs, eigencam for detectors (default)")
    ex.add_argument("--top-k", type=positive_int, default=1, metavar="K",
                    help="a row of the top K labels' maps side by side (default 1)")
    ex.add_argument("--out", default="explained", help="folder for the overlays, <stem>.png (default ./explained)")
    add_runtime_options(ex)
    ex.set_defaults(func=commands.cmd_explain)


def add_report(sub: Any) -> None:
    r = sub.add_parser("report", help="one self-contained HTML page that explains a run (metrics, plots, error analysis)",
                       description="Write RUN_DIR's report: dataset, config, training curves, test metrics, plots, "
                                   "the most confident mistakes (or a detector's false positives and missed boxes), "
                                   "export parity and environment, in one HTML file that opens offline.")
    r.add_argument("runs", metavar="RUN_DIR", nargs="+",
                   help="the directory `lensforge train` wrote (or its bundle); two of them: compare A with B "
                        "(config diff, metric deltas, curves overlaid)")
    r.add_argument("--out", metavar="FILE",
                   help="where to write the page (default: RUN_DIR/report.html; for two runs A/compare-B.html)")
    r.set_defaults(func=commands.cmd_report)


def add_detection_options(p: argparse.ArgumentParser) -> None:
    """Which detections to keep (detector bundles only); defaults: the bundle's tuned threshold, all classes."""
    g = p.add_argument_group("detections (detector bundles)")
    g.add_argument("--conf", type=unit_float, metavar="SCORE",
                   help="keep boxes scoring at least this (default: the threshold tuned for F-beta on validation)")
    g.add_argument("--iou", type=unit_float, metavar="IOU",
                   help="extra non-maximum suppression: drop a box overlapping a better one of its class by more than this")
    g.add_argument("--agnostic-nms", action="store_true", help="with --iou: suppress across classes, not per class")
    g.add_argument("--classes", metavar="NAMES", help="comma-separated class names (or ids) to keep, e.g. dog,cat")
    g.add_argument("--max-det", type=positive_int, metavar="N", help="keep at most the N best boxes per image")


def add_init(sub: Any) -> None:
    n = sub.add_parser("init", help="write a DVC pipeline (dvc.yaml + params.yaml) into your git repository",
                       description="Write dvc.yaml (stages inspect → train → evaluate → export, with their deps, "
                                   "params, outputs, metrics and plots) and params.yaml (every training setting; "
                                   "lensforge train --config params.yaml reads it) into DIR, a git repository. "
                                   "Then: dvc init; dvc repro; dvc metrics show; dvc plots show.")
    n.add_argument("dir", nargs="?", default=".", metavar="DIR", help="the repository (default: this directory)")
    n.add_argument("--dvc", action="store_true", required=True, help="write the DVC pipeline (the one kind init writes)")
    n.add_argument("--data", default="data", help="the dataset's path inside DIR, as the stages name it (default: data)")
    n.add_argument("--overwrite", action="store_true", help="replace an existing dvc.yaml / params.yaml")
    n.set_defaults(func=commands.cmd_init)


SUBCOMMANDS = (add_demo, add_init, add_data, add_train, add_evaluate, add_report, add_export, add_bench, add_serve,
               add_predict, add_explain)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lensforge", description="From a folder of labelled images to a fast, safe, served vision model.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"lensforge {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="show library log messages")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(sub)
    return p
