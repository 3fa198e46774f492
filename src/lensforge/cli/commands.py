"""What each subcommand does: read its options, call the library, hand the result to
:mod:`lensforge.cli.render`. Library imports are inside the commands: ``lensforge serve``
never loads torch, and a missing extra is reported for the command that needs it."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from lensforge.cli import render
from lensforge.cli.console import ConsoleReporter, console
from lensforge.errors import ConfigError, DataError
from lensforge.runtime.results import DetectionResult

EXPORT_TARGETS = ("onnx-fp16", "onnx-int8", "triton", "torchserve", "explain", "kserve", "all")


def cmd_inspect(args: argparse.Namespace) -> int:
    from lensforge.data.formats import read_dataset
    from lensforge.data.inspect import inspect_dataset

    # without the flag, paths outside the data folder are listed in the report but not read
    ds = read_dataset(args.data, fmt=args.format, task=args.task,
                      outside_root="allow" if args.allow_outside_root else "skip")
    ui = ConsoleReporter(quiet=args.json)
    with ui.track("Checking images", len(ds.records)) as advance:
        report = inspect_dataset(ds, verify=not args.fast, progress=lambda done, total: advance(1),
                                 outside_allowed=args.allow_outside_root)
    if args.output:  # e.g. the DVC pipeline's inspect stage (lensforge.tracking.dvc)
        write_json(Path(args.output), report)
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        render.print_inspection(report, console)
    return 0


def write_json(path: Path, doc: Any) -> None:
    """``doc`` as JSON to ``path`` through a temp file and a rename (never half a file)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(doc, indent=2, default=str) + "\n", encoding="utf-8")
        tmp.replace(path)
    except OSError as e:
        raise DataError(f"cannot write {path}: {e.strerror}") from None


# -- train ------------------------------------------------------------------------------------


def train_config(args: argparse.Namespace) -> Any:
    """The TrainConfig the options ask for: --config (or a resumed run's config.yaml), then every
    option given. Options not given are None and leave the file's value alone."""
    from lensforge.config import TrainConfig

    overrides = {name: getattr(args, name) for name in args.config_fields}
    overrides.update(data=args.data, overwrite=args.overwrite or None, resume=args.resume or None,
                     finish=args.finish or None)
    if args.split is not None:
        overrides["test_fraction"], overrides["val_fraction"] = parse_split(args.split)
    if args.config:
        return TrainConfig.load(args.config, **overrides)
    if (args.resume or args.finish) and args.out and (Path(args.out) / "config.yaml").is_file():
        # continue with the run's own settings (epochs, schedule, split); options given now still win
        return TrainConfig.load(Path(args.out) / "config.yaml", **overrides)
    return TrainConfig().override(**overrides)


def parse_split(text: str) -> tuple[float, float]:
    """"0.2,0.1" → (test, val); "0.2" keeps the default validation fraction."""
    from lensforge.config import TrainConfig

    try:
        parts = [float(p) for p in text.split(",")]
    except ValueError:
        raise ConfigError(f"--split takes TEST[,VAL] fractions like 0.2,0.2; got {text!r}") from None
    if len(parts) not in (1, 2):
        raise ConfigError(f"--split takes TEST[,VAL] fractions like 0.2,0.2; got {text!r}")
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
    from lensforge.errors import TrainingInterrupted
    from lensforge.training import train
    from lensforge.training.distributed import is_primary

    quiet_lightning()
    cfg = train_config(args)
    try:
        result = train(cfg, reporter=ConsoleReporter(quiet=args.quiet))
    except TrainingInterrupted:
        # Ctrl-C reaches every DDP process (the terminal signals the whole group); rank 0 alone
        # says where the checkpoint is, as it alone saved it, and exits 130. The others exit 0:
        # Lightning's launcher in rank 0 SIGKILLs itself when a child it started exits non-zero
        # (a 5 s poll), which could cut rank 0's checkpoint or exit short (seen: exit -9)
        if not is_primary(cfg):
            return 0
        raise
    if result.rank:  # another DDP process: rank 0 prints the summary
        return 0
    test = result.metrics.get("test") or result.metrics.get("val")
    if test and not args.quiet:  # --quiet: the summary table alone (it holds each split's headline)
        console.print()
        render.print_metrics(test, console)
    render.print_summary(result, console)
    return 0


# -- evaluate, predict ------------------------------------------------------------------------


def local_bundle(ref: str) -> str:
    """A bundle directory as given, or an MLflow URI (``models:/NAME/VERSION``, ``runs:/ID/bundle``)
    downloaded into the user cache and checked (runtime/remote.py; MLflow is imported only then)."""
    from lensforge.runtime.remote import fetch_bundle, is_uri

    return str(fetch_bundle(ref)) if is_uri(ref) else ref


def make_predictor(args: argparse.Namespace, bundle: Any) -> Any:
    from lensforge.runtime.predictor import Predictor

    providers = [p.strip() for item in (args.provider or []) for p in item.split(",") if p.strip()] or None
    return Predictor(bundle, threads=args.threads, providers=providers, fallback=args.fallback,
                     optimization=args.optimization, cache_optimized=args.cache_optimized)


def check_data_fits(bundle: Any, data: str) -> None:
    """A classifier on detection data or a detector on class labels is refused before reading it,
    with what ``evaluate`` can do instead (the reader's own message suggests a task, which only
    ``train`` chooses)."""
    from lensforge.data.formats import DETECT_FORMATS, detect_format

    path = Path(data).expanduser()
    if not path.exists():
        return  # evaluate says so, in its words
    fmt = detect_format(path.absolute())
    if (fmt in DETECT_FORMATS) == (bundle.task == "detect"):
        return
    if bundle.task == "detect":
        raise DataError(f"{bundle.path} is a detector but {data} is {fmt} data without boxes: evaluate it on "
                        "COCO, Roboflow COCO or YOLO annotations of its classes, or evaluate a classifier bundle on this data")
    raise DataError(f"{data} is a detection dataset ({fmt}: boxes) but {bundle.path} is a {bundle.task} model: "
                    f"evaluate a detector bundle on it (lensforge train {data} makes one), or evaluate this bundle "
                    "on class folders or a CSV labelled with its classes")


def cmd_evaluate(args: argparse.Namespace) -> int:
    from rich.markup import escape

    from lensforge.evaluation import evaluate
    from lensforge.runtime.bundle import load_bundle

    bundle = load_bundle(args.bundle)
    check_data_fits(bundle, args.data)
    ui = ConsoleReporter(quiet=args.json)
    res = evaluate(bundle, args.data, out_dir=args.out, split=args.split, reporter=ui,
                   predictor=make_predictor(args, bundle), allow_outside_root=args.allow_outside_root)
    log_evaluation(bundle, res, args.data, ui)
    if args.json:
        print(json.dumps(res.metrics.to_dict(), indent=2))
        return 0
    render.print_metrics(res.metrics, console)
    console.print(f"[bold cyan]›[/] Report, predictions.csv and plots in {escape(str(res.out_dir))}")
    return 0


def log_evaluation(bundle: Any, res: Any, data: str, reporter: Any) -> None:
    """Into the MLflow run that made the bundle, when it records one (tracking/lineage.py)."""
    from lensforge.tracking.lineage import log_to_bundle_run, recorded_run

    if recorded_run(bundle):
        files = sorted(p for p in Path(res.out_dir).iterdir() if p.suffix in (".png", ".json", ".html")) if res.out_dir else []
        log_to_bundle_run(bundle, "evaluate", metrics=res.metrics.numbers(), tags={"lensforge.evaluate.data": data},
                          artifacts=files, reporter=reporter)


def cmd_report(args: argparse.Namespace) -> int:
    from rich.markup import escape

    from lensforge.report import write_comparison, write_report

    if len(args.runs) > 2:
        raise ConfigError(f"report takes one run, or two to compare; got {len(args.runs)}")
    path = write_report(args.runs[0], args.out) if len(args.runs) == 1 else write_comparison(*args.runs, args.out)
    console.print(f"[bold cyan]›[/] Report written: {escape(str(path))}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    if args.engine:  # batch mode: rows to a file (lensforge.batch)
        return predict_batch(args)
    from lensforge.data.formats import list_images
    from lensforge.runtime.draw import save_annotated

    predictor = make_predictor(args, local_bundle(args.bundle))
    keep = detection_filter(args, predictor)
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
                    res = keep(res)
                    doc = {"path": str(src), **(res.to_dict() if predictor.detector else res.to_dict(k=args.top))}
                    if annotate_dir:
                        doc["annotated"] = str(save_annotated(src, res, annotate_dir, taken=taken))
                if args.json or out:
                    print(json.dumps(doc), file=out or sys.stdout)
                rows.append(doc)
    finally:
        if out:
            out.close()
    if not args.json:
        render.print_predictions(rows, detector=predictor.detector, top=args.top, show=args.show,
                                 seconds=time.perf_counter() - t0, failed=failed, annotate_dir=annotate_dir,
                                 console=console)
    return 1 if failed and failed == len(rows) else 0


def predict_batch(args: argparse.Namespace) -> int:
    """``predict --engine local|ray``: every image of SOURCE to one row in --output (lensforge.batch)."""
    from lensforge.batch import predict_many

    if not args.output:
        raise ConfigError("--engine writes its rows to a file: add --output results.parquet (or .jsonl)")
    given = [f"--{k.replace('_', '-')}" for k in ("json", "annotate", *DETECTION_OPTIONS) if getattr(args, k, None) not in (None, False)]
    if given:
        raise ConfigError(f"{', '.join(given)} cannot be used with --engine (rows hold every detection above the "
                          "bundle's threshold); drop --engine to use them")
    if args.engine != "ray" and (args.address or args.actors):
        raise ConfigError("--address and --actors are for --engine ray")
    providers = [p.strip() for item in (args.provider or []) for p in item.split(",") if p.strip()] or None
    ui = ConsoleReporter()
    with contextlib.ExitStack() as stack:  # the bar opens at the first report, when the total is known
        shown = [0]
        bar: list[Callable[[int], None]] = []

        def progress(done: int, total: int) -> None:
            if not bar:
                bar.append(stack.enter_context(ui.track("Predicting", total)))
            bar[0](done - shown[0])
            shown[0] = done

        run = predict_many(local_bundle(args.bundle), args.inputs, engine=args.engine, output=args.output, address=args.address,
                           actors=args.actors, threads=args.threads, batch_size=args.batch_size, providers=providers,
                           optimization=args.optimization, progress=progress)
    render.print_batch_run(run, console)
    return 1 if run.failed == run.images else 0


DETECTION_OPTIONS = ("conf", "iou", "classes", "max_det", "agnostic_nms")


def detection_filter(args: argparse.Namespace, predictor: Any) -> Callable[[Any], Any]:
    """``--conf --iou --classes --max-det --agnostic-nms`` as one function result → result
    (identity when none is given; the bundle's tuned threshold is the default ``--conf``).
    Bad values are one ConfigError before any image is read."""
    given = {k: getattr(args, k, None) for k in DETECTION_OPTIONS}
    if not any(v not in (None, False) for v in given.values()):
        return lambda res: res
    if not predictor.detector:
        names = ", ".join("--" + k.replace("_", "-") for k, v in given.items() if v not in (None, False))
        raise ConfigError(f"{names} filter detections; {args.bundle} holds a {predictor.task} model")
    classes = [c.strip() for c in given["classes"].split(",") if c.strip()] if given["classes"] else None

    def keep(res: Any) -> Any:
        return res.filtered(conf=given["conf"], iou=given["iou"], classes=classes, max_det=given["max_det"],
                            agnostic=bool(given["agnostic_nms"]))

    try:  # check the values once (unknown class, conf out of range) on an empty result
        keep(DetectionResult(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64),
                             predictor.classes, predictor.score_threshold))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return keep


# -- export, bench, serve, demo ---------------------------------------------------------------


def default_export_dir(bundle: Path, target: str) -> Path:
    """Beside the bundle: <bundle>-fp16, <bundle>-int8, triton/, torchserve/."""
    bundle = bundle.resolve()
    return {
        "onnx-fp16": bundle.with_name(f"{bundle.name}-fp16"),
        "onnx-int8": bundle.with_name(f"{bundle.name}-int8"),
        "triton": bundle.parent / "triton",
        "torchserve": bundle.parent / "torchserve",
        "kserve": bundle.parent / "kubernetes",
        "all": bundle.parent / "exports",
    }[target]


def cmd_export(args: argparse.Namespace) -> int:
    from rich.markup import escape

    from lensforge.runtime.bundle import load_bundle

    bundle = load_bundle(args.bundle)  # a clear error before any export tool is imported
    if args.to == "explain":  # into the bundle itself: explain.onnx beside model.onnx
        from lensforge.explain.export import add_explain

        entry = add_explain(bundle.path, overwrite=args.overwrite)
        console.print(f"[bold cyan]›[/] Added {escape(str(bundle.path / entry['file']))} (CAM maps equal torch's to "
                      f"{entry['parity']['max_abs_diff_maps']:.1e}); explain with: lensforge explain "
                      f"{escape(str(bundle.path))} IMAGE")
        return 0
    out = Path(args.out) if args.out else default_export_dir(bundle.path, args.to)
    ui = ConsoleReporter()
    ui.step(f"Exporting {bundle.path} → {args.to} in {out}")
    if args.to == "onnx-fp16":
        from lensforge.export.quantize import export_fp16

        written = export_fp16(bundle.path, out, max_drop=args.max_drop, force=args.force, overwrite=args.overwrite,
                              reporter=ui)
    elif args.to == "onnx-int8":
        from lensforge.export.quantize import export_int8

        written = export_int8(bundle.path, out, calib=args.calib, calib_dir=Path(args.calib_dir) if args.calib_dir else None,
                              max_drop=args.max_drop, force=args.force, method=args.method, overwrite=args.overwrite,
                              reporter=ui)
    elif args.to == "all":
        from lensforge.export.parity import export_all

        report = export_all(bundle.path, out, calib=args.calib, calib_dir=args.calib_dir, method=args.method,
                            max_drop=args.max_drop, force=args.force, name=args.name, overwrite=args.overwrite,
                            reporter=ui)
        (out / "parity.json").write_text(json.dumps(report.to_dict(), indent=2, default=str) + "\n")
        log_export(bundle, args.to, out, ui)
        render.print_parity(report, console)
        console.print(f"[bold cyan]›[/] Written: {escape(str(out))} (parity table in parity.json)")
        return 0
    elif args.to == "triton":
        from lensforge.export.triton import export_triton

        written = export_triton(bundle.path, out, name=args.name, overwrite=args.overwrite)
    elif args.to == "kserve":
        from lensforge.export.kserve import export_kserve

        written = export_kserve(bundle, out, name=args.name, image=args.image, memory=args.memory, cpus=args.cpus,
                                replicas=args.replicas, overwrite=args.overwrite)
        log_export(bundle, args.to, Path(written), ui)
        console.print(f"[bold cyan]›[/] Written: {escape(str(written))} (kubectl apply -f it; see its README.md)")
        return 0
    else:
        from lensforge.export.torchserve import export_torchserve

        written = export_torchserve(bundle.path, out, name=args.name, overwrite=args.overwrite)
    log_export(bundle, args.to, Path(written), ui)
    render.print_export_check(Path(written), console)
    return 0


def log_export(bundle: Any, target: str, written: Path, reporter: Any) -> None:
    """Into the MLflow run that made the bundle, when it records one: where the export went
    (a tag) and its lensforge.json / parity.json (tracking/lineage.py)."""
    from lensforge.tracking.lineage import log_to_bundle_run, recorded_run

    if recorded_run(bundle):
        where = written if written.is_dir() else written.parent
        files = [where / name for name in ("lensforge.json", "parity.json")]
        log_to_bundle_run(bundle, f"export/{target}", tags={f"lensforge.export.{target}": str(written.resolve())},
                          artifacts=files, reporter=reporter)


def cmd_explain(args: argparse.Namespace) -> int:
    """Heat maps of why BUNDLE predicts what it does, one overlay (or a row of --top-k) per image."""
    from rich.markup import escape

    from lensforge.data.formats import list_images
    from lensforge.errors import ImageError
    from lensforge.runtime.bundle import load_bundle
    from lensforge.runtime.explain import label_index, overlay_row

    bundle = load_bundle(args.bundle)
    if args.label is not None:
        label_index(args.label, bundle.classes)  # a wrong label is one line before any image is read
    labels = None if args.label is None else [args.label]
    if bundle.task == "detect":  # per-box maps (EigenCAM), in torch
        from lensforge.explain.detect import DetectionExplainer

        box_explainer = DetectionExplainer(bundle, method=args.method, labels=labels)
        explain = lambda src: [box_explainer.explain(src)]  # noqa: E731
    elif args.method in ("auto", "cam", "attention", "rollout"):  # CAM (CNNs), attention (ViTs): ONNX Runtime alone
        predictor = make_predictor(args, bundle)
        # attention: the head mean, then one map per head (the "last attention maps" picture)
        explain = lambda src: predictor.explain_labels(src, labels, k=args.top_k, method=args.method,  # noqa: E731
                                                       heads=True)
    else:
        from lensforge.explain import TorchExplainer

        torch_explainer = TorchExplainer.from_bundle(bundle)
        torch_explainer.resolve(args.method)
        explain = lambda src: torch_explainer.explain(src, labels, k=args.top_k, method=args.method)  # noqa: E731
    paths = list_images(args.inputs)
    if not paths:
        raise DataError(f"no images found in {', '.join(args.inputs)}")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    ui = ConsoleReporter()
    written, failed, method = 0, 0, args.method
    used: set[str] = set()
    with ui.track("Explaining", len(paths)) as advance:
        for path in paths:
            try:
                exps = explain(path)
            except ImageError as e:  # this image only: the others go on
                failed += 1
                ui.warn(str(e) if str(path) in str(e) else f"{path}: {e}")  # one line naming the image
            else:
                (overlay_row(exps) if len(exps) > 1 else exps[0].overlay()).save(out_dir / f"{_unique_name(path.stem, used)}.png")
                written, method = written + 1, exps[0].method
            advance(1)
    console.print(f"[bold cyan]›[/] {written} overlay(s) ({method}) in {escape(str(out_dir))}"
                  + (f"; {failed} image(s) could not be read" if failed else ""))
    return 1 if failed and not written else 0  # as predict: 1 only when no image could be explained


def _unique_name(stem: str, used: set[str]) -> str:
    """``stem``, or ``stem-2``, ``stem-3``... when two inputs share a name."""
    name, n = stem, 1
    while name in used:
        n += 1
        name = f"{stem}-{n}"
    used.add(name)
    return name


def cmd_bench(args: argparse.Namespace) -> int:
    from lensforge.export.bench import benchmark

    # the exports `lensforge export` wrote for this bundle are found and compared with it (--no-discover: not)
    report = benchmark(
        [Path(args.bundle), *(Path(b) for b in args.also)], batch_sizes=args.batch_sizes,
        threads=args.threads or None, seconds=args.seconds, images=args.images or None,
        reporter=ConsoleReporter(quiet=args.json), torch_eager=not args.no_torch, discover=not args.no_discover,
    )
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        render.print_bench(report, console)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from lensforge.serve import serve

    from lensforge.runtime.remote import is_uri, parse_uri

    bundles: Any = [local_bundle(b) for b in args.bundles]  # MLflow URIs: downloaded (or cached) and checked
    if args.name:
        if len(args.name) != len(args.bundles):
            raise DataError(f"--name given {len(args.name)} time(s) for {len(args.bundles)} bundle(s); give one name per bundle")
        bundles = dict(zip(args.name, bundles))
    elif any(is_uri(b) for b in args.bundles):  # models:/NAME/1 is served as NAME, not as its cache folder
        from lensforge.runtime.bundle import display_name

        names = [parse_uri(ref).display_name if is_uri(ref) else display_name(Path(path))
                 for ref, path in zip(args.bundles, bundles)]
        if len(set(names)) < len(names):
            raise DataError(f"two bundles would both be served as {max(names, key=names.count)!r}; name each with --name")
        bundles = dict(zip(names, bundles))
    classes = [c.strip() for c in args.classes.split(",") if c.strip()] if args.classes else None
    serve(bundles, host=args.host, port=args.port, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
          max_queue=args.max_queue, max_inflight=args.max_inflight, max_body_bytes=int(args.max_body_mb * 1024 * 1024),
          timeout_s=args.timeout, threads=args.threads, workers=args.workers, strict=args.strict, drain_s=args.drain,
          grace_s=args.grace, local_roots=args.allow_local_root, allow_remote=args.allow_remote,
          conf=args.conf, iou=args.iou, classes=classes, max_det=args.max_det, agnostic_nms=args.agnostic_nms,
          announce=render.print_serve_start)
    return 0


def cmd_init(args: argparse.Namespace) -> int:
    from rich.markup import escape

    from lensforge.tracking.dvc import init_dvc

    written = init_dvc(args.dir, data=args.data, overwrite=args.overwrite)
    console.print(f"[bold cyan]›[/] Wrote {escape(str(written.pipeline))} and {escape(str(written.params))}; "
                  "next: dvc init (once), then dvc repro")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from lensforge.demo import run_demo

    quiet_lightning()
    return run_demo(Path(args.dir), task=args.task, epochs=args.epochs, reporter=ConsoleReporter(), console=console)
