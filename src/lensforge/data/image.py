"""The one safe image decoder: bytes, path or file object in, 8-bit RGB ``PIL.Image`` out.

Training, ``lensforge predict`` and the HTTP server all decode through :func:`decode_image`,
so every entry point rejects the same bad inputs with the same :class:`ImageError` codes
(``empty``, ``unsupported_format``, ``corrupt``, ``too_large``, ``too_small``,
``unreadable``). This module imports only the standard library, numpy and Pillow: the
serving runtime imports it and must not pull in torch.

Safety policy, in the order :func:`decode_image` applies it:

1. **Format allow-list by content.** The format is what Pillow's magic-byte detection says
   (``Image.open(fp, formats=...)``), never the file extension; a ``.png`` that holds TIFF
   is ``unsupported_format``. Formats outside the list (EPS, PDF, TIFF, ...) never reach
   their decoders.
2. **Size caps from the header, before any pixel is decoded.** ``width * height`` above
   ``max_pixels``, a longer side more than ``max_aspect`` times the shorter one (65535x1:
   a 275-byte PNG that decodes cheaply but makes every resize to a model's input side
   allocate gigabytes) and, optionally, a side above ``max_side`` are ``too_large``. Pillow's own
   decompression-bomb check prints nothing: its warning (at ``Image.MAX_IMAGE_PIXELS``, above
   our default cap) is silenced while the header is read, and its error (at twice that, so
   only reachable when a caller raises ``max_pixels`` that far) becomes ``too_large``. No
   global Pillow setting is changed (``Image.MAX_IMAGE_PIXELS`` and
   ``ImageFile.LOAD_TRUNCATED_IMAGES`` stay as they are).
3. **Full decode inside the guard.** ``load()`` runs here, so a truncated or damaged file is
   ``corrupt`` now, not a crash later in a data loader or request handler.
4. **JPEG draft mode.** Given ``min_size``, a JPEG much larger than needed is decoded by
   libjpeg at 1/2, 1/4 or 1/8 scale (in the DCT domain, much faster), never below
   ``min_size`` on its shorter side.
5. **EXIF orientation** (tag 274, values 2-8) is applied, with the same transposes as
   ``PIL.ImageOps.exif_transpose``. Broken or implausible EXIF counts as orientation 1: bad
   metadata never fails a decode.
6. **Mode conversion to RGB, 8 bits per channel** (see :func:`to_rgb`):

   - ``RGB``: kept.
   - ``1``, ``L``, ``P`` (opaque), ``CMYK``, ``YCbCr``, ``LAB``, ``HSV``, ``RGBX``: Pillow's
     conversion to RGB.
   - Anything with alpha (``RGBA``, ``LA``, ``PA``, ``RGBa``, ``La``, and ``P``/``L``/``RGB``/
     ``1`` with a transparency key or an RGBA palette): composited over **white**,
     ``out = round((c * a + 255 * (255 - a)) / 255)``. Dropping alpha instead would turn
     transparent areas into whatever colour the encoder left there, often black.
   - 16-bit (``I;16``, ``I;16B``, ``I;16L``, ``I;16N``) and ``I`` (treated as 16-bit data,
     as 16-bit PNGs are; values outside 0..65535 are clipped first): ``round(v / 257)``, so
     65535 maps to 255. Clipping to 255 instead would turn almost every pixel white.
   - ``F``: finite values all within [0, 1] are scaled by 255; otherwise values are clipped
     to [0, 255]; NaN and infinities become 0; then rounded.

7. **Animated GIF / WebP / APNG: the first frame only.** Other frames are neither decoded nor
   counted, so a file with 10,000 frames costs what its first frame costs.

The result is a new image with empty ``info``: no metadata (EXIF, ICC, text) travels with
it. Embedded ICC profiles are ignored; pixel values are taken as sRGB.
"""

from __future__ import annotations

import io
import logging
import os
import stat
import struct
import threading
import warnings
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from typing import IO

import numpy as np
from PIL import ExifTags, Image, JpegImagePlugin, UnidentifiedImageError

from lensforge.errors import ImageError

logger = logging.getLogger(__name__)

DEFAULT_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "BMP", "GIF")
"""Pillow format names decoded by default; anything else is ``unsupported_format``."""

# 40 MP covers phones' default output (12 MP, 4000x3000) and most cameras (24-36 MP) while
# bounding one decoded RGB image at ~120 MB, so a handful of concurrent server requests or
# data-loader workers cannot exhaust memory; 48-200 MP sensor modes need a raised cap. It is
# also below Pillow's own bomb limit (~89 MP), so our cap, not Pillow's, decides.
DEFAULT_MAX_PIXELS = 40_000_000

# Longest side / shorter side. The server, the CLI, training and export all use this one
# cap: a 65535x1 image resized so its shorter side is 256 would be 16.7 M pixels wide
# (~13 GB). 100:1 keeps any real photo, panorama or scan strip.
DEFAULT_MAX_ASPECT = 100

# Smallest allowed side. 1x1 images are valid input and decode to a 1x1 RGB image; callers
# that need more (for example a detector with a minimum stride) pass ``min_side``.
MIN_SIDE = 1

ImageSource = str | os.PathLike | bytes | bytearray | memoryview | IO[bytes]
"""A path, the encoded bytes, or a binary file object (read from its start)."""

SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I"})
GRAYSCALE_MODES = frozenset({"1", "L", "LA", "La", "F"}) | SIXTEEN_BIT_MODES

_ORIENTATION_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}

# What Pillow's parsers and decoders raise on malformed data. Caught only around Pillow's
# open/load/metadata calls, where they mean "this file is damaged", never around our code.
_DAMAGED_DATA_ERRORS = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    IndexError,
    KeyError,
    TypeError,
    struct.error,
    zlib.error,
)

# ``warnings.catch_warnings`` swaps process-wide state; the lock keeps our own concurrent
# decodes from restoring each other's filters. It is held only while Pillow parses a header
# or EXIF block, or probe_image counts GIF frames (no pixel decoding), never during load().
_PILLOW_WARNINGS_LOCK = threading.RLock()


@dataclass(frozen=True)
class ImageInfo:
    """What :func:`probe_image` learnt about one file.

    format: Pillow format name ("JPEG", "PNG", "MPO" for multi-picture JPEGs, ...), None when
        the file could not be identified.
    width, height: pixels as stored in the file, before EXIF rotation; 0 when unknown.
    mode: Pillow mode as stored ("RGB", "L", "CMYK", "I;16", "P", ...); "" when unknown.
    exif_orientation: EXIF tag 274, 1..8; 1 when absent or unreadable.
    frames: number of frames (1 for still images); 0 when unknown.
    error_code, error: the :class:`ImageError` code and message decoding would fail with,
        or None when the file is fine (as far as the probe looked).
    """

    format: str | None
    width: int
    height: int
    mode: str
    exif_orientation: int
    frames: int
    error_code: str | None
    error: str | None

    @property
    def ok(self) -> bool:
        return self.error_code is None

    @property
    def is_16bit(self) -> bool:
        """True for the 16-bit grayscale modes (``I;16`` family) and ``I``."""
        return self.mode in SIXTEEN_BIT_MODES

    @property
    def is_grayscale(self) -> bool:
        return self.mode in GRAYSCALE_MODES

    @property
    def oriented_size(self) -> tuple[int, int]:
        """(width, height) after EXIF rotation: swapped for orientations 5-8."""
        if self.exif_orientation in (5, 6, 7, 8):
            return self.height, self.width
        return self.width, self.height


def decode_image(
    source: ImageSource,
    *,
    min_size: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    formats: Sequence[str] = DEFAULT_FORMATS,
    max_side: int | None = None,
    min_side: int = MIN_SIDE,
    max_aspect: int | None = DEFAULT_MAX_ASPECT,
) -> Image.Image:
    """Decode one image safely into a new 8-bit RGB image (mode "RGB", HxWx3 uint8).

    source: a path, the encoded bytes (``bytes``/``bytearray``/``memoryview``) or a binary
        file object, read from its start.
    min_size: the smallest shorter side the caller needs (e.g. 256 before a 224 crop). JPEGs
        at least twice as large are decoded at 1/2, 1/4 or 1/8 scale with the shorter side
        still >= ``min_size``; other formats and smaller images are decoded at full size.
        None decodes everything at full size.
    max_pixels: width * height cap, checked on the header before decoding.
    formats: Pillow format names allowed, matched against the file content.
    max_side: optional cap on either side.
    min_side: smaller sides are ``too_small``.
    max_aspect: cap on longer side / shorter side (rejects 65535x1-style extremes from the
        header); None turns it off.

    The output is EXIF-oriented; its ``info`` holds only ``"original_size"``: (width, height)
    of the full-resolution image as displayed, which differs from ``size`` after a reduced
    JPEG decode. See the module docstring for the
    mode-conversion policy. Raises :class:`ImageError` for anything wrong with the image;
    ``ValueError``/``TypeError`` for invalid arguments.
    """
    allowed = _allowed_formats(formats)
    _check_limits(min_size=min_size, max_pixels=max_pixels, max_side=max_side, min_side=min_side,
                  max_aspect=max_aspect)
    with _open_source(source) as (fp, where):
        img = _open_image(fp, allowed, where)
        try:
            _check_dimensions(img.size, max_pixels, max_side, min_side, max_aspect, where)
            stored = img.size
            if min_size is not None and isinstance(img, JpegImagePlugin.JpegImageFile):
                if min(img.size) >= 2 * min_size:
                    # libjpeg picks the largest 1/2, 1/4, 1/8 scale keeping both sides >= min_size.
                    img.draft("RGB", (min_size, min_size))
            _load(img, where)
            loaded = img.size
            oriented = _apply_orientation(img)
            out = to_rgb(oriented)
            if out is img:
                # A plain Image over the same decoded pixels, detached from the file and its
                # metadata, without copying them: img.close() below drops img's reference
                # only. (copy() cost as much as a third of a 640x480 decode in the server:
                # fresh pages for 0.9 MB on every request.)
                out = img._new(img.im)
        finally:
            if fp is not source:  # Image.close() closes the file too: never the caller's
                img.close()
    turned = oriented.size != loaded  # EXIF orientations 5-8 swap the sides
    # the only metadata kept: the full-resolution size as displayed, so detectors can map
    # boxes found on a draft-decoded (reduced) image back to the original pixels
    out.info = {"original_size": (stored[1], stored[0]) if turned else stored}
    return out


def probe_image(
    path: str | os.PathLike,
    *,
    verify: bool = False,
    formats: Sequence[str] = DEFAULT_FORMATS,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_side: int | None = None,
    min_side: int = MIN_SIDE,
    max_aspect: int | None = DEFAULT_MAX_ASPECT,
) -> ImageInfo:
    """Describe one image file from its header, reporting problems instead of raising them.

    Without ``verify`` only the header (and EXIF block) is read: format, size, mode,
    orientation, frame count, and the errors visible there (unreadable, empty, unsupported
    format, too large/small, a damaged header). With ``verify=True`` the file is also fully
    decoded by :func:`decode_image` with the same limits, so truncation and corruption are
    reported in ``error_code``/``error``. Frames are counted by scanning the file (GIF) or
    read from the header (APNG, WebP); no frame is decoded.
    """
    allowed = _allowed_formats(formats)
    _check_limits(min_size=None, max_pixels=max_pixels, max_side=max_side, min_side=min_side,
                  max_aspect=max_aspect)
    fields: dict = {"format": None, "width": 0, "height": 0, "mode": "",
                    "exif_orientation": 1, "frames": 0}
    try:
        with _open_source(path) as (fp, where):
            img = _open_image(fp, allowed, where)
            try:
                fields.update(format=img.format, width=img.size[0], height=img.size[1],
                              mode=img.mode)
                fields["exif_orientation"] = _exif_orientation(img)
                fields["frames"] = _count_frames(img, where)
                _check_dimensions(img.size, max_pixels, max_side, min_side, max_aspect, where)
            finally:
                img.close()  # the file is ours: probe_image only takes paths
        if verify:
            decode_image(path, formats=allowed, max_pixels=max_pixels, max_side=max_side,
                         min_side=min_side, max_aspect=max_aspect)
    except ImageError as exc:
        return ImageInfo(**fields, error_code=exc.code, error=str(exc))
    return ImageInfo(**fields, error_code=None, error=None)


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert a loaded image of any Pillow mode to 8-bit RGB (policy: module docstring).

    Returns ``image`` itself when it is already opaque RGB, else a new image. Raises
    ``ImageError("unsupported_format")`` for a mode with no defined conversion.
    """
    mode = image.mode
    if mode in SIXTEEN_BIT_MODES:
        return _gray_to_rgb(_scale_16bit(np.asarray(image)))
    if mode == "F":
        return _gray_to_rgb(_scale_float(np.asarray(image, dtype=np.float32)))
    if image.has_transparency_data:
        return _over_white(_to_rgba(image))
    if mode == "RGB":
        return image
    try:
        return image.convert("RGB")
    except ValueError:
        raise ImageError("unsupported_format", f"unsupported image mode {mode}") from None


# --- reading the source ----------------------------------------------------------------


@contextmanager
def _open_source(source: ImageSource) -> Iterator[tuple[IO[bytes], str]]:
    """Yield a seekable binary file and the prefix for error messages ("name: " or "")."""
    if isinstance(source, (str, os.PathLike)):
        with _open_path(source) as fp:
            yield fp, f"{os.fsdecode(source)}: "
        return
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise ImageError("empty", "empty image")
        yield io.BytesIO(source), ""
        return
    if isinstance(source, io.TextIOBase) or not hasattr(source, "read"):
        raise TypeError(
            "image source must be a path, bytes or a binary file object, "
            f"not {type(source).__name__}"
        )
    name = getattr(source, "name", None)
    where = f"{name}: " if isinstance(name, str) else ""
    try:
        fp = _seekable(source)
        size = fp.seek(0, io.SEEK_END)
        fp.seek(0)
    except OSError as exc:
        raise ImageError("unreadable", f"{where}cannot read image: {_reason(exc)}") from None
    if size == 0:
        raise ImageError("empty", f"{where}empty image")
    yield fp, where


@contextmanager
def _open_path(path: str | os.PathLike) -> Iterator[IO[bytes]]:
    name = os.fsdecode(path)
    # O_NONBLOCK: opening a FIFO must not hang; fstat on the open descriptor (not a stat
    # before it) decides "regular file", so the answer cannot change between check and read.
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise ImageError("unreadable", f"cannot read image {name}: {_reason(exc)}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ImageError("unreadable", f"cannot read image {name}: not a regular file")
        if st.st_size == 0:
            raise ImageError("empty", f"{name}: empty image")
        fp = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    with fp:
        yield fp


def _seekable(fp: IO[bytes]) -> IO[bytes]:
    seekable = getattr(fp, "seekable", None)
    if seekable is not None and seekable():
        return fp
    return io.BytesIO(fp.read())  # Pillow needs seek(); pipes and sockets are read whole


def _reason(exc: OSError) -> str:
    return (exc.strerror or type(exc).__name__).lower()


# --- Pillow, guarded -------------------------------------------------------------------


@contextmanager
def _quiet_pillow() -> Iterator[None]:
    """Silence Pillow's warnings (bomb, malformed EXIF/MPO) while it parses headers."""
    with _PILLOW_WARNINGS_LOCK, warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        warnings.filterwarnings("ignore", module=r"PIL\.")
        yield


def _open_image(fp: IO[bytes], allowed: tuple[str, ...], where: str) -> Image.Image:
    """``Image.open`` restricted to ``allowed``, with every failure mapped to ImageError."""
    try:
        with _quiet_pillow():
            return Image.open(fp, formats=list(allowed))
    except UnidentifiedImageError:
        pass  # below, outside the except block, so no exception context is chained
    except (Image.DecompressionBombError, *_DAMAGED_DATA_ERRORS) as exc:
        raise _damaged(exc, where) from None
    found = _sniff_format(fp)
    allowed_list = ", ".join(allowed)
    if found in allowed:  # right magic bytes, but the header did not parse
        raise ImageError("corrupt", f"{where}corrupt or truncated image")
    if found is not None:
        raise ImageError(
            "unsupported_format",
            f"{where}unsupported image format: {found}; allowed: {allowed_list}",
        )
    raise ImageError("unsupported_format", f"{where}not an image; allowed: {allowed_list}")


def _load(img: Image.Image, where: str) -> None:
    try:
        img.load()
    except (Image.DecompressionBombError, *_DAMAGED_DATA_ERRORS) as exc:
        raise _damaged(exc, where) from None


def _damaged(exc: BaseException, where: str) -> ImageError:
    """The ImageError for an exception Pillow raised while reading a file."""
    logger.debug("%sPillow failed: %s: %s", where, type(exc).__name__, exc)
    if isinstance(exc, Image.DecompressionBombError):  # only above 2 * Image.MAX_IMAGE_PIXELS
        limit = 2 * (Image.MAX_IMAGE_PIXELS or 0)
        return ImageError("too_large", f"{where}image too large: over {limit} pixels")
    # Pillow's PNG reader refuses text chunks over MAX_TEXT_CHUNK / MAX_TEXT_MEMORY with a
    # ValueError; that is a size limit (413 in the server), not damage.
    if isinstance(exc, ValueError) and ("MAX_TEXT" in str(exc) or "text chunks" in str(exc)):
        return ImageError("too_large", f"{where}image metadata too large")
    return ImageError("corrupt", f"{where}corrupt or truncated image")


def _sniff_format(fp: IO[bytes]) -> str | None:
    """Name the format by its magic bytes using Pillow's own prefix checks; decode nothing.

    Only used to word the error for a file Image.open refused: the allow-list decision was
    already taken by Image.open itself.
    """
    try:
        fp.seek(0)
        prefix = fp.read(16)  # what Image.open hands the same checks
    except (OSError, ValueError):
        return None
    Image.init()
    for name in Image.ID:
        accept = Image.OPEN[name][1]
        if accept is None:  # plugins without a prefix check claim any input; skip them
            continue
        try:
            result = accept(prefix)
        except (IndexError, struct.error, TypeError, ValueError):
            continue
        if result and not isinstance(result, str):  # a str result is a "maybe" warning
            return name
    return None


@lru_cache(maxsize=32)
def _known_formats(formats: tuple[str, ...]) -> tuple[str, ...]:
    Image.init()
    unknown = [f for f in formats if f not in Image.OPEN]
    if unknown:
        raise ValueError(
            f"unknown image format(s) {', '.join(unknown)}; Pillow can read: "
            + ", ".join(sorted(Image.OPEN))
        )
    return formats


def _allowed_formats(formats: Sequence[str]) -> tuple[str, ...]:
    if isinstance(formats, str) or not all(isinstance(f, str) for f in formats):
        raise TypeError("formats must be a sequence of Pillow format names, e.g. ('JPEG', 'PNG')")
    if not formats:
        raise ValueError("formats must name at least one image format")
    return _known_formats(tuple(f.upper() for f in formats))


def _check_limits(
    *, min_size: int | None, max_pixels: int, max_side: int | None, min_side: int,
    max_aspect: int | None = None,
) -> None:
    for name, value, optional in (
        ("min_size", min_size, True),
        ("max_pixels", max_pixels, False),
        ("max_side", max_side, True),
        ("min_side", min_side, False),
        ("max_aspect", max_aspect, True),
    ):
        if value is None and optional:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def check_aspect(size: tuple[int, int], max_aspect: int | None = DEFAULT_MAX_ASPECT, where: str = "") -> None:
    """Raise ``ImageError("too_large")`` when the longer side of ``size`` is more than
    ``max_aspect`` times the shorter one. For images that arrive already decoded (a PIL
    image or an array given to the Predictor), so resizing them cannot blow up either."""
    width, height = size
    if max_aspect is not None and max(width, height) > max_aspect * min(width, height):
        raise ImageError(
            "too_large",
            f"{where}image too large: {width}x{height} has an aspect ratio over {max_aspect}:1",
        )


def _check_dimensions(
    size: tuple[int, int], max_pixels: int, max_side: int | None, min_side: int,
    max_aspect: int | None, where: str,
) -> None:
    width, height = size
    if width * height > max_pixels:
        raise ImageError(
            "too_large", f"{where}image too large: {width}x{height} > {max_pixels} pixels"
        )
    if max_side is not None and max(width, height) > max_side:
        raise ImageError(
            "too_large", f"{where}image too large: {width}x{height} has a side over {max_side}"
        )
    if min(width, height) < min_side:
        raise ImageError(
            "too_small", f"{where}image too small: {width}x{height} has a side under {min_side}"
        )
    check_aspect(size, max_aspect, where)


def _count_frames(img: Image.Image, where: str) -> int:
    try:
        with _quiet_pillow():
            return int(getattr(img, "n_frames", 1))
    except _DAMAGED_DATA_ERRORS as exc:
        raise _damaged(exc, where) from None


# --- orientation and modes -------------------------------------------------------------


def _exif_orientation(img: Image.Image) -> int:
    """EXIF orientation 1..8; 1 when absent, unreadable or out of range."""
    try:
        with _quiet_pillow():
            value = img.getexif().get(ExifTags.Base.Orientation, 1)
    except Exception as exc:  # noqa: BLE001 - damaged metadata must never fail a decode
        logger.debug("ignoring unreadable EXIF block: %s: %s", type(exc).__name__, exc)
        return 1
    if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 8:
        return value
    return 1


def _apply_orientation(img: Image.Image) -> Image.Image:
    method = _ORIENTATION_TRANSPOSE.get(_exif_orientation(img))
    return img if method is None else img.transpose(method)


def _to_rgba(image: Image.Image) -> Image.Image:
    if image.mode == "La":  # premultiplied; Pillow converts it to RGBA only via LA
        image = image.convert("LA")
    return image.convert("RGBA")


def _over_white(rgba: Image.Image) -> Image.Image:
    """Composite RGBA over opaque white: round((c*a + 255*(255-a)) / 255), exact integers."""
    pixels = np.asarray(rgba)
    alpha = pixels[..., 3].astype(np.uint16)
    white_part = (255 - alpha) * 255 + 127  # +127: round to nearest in the // 255 below
    out = np.empty(pixels.shape[:2] + (3,), dtype=np.uint8)
    for c in range(3):  # one channel at a time keeps the uint16 temporaries small
        out[..., c] = (pixels[..., c].astype(np.uint16) * alpha + white_part) // 255
    return Image.fromarray(out)


def _scale_16bit(values: np.ndarray) -> np.ndarray:
    if values.dtype.kind == "i":  # mode "I" is int32: clip to the 16-bit range first
        values = np.clip(values, 0, 65535)
    wide = values.astype(np.uint32)  # room for the +128 below
    return ((wide + 128) // 257).astype(np.uint8)  # round(v / 257): 65535 -> 255, 32896 -> 128


def _scale_float(values: np.ndarray) -> np.ndarray:
    values = np.where(np.isfinite(values), values, 0.0).astype(np.float32, copy=False)
    if values.size and values.min() >= 0.0 and values.max() <= 1.0:
        values = values * 255.0
    return np.rint(np.clip(values, 0.0, 255.0)).astype(np.uint8)


def _gray_to_rgb(gray: np.ndarray) -> Image.Image:
    return Image.fromarray(np.ascontiguousarray(gray)).convert("RGB")
