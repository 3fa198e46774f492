"""Results drawn on images: boxes and labels for detections, a top-labels panel for
classifications. One module used by the CLI (``predict --annotate``), the server
(``/annotate``) and the evaluation reports, so a result looks the same everywhere.

Pillow + numpy only (no torch, no matplotlib: the serving install has neither). Every
function returns a new RGB image and leaves its input untouched. Sizes (line width, font,
padding) scale with the image so labels stay legible from 320-px thumbnails to 4000-px photos;
the font is Pillow's built-in scalable one (``ImageFont.load_default(size=...)``), so nothing
depends on the fonts installed on the machine.
"""

from __future__ import annotations

import io
import logging
import math
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from lensforge.data.image import decode_image
from lensforge.runtime.results import ClassificationResult, DetectionResult

log = logging.getLogger(__name__)

Result = ClassificationResult | DetectionResult

# Fixed palette (Kelly's colours of maximum contrast, minus white/black/greys): class i always
# gets PALETTE[i % len], so a class keeps its colour across images, runs and the web page
# (static/app.js carries the same list).
PALETTE: tuple[tuple[int, int, int], ...] = (
    (230, 25, 75),    # red
    (60, 180, 75),    # green
    (255, 225, 25),   # yellow
    (0, 130, 200),    # blue
    (245, 130, 48),   # orange
    (145, 30, 180),   # purple
    (70, 240, 240),   # cyan
    (240, 50, 230),   # magenta
    (210, 245, 60),   # lime
    (250, 190, 212),  # pink
    (0, 128, 128),    # teal
    (220, 190, 255),  # lavender
    (170, 110, 40),   # brown
    (255, 250, 200),  # beige
    (128, 0, 0),      # maroon
    (170, 255, 195),  # mint
    (128, 128, 0),    # olive
    (255, 215, 180),  # apricot
    (0, 0, 128),      # navy
    (128, 128, 128),  # grey
)
ENCODINGS = {"jpeg": "JPEG", "png": "PNG"}
JPEG_QUALITY = 90  # boxes' thin edges and small text ring visibly below ~85
PNG_COMPRESS_LEVEL = 3  # zlib level: a noisy 12 MP photo in 5.1 s instead of 7.7 s at 6, ~10% larger
PANEL_ALPHA = 0.67  # how far the classification panel darkens the image under it


def class_color(i: int) -> tuple[int, int, int]:
    """The RGB colour of class ``i`` (any int; the palette cycles every 20 classes)."""
    return PALETTE[int(i) % len(PALETTE)]


def text_color(background: tuple[int, int, int]) -> tuple[int, int, int]:
    """Black or white, whichever reads better on ``background`` (ITU-R BT.601 luma)."""
    r, g, b = background
    return (0, 0, 0) if 0.299 * r + 0.587 * g + 0.114 * b >= 140 else (255, 255, 255)


@dataclass(frozen=True)
class Style:
    """Sizes in pixels for one image, all derived from its size.

    Scaled by the geometric mean of the sides so a very wide or very tall image neither
    gets huge text nor hairlines; clamped so small images keep readable 12-px text.
    """

    line: int
    font_size: int
    pad: int

    @classmethod
    def for_size(cls, width: int, height: int) -> Style:
        side = math.sqrt(max(1, width) * max(1, height))
        font_size = max(12, round(side * 0.028))  # ~13 px at 480, ~97 px at a 4000x3000 photo
        font_size = min(font_size, max(12, min(width, height) // 3))  # never taller than a third of a strip
        return cls(line=max(2, round(side * 0.003)), font_size=font_size, pad=max(2, font_size // 5))


@lru_cache(maxsize=32)
def font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Pillow's built-in font at ``size`` px (scalable when Pillow has FreeType, else its bitmap font)."""
    return ImageFont.load_default(size=size)


@dataclass(frozen=True)
class PlacedLabel:
    """One detection's label as :func:`draw_detections` draws it, in pixels of the image drawn on.

    rect: (left, top, right, bottom) of the filled plate, right/bottom exclusive; always inside
        the image and never touching another label's rect (when the image has room for all).
    box: the detection's box, (x1, y1, x2, y2) inclusive pixel corners, clipped to the image.
    leader: (x1, y1, x2, y2) of the line from the plate to its box when the plate had to be
        put away from the box (no free spot next to it), else None.
    """

    text: str
    color: tuple[int, int, int]
    rect: tuple[int, int, int, int]
    box: tuple[int, int, int, int]
    leader: tuple[int, int, int, int] | None = None


def draw_detections(
    img: Image.Image,
    result: DetectionResult,
    *,
    threshold: float | None = None,
    show_scores: bool = True,
) -> Image.Image:
    """A new RGB copy of ``img`` with the detections drawn.

    Each box scoring at least ``threshold`` (default: the result's own tuned threshold) is
    outlined in its class colour, with a label ("name 0.92", or "name" without
    ``show_scores``) on a filled plate of the same colour, text black or white by luminance.
    Labels never cover each other: see :func:`label_layout` for where each one goes (above
    the box when there is room, as for a lone box).

    Boxes are xyxy in pixels of the image the result was computed on (``result.image_size``);
    when ``img`` has another size (e.g. a downscaled copy for display) they are scaled to it.
    Boxes are drawn best-last, so the most confident box ends up on top.
    """
    out = _rgb_copy(img)
    labels = label_layout(out.size, result, threshold=threshold, show_scores=show_scores)
    if not labels:
        return out
    style = Style.for_size(*out.size)
    fnt = font(style.font_size)
    draw = ImageDraw.Draw(out)
    for lab in labels:  # label_layout lists them worst first: the best box's outline ends on top
        draw.rectangle(lab.box, outline=lab.color, width=style.line)
    # leader lines, then plates: after every box, so no outline or line crosses a label
    for lab in labels:
        if lab.leader is not None:
            draw.line(lab.leader, fill=lab.color, width=max(1, style.line))
    for lab in labels:
        left, top, right, bottom = lab.rect
        draw.rectangle((left, top, right - 1, bottom - 1), fill=lab.color)
        draw.text((left + style.pad, top + style.pad // 2), lab.text, fill=text_color(lab.color), font=fnt)
    return out


def label_layout(
    size: tuple[int, int],
    result: DetectionResult,
    *,
    threshold: float | None = None,
    show_scores: bool = True,
) -> list[PlacedLabel]:
    """Where :func:`draw_detections` puts each box and label on an image of ``size`` (width,
    height): one :class:`PlacedLabel` per box scoring at least ``threshold``, lowest score
    first (the drawing order). The best-scoring boxes choose their label's place first.

    A label goes to the first of these spots that covers no other label (and, among those,
    the one covering least of the other boxes): above the box, inside its top, below it,
    inside its bottom (each left- then right-aligned with the box, shifted to stay in the
    image). When all are taken it goes to the nearest free spot, joined to its box by a
    leader line. A label too wide for the image is shortened with "…".
    """
    w, h = int(size[0]), int(size[1])
    kept = result.above(threshold)
    if not len(kept) or w < 1 or h < 1:
        return []
    boxes = kept.boxes.astype(np.float64)
    if result.image_size and tuple(result.image_size) != (w, h):
        sx, sy = w / result.image_size[0], h / result.image_size[1]
        boxes = boxes * np.array([sx, sy, sx, sy])
    style = Style.for_size(w, h)
    fnt = font(style.font_size)
    order = np.argsort(kept.scores, kind="stable")  # ascending: best drawn last, on top
    clipped = np.array([_clip_box(b, w, h) for b in boxes], dtype=np.int64).reshape(-1, 4)
    texts, sizes = [], []
    for i in range(len(kept)):
        name = kept.classes[int(kept.class_ids[i])]
        text = f"{name} {float(kept.scores[i]):.2f}" if show_scores else name
        text = _fit_text(fnt, text, w - 2 * style.pad)
        texts.append(text)
        sizes.append((min(w, _text_width(fnt, text) + 2 * style.pad), min(h, _text_height(fnt) + style.pad)))
    rects, leaders = place_labels(clipped, np.array(sizes, dtype=np.int64), w, h, priority=order[::-1])
    return [
        PlacedLabel(texts[i], class_color(int(kept.class_ids[i])), tuple(int(v) for v in rects[i]),
                    tuple(int(v) for v in clipped[i]), leaders[i])
        for i in order
    ]


def place_labels(
    boxes: np.ndarray,
    sizes: np.ndarray,
    width: int,
    height: int,
    priority: np.ndarray | None = None,
) -> tuple[np.ndarray, list[tuple[int, int, int, int] | None]]:
    """A greedy label placer: one rect per box, none overlapping or touching another.

    boxes: int (N, 4) inclusive pixel corners inside the image; sizes: int (N, 2) label
    (width, height), each at most the image's; priority: the order in which boxes choose
    (default: as given). Returns int (N, 4) rects (left, top, right, bottom; right/bottom
    exclusive), all inside the image, and per box its leader line or None.

    Each box tries the spots next to it (see :func:`label_layout`) and takes the first that
    is free of placed labels, preferring ones that cover less of the other boxes; else the
    nearest free spot on a grid over the image (half a label high), weighing distance against
    covered boxes. Only when the image is full does a label overlap: then the spot next to
    its box overlapping placed labels least.
    """
    boxes = np.asarray(boxes, dtype=np.int64).reshape(-1, 4)
    sizes = np.asarray(sizes, dtype=np.int64).reshape(-1, 2)
    n = len(boxes)
    box_rects = boxes + np.array([0, 0, 1, 1])  # inclusive corners -> exclusive right/bottom
    rects = np.zeros((n, 4), dtype=np.int64)
    leaders: list[tuple[int, int, int, int] | None] = [None] * n
    placed = np.zeros((0, 4), dtype=np.int64)
    for i in (range(n) if priority is None else priority):
        others = np.delete(box_rects, i, axis=0)
        near = _spots_next_to(boxes[i], sizes[i], width, height)
        free = ~_touches(near, placed).any(axis=1)
        if free.any():
            cover = _covered_fraction(near[free], others)
            rect = near[free][int(np.argmin(cover))]  # argmin takes the first: preference order breaks ties
        else:
            rect = _free_spot_away(box_rects[i], sizes[i], width, height, placed, others)
            if rect is None:
                log.debug("no free spot for label %d of %d; it overlaps others", i, n)
                rect = near[int(np.argmin(_overlap_area(near, placed).sum(axis=1)))]
            else:
                leaders[i] = _leader(box_rects[i], rect)
        rects[i] = rect
        placed = np.vstack([placed, rect[None]])
    return rects, leaders


def draw_classification(img: Image.Image, result: ClassificationResult, k: int = 3) -> Image.Image:
    """A new RGB copy of ``img`` with a panel in the top-left corner listing the top ``k``
    labels (single-label) or every label at/above its threshold (multi-label), each with
    its score as text and as a bar in the class colour, on a translucent dark background.
    A multi-label result with no hit says so.
    """
    out = _rgb_copy(img)
    w, h = out.size
    style = Style.for_size(w, h)
    fnt = font(style.font_size)
    index = {name: i for i, name in enumerate(result.classes)}
    if result.multilabel:
        rows = [(name, float(result.scores[index[name]])) for name in result.labels]
        if not rows:
            rows = [("no label above threshold", None)]
    else:
        rows = [(name, score) for name, score in result.top(max(1, k))]
    texts = [name if score is None else f"{name} {score:.2f}" for name, score in rows]
    line_h = _text_height(fnt)
    bar_h = max(2, style.font_size // 4)
    row_h = line_h + bar_h + 2 * style.pad
    text_w = max(_text_width(fnt, t) for t in texts)
    panel_w = min(w, text_w + 2 * style.pad)
    panel_h = min(h, row_h * len(rows) + style.pad)
    margin = min(style.pad, max(0, w - panel_w), max(0, h - panel_h))

    # darken only the panel's pixels (compositing a whole 12-megapixel overlay costs ~1 s)
    box = (margin, margin, margin + panel_w, margin + panel_h)
    region = out.crop(box)
    out.paste(Image.blend(region, Image.new("RGB", region.size, (0, 0, 0)), PANEL_ALPHA), box)
    draw = ImageDraw.Draw(out)
    for r, ((name, score), text) in enumerate(zip(rows, texts)):
        top = margin + style.pad + r * row_h
        draw.text((margin + style.pad, top), text, fill=(255, 255, 255), font=fnt)
        if score is not None:
            bar_w = max(1, round((panel_w - 2 * style.pad) * min(max(score, 0.0), 1.0)))
            y = top + line_h + style.pad // 2
            draw.rectangle((margin + style.pad, y, margin + style.pad + bar_w - 1, y + bar_h - 1),
                           fill=class_color(index[name]))
    return out


def annotate(img: Image.Image, result: Result) -> Image.Image:
    """``img`` with ``result`` drawn: :func:`draw_detections` or :func:`draw_classification`."""
    if isinstance(result, DetectionResult):
        return draw_detections(img, result)
    if isinstance(result, ClassificationResult):
        return draw_classification(img, result)
    raise TypeError(f"annotate() draws a DetectionResult or ClassificationResult, got {type(result).__name__}")


def encode_image(img: Image.Image, fmt: str = "jpeg") -> bytes:
    """``img`` encoded as ``fmt`` ("jpeg", quality 90, or "png")."""
    key = fmt.lower()
    if key == "jpg":
        key = "jpeg"
    if key not in ENCODINGS:
        raise ValueError(f"unknown image format {fmt!r}; use one of {', '.join(ENCODINGS)}")
    buf = io.BytesIO()
    rgb = img if img.mode == "RGB" else img.convert("RGB")
    if key == "jpeg":
        rgb.save(buf, format="JPEG", quality=JPEG_QUALITY)
    else:
        rgb.save(buf, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buf.getvalue()


def fit_within(img: Image.Image, max_side: int | None) -> Image.Image:
    """``img`` shrunk (aspect kept) so its longer side is at most ``max_side``; the same
    object when it already fits or ``max_side`` is None. Drawing on a capped copy keeps
    annotating a 50-megapixel photo cheap; :func:`draw_detections` rescales the boxes."""
    if max_side is None or max(img.size) <= max_side:
        return img
    scale = max_side / max(img.size)
    size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
    return img.resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0)


def save_annotated(source: str | os.PathLike[str], result: Result, out_dir: str | os.PathLike[str],
                   *, taken: set[Path]) -> Path:
    """Decode ``source`` (full resolution, EXIF applied), draw ``result`` on it and write it
    to ``out_dir`` as ``<stem>.jpg``; returns the path written.

    ``taken``: resolved paths that must not be written (the inputs, earlier outputs); the
    new path is added to it. A clash (``a/x.png`` and ``b/x.jpg``, or an input that is
    itself ``out_dir/x.jpg``) gets ``<stem>-1.jpg``, ``<stem>-2.jpg``... so inputs and
    earlier outputs are never overwritten.
    """
    out_dir = Path(out_dir)
    stem = Path(source).stem
    target = out_dir / f"{stem}.jpg"
    n = 0
    while target.resolve() in taken:
        n += 1
        target = out_dir / f"{stem}-{n}.jpg"
    img = decode_image(source)
    target.write_bytes(encode_image(annotate(img, result), "jpeg"))
    taken.add(target.resolve())
    return target


# -- helpers ---------------------------------------------------------------------------------

def _rgb_copy(img: Image.Image) -> Image.Image:
    # convert() returns a new image even for an RGB input, so the caller's image is never drawn on
    return img.convert("RGB") if img.mode != "RGB" else img.copy()


def _clip_box(box: np.ndarray, w: int, h: int) -> tuple[int, int, int, int]:
    """Float xyxy → integer pixel corners inside the image, x2 >= x1 and y2 >= y1 (Pillow
    rejects reversed rectangles; a box may lie partly or wholly outside after rounding)."""
    x1, y1, x2, y2 = (float(v) if math.isfinite(v) else 0.0 for v in box)
    x1 = min(max(round(min(x1, x2)), 0), w - 1)
    y1 = min(max(round(min(y1, y2)), 0), h - 1)
    x2 = min(max(round(max(x1, x2)), x1), w - 1)
    y2 = min(max(round(max(y1, y2)), y1), h - 1)
    return x1, y1, x2, y2


def _text_width(fnt: ImageFont.FreeTypeFont | ImageFont.ImageFont, text: str) -> int:
    left, _, right, _ = fnt.getbbox(text)
    return math.ceil(right - min(0, left))


def _text_height(fnt: ImageFont.FreeTypeFont | ImageFont.ImageFont) -> int:
    # ascent + descent of the font, not of the string: every label gets the same height
    if isinstance(fnt, ImageFont.FreeTypeFont):
        ascent, descent = fnt.getmetrics()
        return int(ascent + descent)
    _, top, _, bottom = fnt.getbbox("Hg")
    return int(bottom - min(0, top))


def _fit_text(fnt: ImageFont.FreeTypeFont | ImageFont.ImageFont, text: str, max_width: int) -> str:
    """``text``, or its longest prefix + "…" that is at most ``max_width`` px wide."""
    if _text_width(fnt, text) <= max_width:
        return text
    for end in range(len(text) - 1, 0, -1):
        short = text[:end].rstrip() + "…"
        if _text_width(fnt, short) <= max_width:
            return short
    return text[:1]


def _spots_next_to(box: np.ndarray, size: np.ndarray, w: int, h: int) -> np.ndarray:
    """Candidate label rects for one box, best first: above, inside the top, below, inside the
    bottom; each left-aligned then right-aligned with the box, shifted inside the image.
    A spot that would leave the image at the top or bottom is skipped (the next one is its
    flip to the inside); when all are, the label sits at the box's top, pushed inside."""
    x1, y1, x2, y2 = (int(v) for v in box)
    tw, th = int(size[0]), int(size[1])
    spots = []
    for top in (y1 - th, y1, y2 + 1, y2 + 1 - th):
        if top < 0 or top + th > h:
            continue
        for left in (x1, x2 + 1 - tw):
            left = max(0, min(left, w - tw))
            spots.append((left, top, left + tw, top + th))
    if not spots:
        top, left = max(0, min(y1, h - th)), max(0, min(x1, w - tw))
        spots.append((left, top, left + tw, top + th))
    return np.array(list(dict.fromkeys(spots)), dtype=np.int64)  # duplicates out, order kept


def _touches(cands: np.ndarray, placed: np.ndarray, gap: int = 1) -> np.ndarray:
    """(K, M) bool: candidate k overlaps placed rect m or comes within ``gap`` px of it (plates of
    one colour that touch would read as one)."""
    if not len(placed):
        return np.zeros((len(cands), 0), dtype=bool)
    c, p = cands[:, None, :], placed[None, :, :]
    return ((c[..., 0] < p[..., 2] + gap) & (p[..., 0] < c[..., 2] + gap)
            & (c[..., 1] < p[..., 3] + gap) & (p[..., 1] < c[..., 3] + gap))


def _overlap_area(cands: np.ndarray, rects: np.ndarray) -> np.ndarray:
    """(K, M) intersection areas of candidate rects with ``rects`` (both exclusive right/bottom)."""
    if not len(rects):
        return np.zeros((len(cands), 0), dtype=np.int64)
    c, r = cands[:, None, :], rects[None, :, :]
    iw = np.clip(np.minimum(c[..., 2], r[..., 2]) - np.maximum(c[..., 0], r[..., 0]), 0, None)
    ih = np.clip(np.minimum(c[..., 3], r[..., 3]) - np.maximum(c[..., 1], r[..., 1]), 0, None)
    return iw * ih


def _covered_fraction(cands: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """(K,) how much of the other boxes each candidate covers, as a fraction of its own area
    (summed over boxes, so a plate over two overlapping boxes counts twice)."""
    area = (cands[:, 2] - cands[:, 0]) * (cands[:, 3] - cands[:, 1])
    return _overlap_area(cands, boxes).sum(axis=1) / np.maximum(area, 1)


def _free_spot_away(box: np.ndarray, size: np.ndarray, w: int, h: int, placed: np.ndarray,
                    others: np.ndarray) -> np.ndarray | None:
    """The best free label rect anywhere on a grid over the image (step: half a label high),
    or None when there is none. Best: nearest to ``box`` (exclusive corners), where covering
    the whole of another box counts as four label heights further away."""
    tw, th = int(size[0]), int(size[1])
    step = max(1, th // 2)
    lefts = np.unique(np.append(np.arange(0, w - tw + 1, step), w - tw))
    tops = np.unique(np.append(np.arange(0, h - th + 1, step), h - th))
    ll, tt = np.meshgrid(lefts, tops)
    cands = np.stack([ll.ravel(), tt.ravel(), ll.ravel() + tw, tt.ravel() + th], axis=1)
    cands = cands[~_touches(cands, placed).any(axis=1)]
    if not len(cands):
        return None
    # gap between each candidate and the box along x and y (0 where they overlap on that axis)
    dx = np.maximum(0, np.maximum(box[0] - cands[:, 2], cands[:, 0] - box[2]))
    dy = np.maximum(0, np.maximum(box[1] - cands[:, 3], cands[:, 1] - box[3]))
    cost = np.hypot(dx, dy) + 4 * th * _covered_fraction(cands, others)
    return cands[int(np.argmin(cost))]


def _leader(box: np.ndarray, rect: np.ndarray) -> tuple[int, int, int, int]:
    """The shortest line from a label rect to its box (both with exclusive right/bottom)."""
    bx1, by1, bx2, by2 = (int(v) for v in box)
    rx1, ry1, rx2, ry2 = (int(v) for v in rect)
    cx, cy = (rx1 + rx2 - 1) / 2, (ry1 + ry2 - 1) / 2
    px_, py_ = min(max(cx, bx1), bx2 - 1), min(max(cy, by1), by2 - 1)  # box point nearest the plate's centre
    qx, qy = min(max(px_, rx1), rx2 - 1), min(max(py_, ry1), ry2 - 1)  # plate point nearest that
    return round(qx), round(qy), round(px_), round(py_)
