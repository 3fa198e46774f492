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
from rich.measure import Measurement
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
    from lensforge.serve.lifecycle import Started

# A classification report shows every class up to this many; beyond it, the worst and best few.
REPORT_ALL_UP_TO = 15
REPORT_WORST = 10
REPORT_BEST = 5
SUMMARY_METRICS = ("f1_macro", "f1_micro", "exact_match", "map50")  # beside the headline, where a task has them


# Names (classes, formats, paths) are never cut to "black-k…": their columns fold a word that does
# not fit onto the next line, numbers and headers never wrap, and a table too wide for the
# console is drawn in a taller, narrower layout instead (bench, detection counts).


def _name_column(table: Table, header: str, **kwargs: Any) -> None:
    """A column of names: folded, never ellipsised."""
    table.add_column(header, overflow="fold", **kwargs)


def _number_column(table: Table, header: str, **kwargs: Any) -> None:
    """A column of numbers: right-aligned, never wrapped (its header stays on one line too)."""
    table.add_column(header, justify="right", no_wrap=True, **kwargs)


def _fits(table: Table, console: Console) -> bool:
    """Whether ``table`` draws at its natural width, every cell on one line, on ``console``."""
    unbounded = console.options.update_width(1_000_000)  # measured against the console's width, it would always fit
    return Measurement.get(console, unbounded, table).maximum <= console.options.max_width


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
    _number_column(table, "value")
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
        (_name_column if c == "class" else _number_column)(table, header)
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
        t = Table(title="Per class (IoU 0.5 at the threshold; n/a: no box of the class here)", title_justify="left")
        for col in ("class", "boxes", "AP", "AP50", "precision", "recall", f"F{m.beta:g}"):
            (_name_column if col == "class" else _number_column)(t, col)
        for r in m.per_class:
            t.add_row(escape(r["class"]), str(r["support"]), _fmt(r["ap"]), _fmt(r["ap50"]), _fmt(r["precision"]),
                      _fmt(r["recall"]), _fmt(r["fbeta"]))
        out.print(t)


def metrics_line(m: Metrics) -> str:
    """One split's numbers on one line: the typed headline first, then what else the task has."""
    name, value = m.headline
    shown = [(name, value), *((k, m.get(k)) for k in SUMMARY_METRICS if k != name)]
    return "  ".join(f"{k} {v:.3f}" for k, v in shown if isinstance(v, (int, float)))


def best_epoch_line(history: list[dict[str, Any]], val: Metrics | None) -> str | None:
    """The epoch the bundle's weights come from, with the validation figure the epoch table
    showed for it (torch, during training, on the val split's readable images: the same images
    and pixels as the ONNX val figure above it, so the two agree to rounding); None without
    epochs (a linear probe)."""
    best = [r for r in history if r.get("best")]
    if not best:
        return None
    row = best[-1]
    keys = [k for k in ("val_acc", "val_map", "val_map50") if isinstance(row.get(k), (int, float))]
    figure = f": {keys[0]} {row[keys[0]]:.3f}" if keys else ""
    n = val.get("n") if val is not None else None
    on = f", {n} val images" if isinstance(n, int) and keys else ""
    epochs = row.get("epochs") or len(history)
    return f"epoch {row['epoch']} of {epochs}{figure} [dim](torch, in training{on}; the bundle holds these weights)[/]"


def print_summary(result: TrainResult, console: Console | None = None) -> None:
    """The last table of ``lensforge train``: where the bundle is, its parity, each split's headline."""
    t = Table(title="Done", show_header=False, title_justify="left", box=None, padding=(0, 2))
    t.add_row("bundle", escape(str(result.bundle_dir)))
    t.add_row("run directory", escape(str(result.run_dir)))
    t.add_row("ONNX vs torch", f"max |Δscore| {result.parity:.2e}")
    for split, m in result.metrics.items():
        n = m.get("n")
        on = f"{n} images, " if isinstance(n, int) else ""
        t.add_row(f"{split} metrics", f"{metrics_line(m)}  [dim]({on}the bundle's ONNX model, ONNX Runtime)[/]")
    best = best_epoch_line(result.history, result.metrics.get("val"))
    if best:
        t.add_row("best epoch", best)
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
    _name_column(t, "image")
    header = "objects found" if detector else "prediction"
    _name_column(t, header, min_width=len(header))  # never "objects\nfound"
    _name_column(t, f"best {top}" if detector else f"top {top}")
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


def print_batch_run(run: Any, console: Console | None = None) -> None:
    """``lensforge predict --engine``'s summary: where the rows are, how many, how fast."""
    out = console or default_console
    how = f"{run.actors} Ray actor(s) x {run.threads} thread(s)" if run.engine == "ray" else f"{run.threads} thread(s)"
    out.print(f"[bold cyan]›[/] {run.images} image(s) in {run.seconds:.2f} s ({run.images_per_s:.1f} img/s, {how})"
              + (f", [red]{run.failed} unreadable (rows with an error)[/]" if run.failed else ""), soft_wrap=True)
    out.print(f"[bold cyan]›[/] Rows in {escape(str(run.output))}", soft_wrap=True)


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
    """``export --to all``'s parity table: every artefact against the fp32 ONNX model, on the
    images its title names; then the figures that decided fp16/int8, on theirs."""
    out = console or default_console
    t = Table(title=f"Parity with the fp32 ONNX model on {escape(report.source)}", title_justify="left")
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
    out.print(t)
    if report.decided:
        title, table = _decided_table(report)
        out.print(f"[italic]{escape(title)}[/]")  # above, not as its title: a narrow table would wrap it
        out.print(table)


def _decided_table(report: ParityReport) -> tuple[str, Table]:
    """What each fp16/int8 export was judged by (its own images, usually many more than the
    parity table's): fp32 and the format on the same images, the drop and the outcome. One
    table per image set, titled by it; rows judged on other images get their own line."""
    from lensforge.export.quantize import describe_checked

    sets = {describe_checked(d.get("checked_on")) for d in report.decided.values()}
    on = sets.pop() if len(sets) == 1 else None
    title = f"What decided the exports: {report.metric} on {on}" if on else f"What decided the exports: {report.metric}"
    t = Table()
    _name_column(t, "format")
    _number_column(t, "fp32")
    _number_column(t, "format's")
    _number_column(t, "drop pt")
    if on is None:
        _name_column(t, "images")
    _name_column(t, "outcome")
    for precision, d in report.decided.items():
        def num(v: Any) -> str:
            return "n/a" if not isinstance(v, (int, float)) else f"{v:.1f}"
        cells = [escape(precision), num(d.get("fp32")), num(d.get(precision)), num(d.get("drop_points"))]
        if on is None:
            cells.append(escape(describe_checked(d.get("checked_on"))))
        cells.append("kept" if d.get("kept") else "[red]refused[/]")
        t.add_row(*cells)
    return title, t


def print_bench(report: BenchReport, console: Console | None = None) -> None:
    """``lensforge bench``'s table: one line per format × batch × threads (model-only and
    end-to-end images/s and batch latency p50/p99 in ms, the format's accuracy), then the
    recommendation. On a console too narrow for that (80 columns), each format's accuracy in a
    table of its own and one line per format × batch × threads × mode, so no format name or
    header is cut."""
    out = console or default_console
    table = _bench_table(report, wide=True)
    if _fits(table, out):
        out.print(table)
    else:
        out.print(_bench_accuracy(report))
        out.print(_bench_table(report, wide=False))
    on = (f"every row on the same {report.accuracy_on}" if report.accuracy_on
          else "each row on its own images (column 'on'); Δ only where measured on the same images")
    out.print(f"[dim]e2e: {escape(report.images)}; latencies are per batch; {escape(report.metric)} %: {escape(on)}; "
              f"Δ pt: {escape(report.metric)} vs fp32[/]")
    for note in report.notes:
        out.print(f"[dim]{escape(note)}[/]")
    out.print(f"[bold]Recommended:[/] {escape(report.recommendation)}")


def _bench_accuracy(report: BenchReport) -> Table:
    """Each format's accuracy and its difference to fp32 (the same on every row of a format)."""
    from lensforge.export.bench import signed_points

    on = f" on {report.accuracy_on}" if report.accuracy_on else ""
    table = Table(title=escape(f"{report.metric} of each format{on}"), title_justify="left")
    _name_column(table, "format")
    _number_column(table, f"{report.metric} %")
    _number_column(table, "Δ pt")
    if not report.accuracy_on:
        _name_column(table, "on")
    for fmt in report.formats:
        r = next(r for r in report.rows if r.format == fmt)
        cells = [escape(fmt), "—" if r.accuracy is None else f"{r.accuracy:.1f}",
                 "—" if r.accuracy_delta is None else signed_points(r.accuracy_delta)]
        if not report.accuracy_on:
            cells.append(escape(r.accuracy_on or "unknown images"))
        table.add_row(*cells)
    return table


def _bench_table(report: BenchReport, wide: bool) -> Table:
    """wide: model and e2e side by side, with the accuracy (9 columns); else a ``mode`` column,
    a row per mode and no accuracy (:func:`_bench_accuracy` has it)."""
    from lensforge.export.bench import MODES, signed_points

    table = Table(title=escape(f"lensforge bench — {report.machine}"), title_justify="left")
    _name_column(table, "format")
    _number_column(table, "batch")
    _number_column(table, "threads")
    measured = ["model img/s", "model p50/p99 ms", "e2e img/s", "e2e p50/p99 ms", f"{report.metric} %", "Δ pt"]
    if not wide:
        table.add_column("mode", no_wrap=True)
    for name in measured if wide else ["img/s", "p50/p99 ms"]:
        _number_column(table, name)
    mixed = wide and not report.accuracy_on  # rows measured on different images say which
    if mixed:
        _name_column(table, "on")
    keys = list(dict.fromkeys((r.threads, r.batch) for r in report.rows))
    for i, (t, n) in enumerate(keys):
        if i:
            table.add_section()
        for fmt in report.formats:
            rows = [report.row(fmt, n, t, mode) for mode in MODES]
            cells = [(f"{r.img_s:,.1f}", f"{r.batch_p50_ms:.1f} / {r.batch_p99_ms:.1f}") for r in rows if r is not None]
            if len(cells) < len(MODES):
                continue
            if wide:
                acc, delta = rows[0].accuracy, rows[0].accuracy_delta  # type: ignore[union-attr]
                on = [escape(rows[0].accuracy_on or "unknown images")] if mixed else []  # type: ignore[union-attr]
                table.add_row(escape(fmt), str(n), str(t), *(c for pair in cells for c in pair),
                              "—" if acc is None else f"{acc:.1f}", "—" if delta is None else signed_points(delta), *on)
            else:
                for j, (mode, (speed, latency)) in enumerate(zip(MODES, cells)):
                    # the format, batch and threads once: the mode rows below belong to them
                    table.add_row(*(("", "", "") if j else (escape(fmt), str(n), str(t))), mode, speed, latency)
    return table


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
    head.add_column(no_wrap=True)
    head.add_column(overflow="fold")  # a long dataset path folds rather than losing its end
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
    _name_column(classes, "class")
    for split in report["splits"]:
        _number_column(classes, split)
    _number_column(classes, "total")
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
    table = _detection_counts(report, wide=True)
    if not _fits(table, console):
        table = _detection_counts(report, wide=False)
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


def _detection_counts(report: dict[str, Any], wide: bool) -> Table:
    """Images and boxes per class and split. wide: a column pair per split (images, boxes);
    else one row per class and split under four columns, for narrow consoles."""
    det, totals = report["detection"], report["split_totals"]  # split_totals: the JSON's, row for row
    columns = [*report["splits"], "total"]
    table = Table(title="Images / boxes per class", title_justify="left")
    _name_column(table, "class")
    if wide:
        for col in columns:
            _number_column(table, f"{col}\nimages")
            _number_column(table, f"{col}\nboxes")
        for name, row in det["table"].items():
            table.add_row(escape(name), *[str(row[c][k]) for c in columns for k in ("images", "boxes")])
        table.add_row("[dim]no boxes[/]", *[x for c in columns for x in (str(totals[c]["empty_images"]), "")])
        table.add_row("[bold]all[/]", *[str(totals[c][k]) for c in columns for k in ("images", "boxes")])
        return table
    for header in ("split", "images", "boxes"):
        (_name_column if header == "split" else _number_column)(table, header)
    groups = [(escape(name), {c: (str(row[c]["images"]), str(row[c]["boxes"])) for c in columns})
              for name, row in det["table"].items()]
    groups.append(("[dim]no boxes[/]", {c: (str(totals[c]["empty_images"]), "") for c in columns}))
    groups.append(("[bold]all[/]", {c: (str(totals[c]["images"]), str(totals[c]["boxes"])) for c in columns}))
    for i, (name, cells) in enumerate(groups):
        if i:
            table.add_section()
        for j, col in enumerate(columns):
            table.add_row(name if j == 0 else "", col, *cells[col])
    return table


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
    _number_column(problems, "count")
    _name_column(problems, "examples")
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
    _number_column(notes, "count")
    _name_column(notes, "examples")
    for kind, entry in report["odd_images"].items():
        if entry["count"]:
            notes.add_row(ODD_KINDS[kind], str(entry["count"]), _examples(entry["examples"]))
    if notes.row_count:
        console.print(notes)

    for line in report.get("advice", []):  # what to do about a rare class; what training will do
        console.print(f"[bold cyan]›[/] {escape(line)}")
    style = "green" if not report["issues"] else "yellow"
    console.print(f"[bold {style}]{escape(report['verdict'])}[/]")


# -- serve ------------------------------------------------------------------------------------

SERVE_CLASSES_SHOWN = 5  # class names per model in the start-up table; the count says the rest


def print_serve_start(started: Started, console: Console | None = None) -> None:
    """``lensforge serve``'s start-up text: the models, where to point a browser or a probe,
    and the limits in force (what an operator checks before sending traffic)."""
    out = console or default_console
    s, url = started.settings, started.url
    t = Table(title=f"lensforge serve: {len(started.models)} model(s)", title_justify="left")
    _name_column(t, "model")
    _name_column(t, "task")
    _name_column(t, "classes")
    _number_column(t, "input")
    for m in started.models:
        classes = list(m.bundle.classes)
        shown = ", ".join(classes[:SERVE_CLASSES_SHOWN]) + (", …" if len(classes) > SERVE_CLASSES_SHOWN else "")
        t.add_row(escape(m.name), m.bundle.task, escape(f"{shown} ({len(classes)})"), m.input_size)
    out.print(t)
    everywhere = " (listening on all interfaces)" if started.host in ("0.0.0.0", "::", "") else ""
    out.print(f"[bold cyan]›[/] page    {url}/{everywhere}")
    out.print(f"[bold cyan]›[/] docs    {url}/docs")
    out.print(f"[bold cyan]›[/] health  {url}/healthz   ready: {url}/readyz   metrics: {url}/metrics")
    workers = f"{started.workers} worker{'s' if started.workers > 1 else ''}"
    out.print(f"[bold cyan]›[/] limits  max batch {s.max_batch} (waits up to {s.max_wait_ms:g} ms while busy), queue {s.max_queue} per model, "
              f"in flight {s.max_inflight} per worker, body {s.max_body_bytes / 2**20:g} MB, timeout {s.timeout_s:g} s, "
              f"{workers} x {started.threads} thread{'s' if started.threads > 1 else ''} per model")
    d = s.detections
    if d is not None:
        kept = [f"conf >= {d.conf:g}" if d.conf is not None else "conf: each bundle's tuned threshold",
                *([f"classes {', '.join(d.classes)}"] if d.classes else []),
                *([f"NMS IoU {d.iou:g}{' across classes' if d.agnostic else ''}"] if d.iou is not None else []),
                *([f"at most {d.max_det} per image"] if d.max_det is not None else [])]
        out.print(f"[bold cyan]›[/] detections  {escape('; '.join(kept))}")
