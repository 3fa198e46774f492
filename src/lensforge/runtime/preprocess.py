"""Image → model input, in numpy: the eval transform every consumer shares.

Training (validation batches and feature extraction), the Predictor and the server all call
:func:`preprocess`, so the pixels a model sees at serving time are the pixels it was
validated on. The facts it needs travel in the bundle as an :class:`InputSpec`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Any

import numpy as np
from PIL import Image

from lensforge.data.image import check_aspect

_RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}


@dataclass(frozen=True)
class InputSpec:
    """How to turn a decoded RGB image into the model's input tensor.

    size: side of the square crop the model sees (pixels).
    resize: the shorter image side is resized to this before the centre crop
        (``size / resize`` is timm's ``crop_pct``).
    mean, std: per-channel normalisation of values scaled to [0, 1].
    interpolation: "bilinear" or "bicubic".
    """

    size: int = 224
    resize: int = 256
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        if self.size < 8 or self.resize < self.size:
            raise ValueError(f"need 8 <= size <= resize, got size={self.size}, resize={self.resize}")
        if self.interpolation not in _RESAMPLE:
            raise ValueError(f"interpolation must be one of {sorted(_RESAMPLE)}, got {self.interpolation!r}")
        _check_normalisation(self.mean, self.std)

    @classmethod
    def for_size(cls, size: int, crop_pct: float = 0.875, **kw: Any) -> InputSpec:
        return cls(size=size, resize=round(size / crop_pct), **kw)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> InputSpec:
        return cls(
            size=int(d["size"]),
            resize=int(d["resize"]),
            mean=_floats(d["mean"], "mean"),  # type: ignore[arg-type]
            std=_floats(d["std"], "std"),  # type: ignore[arg-type]
            interpolation=str(d.get("interpolation", "bilinear")),
        )


@dataclass(frozen=True)
class DetectSpec:
    """A detector's input sizes. The image is resized (aspect kept) so its shorter side is
    ``min_size`` unless the longer would pass ``max_size`` (torchvision's rule, the one
    training used), then given to the graph as float32 (1, 3, h, w) RGB in [0, 1]; the graph
    normalises with ``mean``/``std`` itself. Boxes come back in the resized image's pixels
    and the Predictor maps them to the original's.
    """

    min_size: int = 512
    max_size: int = 853
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    def __post_init__(self) -> None:
        if not 32 <= self.min_size <= self.max_size:
            raise ValueError(f"need 32 <= min_size <= max_size, got min_size={self.min_size}, max_size={self.max_size}")
        _check_normalisation(self.mean, self.std)

    def scale_for(self, width: int, height: int) -> float:
        """The factor a ``width`` x ``height`` image is resized by (torchvision's rule)."""
        return min(self.min_size / min(width, height), self.max_size / max(width, height))

    def target_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) the model sees for a ``width`` x ``height`` image."""
        s = self.scale_for(width, height)
        return max(1, round(width * s)), max(1, round(height * s))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DetectSpec:
        return cls(
            min_size=int(d["min_size"]),
            max_size=int(d["max_size"]),
            mean=_floats(d["mean"], "mean"),  # type: ignore[arg-type]
            std=_floats(d["std"], "std"),  # type: ignore[arg-type]
        )


def detector_input(img: Image.Image, spec: DetectSpec) -> np.ndarray:
    """Decoded RGB image → float32 (3, h, w) in [0, 1] at the model's size (see
    :meth:`DetectSpec.target_size`): what a detector graph takes."""
    size = spec.target_size(*img.size)
    if size != img.size:
        img = img.resize(size, Image.Resampling.BILINEAR, reducing_gap=3.0 if size[0] < img.width else None)
    x = np.asarray(img, dtype=np.float32) * np.float32(1 / 255)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def _check_normalisation(mean: tuple[float, ...], std: tuple[float, ...]) -> None:
    """Per-channel mean/std, shared by classifier and detector specs."""
    for name, values in (("mean", mean), ("std", std)):
        if len(values) != 3 or not all(math.isfinite(v) for v in values):
            raise ValueError(f"{name} must be 3 finite numbers (one per RGB channel), got {list(values)}")
    if min(std) <= 0:
        raise ValueError(f"std must be > 0 for every channel (it divides the pixels), got {list(std)}")


def _floats(values: Any, name: str) -> tuple[float, ...]:
    # A JSON string would otherwise pass as a sequence of digits: "123" -> (1.0, 2.0, 3.0).
    if not isinstance(values, (list, tuple)):
        raise TypeError(f"{name} must be a list of 3 numbers, got {values!r}")
    return tuple(float(v) for v in values)


def resize_shorter(img: Image.Image, spec: InputSpec) -> Image.Image:
    """Resize so the shorter side is ``spec.resize`` (aspect kept); a no-op when it already is.

    Raises ImageError("too_large") past the decoder's aspect cap: images decoded by
    :func:`~lensforge.data.image.decode_image` never get here, but a PIL image handed over
    as is would (65535x1 → a 16.7 M-pixel-wide resize, gigabytes)."""
    check_aspect(img.size)
    w, h = img.size
    nw, nh = crop_geometry(img.size, spec)[0]
    if (nw, nh) == (w, h):
        return img
    # reducing_gap lets Pillow shrink by whole factors first (much faster on big photos)
    # while the final pass still filters properly.
    return img.resize((nw, nh), _RESAMPLE[spec.interpolation], reducing_gap=3.0)


def crop_geometry(size: tuple[int, int], spec: InputSpec) -> tuple[tuple[int, int], tuple[int, int]]:
    """For an image of ``size`` (w, h): the size :func:`resize_shorter` gives it and the
    (left, top) corner of the centre ``spec.size``² crop in those resized pixels."""
    w, h = size
    scale = spec.resize / min(w, h)
    nw, nh = max(spec.size, round(w * scale)), max(spec.size, round(h * scale))
    return (nw, nh), ((nw - spec.size) // 2, (nh - spec.size) // 2)


def _decoded_grid(img: Image.Image) -> tuple[tuple[int, int], int]:
    """(full-resolution size, d) of an image libjpeg decoded at 1/d scale (JPEG draft, see
    :func:`~lensforge.data.image.decode_image`: ``info["original_size"]``), else (size, 1).

    At 1/d each decoded pixel is exactly a d x d block of the original (the last one partial:
    ``ceil(side / d)`` pixels), so the crop is placed in the original's geometry and mapped by
    exactly 1/d. Using the decoded size instead would stretch that partial block over the
    image: up to ~0.3 output pixels off at the far edge, visible on sharp edges."""
    original = img.info.get("original_size")
    if isinstance(original, tuple) and len(original) == 2 and tuple(original) != img.size:
        w, h = original
        for d in (2, 4, 8):
            if (-(-w // d), -(-h // d)) == img.size:
                return (w, h), d
    return img.size, 1


def resize_and_crop(img: Image.Image, spec: InputSpec) -> Image.Image:
    """Resize the shorter side to ``spec.resize``, then centre-crop ``spec.size``² -- in one
    pass: only the crop is resampled (Pillow's ``resize(box=...)``), with the filter centres
    and support of the full resize, so the pixels are those of resize-then-crop (up to float
    rounding and, past ``reducing_gap``, where the whole-factor ``reduce`` blocks start) while
    the pixels cut away by the crop are never computed (~1.7x fewer outputs from a 4:3 photo).
    A draft-decoded JPEG is cropped where the full-resolution image would be."""
    check_aspect(img.size)
    full, d = _decoded_grid(img)
    (nw, nh), (left, top) = crop_geometry(full, spec)
    s = spec.size
    if d == 1 and (nw, nh) == img.size:
        return img.crop((left, top, left + s, top + s))
    sx, sy = full[0] / (nw * d), full[1] / (nh * d)  # decoded pixels per resized pixel, per axis
    box = (left * sx, top * sy, (left + s) * sx, (top + s) * sy)
    return img.resize((s, s), _RESAMPLE[spec.interpolation], box=box, reducing_gap=3.0)


@lru_cache(maxsize=16)
def _affine(spec: InputSpec) -> tuple[np.ndarray, np.ndarray]:
    """(scale, offset), float32 (3, 1, 1): ``(x / 255 - mean) / std == x * scale + offset``."""
    std = np.asarray(spec.std, dtype=np.float32)
    scale = np.float32(1.0) / (np.float32(255.0) * std)
    offset = -np.asarray(spec.mean, dtype=np.float32) / std
    return scale.reshape(3, 1, 1), offset.reshape(3, 1, 1)


def normalize(img: Image.Image, spec: InputSpec, out: np.ndarray | None = None) -> np.ndarray:
    """RGB image of ``spec.size``² → float32 (3, size, size), normalised.

    out: a float32 C-contiguous (3, size, size) array to write into (for example one row of a
    preallocated batch); None allocates one. The uint8 pixels are read once through a
    channels-first view and written once, scaled and shifted in place: no float HWC
    temporaries and no transposing copy."""
    s = spec.size
    if out is None:
        out = np.empty((3, s, s), dtype=np.float32)
    elif out.shape != (3, s, s) or out.dtype != np.float32:
        raise ValueError(f"out must be float32 (3, {s}, {s}), got {out.dtype} {out.shape}")
    pixels = np.asarray(img)
    if pixels.shape != (s, s, 3):
        raise ValueError(f"expected an RGB image of {s}x{s}, got an array of shape {pixels.shape}")
    scale, offset = _affine(spec)
    np.multiply(pixels.transpose(2, 0, 1), scale, out=out)
    out += offset
    return out


def preprocess(img: Image.Image, spec: InputSpec, out: np.ndarray | None = None) -> np.ndarray:
    """Decoded RGB image (any size) → float32 (3, size, size) model input (into ``out`` if given)."""
    return normalize(resize_and_crop(img, spec), spec, out)
