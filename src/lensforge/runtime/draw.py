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
    ``show_scores``) on a filled background of the same colour, text black or white by
    luminance. The label sits above the box, or just inside it when the box touches the
    top edge, and is shifted to stay inside the image.

    Boxes are xyxy in pixels of the image the result was computed on (``result.image_size``);
    when ``img`` has another size (e.g. a downscaled copy for display) they are scaled to it.
    Boxes are drawn best-last, so the most confident box and its label end up on top.
    """
    out = _rgb_copy(img)
    kept = result.above(threshold)
    if not len(kept):
        return out
    w, h = out.size
    boxes = kept.boxes.astype(np.float64)
    if result.image_size and tuple(result.image_size) != (w, h):
        sx, sy = w / result.image_size[0], h / result.image_size[1]
        boxes = boxes * np.array([sx, sy, sx, sy])
    style = Style.for_size(w, h)
    fnt = font(style.font_size)
    draw = ImageDraw.Draw(out)
    order = np.argsort(kept.scores, kind="stable")  # ascending: best drawn last, on top
    placed = []
    for i in order:
        x1, y1, x2, y2 = _clip_box(boxes[i], w, h)
        color = class_color(int(kept.class_ids[i]))
        draw.rectangle((x1, y1, x2, y2), outline=color, width=style.line)
        name = kept.classes[int(kept.class_ids[i])]
        text = f"{name} {float(kept.scores[i]):.2f}" if show_scores else name
        placed.append((text, color, (x1, y1)))
    # labels after every box, so no later box's outline crosses an earlier label
    for text, color, (x1, y1) in placed:
        _label(draw, fnt, style, text, color, x1, y1, w, h)
    return out


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


def _label(draw: ImageDraw.ImageDraw, fnt: ImageFont.FreeTypeFont | ImageFont.ImageFont, style: Style,
           text: str, color: tuple[int, int, int], x1: int, y1: int, w: int, h: int) -> None:
    """A filled label with its top-left at the box's top-left corner, above the box when
    there is room, else inside it; shifted left/up so it stays inside the image."""
    tw = _text_width(fnt, text) + 2 * style.pad
    th = _text_height(fnt) + style.pad
    top = y1 - th if y1 - th >= 0 else y1
    top = max(0, min(top, h - th))
    left = max(0, min(x1, w - tw))
    draw.rectangle((left, top, left + tw - 1, top + th - 1), fill=color)
    draw.text((left + style.pad, top + style.pad // 2), text, fill=text_color(color), font=fnt)
