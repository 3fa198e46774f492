"""Explanations without torch: the class activation maps of a bundle's ``explain.onnx``, mapped
back onto the image, and drawn as an overlay. numpy + Pillow + onnxruntime only.

``explain.onnx`` (written by :mod:`lensforge.explain.export` for classifiers whose head is
global average pooling + one linear layer) takes what ``model.onnx`` takes and returns

    cams    float32 (N, C, h, w)  the last feature map weighted by each class's head weights
                                  (the exact class activation map: its spatial mean + the
                                  class bias is the class's logit)
    scores  float32 (N, C)        the same scores as model.onnx

A separate graph rather than extra outputs of ``model.onnx``: the predict path then loads and
runs exactly what it did before (measured in bench/explain.py), and the explain session is
only opened by the first explanation.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from lensforge.errors import BundleError, ConfigError, ModelError
from lensforge.runtime.bundle import EXPLAIN_FILE, Bundle
from lensforge.runtime.preprocess import InputSpec, preprocess

log = logging.getLogger(__name__)

EXPLAIN_OUTPUTS = ("cams", "scores")  # explain.onnx's outputs, in this order
# a ViT bundle's explain.onnx (lensforge.explain.attention): attention (N, heads, h, w), the last layer's CLS
# query over the patches per head; rollout (N, 1, h, w), attention rollout through every layer; scores (N, C)
ATTENTION_OUTPUTS = ("attention", "rollout", "scores")
ATTENTION_METHODS = ("attention", "rollout")  # what a ViT explains with, the default first
# what --method takes; cam, attention and rollout run without torch (from explain.onnx), eigencam is for detectors
METHODS = ("auto", "cam", "gradcam", "gradcam++", "attention", "rollout", "eigencam")
TORCH_METHODS = ("gradcam", "gradcam++", "eigencam")  # methods that need torch (the train extra)
ALPHA = 0.45  # how strongly the heat map covers the image in overlays


@dataclass
class Explanation:
    """Why a classifier gave ``label`` its score, as a heat map over the image.

    map: float32 (H, W) in [0, 1] at the image's resolution (the decoded image: a large JPEG
        may have been decoded at a reduced DCT scale, as for predict); 0 where the model's
        centre crop did not see the image.
    label, score: the class explained and its score (probability; sigmoid for multi-label).
    method: "cam", "gradcam", "gradcam++", "attention", "rollout" or "eigencam".
    image: the RGB image the map lies on (for :meth:`overlay`).
    head: for ``attention``, the attention head shown (None: the mean over the heads). Attention
        maps do not depend on the label: every label of an image gets the same map.
    """

    map: np.ndarray
    label: str
    score: float
    method: str
    image: Image.Image | None = field(default=None, repr=False)
    head: int | None = None

    def __post_init__(self) -> None:
        m = self.map
        if not isinstance(m, np.ndarray) or m.ndim != 2 or m.dtype != np.float32:
            raise ValueError(f"map must be float32 (H, W), got {getattr(m, 'dtype', type(m))} {getattr(m, 'shape', '')}")
        if m.size and (float(m.min()) < 0 or float(m.max()) > 1):
            raise ValueError(f"map must lie in [0, 1], got [{m.min():.3g}, {m.max():.3g}]")
        if self.image is not None and self.image.size != (m.shape[1], m.shape[0]):
            raise ValueError(f"map {m.shape[1]}x{m.shape[0]} does not match the image {self.image.width}x{self.image.height}")

    @property
    def peak(self) -> tuple[int, int]:
        """(x, y) of the map's maximum, in image pixels."""
        y, x = np.unravel_index(int(np.argmax(self.map)), self.map.shape)
        return int(x), int(y)

    def overlay(self, alpha: float = ALPHA, colorbar: bool = True) -> Image.Image:
        """A new RGB image: the map in the turbo colour map blended over the image with
        ``alpha``, a colour bar (0 → 1) on the right and "label score (method)" in the top-left corner."""
        return draw_overlay(self, alpha=alpha, colorbar=colorbar)

    def to_dict(self, size: int = 32) -> dict[str, Any]:
        """JSON-ready: label, score, method, the image size and the map shrunk to at most
        ``size`` px on its longer side (rounded to 3 decimals)."""
        h, w = self.map.shape
        scale = min(1.0, size / max(h, w, 1))
        small = Image.fromarray(self.map, "F").resize((max(1, round(w * scale)), max(1, round(h * scale))),
                                                      Image.Resampling.BILINEAR)
        return {"label": self.label, "score": round(float(self.score), 6), "method": self.method,
                **({"head": self.head} if self.head is not None else {}), "width": w, "height": h, "map": np.round(np.clip(np.asarray(small), 0, 1), 3).tolist()}


# -- numbers: normalise a low-resolution map and lay it over the image --------------------------


def normalise(cam: np.ndarray) -> np.ndarray:
    """ReLU, then divided by its maximum: float32 in [0, 1]; all zeros when nothing is positive
    (no part of the image speaks for the class). Keeps 0 meaning "no evidence"."""
    m = np.maximum(np.asarray(cam, dtype=np.float32), 0)
    top = float(m.max()) if m.size else 0.0
    return m / np.float32(top) if top > 0 else np.zeros_like(m)


def _axis_taps(n_image: int, n_grid: int, scale: float, offset: int, crop: int
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Bilinear taps taking a grid that covers the crop ``[offset, offset + crop)`` of the
    resized axis back to the original image's ``n_image`` pixels: per pixel the two grid cells
    (lo, hi) and their float32 weights; 0 for pixels the crop leaves out. ``scale``: resized /
    original length. Two taps per pixel rather than a dense (n_image, n_grid) matrix: the matrix
    product went through OpenBLAS, whose thread wake-ups cost 8-16 ms on a busy 2-core machine
    for a 640x427 image (the gather is ~1 ms and does not depend on the grid's size)."""
    u = (np.arange(n_image, dtype=np.float64) + 0.5) * scale - offset  # pixel centre, in crop pixels
    g = u * n_grid / crop - 0.5  # ... in grid cells (cell i's centre at i)
    g = np.clip(g, 0, n_grid - 1)  # the border cells extend to the crop's edge
    lo = np.floor(g).astype(np.intp)
    hi = np.minimum(lo + 1, n_grid - 1)
    frac = (g - lo).astype(np.float32)
    seen = ((u >= 0) & (u < crop)).astype(np.float32)  # outside the centre crop: the model never saw it
    return lo, hi, (1 - frac) * seen, frac * seen


def to_image(grid: np.ndarray, spec: InputSpec, size: tuple[int, int]) -> np.ndarray:
    """A map over the model's input crop (any grid: (h, w) features, or (S, S) pixels) →
    float32 (H, W) over an image of ``size`` = (W, H), following the predict path's resize
    (shorter side to ``spec.resize``) and centre crop (``spec.size``), bilinearly."""
    w, h = size
    s = spec.resize / min(w, h)
    nw, nh = max(spec.size, round(w * s)), max(spec.size, round(h * s))  # as resize_shorter
    left, top = (nw - spec.size) // 2, (nh - spec.size) // 2  # as resize_and_crop
    g = np.asarray(grid, np.float32)
    ylo, yhi, y0, y1 = _axis_taps(h, g.shape[0], nh / h, top, spec.size)
    xlo, xhi, x0, x1 = _axis_taps(w, g.shape[1], nw / w, left, spec.size)
    # separable: along x on the grid's few rows (h, W), then along y by copying whole rows (H, W)
    cols = g[:, xlo] * x0 + g[:, xhi] * x1
    out = np.take(cols, ylo, axis=0)
    out *= y0[:, None]  # in place: each fresh (H, W) array costs page faults (~0.3 ms at 640x427)
    far = np.take(cols, yhi, axis=0)
    far *= y1[:, None]
    out += far
    return np.clip(out, 0, 1, out=out)


# -- drawing ------------------------------------------------------------------------------------

# Turbo colour map (Google, 2019) as Mikhailov's polynomial fit: perceptually ordered, no matplotlib.
_TURBO = np.array([
    [0.13572138, 4.61539260, -42.66032258, 132.13108234, -152.94239396, 59.28637943],
    [0.09140261, 2.19418839, 4.84296658, -14.18503333, 4.27729857, 2.82956604],
    [0.10667330, 12.64194608, -60.58204836, 110.36276771, -89.90310912, 27.34824973],
])


def _turbo(x: np.ndarray) -> np.ndarray:
    """float (...) in [0, 1] → float (..., 3) in [0, 1]: the polynomial itself."""
    x = np.clip(np.asarray(x, np.float64), 0, 1)[..., None]
    powers = np.concatenate([x ** k for k in range(6)], axis=-1)
    return np.clip(powers @ _TURBO.T, 0, 1)


# the polynomial at 256 levels: an overlay is 8-bit anyway, and a look-up is ~50x cheaper than
# evaluating six powers per pixel (80 ms of a 640x427 overlay's 85 ms, measured in-process)
_TURBO_LUT = (_turbo(np.linspace(0, 1, 256)) * 255 + 0.5).astype(np.uint8)


_TURBO_PALETTE = _TURBO_LUT.tobytes()  # the look-up as a 'P' image's palette (768 bytes, RGB per level)


def _levels(m: np.ndarray) -> np.ndarray:
    """float (H, W) in [0, 1] → uint8 (H, W): the colour map's level of each pixel (rounded)."""
    return (np.clip(np.asarray(m, np.float32), 0, 1) * np.float32(255) + np.float32(0.5)).astype(np.uint8)


def colorize(m: np.ndarray) -> np.ndarray:
    """float (H, W) in [0, 1] → uint8 (H, W, 3) in the turbo colour map (256 levels)."""
    return np.take(_TURBO_LUT, _levels(m), axis=0)  # take: ~3x faster than fancy indexing here


def colorize_image(m: np.ndarray) -> Image.Image:
    """:func:`colorize` as an RGB image: the levels as a palette image whose palette is the look-up,
    converted by Pillow (~4x faster than numpy's per-pixel take of 3 bytes, the same pixels)."""
    levels = _levels(m)
    img = Image.frombuffer("P", (levels.shape[1], levels.shape[0]), levels.tobytes(), "raw", "P", 0, 1)
    img.putpalette(_TURBO_PALETTE)
    return img.convert("RGB")


@lru_cache(maxsize=16)
def _colour_bar(width: int, height: int) -> Image.Image:
    """The colour bar's ramp (1 at the top), drawn once per size: every overlay of an image size
    has the same one. Callers paste it, never draw on it."""
    return colorize_image(np.linspace(1, 0, height, dtype=np.float32)[:, None].repeat(width, axis=1))


def draw_overlay(e: Explanation, alpha: float = ALPHA, colorbar: bool = True) -> Image.Image:
    """See :meth:`Explanation.overlay`. All in uint8 through Pillow: the map's levels become a
    palette image (the colour map as its palette), blended over the image with Image.blend."""
    from lensforge.runtime.draw import PANEL_ALPHA, Style, font

    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be between 0 and 1, got {alpha}")
    base = e.image.convert("RGB") if e.image is not None else Image.new("RGB", (e.map.shape[1], e.map.shape[0]))
    out = Image.blend(base, colorize_image(e.map), alpha)
    w, h = out.size
    style = Style.for_size(w, h)
    fnt = font(style.font_size)
    draw = ImageDraw.Draw(out)
    # the longest of these that fits the width: on a small image "(cam)" was cut off mid-word
    texts = [f"{e.label} {e.score:.2f} ({e.method}{'' if e.head is None else f', head {e.head}'})",
             f"{e.label} {e.score:.2f}", str(e.label)]
    text = next((t for t in texts if draw.textlength(t, font=fnt) + 2 * style.pad <= w), texts[-1])
    x1, _, x2, y2 = (int(v) for v in draw.textbbox((0, 0), text, font=fnt))
    box = (0, 0, min(w, x2 - x1 + 2 * style.pad), min(h, y2 + 2 * style.pad))
    region = out.crop(box)
    out.paste(Image.blend(region, Image.new("RGB", region.size, (0, 0, 0)), PANEL_ALPHA), box)
    draw.text((style.pad - x1, style.pad), text, fill=(255, 255, 255), font=fnt)
    if colorbar and w >= 24 and h >= 24:
        bar_w = max(4, w // 40)
        bar_h = max(8, h // 2)
        x0, y0 = w - bar_w - style.pad, (h - bar_h) // 2
        out.paste(_colour_bar(bar_w, bar_h), (x0, y0))
        draw.rectangle((x0 - 1, y0 - 1, x0 + bar_w, y0 + bar_h), outline=(255, 255, 255))
        small = font(max(10, style.font_size * 3 // 4))
        for value, y in (("1", y0), ("0", y0 + bar_h)):
            tw = draw.textlength(value, font=small)
            draw.text((x0 - tw - 2, y), value, fill=(255, 255, 255), font=small, anchor="lm",
                      stroke_width=1, stroke_fill=(0, 0, 0))
    return out


def overlay_row(explanations: Sequence[Explanation], gap: int = 4) -> Image.Image:
    """The overlays of ``explanations`` side by side (e.g. the top-K labels of one image)."""
    tiles = [e.overlay() for e in explanations]
    if not tiles:
        raise ValueError("overlay_row needs at least one explanation")
    width = sum(t.width for t in tiles) + gap * (len(tiles) - 1)
    row = Image.new("RGB", (width, max(t.height for t in tiles)), (255, 255, 255))
    x = 0
    for t in tiles:
        row.paste(t, (x, 0))
        x += t.width + gap
    return row


# -- the ONNX side ------------------------------------------------------------------------------


def label_index(label: str | int, classes: Sequence[str]) -> int:
    """A class name (or 0-based index) → its index; a ConfigError naming the classes otherwise."""
    if isinstance(label, (int, np.integer)) and not isinstance(label, bool):
        if 0 <= int(label) < len(classes):
            return int(label)
    elif label in classes:
        return list(classes).index(str(label))
    shown = ", ".join(classes[:20]) + (", ..." if len(classes) > 20 else "")
    raise ConfigError(f"label {label!r} is not one of this model's {len(classes)} classes: {shown}")


def check_method(method: str) -> None:
    """Without torch the exact CAM (CNNs) and attention / rollout (ViTs) run; the other methods
    say where they do run. Whether the method fits the bundle's graph is the explainer's check."""
    if method not in METHODS:
        raise ConfigError(f"unknown explain method {method!r}; use one of {', '.join(METHODS)}")
    if method in TORCH_METHODS:
        raise ModelError(f"{method} needs torch (lensforge's train extra): use lensforge.explain.TorchExplainer or "
                         "`lensforge explain --method ...`; without torch a bundle explains with: cam (CNNs), "
                         "attention or rollout (ViTs)")


class CamExplainer:
    """Runs a bundle's ``explain.onnx``. ``open_session(path)`` opens an onnxruntime session
    with the Predictor's options (threads, providers)."""

    def __init__(self, bundle: Bundle, open_session: Callable[[str], Any]) -> None:
        self.bundle = bundle
        self.classes = tuple(bundle.classes)
        if bundle.task == "detect":
            raise ModelError(f"{bundle.path} holds a detector; its per-box maps (eigencam) need torch: "
                             f"lensforge explain {bundle.path} IMAGE")
        info = bundle.meta.get("explain")
        path = bundle.path / (info.get("file", EXPLAIN_FILE) if isinstance(info, dict) else EXPLAIN_FILE)
        if not isinstance(info, dict) or not path.is_file():
            raise BundleError(f"{bundle.path} has no explain graph (made before lensforge could explain, or its head is "
                              f"not pooling + linear); add it with: lensforge export {bundle.path} --to explain")
        self.spec = bundle.input_spec
        self.session = open_session(str(path))
        names = tuple(o.name for o in self.session.get_outputs())
        # the graph's outputs say which methods it carries (lensforge.json's explain.methods says the same)
        if names == EXPLAIN_OUTPUTS:
            self.methods: tuple[str, ...] = ("cam",)
        elif names == ATTENTION_OUTPUTS:
            self.methods = ATTENTION_METHODS
        else:
            raise BundleError(f"{path} outputs {', '.join(names)}; an explain graph outputs {', '.join(EXPLAIN_OUTPUTS)} "
                              f"(CNNs) or {', '.join(ATTENTION_OUTPUTS)} (ViTs)")
        self.input_name = self.session.get_inputs()[0].name

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """float32 (N, 3, S, S) → cams float32 (N, C, h, w), scores float32 (N, C)."""
        cams, scores = self.session.run(list(EXPLAIN_OUTPUTS), {self.input_name: np.ascontiguousarray(batch, np.float32)})
        return cams, scores

    def resolve(self, method: str) -> str:
        """``auto`` → this graph's default; a method the graph does not carry → ModelError naming those it does."""
        check_method(method)
        if method == "auto":
            return self.methods[0]
        if method not in self.methods:
            kind = "a ViT" if self.methods == ATTENTION_METHODS else "a CNN"
            raise ModelError(f"{method} does not fit this model ({kind}); it explains with: {', '.join(self.methods)}"
                             + ("" if kind == "a ViT" else " (gradcam, gradcam++ with torch)"))
        return method

    def explain(self, img: Image.Image, labels: Sequence[str | int] | None = None, k: int = 1,
                method: str = "auto", heads: bool = False) -> list[Explanation]:
        """One decoded RGB image → explanations of ``labels`` (default: the top ``k``), in order.
        ``heads``: for ``attention``, each label's head-mean map is followed by one map per head."""
        method = self.resolve(method)
        batch = preprocess(img, self.spec)[None]
        if method == "cam":
            cams, scores = self.run(batch)
            return explanations(img, cams[0], scores[0], self.classes, self.spec, "cam", labels, k)
        attention, rollout, scores = self.session.run(list(ATTENTION_OUTPUTS),
                                                      {self.input_name: np.ascontiguousarray(batch, np.float32)})
        return attention_explanations(img, attention[0], rollout[0], scores[0], self.classes, self.spec, method,
                                      labels, k, heads)


def explanations(img: Image.Image, grids: np.ndarray, scores: np.ndarray, classes: Sequence[str], spec: InputSpec,
                 method: str, labels: Sequence[str | int] | None, k: int) -> list[Explanation]:
    """Per-class grids (C, h, w) of one image → :class:`Explanation` of each wanted class."""
    wanted = ([label_index(lab, classes) for lab in labels] if labels is not None
              else [int(i) for i in np.argsort(-scores, kind="stable")[:max(1, k)]])
    return [Explanation(to_image(normalise(grids[i]), spec, img.size), classes[i], float(scores[i]), method, img)
            for i in wanted]


def attention_explanations(img: Image.Image, attention: np.ndarray, rollout: np.ndarray, scores: np.ndarray,
                           classes: Sequence[str], spec: InputSpec, method: str, labels: Sequence[str | int] | None,
                           k: int, heads: bool = False) -> list[Explanation]:
    """A ViT graph's outputs for one image (attention (heads, h, w), rollout (1, h, w), scores
    (C,)) → :class:`Explanation` of each wanted class. The map does not depend on the class:
    ``attention`` is the last layer's CLS attention averaged over the heads (each head's own
    map follows when ``heads``), ``rollout`` the attention rollout."""
    wanted = ([label_index(lab, classes) for lab in labels] if labels is not None
              else [int(i) for i in np.argsort(-scores, kind="stable")[:max(1, k)]])
    if method == "rollout":
        grids: list[tuple[np.ndarray, int | None]] = [(rollout[0], None)]
    elif method == "attention":
        grids = [(attention.mean(0), None), *([(a, i) for i, a in enumerate(attention)] if heads else [])]
    else:
        raise ModelError(f"{method} is not an attention method; use one of {', '.join(ATTENTION_METHODS)}")
    maps = [(to_image(normalise(g), spec, img.size), head) for g, head in grids]  # once: the same for every label
    return [Explanation(m, classes[i], float(scores[i]), method, img, head) for i in wanted for m, head in maps]
