"""Every table and report the CLI draws. The library returns data (typed metrics, the inspect
report, :class:`ParityReport`, :class:`BenchReport`); this module is the one place it becomes
rich tables on a console. ``lensforge.demo`` prints through these functions too.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console, Group
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from lensforge.cli.console import console as default_console
from lensforge.metrics.base import Metrics

# The reports' modules import scikit-learn, onnxruntime or torch: this module imports them where a
# report is drawn, so `lensforge --help` and `serve` never load them.
if TYPE_CHECKING:
    from lensforge.export.bench import BenchReport
    from lensforge.export.parity import ParityReport
    from lensforge.metrics.classification import (
        ClassificationMetrics,
        MultilabelMetrics,
    )
    from lensforge.metrics.detection import DetectionMetrics
    from lensforge.training import TrainResult

# A classification report shows every class up to this many; beyond it, the worst and best few.
REPORT_ALL_UP_TO = 15
REPORT_WORST = 10
REPORT_BEST = 5
SUMMARY_METRICS = ("f1_macro", "f1_micro", "exact_match", "map50")  # beside the headline, where a task has them


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


# -- metrics ----------------------------------------------------------------------------------


def print_metrics(metrics: Metrics, console: Console | None = None) -> None:
    """Any task's metrics report: the classification or the detection one, by the metrics' type."""
    from lensforge.metrics.classification import (
        ClassificationMetrics,
        MultilabelMetrics,
    )
    from lensforge.metrics.detection import DetectionMetrics

    if isinstance(metrics, DetectionMetrics):
        print_detection(metrics, console)
    elif isinstance(metrics, (ClassificationMetrics, MultilabelMetrics)):
        print_classification(metrics, "multilabel" if isinstance(metrics, MultilabelMetrics) else "classify", console)
    else:
        raise TypeError(f"no report for {type(metrics).__name__}")


def _summary_table(metrics: ClassificationMetrics | MultilabelMetrics, task: str) -> Table:
    table = Table(title="Overall", show_header=False, title_justify="left")
    table.add_column("metric")
    table.add_column("value", justify="right")
    rows: list[tuple[str, Any]]
    if task == "classify":
        m: Any = metrics
        rows = [("images", m.n), ("accuracy", m.accuracy)]
        if m.top5_accuracy is not None:  # only with more than five classes
            rows.append(("top-5 accuracy", m.top5_accuracy))
        rows += [
            ("precision (macro / weighted)", (m.precision_macro, m.precision_weighted)),
            ("recall (macro / weighted)", (m.recall_macro, m.recall_weighted)),
            ("F1 (macro / weighted)", (m.f1_macro, m.f1_weighted)),
            ("F2 (macro)", m.f2_macro),
        ]
    else:
        m = metrics
        rows = [
            ("images", m.n),
            (f"mAP (over {m.map_labels} of {len(m.per_class)} labels with positives)", m.map),
            ("F1 (micro / macro / samples)", (m.f1_micro, m.f1_macro, m.f1_samples)),
            ("exact match", m.exact_match),
            ("Hamming loss", m.hamming_loss),
        ]
    for name, value in rows:
        shown = " / ".join(_fmt(v) for v in value) if isinstance(value, tuple) else _fmt(value)
        table.add_row(name, shown)
    return table


def _per_class_table(metrics: ClassificationMetrics | MultilabelMetrics, task: str) -> Table:
    # Worst first; among equals, the class with more images first (it matters more).
    order = sorted(metrics.per_class, key=lambda r: (r["f1"], -r["support"]))
    columns = ["class", "support", "precision", "recall", "f1"]
    if task == "multilabel":
        columns += ["ap", "threshold"]
    one, many = ("label", "labels") if task == "multilabel" else ("class", "classes")
    table = Table(title=f"Per {one} (worst F1 first)", title_justify="left")
    for c in columns:
        header = one if c == "class" else c.upper() if c in ("f1", "ap") else c
        table.add_column(header, justify="left" if c == "class" else "right")
    if len(order) > REPORT_ALL_UP_TO:
        hidden = len(order) - REPORT_WORST - REPORT_BEST
        shown: list[dict[str, Any] | None] = [*order[:REPORT_WORST], None, *order[-REPORT_BEST:]]
        table.caption = f"{REPORT_WORST} worst and {REPORT_BEST} best of {len(order)} {many} (all in the JSON)"
    else:
        hidden, shown = 0, list(order)
    for row in shown:
        if row is None:
            table.add_row(f"… {hidden} more …", *[""] * (len(columns) - 1), style="dim")
        else:
            table.add_row(*[escape(_fmt(row[c])) for c in columns])  # class names are not markup
    return table


def format_classification(metrics: ClassificationMetrics | MultilabelMetrics, task: str) -> Group:
    """A classifier's report as rich renderables: an overall table, then the per-class table.

    metrics: :class:`ClassificationMetrics` (task ``"classify"``) or :class:`MultilabelMetrics`
    (task ``"multilabel"``).
    """
    from lensforge.metrics.classification import (
        ClassificationMetrics,
        MultilabelMetrics,
    )

    if task not in ("classify", "multilabel"):
        raise ValueError(f"task must be one of classify, multilabel, got {task!r} "
                         "(detection reports: lensforge.cli.render.print_detection)")
    expected = ClassificationMetrics if task == "classify" else MultilabelMetrics
    if not isinstance(metrics, expected):
        raise ValueError(  # noqa: TRY004  (a ValueError, as for a wrong task: callers catch one kind)
            f"these metrics are not {task} metrics ({type(metrics).__name__}, not {expected.__name__})")
    return Group(_summary_table(metrics, task), Text(""), _per_class_table(metrics, task))


def print_classification(metrics: ClassificationMetrics | MultilabelMetrics, task: str,
                         console: Console | None = None) -> None:
    """Print ``format_classification(metrics, task)`` on ``console`` (the CLI's stdout console if None)."""
    (console or default_console).print(format_classification(metrics, task))


def print_detection(m: DetectionMetrics, console: Console | None = None) -> None:
    """The COCO numbers, the operating point and the per-class table of a detector."""
    out = console or default_console
    head = Table(title="Detection (COCO box metrics)", show_header=False, title_justify="left", box=None, padding=(0, 2))
    head.add_row("AP@[.50:.95]", _fmt(m.map), "AP50", _fmt(m.map50), "AP75", _fmt(m.map75))
    head.add_row("AP small", _fmt(m.map_small), "AP medium", _fmt(m.map_medium), "AP large", _fmt(m.map_large))
    head.add_row("AR@1", _fmt(m.mar1), "AR@10", _fmt(m.mar10), "AR@100", _fmt(m.mar100))
    at = m.at_threshold
    out.print(head)
    out.print(f"  at score ≥ {m.threshold:.3f} (IoU 0.5): precision {_fmt(at.get('precision'))}  "
              f"recall {_fmt(at.get('recall'))}  F{m.beta:g} {_fmt(at.get('fbeta'))}")
    if m.per_class:
        t = Table(title="Per class (IoU 0.5 at the threshold)", title_justify="left")
        for col in ("class", "boxes", "AP", "AP50", "precision", "recall", f"F{m.beta:g}"):
            t.add_column(col, justify="left" if col == "class" else "right")
        for r in m.per_class:
            t.add_row(escape(r["class"]), str(r["support"]), _fmt(r["ap"]), _fmt(r["ap50"]), _fmt(r["precision"]),
                      _fmt(r["recall"]), _fmt(r["fbeta"]))
        out.print(t)


def metrics_line(m: Metrics) -> str:
    """One split's numbers on one line: the typed headline first, then what else the task has."""
    name, value = m.headline
    shown = [(name, value), *((k, m.get(k)) for k in SUMMARY_METRICS if k != name)]
    return "  ".join(f"{k} {v:.3f}" for k, v in shown if isinstance(v, (int, float)))


def print_summary(result: TrainResult, console: Console | None = None) -> None:
    """The last table of ``lensforge train``: where the bundle is, its parity, each split's headline."""
    t = Table(title="Done", show_header=False, title_justify="left", box=None, padding=(0, 2))
    t.add_row("bundle", escape(str(result.bundle_dir)))
    t.add_row("run directory", escape(str(result.run_dir)))
    t.add_row("ONNX vs torch", f"max |Δscore| {result.parity:.2e}")
    for split, m in result.metrics.items():
        t.add_row(f"{split} metrics", metrics_line(m))
    if result.skipped_images:
        t.add_row("skipped images", str(result.skipped_images))
    t.add_row("time", f"{result.seconds:.0f} s")
    t.add_row("next", escape(f"lensforge predict {result.bundle_dir} IMAGE_OR_DIR"))
    (console or default_console).print(t)


# -- predict and export -----------------------------------------------------------------------


def print_predictions(rows: list[dict[str, Any]], *, detector: bool, top: int, show: int, seconds: float,
                      failed: int, annotate_dir: Path | None, console: Console | None = None) -> None:
    """``lensforge predict``'s table: the first ``show`` rows (each the JSON line of one image)."""
    out = console or default_console
    t = Table(show_lines=False)
    t.add_column("image", overflow="fold")
    t.add_column("objects found" if detector else "prediction")
    t.add_column(f"best {top}" if detector else f"top {top}", overflow="fold")
    for doc in rows[:show]:
        if "error" in doc:
            t.add_row(escape(doc["path"]), "[red]error[/]", escape(doc["error"]))
        elif detector:
            found = doc["detections"]
            counts = Counter(d["label"] for d in found)
            t.add_row(escape(doc["path"]), escape(", ".join(f"{n} {label}" for label, n in counts.items())) or "[dim](nothing)[/]",
                      escape("  ".join(f"{d['label']} {d['score']:.3f}" for d in found[:top])))
        else:
            t.add_row(escape(doc["path"]), escape(", ".join(doc["labels"])) or "[dim](none)[/]",
                      escape("  ".join(f"{d['label']} {d['score']:.3f}" for d in doc["top"])))
    out.print(t)
    if len(rows) > show:
        out.print(f"[dim]… {len(rows) - show} more (use --json or --output for all)[/]")
    out.print(f"[bold cyan]›[/] {len(rows)} images in {seconds:.2f} s ({len(rows) / max(seconds, 1e-9):.1f} img/s)"
              + (f", [red]{failed} unreadable[/]" if failed else ""))
    if annotate_dir:
        out.print(f"[bold cyan]›[/] Annotated images in {escape(str(annotate_dir))}")


def print_export_check(written: Path, console: Console | None = None) -> None:
    """The export check an exported bundle records in its ``lensforge.json``, then where it is."""
    out = console or default_console
    meta_file = written / "lensforge.json"
    if meta_file.is_file():
        export = json.loads(meta_file.read_text()).get("export", {})
        if export:
            t = Table(title="Export check", show_header=False, title_justify="left", box=None, padding=(0, 2))
            for k, v in export.items():
                if isinstance(v, (int, float, str)):
                    t.add_row(escape(k), escape(f"{v:.4g}" if isinstance(v, float) else str(v)))
            out.print(t)
    out.print(f"[bold cyan]›[/] Written: {escape(str(written))}")


def print_parity(report: ParityReport, console: Console | None = None) -> None:
    """``export --to all``'s parity table: every artefact against the fp32 ONNX model."""
    t = Table(title=f"Parity with the fp32 ONNX model on {report.images} images ({escape(report.source)})",
              title_justify="left")
    t.add_column("model")
    t.add_column("max |Δscore|", justify="right")
    t.add_column("top-1 agreement", justify="right")
    t.add_column(report.metric, justify="right")
    t.add_column("file / note")
    for r in report.rows:
        diff = "" if r.max_abs_diff is None else f"{r.max_abs_diff:.2e}" + (" (top-5)" if r.compared != "all scores" else "")
        agree = "" if r.top1_agreement is None else f"{100 * r.top1_agreement:.1f}%"
        acc = "" if r.accuracy is None else f"{r.accuracy:.1f}"
        detail = r.note if r.note else (r.artifact or "")
        t.add_row(escape(r.target), diff, agree, acc, escape(detail))
    (console or default_console).print(t)


def print_bench(report: BenchReport, console: Console | None = None) -> None:
    """``lensforge bench``'s table: one line per format × batch × threads (model-only and
    end-to-end images/s and batch latency p50/p99 in ms, the format's accuracy), then the
    recommendation."""
    from lensforge.export.bench import signed_points

    out = console or default_console
    table = Table(title=escape(f"lensforge bench — {report.machine}"), title_justify="left")
    for name in ("format", "batch", "threads"):
        table.add_column(name, justify="left" if name == "format" else "right")
    for name in ("model img/s", "model p50/p99 ms", "e2e img/s", "e2e p50/p99 ms", f"{report.metric} %", "Δ pt"):
        table.add_column(name, justify="right")
    keys = list(dict.fromkeys((r.threads, r.batch) for r in report.rows))
    for i, (t, n) in enumerate(keys):
        if i:
            table.add_section()
        for fmt in report.formats:
            model, e2e = report.row(fmt, n, t, "model"), report.row(fmt, n, t, "e2e")
            if model is None or e2e is None:
                continue
            acc = "—" if model.accuracy is None else f"{model.accuracy:.1f}"
            delta = "—" if model.accuracy_delta is None else signed_points(model.accuracy_delta)
            table.add_row(
                escape(fmt), str(n), str(t),
                f"{model.img_s:,.1f}", f"{model.batch_p50_ms:.1f} / {model.batch_p99_ms:.1f}",
                f"{e2e.img_s:,.1f}", f"{e2e.batch_p50_ms:.1f} / {e2e.batch_p99_ms:.1f}", acc, delta,
            )
    out.print(table)
    out.print(f"[dim]e2e: {escape(report.images)}; latencies are per batch; Δ pt: {escape(report.metric)} vs fp32[/]")
    for note in report.notes:
        out.print(f"[dim]{escape(note)}[/]")
    out.print(f"[bold]Recommended:[/] {escape(report.recommendation)}")


# -- data inspect -----------------------------------------------------------------------------


def _examples(items: list[Any], n: int = 3) -> str:
    texts = [
        item if isinstance(item, str) else f"{item['path']} ({item.get('code') or item['reason']})"
        for item in items[:n]
    ]
    more = " ..." if len(items) > n else ""
    return escape(", ".join(texts) + more)


def print_inspection(report: dict[str, Any], console: Console | None = None) -> None:
    """An :func:`~lensforge.data.inspect.inspect_dataset` report as rich tables, ending with the verdict."""
    console = console or default_console
    head = Table.grid(padding=(0, 2))
    head.add_row("[bold]dataset[/]", escape(report["root"]))
    head.add_row("[bold]format[/]", f"{report['format']}  (task {report['task']})")
    head.add_row("[bold]images[/]", str(report["total_images"]))
    if report["file_formats"]:
        head.add_row(
            "[bold]files[/]", ", ".join(f"{k} {v}" for k, v in report["file_formats"].items())
        )
    if report["imbalance_ratio"] is not None:
        ratio = f"{report['imbalance_ratio']:.2f} (largest / smallest class)"
        head.add_row("[bold]imbalance[/]", ratio)
    console.print(head)

    if "detection" in report:
        _print_inspected_detection(report, console)
    else:
        _print_class_table(report, console)
    _print_sizes_and_problems(report, console)


def _print_class_table(report: dict[str, Any], console: Console) -> None:
    counts = report["counts"]
    classes = Table(title="Images per class", title_justify="left")
    classes.add_column("class")
    for split in report["splits"]:
        classes.add_column(split, justify="right")
    classes.add_column("total", justify="right")
    for name, n in counts["per_class"].items():
        row = [str(counts["table"][name][s]) for s in report["splits"]]
        classes.add_row(escape(name), *row, str(n))
    if report["task"] == "multilabel":
        blanks = [""] * len(report["splits"])
        classes.add_row("[dim](no label)[/]", *blanks, str(counts["no_label"]))
    classes.add_row(
        "[bold]images[/]",
        *[str(counts["per_split"][s]) for s in report["splits"]],
        str(report["total_images"]),
    )
    console.print(classes)


def _print_inspected_detection(report: dict[str, Any], console: Console) -> None:
    det = report["detection"]
    columns = [*report["splits"], "total"]
    table = Table(title="Images / boxes per class", title_justify="left")
    table.add_column("class")
    for col in columns:
        table.add_column(f"{col}\nimages", justify="right")
        table.add_column(f"{col}\nboxes", justify="right")
    for name, row in det["table"].items():
        cells = [str(row[c][k]) for c in columns for k in ("images", "boxes")]
        table.add_row(escape(name), *cells)
    totals = report["split_totals"]  # the JSON's per-split totals, row for row
    table.add_row("[dim]no boxes[/]", *[x for c in columns for x in (str(totals[c]["empty_images"]), "")])
    table.add_row("[bold]all[/]", *[str(totals[c][k]) for c in columns for k in ("images", "boxes")])
    console.print(table)
    spread = det["boxes_per_image"]
    if spread:
        console.print(
            f"boxes per image  min {spread['min']}  median {spread['median']:g}  max {spread['max']}"
            f"   crowd boxes {det['crowd_boxes']}"
        )
    sizes = det["box_sizes"]
    console.print(
        f"box sizes (area)  small <32²: {sizes['small']}  medium: {sizes['medium']}  "
        f"large >96²: {sizes['large']}"
    )
    if det["notes"]:
        notes = Table(title="What the reader fixed or decided", title_justify="left")
        notes.add_column("note")
        for note in det["notes"]:
            notes.add_row(escape(note))
        console.print(notes)


def _print_sizes_and_problems(report: dict[str, Any], console: Console) -> None:
    sizes = report["image_sizes"]
    if sizes:
        table = Table(title="Image sizes (px)", title_justify="left")
        for col in ("", "min", "median", "max"):
            table.add_column(col, justify="right")
        for axis in ("width", "height"):
            s = sizes[axis]
            table.add_row(axis, str(s["min"]), f"{s['median']:g}", str(s["max"]))
        console.print(table)
        buckets = "  ".join(f"{k}: {v}" for k, v in sizes["shorter_side"].items() if v)
        console.print(f"shorter side  {buckets}")

    problems = Table(title="Problems", title_justify="left")
    problems.add_column("problem")
    problems.add_column("count", justify="right")
    problems.add_column("examples")
    dup = report["duplicates"]
    rows = [
        ("unreadable / truncated", report["unreadable"]["count"], report["unreadable"]["examples"]),
        (
            "duplicates across splits",
            dup["cross_split_groups"],
            [
                " = ".join(f"{d['path']} ({d['split']})" for d in g)
                for g in dup["cross_split_examples"]
            ],
        ),
        ("duplicate groups", dup["groups"], [" = ".join(g) for g in dup["examples"]]),
        (
            "duplicates, different labels",
            dup["conflicting_label_groups"],
            [" = ".join(d["path"] for d in g) for g in dup["conflicting_label_examples"]],
        ),
        ("skipped by reader", report["skipped"]["count"], report["skipped"]["examples"]),
        ("outside the data folder", report["outside_root"]["count"], report["outside_root"]["examples"]),
    ]
    if "detection" in report:
        mismatch = report["detection"]["size_mismatch"]
        rows.append((
            "annotated size ≠ file size",
            mismatch["count"],
            [f"{m['path']} ({m['annotated'][0]}x{m['annotated'][1]} vs "
             f"{m['file'][0]}x{m['file'][1]})" for m in mismatch["examples"]],
        ))
    for name, n, examples in rows:
        if n:
            problems.add_row(name, f"[red]{n}[/]", _examples(examples))
    if problems.row_count:
        console.print(problems)

    from lensforge.data.inspect import (
        ODD_KINDS,  # the inspect module reads images: not on every CLI start
    )

    notes = Table(title="Odd images (decoded to RGB, worth a look)", title_justify="left")
    notes.add_column("kind")
    notes.add_column("count", justify="right")
    notes.add_column("examples")
    for kind, entry in report["odd_images"].items():
        if entry["count"]:
            notes.add_row(ODD_KINDS[kind], str(entry["count"]), _examples(entry["examples"]))
    if notes.row_count:
        console.print(notes)

    style = "green" if not report["issues"] else "yellow"
    console.print(f"[bold {style}]{escape(report['verdict'])}[/]")
