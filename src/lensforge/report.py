"""The run report: one self-contained HTML file that explains a run.

``write_report(run_dir)`` reads what ``train`` and ``evaluate`` left in a run directory —
``bundle/lensforge.json`` (task, classes, data counts and notes, history, versions),
``config.yaml``, ``training_curves.png``, ``eval/`` (``metrics.json``, ``predictions.csv``,
plots) and ``exports/parity.json`` when present — and writes ``report.html``: images inlined
as ``data:`` URIs, CSS inline, no script, so it opens offline and can be mailed around.

Error analysis is computed here from the saved files: a classifier's most confident
mistakes (thumbnails) and most confused class pairs; a detector's worst false positives and
missed boxes drawn on their images (matched with :func:`lensforge.metrics.detection.match_detections`).

Every string that comes from the user (class names, paths, config values) goes through
:func:`html.escape`. No torch: a serving install can render a report.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import logging
import os
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from PIL import Image, ImageDraw

from lensforge.data.image import decode_image
from lensforge.data.records import Record
from lensforge.errors import LensforgeError
from lensforge.heldout import saved_splits
from lensforge.metrics.detection import match_detections
from lensforge.runtime.bundle import SPLIT_FILE, load_bundle
from lensforge.runtime.draw import Style, font
from lensforge.runtime.results import DetectionResult
from lensforge.ui import Reporter

log = logging.getLogger(__name__)

REPORT_FILE = "report.html"
THUMB = 160  # px, longer side of a mistake's thumbnail
DRAWN = 360  # px, longer side of a detector's error image
MAX_MISTAKES = 12  # thumbnails in the gallery
MAX_PAIRS = 8  # confused class pairs listed
MAX_DETECT_IMAGES = 6  # detection error images drawn
MAX_ROWS = 15
FP_PER_IMAGE = 5  # false positives drawn per image, the most confident: more would hide the image
MAX_PNG = 300_000  # bytes: a larger plot is inlined as a JPEG  # rows of the false-positive / missed-box tables
# keys of metrics.json that are curves or matrices, drawn as plots rather than tabulated
CURVE_KEYS = {"confusion_matrix", "pr_curve", "fbeta_curve", "per_class"}
# the eval/ plots, in the order the report shows them, with their captions
PLOTS = (("confusion_matrix.png", "Confusion matrix"), ("pr_curves.png", "Precision-recall curves"),
         ("per_class.png", "Per-class F1"), ("per_class_ap.png", "Per-class average precision"),
         ("fbeta_threshold.png", "F-beta against the score threshold"),
         ("examples.png", "Examples: ground truth beside predictions"))
FP_COLOR, MISS_COLOR, TP_COLOR = (255, 140, 0), (220, 20, 60), (46, 160, 67)


class ReportError(LensforgeError):
    """The directory cannot be reported on (not a run, or no test metrics)."""


@dataclass
class RunFiles:
    """Where a run's pieces are. root: the run directory (the bundle itself for a lone bundle);
    meta: the bundle's lensforge.json; config: config.yaml's content ({} without one)."""

    root: Path
    bundle: Path
    eval_dir: Path
    meta: dict[str, Any]
    config: dict[str, Any]
    metrics: dict[str, Any]


def locate(path: str | os.PathLike[str], eval_dir: str | os.PathLike[str] | None = None) -> RunFiles:
    """The run at ``path`` (a run directory or a bundle directory) and its evaluation
    (``eval_dir``, default ``<run>/eval``). ReportError when it is not a run or has no test metrics."""
    p = Path(path)
    if (p / "bundle" / "lensforge.json").is_file():
        root, bundle = p, p / "bundle"
    elif (p / "lensforge.json").is_file():
        bundle = p
        root = p.parent if (p.parent / "config.yaml").is_file() else p
    else:
        raise ReportError(f"{p} is not a lensforge run directory (no bundle/lensforge.json): "
                          "pass the directory `lensforge train` wrote (its --out)")
    try:
        meta = json.loads((bundle / "lensforge.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ReportError(f"cannot read {bundle / 'lensforge.json'}: {e}") from None
    ev = Path(eval_dir) if eval_dir else root / "eval"
    try:
        metrics = json.loads((ev / "metrics.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ReportError(f"{p} has no test metrics ({ev / 'metrics.json'} is missing): run "
                          f"`lensforge evaluate {bundle} DATA` first") from None
    except (OSError, ValueError) as e:
        raise ReportError(f"cannot read {ev / 'metrics.json'}: {e}") from None
    config: dict[str, Any] = {}
    if (root / "config.yaml").is_file():
        try:
            config = yaml.safe_load((root / "config.yaml").read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as e:
            log.warning("cannot read %s: %s", root / "config.yaml", e)
    return RunFiles(root, bundle, ev, meta, config if isinstance(config, dict) else {}, metrics)


def write_report(run: str | os.PathLike[str], out: str | os.PathLike[str] | None = None, *,
                 eval_dir: str | os.PathLike[str] | None = None, records: Sequence[Record] | None = None) -> Path:
    """Write the HTML report of ``run`` to ``out`` (default ``<run>/report.html``) atomically
    (a temp file beside it, then rename: never half a file). records: the evaluated images
    with their ground truth, for a detector's error analysis when they are not the saved split."""
    files = locate(run, eval_dir)
    target = Path(out) if out else files.root / REPORT_FILE
    return _write_atomically(target, render(files, records))


def render(files: RunFiles, records: Sequence[Record] | None = None) -> str:
    """The whole page as a string."""
    meta = files.meta
    name = files.root.name
    sections = [
        _section("Dataset", dataset_html(meta)),
        _section("Configuration", config_html(files)),
        _section("Training", training_html(files)),
        _section("Final metrics", metrics_html(files.metrics, meta.get("classes", []))),
        _section("Plots", plots_html(files.eval_dir)),
        _section("Error analysis", errors_html(files, records)),
        _section("Export parity", parity_html(files)),
        _section("Environment", environment_html(files)),
    ]
    head, value = _headline(meta.get("task", ""), files.metrics)
    return (f"<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>lensforge report: {_e(name)}</title><style>{CSS}</style></head><body>"
            f"<header><h1>lensforge run <code>{_e(name)}</code></h1>"
            f"<p>{_e(meta.get('task', '?'))} · {len(meta.get('classes', []))} classes · "
            f"{_e(meta.get('model', {}).get('backbone', '?'))} · {head} <b>{_num(value)}</b> on "
            f"{_e(files.metrics.get('evaluated_on', 'the held-out images'))} · created {_e(meta.get('created', '?'))}</p>"
            f"</header>{''.join(sections)}</body></html>\n")


# -- sections ----------------------------------------------------------------------------------

def dataset_html(meta: dict[str, Any]) -> str:
    data = meta.get("data", {})
    counts = data.get("counts", {})
    rows = [("format", data.get("format")), ("root", data.get("root")), ("task", meta.get("task")),
            ("classes", ", ".join(meta.get("classes", [])))]
    parts = [_kv_table(rows)]
    if counts:
        parts.append(_table(["split", "images"], [[k, v] for k, v in counts.items()] + [["total", sum(counts.values())]]))
    notes = data.get("notes") or []
    if notes:
        parts.append("<p>Notes:</p><ul>" + "".join(f"<li>{_e(n)}</li>" for n in notes) + "</ul>")
    return "".join(parts)


def config_html(files: RunFiles) -> str:
    cfg = files.config.get("config") or files.meta.get("config") or {}
    if not cfg:
        return "<p>No config recorded.</p>"
    return f"<pre>{_e(yaml.safe_dump(cfg, sort_keys=False))}</pre>"


def training_html(files: RunFiles) -> str:
    parts = []
    curves = files.root / "training_curves.png"
    if curves.is_file():
        parts.append(_figure(curves.read_bytes(), "Training curves"))
    history = files.meta.get("training", {}).get("history") or []
    if history:
        cols = list(dict.fromkeys(k for row in history for k in row))
        parts.append(_table(cols, [[row.get(c) for c in cols] for row in history]))
    return "".join(parts) or "<p>No training epochs recorded (a linear probe has none).</p>"


def metrics_html(metrics: dict[str, Any], classes: Sequence[str]) -> str:
    scalars = [(k, v) for k, v in metrics.items() if k not in CURVE_KEYS and (v is None or isinstance(v, (int, float, str)))]
    parts = [_kv_table(scalars)]
    for key, value in metrics.items():  # small named tables (a detector's at_threshold / best)
        if key in CURVE_KEYS or not isinstance(value, dict) or set(value) <= set(classes):
            continue  # per-class dicts are the per-class table's columns already
        if all(v is None or isinstance(v, (int, float, str)) for v in value.values()):
            parts.append(f"<h3>{_e(key)}</h3>" + _kv_table(list(value.items())))
    per_class = metrics.get("per_class")
    if isinstance(per_class, list) and per_class:
        cols = list(dict.fromkeys(k for row in per_class for k in row))
        parts.append("<h3>Per class</h3>" + _table(cols, [[row.get(c) for c in cols] for row in per_class]))
    return "".join(parts)


def plots_html(eval_dir: Path) -> str:
    figures = [_figure((eval_dir / f).read_bytes(), caption) for f, caption in PLOTS if (eval_dir / f).is_file()]
    return f"<div class=\"grid\">{''.join(figures)}</div>" if figures else "<p>No plots in eval/.</p>"


def errors_html(files: RunFiles, records: Sequence[Record] | None) -> str:
    task = files.meta.get("task")
    predictions = files.eval_dir / "predictions.csv"
    if not predictions.is_file():
        return f"<p>No {_e(predictions)}: nothing to analyse.</p>"
    with predictions.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if task == "detect":
        return detection_errors_html(files, rows, records)
    parts = [f"<h3>Most confident mistakes</h3>{mistakes_gallery(rows, task == 'multilabel', files.meta.get('classes', []))}"]
    matrix = files.metrics.get("confusion_matrix")
    if matrix:
        parts.append(f"<h3>Most confused class pairs</h3>{confused_pairs_html(np.asarray(matrix), files.meta['classes'])}")
    return "".join(parts)


def parity_html(files: RunFiles) -> str:
    parts = []
    parity = files.meta.get("parity")
    if isinstance(parity, dict):
        parts.append("<h3>ONNX against torch at training time</h3>" + _kv_table(
            [(k, v) for k, v in parity.items() if not isinstance(v, (dict, list))]))
    exported = files.root / "exports" / "parity.json"
    if exported.is_file():
        try:
            report = json.loads(exported.read_text(encoding="utf-8"))
            rows = report.get("rows", [])
            cols = list(dict.fromkeys(k for row in rows for k in row))
            parts.append(f"<h3>Exported formats against fp32 ({_e(report.get('images'))} images of "
                         f"{_e(report.get('source'))}; metric {_e(report.get('metric'))})</h3>"
                         + _table(cols, [[row.get(c) for c in cols] for row in rows]))
        except (OSError, ValueError, AttributeError) as e:
            parts.append(f"<p>Cannot read {_e(exported)}: {_e(e)}</p>")
    else:
        parts.append("<p>No export parity table yet: <code>lensforge export BUNDLE --to all</code> writes one.</p>")
    return "".join(parts)


def environment_html(files: RunFiles) -> str:
    rows: list[tuple[str, Any]] = list((files.meta.get("versions") or files.config.get("versions") or {}).items())
    rows.append(("machine", files.config.get("machine", "not recorded")))
    rows.append(("bundle created", files.meta.get("created")))
    return _kv_table(rows)


# -- classification error analysis -------------------------------------------------------------

def mistakes_gallery(rows: list[dict[str, str]], multilabel: bool, classes: Sequence[str]) -> str:
    """The most confident mistakes as thumbnails: single-label rows that are wrong, by score;
    multi-label rows whose predicted set differs from the truth, by their largest score error."""
    wrong: list[tuple[float, dict[str, str], str]] = []
    for row in rows:
        if multilabel:
            if set(filter(None, row["true"].split(";"))) == set(filter(None, row["predicted"].split(";"))):
                continue
            truth = set(row["true"].split(";"))
            error = max(abs((c in truth) - float(row[c])) for c in classes if c in row)
            wrong.append((error, row, f"error {error:.2f}"))
        elif row.get("correct") == "0":
            wrong.append((float(row["score"]), row, f"score {float(row['score']):.2f}"))
    if not wrong:
        return "<p>No mistakes on these images.</p>"
    wrong.sort(key=lambda t: -t[0])
    cards = []
    for _, row, score in wrong[:MAX_MISTAKES]:
        img = _thumbnail(Path(row["path"]), THUMB)
        cards.append(f"<figure class=\"card\">{img}<figcaption><span class=\"true\">true: {_e(row['true'] or '—')}</span>"
                     f"<br><span class=\"pred\">predicted: {_e(row['predicted'] or '—')}</span><br>{_e(score)}"
                     f"<br><small title=\"{_e(row['path'])}\">{_e(Path(row['path']).name)}</small></figcaption></figure>")
    more = f"<p>{len(wrong) - MAX_MISTAKES} more in predictions.csv.</p>" if len(wrong) > MAX_MISTAKES else ""
    return f"<p>{len(wrong)} of {len(rows)} images wrong.</p><div class=\"gallery\">{''.join(cards)}</div>{more}"


def confused_pairs(matrix: np.ndarray, classes: Sequence[str]) -> list[tuple[str, str, int, float]]:
    """(true, predicted, count, share of the true class) for the off-diagonal cells, most first."""
    m = np.asarray(matrix, dtype=np.int64)
    off = m.copy()
    np.fill_diagonal(off, 0)
    support = m.sum(axis=1)
    pairs = [(classes[i], classes[j], int(off[i, j]), off[i, j] / support[i])
             for i, j in zip(*np.nonzero(off))]
    return sorted(pairs, key=lambda p: (-p[2], -p[3]))[:MAX_PAIRS]


def confused_pairs_html(matrix: np.ndarray, classes: Sequence[str]) -> str:
    pairs = confused_pairs(matrix, classes)
    if not pairs:
        return "<p>No class was confused with another.</p>"
    return _table(["true", "predicted as", "images", "share of the true class"],
                  [[t, p, n, f"{100 * s:.0f} %"] for t, p, n, s in pairs])


# -- detection error analysis ------------------------------------------------------------------

def detection_errors_html(files: RunFiles, rows: list[dict[str, str]], records: Sequence[Record] | None) -> str:
    classes = list(files.meta.get("classes", []))
    if records is None:
        records = _evaluated_records(files)
    if not records:
        return ("<p>The evaluated images' ground truth is not available here (the data moved, or it was not the "
                "saved split): run <code>lensforge evaluate</code> to write this report with it.</p>")
    results = _results_from_rows(rows, records, classes)

    m = match_detections(records, results, iou=0.5)
    fp = np.flatnonzero(~m.tp & ~m.ignored)
    fp = fp[np.argsort(-m.scores[fp], kind="stable")]
    missed = _missed_boxes(records, results, m)
    fp_rows = [[records[m.image_ids[k]].path.name, classes[m.class_ids[k]], f"{m.scores[k]:.3f}"] for k in fp[:MAX_ROWS]]
    miss_rows = [[records[i].path.name, classes[records[i].labels[b]],
                  "{:.0f} × {:.0f}".format(*np.ptp(records[i].box_array()[b].reshape(2, 2), axis=0))]
                 for i, b in missed[:MAX_ROWS]]
    worst = _worst_images(m, fp, missed)
    drawn = [_draw_errors(records[i], results[i], m, i, [b for j, b in missed if j == i], classes) for i in worst]
    parts = [(f"<p>IoU 0.5, at the tuned score threshold {_num(files.metrics.get('threshold'))}: "
              f"{len(fp)} false positives, {len(missed)} missed boxes over {len(records)} images. "
              f"<span class=\"fp\">orange: false positive</span>, <span class=\"miss\">red: missed box</span>, "
              f"<span class=\"tp\">green: found</span>.</p>")]
    if drawn:
        parts.append(f"<div class=\"gallery\">{''.join(drawn)}</div>")
    parts.append("<h3>Worst false positives</h3>" + (_table(["image", "class", "score"], fp_rows) if fp_rows else "<p>None.</p>"))
    parts.append("<h3>Missed boxes</h3>" + (_table(["image", "class", "size (px)"], miss_rows) if miss_rows else "<p>None.</p>"))
    return "".join(parts)


def _evaluated_records(files: RunFiles) -> list[Record]:
    """The records metrics.json was computed on when they are the saved split ("the test split
    saved at training time"); [] when that cannot be known or read."""
    source = str(files.metrics.get("evaluated_on", ""))
    if not source.endswith("split saved at training time") or not (files.bundle / SPLIT_FILE).is_file():
        return []
    try:
        splits, _ = saved_splits(load_bundle(files.bundle))
    except LensforgeError as e:
        log.warning("the evaluated images of %s cannot be read: %s", files.root, e)
        return []
    return list((splits or {}).get(source.split()[1], []))


def _results_from_rows(rows: list[dict[str, str]], records: Sequence[Record], classes: list[str]) -> list[Any]:
    """predictions.csv's detections (those at or above the threshold) as one DetectionResult per record."""

    index = {c: i for i, c in enumerate(classes)}
    by_path: dict[str, list[dict[str, str]]] = {}
    for row in rows:
        by_path.setdefault(str(Path(row["path"])), []).append(row)
    out = []
    for r in records:
        dets = [d for d in by_path.get(str(r.path), []) if d["label"] in index]
        out.append(DetectionResult(
            boxes=np.asarray([[float(d[k]) for k in ("x1", "y1", "x2", "y2")] for d in dets], np.float32).reshape(-1, 4),
            scores=np.asarray([float(d["score"]) for d in dets], np.float32),
            class_ids=np.asarray([index[d["label"]] for d in dets], np.int64), classes=tuple(classes), threshold=0.0))
    return out


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box of a (N, 4) with every box of b (M, 4), xyxy → (N, M)."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(axis=2)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def _missed_boxes(records: Sequence[Record], results: Sequence[Any], m: Any) -> list[tuple[int, int]]:
    """(record index, box index) of the non-crowd ground-truth boxes no detection found. How
    many per image and class is exact (boxes − matched detections); which ones are those that
    overlap the matched detections least."""
    missed: list[tuple[int, int]] = []
    for i, r in enumerate(records):
        gt = r.box_array()
        crowd = r.crowd_array()
        labels = np.asarray(r.labels, np.int64)
        here = m.image_ids == i
        for c in np.unique(labels[~crowd]) if len(gt) else []:
            boxes = np.flatnonzero((labels == c) & ~crowd)
            found = here & m.tp & (m.class_ids == c)
            n_miss = len(boxes) - int(found.sum())
            if n_miss <= 0:
                continue
            det_boxes = results[i].boxes[results[i].class_ids == c]
            det_tp = m.tp[here][results[i].class_ids == c]  # matches are flattened in each result's order
            best = _iou(gt[boxes], det_boxes[det_tp]).max(axis=1) if det_tp.any() else np.zeros(len(boxes))
            missed += [(i, int(b)) for b in boxes[np.argsort(best, kind="stable")[:n_miss]]]
    return missed


def _worst_images(m: Any, fp: np.ndarray, missed: list[tuple[int, int]]) -> list[int]:
    """Images with the most errors (missed boxes plus false positives, the best FP score breaking ties)."""
    count: dict[int, float] = {}
    for i, _ in missed:
        count[i] = count.get(i, 0) + 1
    for k in fp:
        i = int(m.image_ids[k])
        count[i] = count.get(i, 0) + 1 + float(m.scores[k]) / 10
    return sorted(count, key=lambda i: -count[i])[:MAX_DETECT_IMAGES]


def _draw_errors(record: Record, result: Any, m: Any, i: int, missed: list[int], classes: list[str]) -> str:

    img = _open(record.path)
    if img is None:
        return f"<figure class=\"card\"><div class=\"missing\">image not readable</div><figcaption>{_e(record.path.name)}</figcaption></figure>"
    scale = DRAWN / max(img.size)
    img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))))
    style = Style.for_size(*img.size)
    fnt = font(style.font_size)
    draw = ImageDraw.Draw(img)
    here = m.image_ids == i
    tp, ignored = m.tp[here], m.ignored[here]
    fps = np.flatnonzero(~tp & ~ignored)
    shown = set(fps[np.argsort(-result.scores[fps], kind="stable")[:FP_PER_IMAGE]].tolist())
    marks = [(box, TP_COLOR if t else FP_COLOR, None if t else f"FP {classes[c]} {s:.2f}")
             for k, (box, c, s, t) in enumerate(zip(result.boxes, result.class_ids, result.scores, tp))
             if t or k in shown]
    marks += [(record.box_array()[b], MISS_COLOR, f"missed {classes[record.labels[b]]}") for b in missed]
    for box, color, text in marks:
        x1, y1, x2, y2 = (float(v) * scale for v in box)
        draw.rectangle((x1, y1, x2, y2), outline=color, width=style.line)
        if text:
            draw.text((x1 + style.pad, max(0.0, y1 - style.font_size - style.pad)), text, fill=color, font=fnt,
                      stroke_width=1, stroke_fill=(0, 0, 0))
    n_fp = int((~tp & ~ignored).sum())
    drawn = f" (the {FP_PER_IMAGE} best drawn)" if n_fp > FP_PER_IMAGE else ""
    return (f"<figure class=\"card wide\">{_img_tag(_jpeg(img), record.path.name)}<figcaption>{_e(record.path.name)}: "
            f"{n_fp} false positive(s){drawn}, {len(missed)} missed</figcaption></figure>")


# -- HTML and image helpers --------------------------------------------------------------------

def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _num(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    return _e(value)


def _cell(value: Any) -> str:
    if isinstance(value, (dict, list)):
        return f"<code>{_e(json.dumps(value, default=str))}</code>"
    return _num(value)


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_cell(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _kv_table(rows: Sequence[tuple[str, Any]]) -> str:
    body = "".join(f"<tr><th>{_e(k)}</th><td>{_cell(v)}</td></tr>" for k, v in rows)
    return f"<table class=\"kv\"><tbody>{body}</tbody></table>"


def _section(title: str, body: str) -> str:
    anchor = title.lower().replace(" ", "-")
    return f"<section id=\"{anchor}\"><h2>{_e(title)}</h2>{body}</section>"


def _img_tag(data: bytes, alt: str) -> str:
    """An <img> with the image inlined; PNG or JPEG bytes (told apart by their signature)."""
    mime = "image/png" if data[:8] == b"\x89PNG\r\n\x1a\n" else "image/jpeg"
    return f"<img src=\"data:{mime};base64,{base64.b64encode(data).decode('ascii')}\" alt=\"{_e(alt)}\">"


def _figure(png: bytes, caption: str) -> str:
    return f"<figure>{_img_tag(_smaller(png), caption)}<figcaption>{_e(caption)}</figcaption></figure>"


def _smaller(png: bytes) -> bytes:
    """A plot as is, or as a JPEG when it is a large PNG of photos (the examples grid): the
    report stays small enough to mail."""
    if len(png) <= MAX_PNG:
        return png
    try:
        with Image.open(io.BytesIO(png)) as img:
            return _jpeg(img.convert("RGB"))
    except OSError:
        return png


def _open(path: Path) -> Image.Image | None:
    """The image decoded as training decoded it (EXIF-oriented RGB), or None when unreadable."""

    try:
        return decode_image(path)
    except (LensforgeError, OSError) as e:
        log.info("cannot read %s for the report: %s", path, e)
        return None


def _jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def _thumbnail(path: Path, side: int) -> str:
    img = _open(path)
    if img is None:
        return "<div class=\"missing\">image not readable</div>"
    scale = side / max(img.size)  # small images are enlarged too, so the gallery is even
    img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.Resampling.LANCZOS)
    return _img_tag(_jpeg(img), path.name)


def _headline(task: str, metrics: dict[str, Any]) -> tuple[str, Any]:
    key = {"detect": "map", "multilabel": "mAP"}.get(task, "accuracy")
    return key, metrics.get(key)


CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0 auto;max-width:1200px;padding:0 20px 40px;color:#1f2328}
header{border-bottom:1px solid #d0d7de;margin-bottom:8px}h1{font-size:22px;margin:18px 0 4px}
h2{font-size:18px;border-bottom:1px solid #eaeef2;padding-bottom:4px;margin-top:28px}h3{font-size:15px;margin:16px 0 6px}
table{border-collapse:collapse;margin:6px 0 12px;font-variant-numeric:tabular-nums}
th,td{border:1px solid #d0d7de;padding:3px 8px;text-align:left;vertical-align:top}thead th{background:#f6f8fa}
table.kv th{background:#f6f8fa;font-weight:600}
pre{background:#f6f8fa;padding:10px;overflow:auto;max-height:420px;border-radius:6px}
code{font-family:ui-monospace,SFMono-Regular,Menlo,monospace;font-size:12px;word-break:break-all}
figure{margin:0 0 12px}figure img{max-width:100%;height:auto;border:1px solid #eaeef2}
figcaption{font-size:12px;color:#57606a}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(460px,1fr));gap:12px}
.gallery{display:flex;flex-wrap:wrap;gap:10px}.card{width:170px}.card.wide{width:370px}
.card img{image-rendering:auto}.missing{width:160px;height:120px;background:#eee;display:flex;align-items:center;justify-content:center;color:#888}
.true{color:#1a7f37}.pred{color:#cf222e}.fp{color:#d97706}.miss{color:#dc143c}.tp{color:#2ea043}
"""


def write_quietly(run: str | os.PathLike[str], ui: Reporter, *, out: str | os.PathLike[str] | None = None,
                  eval_dir: str | os.PathLike[str] | None = None, records: Sequence[Record] | None = None) -> Path | None:
    """:func:`write_report` at the end of ``train`` and ``evaluate``: a report that cannot be
    written is a warning, never a failed run (the bundle and eval/ are what matter)."""
    try:
        return write_report(run, out, eval_dir=eval_dir, records=records)
    except Exception as e:  # anything: the run's real outputs are already written
        log.debug("the report of %s failed", run, exc_info=True)
        ui.warn(f"the HTML report could not be written ({type(e).__name__}: {e}); "
                f"`lensforge report {run}` retries it")
        return None


# -- two runs side by side ---------------------------------------------------------------------

def write_comparison(a: str | os.PathLike[str], b: str | os.PathLike[str],
                     out: str | os.PathLike[str] | None = None) -> Path:
    """Compare two runs on one page (config diff, metric deltas B − A, training curves
    overlaid), written atomically to ``out`` (default ``<A>/compare-<B's name>.html``)."""
    fa, fb = locate(a), locate(b)
    target = Path(out) if out else fa.root / f"compare-{fb.root.name}.html"
    return _write_atomically(target, render_comparison(fa, fb))


def render_comparison(fa: RunFiles, fb: RunFiles) -> str:
    na, nb = _names(fa, fb)
    sections = [
        _section("Metrics", _table(["metric", na, nb, f"{nb} − {na}"], metric_deltas(fa.metrics, fb.metrics))),
        _section("Training curves", _overlaid_curves(fa, fb, na, nb)),
        _section("Configuration differences", _config_diff(fa, fb, na, nb)),
        _section("Data", _table(["", na, nb], [
            ["format", fa.meta.get("data", {}).get("format"), fb.meta.get("data", {}).get("format")],
            ["root", fa.meta.get("data", {}).get("root"), fb.meta.get("data", {}).get("root")],
            ["classes", ", ".join(fa.meta.get("classes", [])), ", ".join(fb.meta.get("classes", []))],
            *[[f"{split} images", fa.meta.get("data", {}).get("counts", {}).get(split),
               fb.meta.get("data", {}).get("counts", {}).get(split)] for split in ("train", "val", "test")],
            ["evaluated on", fa.metrics.get("evaluated_on"), fb.metrics.get("evaluated_on")]])),
    ]
    return (f"<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>lensforge: {_e(na)} vs "
            f"{_e(nb)}</title><style>{CSS}</style></head><body><header><h1>lensforge runs <code>{_e(na)}</code> "
            f"vs <code>{_e(nb)}</code></h1><p>{_e(fa.root)} · {_e(fb.root)}</p></header>{''.join(sections)}</body></html>\n")


def metric_deltas(a: dict[str, Any], b: dict[str, Any]) -> list[list[Any]]:
    """[metric, A, B, B − A] for every number either run's metrics.json holds (None: n/a)."""
    def number(v: Any) -> float | None:
        return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None

    keys = [k for k in dict.fromkeys([*a, *b]) if number(a.get(k)) is not None or number(b.get(k)) is not None]
    rows = []
    for k in keys:
        va, vb = number(a.get(k)), number(b.get(k))
        rows.append([k, va, vb, None if va is None or vb is None else f"{vb - va:+.4g}"])
    return rows


def _names(fa: RunFiles, fb: RunFiles) -> tuple[str, str]:
    """The runs' directory names, made distinct (two runs called ``run`` in different folders)."""
    na, nb = fa.root.name, fb.root.name
    if na == nb:
        na, nb = f"{fa.root.parent.name}/{na}", f"{fb.root.parent.name}/{nb}"
    return (na, nb) if na != nb else (f"A: {na}", f"B: {nb}")


def _config_diff(fa: RunFiles, fb: RunFiles, na: str, nb: str) -> str:
    ca = fa.config.get("config") or fa.meta.get("config") or {}
    cb = fb.config.get("config") or fb.meta.get("config") or {}
    rows = [[k, ca.get(k, "—"), cb.get(k, "—")] for k in dict.fromkeys([*ca, *cb]) if ca.get(k) != cb.get(k)]
    return _table(["setting", na, nb], rows) if rows else "<p>Same configuration.</p>"


def _overlaid_curves(fa: RunFiles, fb: RunFiles, na: str, nb: str) -> str:
    """Both runs' per-epoch history on the same axes (``plot_training_curves``, keys prefixed by run)."""
    rows: dict[float, dict[str, Any]] = {}
    for name, files in ((na, fa), (nb, fb)):
        for r in files.meta.get("training", {}).get("history") or []:
            row = rows.setdefault(float(r["epoch"]), {"epoch": r["epoch"]})
            row.update({f"{name}: {k}": v for k, v in r.items() if k.startswith(("train_", "val_"))
                        and isinstance(v, (int, float)) and not isinstance(v, bool)})
    if not any(len(r) > 1 for r in rows.values()):
        return "<p>No training epochs recorded.</p>"
    # matplotlib: the train extra
    from lensforge.metrics.plots import plot_training_curves

    with tempfile.TemporaryDirectory() as tmp:
        path = plot_training_curves([rows[e] for e in sorted(rows)], Path(tmp) / "curves.png")
        return _figure(Path(path).read_bytes(), f"{na} and {nb} per epoch")


def _write_atomically(target: Path, page: str) -> Path:
    """``page`` into ``target`` through a temp file beside it and a rename: never half a file."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")  # open() keeps the umask's permissions
    try:
        tmp.write_text(page, encoding="utf-8")
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target
