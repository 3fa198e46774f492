"""Tests for lensforge.data.image: the safe decoder every entry point uses.

All images are generated here, in memory or under tmp_path; no fixture files.
"""

from __future__ import annotations

import dataclasses
import io
import os
import struct
import subprocess
import sys
import time
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import ExifTags, Image, ImageFile
from PIL.PngImagePlugin import PngInfo

from lensforge.data.image import (
    DEFAULT_FORMATS,
    DEFAULT_MAX_ASPECT,
    DEFAULT_MAX_PIXELS,
    MIN_SIDE,
    ImageInfo,
    decode_image,
    probe_image,
    to_rgb,
)
from lensforge.errors import ImageError

WHITE = (255, 255, 255)
RED = (255, 0, 0)
BLUE = (0, 0, 255)


# --- builders ----------------------------------------------------------------------------


def encode(img: Image.Image, fmt: str, **params: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **params)
    return buf.getvalue()


def uniform(mode: str, value: object, size: tuple[int, int] = (6, 4)) -> Image.Image:
    return Image.new(mode, size, value)


def palette(index: int, transparency: int | None = None, mode: str = "P") -> Image.Image:
    """A P image of one palette entry: 0 black, 1 (10, 200, 30), 2 red."""
    img = Image.new("P", (6, 4), index)
    img.putpalette([0, 0, 0, 10, 200, 30, 255, 0, 0])
    if transparency is not None:
        img.info["transparency"] = transparency
    return img


def gray16(value: int) -> Image.Image:
    return Image.fromarray(np.full((4, 6), value, dtype=np.uint16))  # mode I;16


def floats(value: float) -> Image.Image:
    return Image.fromarray(np.full((4, 6), value, dtype=np.float32))  # mode F


def png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def blank_png(width: int, height: int) -> bytes:
    """A valid 1-bit all-black PNG, built row by row so huge sizes stay cheap to write."""
    row = bytes(1 + (width + 7) // 8)  # filter byte + packed pixels
    deflate = zlib.compressobj(9)
    idat = b"".join(deflate.compress(row) for _ in range(height)) + deflate.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", idat)
        + png_chunk(b"IEND", b"")
    )


def noise(size: tuple[int, int] = (64, 48), seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def corner_image() -> Image.Image:
    """32x16 blue image with a red 8x8 block in the stored top-left corner."""
    img = Image.new("RGB", (32, 16), BLUE)
    img.paste(RED, (0, 0, 8, 8))
    return img


def with_orientation(img: Image.Image, fmt: str, orientation: object) -> bytes:
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = orientation
    return encode(img, fmt, exif=exif)


def animated(fmt: str, colors: list[tuple[int, int, int]]) -> bytes:
    frames = [Image.new("RGB", (8, 8), c) for c in colors]
    extra = {"lossless": True} if fmt == "WEBP" else {}
    return encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=50, **extra)


def truncated(data: bytes) -> bytes:
    return data[: len(data) // 2]


def flip_byte(data: bytes, offset: int) -> bytes:
    damaged = bytearray(data)
    damaged[offset] ^= 0xFF
    return bytes(damaged)


def pixel(img: Image.Image, xy: tuple[int, int] = (0, 0)) -> tuple[int, ...]:
    return tuple(img.getpixel(xy))


def close_to(actual: tuple[int, ...], expected: tuple[int, ...], tol: int) -> bool:
    return all(abs(a - e) <= tol for a, e in zip(actual, expected))


# --- modes -------------------------------------------------------------------------------

# (id, encoded file, formats, expected RGB pixel, tolerance)
MODE_CASES = [
    ("rgb-png", encode(uniform("RGB", (10, 20, 30)), "PNG"), DEFAULT_FORMATS, (10, 20, 30), 0),
    ("rgb-jpeg", encode(uniform("RGB", (10, 200, 30)), "JPEG"), DEFAULT_FORMATS, (10, 200, 30), 4),
    ("rgb-bmp", encode(uniform("RGB", (1, 2, 3)), "BMP"), DEFAULT_FORMATS, (1, 2, 3), 0),
    ("rgb-webp", encode(uniform("RGB", (9, 8, 7)), "WEBP", lossless=True), DEFAULT_FORMATS,
     (9, 8, 7), 0),
    ("l-png", encode(uniform("L", 100), "PNG"), DEFAULT_FORMATS, (100, 100, 100), 0),
    ("l-jpeg", encode(uniform("L", 100), "JPEG"), DEFAULT_FORMATS, (100, 100, 100), 2),
    ("1-png-white", encode(uniform("1", 1), "PNG"), DEFAULT_FORMATS, WHITE, 0),
    ("1-bmp-black", encode(uniform("1", 0), "BMP"), DEFAULT_FORMATS, (0, 0, 0), 0),
    ("p-png-opaque", encode(palette(1), "PNG"), DEFAULT_FORMATS, (10, 200, 30), 0),
    ("p-gif-opaque", encode(palette(2), "GIF"), DEFAULT_FORMATS, RED, 0),
    ("p-png-transparent", encode(palette(1), "PNG", transparency=1), DEFAULT_FORMATS, WHITE, 0),
    ("p-gif-transparent", encode(palette(1), "GIF", transparency=1), DEFAULT_FORMATS, WHITE, 0),
    ("p-png-other-transparent", encode(palette(1), "PNG", transparency=0), DEFAULT_FORMATS,
     (10, 200, 30), 0),
    # round((c*a + 255*(255-a)) / 255) = round((100*128 + 255*127) / 255) = round(177.2)
    ("la-png", encode(uniform("LA", (100, 128)), "PNG"), DEFAULT_FORMATS, (177, 177, 177), 0),
    ("rgba-png-half", encode(uniform("RGBA", (255, 0, 0, 128)), "PNG"), DEFAULT_FORMATS,
     (255, 127, 127), 0),
    ("rgba-png-clear-black", encode(uniform("RGBA", (0, 0, 0, 0)), "PNG"), DEFAULT_FORMATS,
     WHITE, 0),
    ("rgba-png-opaque", encode(uniform("RGBA", (1, 2, 3, 255)), "PNG"), DEFAULT_FORMATS,
     (1, 2, 3), 0),
    ("rgba-webp-quarter", encode(uniform("RGBA", (0, 0, 255, 64)), "WEBP", lossless=True),
     DEFAULT_FORMATS, (191, 191, 255), 0),
    ("rgb-png-color-key", encode(uniform("RGB", (10, 20, 30)), "PNG", transparency=(10, 20, 30)),
     DEFAULT_FORMATS, WHITE, 0),
    ("l-png-color-key", encode(uniform("L", 7), "PNG", transparency=7), DEFAULT_FORMATS, WHITE, 0),
    ("cmyk-jpeg-white", encode(uniform("CMYK", (0, 0, 0, 0)), "JPEG"), DEFAULT_FORMATS, WHITE, 3),
    ("cmyk-jpeg-red", encode(uniform("CMYK", (0, 255, 255, 0)), "JPEG"), DEFAULT_FORMATS, RED, 6),
    ("cmyk-jpeg-black", encode(uniform("CMYK", (0, 0, 0, 255)), "JPEG"), DEFAULT_FORMATS,
     (0, 0, 0), 3),
    ("i16-png-max", encode(gray16(65535), "PNG"), DEFAULT_FORMATS, (255, 255, 255), 0),
    ("i16-png-mid", encode(gray16(32896), "PNG"), DEFAULT_FORMATS, (128, 128, 128), 0),
    ("i16-png-low", encode(gray16(1000), "PNG"), DEFAULT_FORMATS, (4, 4, 4), 0),  # not clipped
    ("i16-png-zero", encode(gray16(0), "PNG"), DEFAULT_FORMATS, (0, 0, 0), 0),
    ("f-tiff-unit", encode(floats(0.5), "TIFF"), ("TIFF",), (128, 128, 128), 0),
    ("f-tiff-one", encode(floats(1.0), "TIFF"), ("TIFF",), WHITE, 0),
    ("f-tiff-wide", encode(floats(100.4), "TIFF"), ("TIFF",), (100, 100, 100), 0),
    ("f-tiff-over", encode(floats(300.0), "TIFF"), ("TIFF",), WHITE, 0),
    ("f-tiff-negative", encode(floats(-3.0), "TIFF"), ("TIFF",), (0, 0, 0), 0),
]


@pytest.mark.parametrize(
    "data, formats, expected, tol",
    [case[1:] for case in MODE_CASES],
    ids=[case[0] for case in MODE_CASES],
)
def test_modes_decode_to_rgb8(
    data: bytes, formats: tuple[str, ...], expected: tuple[int, int, int], tol: int
) -> None:
    img = decode_image(data, formats=formats)
    assert img.mode == "RGB"
    assert img.size == (6, 4)
    arr = np.asarray(img)
    assert arr.dtype == np.uint8 and arr.shape == (4, 6, 3)
    assert close_to(pixel(img), expected, tol), pixel(img)


def pa_image() -> Image.Image:
    img = Image.new("PA", (2, 2), (2, 128))
    img.putpalette([0, 0, 0, 10, 200, 30, 255, 0, 0])
    return img


# In-memory modes no allowed file format produces, converted by to_rgb directly.
# (id, image, expected RGB pixel, tolerance)
TO_RGB_CASES = [
    ("pa-half", pa_image(), (255, 127, 127), 0),
    ("rgba-half", uniform("RGBA", (255, 0, 0, 128)), (255, 127, 127), 0),
    ("rgbx", uniform("RGBX", (1, 2, 3, 99)), (1, 2, 3), 0),
    ("rgba-premultiplied", uniform("RGBA", (200, 100, 0, 255)).convert("RGBa"), (200, 100, 0), 0),
    ("la-premultiplied-opaque", uniform("LA", (60, 255)).convert("La"), (60, 60, 60), 0),
    ("i-16bit-max", Image.fromarray(np.full((2, 2), 65535, np.int32)), WHITE, 0),
    ("i-16bit-mid", Image.fromarray(np.full((2, 2), 32896, np.int32)), (128, 128, 128), 0),
    ("i-over-16bit", Image.fromarray(np.full((2, 2), 70000, np.int32)), WHITE, 0),
    ("i-negative", Image.fromarray(np.full((2, 2), -5, np.int32)), (0, 0, 0), 0),
    ("i16b", gray16(32896).convert("I").convert("I;16B"), (128, 128, 128), 0),
    ("f-nan", floats(float("nan")), (0, 0, 0), 0),
    ("f-inf-and-unit", Image.fromarray(np.array([[0.5, np.inf]], np.float32)), (128, 128, 128), 0),
    ("ycbcr", uniform("RGB", (200, 50, 10)).convert("YCbCr"), (200, 50, 10), 3),
    ("hsv", uniform("RGB", (200, 50, 10)).convert("HSV"), (200, 50, 10), 5),
    ("lab", uniform("RGB", (200, 50, 10)).convert("LAB"), (200, 50, 10), 3),
    ("cmyk", uniform("CMYK", (0, 0, 0, 0)), WHITE, 0),
]


@pytest.mark.parametrize(
    "img, expected, tol",
    [case[1:] for case in TO_RGB_CASES],
    ids=[case[0] for case in TO_RGB_CASES],
)
def test_to_rgb_policy(img: Image.Image, expected: tuple[int, int, int], tol: int) -> None:
    out = to_rgb(img)
    assert out.mode == "RGB" and out.size == img.size
    assert close_to(pixel(out), expected, tol), pixel(out)


def test_to_rgb_refuses_a_mode_pillow_cannot_convert(monkeypatch) -> None:
    img = uniform("RGBX", (1, 2, 3, 4))

    def cannot_convert(*args: object, **kwargs: object) -> Image.Image:
        raise ValueError("conversion not supported")

    monkeypatch.setattr(img, "convert", cannot_convert)
    with pytest.raises(ImageError) as info:
        to_rgb(img)
    assert info.value.code == "unsupported_format"
    assert str(info.value) == "unsupported image mode RGBX"


def test_to_rgb_keeps_opaque_rgb_as_is() -> None:
    img = uniform("RGB", (1, 2, 3))
    assert to_rgb(img) is img


def test_sixteen_bit_gradient_scales_every_value() -> None:
    values = np.arange(0, 65536, 257, dtype=np.uint16).reshape(16, 16)  # 0, 257, ..., 65535
    out = np.asarray(decode_image(encode(Image.fromarray(values), "PNG")))
    assert out[..., 0].ravel().tolist() == list(range(256))


# --- errors ------------------------------------------------------------------------------

JPEG_BYTES = encode(noise(), "JPEG", quality=90)
PNG_BYTES = encode(noise(), "PNG")



def text_bomb_png() -> bytes:
    """PNG_BYTES with a zTXt chunk that inflates to 3 MiB (over Pillow's MAX_TEXT_CHUNK)."""
    text = zlib.compress(b"a" * (3 << 20), 9)
    chunk = png_chunk(b"zTXt", b"comment\x00\x00" + text)
    return PNG_BYTES[:33] + chunk + PNG_BYTES[33:]  # right after the signature and IHDR


# (id, input bytes, keyword arguments, expected code, expected message fragment)
ERROR_CASES = [
    ("empty", b"", {}, "empty", "empty image"),
    ("text", b"just some text, definitely not pixels\n", {}, "unsupported_format", "not an image"),
    ("html", b"<!DOCTYPE html><html><body>hi</body></html>", {}, "unsupported_format",
     "not an image"),
    ("pdf", b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n", {}, "unsupported_format", "not an image"),
    ("eps", b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n", {}, "unsupported_format",
     "unsupported image format: EPS; allowed: JPEG, PNG, WEBP, BMP, GIF"),
    ("tiff", encode(noise(), "TIFF"), {}, "unsupported_format", "unsupported image format: TIFF"),
    ("png-not-allowed", PNG_BYTES, {"formats": ("JPEG",)}, "unsupported_format",
     "unsupported image format: PNG; allowed: JPEG"),
    ("jpeg-truncated", truncated(JPEG_BYTES), {}, "corrupt", "corrupt or truncated image"),
    ("png-truncated", truncated(PNG_BYTES), {}, "corrupt", "corrupt or truncated image"),
    ("png-header-only", PNG_BYTES[:40], {}, "corrupt", "corrupt or truncated image"),
    ("png-bad-ihdr-crc", flip_byte(PNG_BYTES, 30), {}, "corrupt", "corrupt or truncated image"),
    ("png-bad-idat", flip_byte(PNG_BYTES, len(PNG_BYTES) // 2), {}, "corrupt",
     "corrupt or truncated image"),
    ("jpeg-magic-only", b"\xff\xd8\xff\xe0" + bytes(12), {}, "corrupt",
     "corrupt or truncated image"),
    ("gif-truncated", truncated(encode(noise().quantize(), "GIF")), {}, "corrupt",
     "corrupt or truncated image"),
    ("over-max-pixels", PNG_BYTES, {"max_pixels": 1000}, "too_large",
     "image too large: 64x48 > 1000 pixels"),
    ("over-max-side", blank_png(65535, 1), {"max_side": 16384}, "too_large",
     "image too large: 65535x1 has a side over 16384"),
    ("under-min-side", blank_png(1, 1), {"min_side": 2}, "too_small", "image too small: 1x1"),
    ("png-text-bomb", text_bomb_png(), {}, "too_large", "image metadata too large"),
]



@pytest.mark.parametrize(
    "data, kwargs, code, fragment",
    [case[1:] for case in ERROR_CASES],
    ids=[case[0] for case in ERROR_CASES],
)
def test_bad_bytes_raise_image_error(
    data: bytes, kwargs: dict, code: str, fragment: str
) -> None:
    with pytest.raises(ImageError) as info:
        decode_image(data, **kwargs)
    assert info.value.code == code
    message = str(info.value)
    assert fragment in message
    assert "0x" not in message and "\n" not in message and "<" not in message
    assert info.value.__suppress_context__ or info.value.__context__ is None  # no chained trace


def test_probe_reports_the_same_errors_without_raising(tmp_path) -> None:
    path = tmp_path / "half.jpg"
    path.write_bytes(truncated(JPEG_BYTES))
    assert probe_image(path).ok  # the header is intact
    checked = probe_image(path, verify=True)
    assert (checked.error_code, checked.format, checked.width) == ("corrupt", "JPEG", 64)
    assert checked.error == f"{path}: corrupt or truncated image"


def test_too_large_is_decided_from_the_header_quickly() -> None:
    data = blank_png(10_000, 10_000)  # ~12 KB on disk, 100 MP (over Pillow's warning limit)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any DecompressionBombWarning would fail the test
        start = time.perf_counter()
        with pytest.raises(ImageError) as info:
            decode_image(data)
        elapsed = time.perf_counter() - start
    assert info.value.code == "too_large"
    assert str(info.value) == f"image too large: 10000x10000 > {DEFAULT_MAX_PIXELS} pixels"
    assert elapsed < 0.5  # a full decode would take seconds and ~300 MB


def test_pillow_bomb_error_becomes_too_large() -> None:
    data = blank_png(20_000, 20_000)  # 400 MP: over twice Pillow's limit, so Pillow raises
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ImageError) as info:
            decode_image(data, max_pixels=10**9)
    assert info.value.code == "too_large"
    assert str(info.value).startswith("image too large: over ")


@pytest.mark.parametrize("size", [(65535, 1), (1, 65535), (101, 1)])
def test_extreme_aspect_ratio_is_refused_from_the_header(size: tuple[int, int], tmp_path) -> None:
    # 65535x1 decodes to 190 KB, but a resize to a 256 px shorter side would be 16.7 M px wide
    # (~13 GB): every caller (predict, train, inspect, the server) must refuse it up front
    w, h = size
    data = blank_png(w, h)
    with pytest.raises(ImageError) as info:
        decode_image(data)
    assert info.value.code == "too_large"
    assert str(info.value) == f"image too large: {w}x{h} has an aspect ratio over {DEFAULT_MAX_ASPECT}:1"
    path = tmp_path / "wide.png"
    path.write_bytes(data)
    probed = probe_image(path)  # inspect's header-only look says the same
    assert (probed.error_code, probed.width, probed.height) == ("too_large", w, h)
    assert decode_image(data, max_aspect=None).size == size  # the cap can be lifted


def test_aspect_cap_is_inclusive() -> None:
    assert decode_image(blank_png(100, 1)).size == (100, 1)


def test_preprocess_refuses_an_extreme_image_handed_over_decoded() -> None:
    from lensforge.runtime.preprocess import InputSpec, preprocess

    with pytest.raises(ImageError, match="1x65535 has an aspect ratio over"):
        preprocess(Image.new("RGB", (1, 65535)), InputSpec(size=32, resize=36))
    assert preprocess(Image.new("RGB", (100, 1)), InputSpec(size=32, resize=36)).shape == (3, 32, 32)


def test_one_pixel_image_decodes() -> None:
    assert MIN_SIDE == 1
    img = decode_image(encode(uniform("RGB", (7, 8, 9), (1, 1)), "PNG"))
    assert img.size == (1, 1) and pixel(img) == (7, 8, 9)


def test_decoding_leaves_global_state_alone() -> None:
    filters = list(warnings.filters)
    limit, truncated_ok = Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES
    inputs = [PNG_BYTES, truncated(PNG_BYTES), blank_png(10_000, 10_000), bad_hex_exif_png()]

    def decode_or_code(data: bytes) -> str:
        try:
            return decode_image(data).mode
        except ImageError as exc:
            return exc.code

    with ThreadPoolExecutor(max_workers=4) as pool:  # concurrent decodes, as in the server
        codes = list(pool.map(decode_or_code, inputs * 4))
    assert codes == ["RGB", "corrupt", "too_large", "RGB"] * 4
    assert warnings.filters == filters
    assert (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES) == (limit, truncated_ok)


# --- paths and sources -------------------------------------------------------------------


def test_missing_file_is_unreadable_with_its_name(tmp_path) -> None:
    with pytest.raises(ImageError) as info:
        decode_image(tmp_path / "nope.jpg")
    assert info.value.code == "unreadable"
    assert "nope.jpg" in str(info.value)


def test_directory_is_unreadable(tmp_path) -> None:
    with pytest.raises(ImageError) as info:
        decode_image(str(tmp_path))
    assert info.value.code == "unreadable"
    assert str(info.value) == f"cannot read image {tmp_path}: not a regular file"


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs POSIX FIFOs")
def test_fifo_is_unreadable_and_does_not_block(tmp_path) -> None:
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    with pytest.raises(ImageError) as info:
        decode_image(fifo)
    assert info.value.code == "unreadable"


def test_empty_file_is_empty(tmp_path) -> None:
    path = tmp_path / "zero.png"
    path.write_bytes(b"")
    with pytest.raises(ImageError) as info:
        decode_image(path)
    assert (info.value.code, str(info.value)) == ("empty", f"{path}: empty image")


def test_tiff_named_png_is_judged_by_content(tmp_path) -> None:
    path = tmp_path / "photo.png"
    path.write_bytes(encode(noise(), "TIFF"))
    with pytest.raises(ImageError) as info:
        decode_image(path)
    assert info.value.code == "unsupported_format"
    assert str(info.value) == (
        f"{path}: unsupported image format: TIFF; allowed: JPEG, PNG, WEBP, BMP, GIF"
    )


def test_jpeg_named_png_decodes(tmp_path) -> None:
    path = tmp_path / "photo.png"
    path.write_bytes(JPEG_BYTES)
    assert decode_image(path).size == (64, 48)


class ReadOnlyStream:
    """A pipe-like object: read() only, no seek()."""

    def __init__(self, data: bytes) -> None:
        self._buf = io.BytesIO(data)

    def read(self, size: int = -1) -> bytes:
        return self._buf.read(size)


SOURCE_KINDS = {
    "path": lambda p: p,
    "str": lambda p: str(p),
    "bytes": lambda p: p.read_bytes(),
    "bytearray": lambda p: bytearray(p.read_bytes()),
    "memoryview": lambda p: memoryview(p.read_bytes()),
    "bytesio": lambda p: io.BytesIO(p.read_bytes()),
    "stream": lambda p: ReadOnlyStream(p.read_bytes()),
}


@pytest.mark.parametrize("kind", sorted(SOURCE_KINDS))
def test_every_source_kind_gives_identical_pixels(tmp_path, kind: str) -> None:
    path = tmp_path / "img.jpg"
    path.write_bytes(JPEG_BYTES)
    reference = np.asarray(decode_image(path.read_bytes()))
    assert np.array_equal(np.asarray(decode_image(SOURCE_KINDS[kind](path))), reference)


class FailingFile(io.BytesIO):
    """A file object whose seek() fails the way a dropped network mount does."""

    def seek(self, *args: object) -> int:
        raise OSError(5, "Input/output error")


def test_file_object_that_cannot_be_read_is_unreadable() -> None:
    with pytest.raises(ImageError) as info:
        decode_image(FailingFile(PNG_BYTES))
    assert info.value.code == "unreadable"
    assert str(info.value) == "cannot read image: input/output error"


def test_open_file_object_is_left_open_and_named_in_errors(tmp_path) -> None:
    path = tmp_path / "half.png"
    path.write_bytes(truncated(PNG_BYTES))
    with open(path, "rb") as fp:
        with pytest.raises(ImageError) as info:
            decode_image(fp)
        assert not fp.closed
    assert str(info.value) == f"{path}: corrupt or truncated image"


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"min_size": 0}, ValueError),
        ({"max_pixels": -1}, ValueError),
        ({"max_side": 2.5}, ValueError),
        ({"formats": "JPEG"}, TypeError),
        ({"formats": ()}, ValueError),
        ({"formats": ("JPEG", "NOPE")}, ValueError),
    ],
    ids=["min_size", "max_pixels", "max_side", "formats-str", "formats-empty", "formats-unknown"],
)
def test_invalid_arguments_are_programming_errors(kwargs: dict, error: type) -> None:
    with pytest.raises(error):
        decode_image(PNG_BYTES, **kwargs)


def test_wrong_source_type_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="not int"):
        decode_image(123)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        decode_image(io.StringIO("text"))  # type: ignore[arg-type]


def test_output_is_new_and_carries_no_metadata() -> None:
    data = with_orientation(uniform("RGB", (1, 2, 3)), "JPEG", 1)
    img = decode_image(data)
    assert img.info == {"original_size": img.size} and type(img) is Image.Image  # nothing from the file


def test_rgb_jpeg_output_is_detached_without_a_copy(tmp_path) -> None:
    """An RGB JPEG's decoded pixels are handed over (no copy), yet the file is closed and the
    image owns them: it reads and writes after the decoder is gone, from bytes and paths."""
    y, x = np.mgrid[0:48, 0:64]
    pixels = np.stack([x * 4, y * 5, (x + y) * 2], -1).astype(np.uint8)  # smooth: JPEG keeps it
    path = tmp_path / "p.jpg"
    Image.fromarray(pixels).save(path, quality=95)
    for source in (path, path.read_bytes()):
        img = decode_image(source)
        assert type(img) is Image.Image and img.size == (64, 48)
        before = np.asarray(img).copy()
        assert np.abs(before.astype(int) - pixels).mean() < 4  # the pixels, readable after close
        img.putpixel((0, 0), (1, 2, 3))
        assert img.getpixel((0, 0)) == (1, 2, 3)
        assert np.array_equal(np.asarray(decode_image(source)), before)  # a fresh decode is untouched


@pytest.mark.parametrize("orientation", [1, 6])
def test_original_size_survives_a_reduced_jpeg_decode(orientation: int) -> None:
    """Detectors map boxes back to full-resolution pixels: the decoder must say what they were."""
    big = Image.new("RGB", (1600, 1000), (90, 120, 30))
    buf = io.BytesIO()
    exif = Image.Exif()
    exif[274] = orientation
    big.save(buf, "JPEG", exif=exif.tobytes())
    img = decode_image(buf.getvalue(), min_size=200)
    displayed = (1000, 1600) if orientation == 6 else (1600, 1000)
    assert img.info["original_size"] == displayed
    assert max(img.size) <= 800 and (img.size[0] > img.size[1]) == (displayed[0] > displayed[1])


# --- EXIF orientation --------------------------------------------------------------------

CORNERS = {"tl": (2, 2), "tr": (-3, 2), "bl": (2, -3), "br": (-3, -3)}

# (orientation, stored-size -> output-size swapped?, corner where the stored top-left ends up)
ORIENTATION_CASES = [
    (1, False, "tl"),
    (2, False, "tr"),  # mirrored
    (3, False, "br"),  # rotated 180
    (4, False, "bl"),  # flipped
    (5, True, "tl"),  # transposed
    (6, True, "tr"),  # rotated 90 clockwise (a phone held upright)
    (7, True, "br"),  # transversed
    (8, True, "bl"),  # rotated 90 counter-clockwise
]


@pytest.mark.parametrize("fmt, tol", [("PNG", 0), ("JPEG", 40)])
@pytest.mark.parametrize("orientation, swapped, corner", ORIENTATION_CASES)
def test_exif_orientation_is_applied(
    fmt: str, tol: int, orientation: int, swapped: bool, corner: str
) -> None:
    img = decode_image(with_orientation(corner_image(), fmt, orientation))
    assert img.size == ((16, 32) if swapped else (32, 16))
    w, h = img.size
    for name, (x, y) in CORNERS.items():
        expected = RED if name == corner else BLUE
        actual = pixel(img, (x % w, y % h))
        assert close_to(actual, expected, tol), (name, actual)


def broken_exif_jpeg(exif_payload: bytes) -> bytes:
    return encode(corner_image(), "JPEG", exif=exif_payload)


def raw_exif(field_type: int, count: int, value: bytes) -> bytes:
    """An EXIF block (big-endian TIFF) holding one Orientation entry, written by hand."""
    entry = struct.pack(">HHI", ExifTags.Base.Orientation, field_type, count)
    entry += value.ljust(4, b"\0")
    return b"Exif\x00\x00MM\x00\x2a" + struct.pack(">IH", 8, 1) + entry + struct.pack(">I", 0)


def bad_hex_exif_png() -> bytes:
    """A PNG whose "Raw profile type exif" text is not hex: Pillow's getexif() raises."""
    info = PngInfo()
    info.add_text("Raw profile type exif", "\nexif\n   4\nzzzz\n")
    return encode(corner_image(), "PNG", pnginfo=info)


def test_hand_written_exif_helper_is_valid() -> None:
    img = decode_image(broken_exif_jpeg(raw_exif(3, 1, struct.pack(">H", 6))))  # SHORT 6
    assert img.size == (16, 32)


@pytest.mark.parametrize(
    "data",
    [
        with_orientation(corner_image(), "JPEG", 9),  # out of range
        with_orientation(corner_image(), "PNG", 0),
        broken_exif_jpeg(raw_exif(2, 2, b"6\0")),  # ASCII "6" instead of SHORT 6
        broken_exif_jpeg(raw_exif(3, 5000, b"\0\0\xff\xff")),  # count runs past the block
        broken_exif_jpeg(b"Exif\x00\x00MM\x00\x2a\x00\x00\x00\x08\xff\xff\x01\x12"),
        broken_exif_jpeg(b"Exif\x00\x00II*\x00\xff\xff\xff\x7f"),  # IFD offset past the end
        broken_exif_jpeg(b"Exif\x00\x00garbage"),
        bad_hex_exif_png(),
    ],
    ids=["value-9", "value-0", "value-str", "count-past-end", "ifd-truncated",
         "ifd-offset-past-end", "garbage", "png-raw-profile-not-hex"],
)
def test_broken_exif_decodes_unrotated(data: bytes) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Pillow's "corrupt EXIF" warnings must not leak either
        img = decode_image(data)
    assert img.size == (32, 16)
    assert close_to(pixel(img, (2, 2)), RED, 40)


# --- JPEG draft mode ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def photo_12mp() -> bytes:
    """4000x3000 JPEG: smooth gradients plus mild noise, like a phone photo."""
    x = np.linspace(0, 240, 4000, dtype=np.float32)[None, :]
    y = np.linspace(0, 240, 3000, dtype=np.float32)[:, None]
    rgb = np.stack(np.broadcast_arrays(x + 0 * y, y + 0 * x, (x + y) / 2), axis=-1)
    rgb = rgb.astype(np.int16) + np.random.default_rng(0).integers(0, 12, rgb.shape, np.int16)
    return encode(Image.fromarray(rgb.astype(np.uint8)), "JPEG", quality=90)  # max 240+11


def test_draft_mode_decodes_a_12mp_jpeg_small_but_not_too_small(photo_12mp: bytes) -> None:
    small = decode_image(photo_12mp, min_size=224)
    assert 224 <= min(small.size) < 3000
    assert small.size == (500, 375)  # 1/8 scale: the largest that keeps the short side >= 224
    full = decode_image(photo_12mp).resize(small.size, Image.Resampling.BOX)
    diff = np.abs(np.asarray(small, np.int16) - np.asarray(full, np.int16))
    assert diff.mean() < 3


@pytest.mark.parametrize(
    "size, min_size, expected",
    [
        ((640, 440), 224, (640, 440)),  # 440 < 2*224: half would be too small
        ((640, 480), 224, (320, 240)),  # 480 >= 2*224: half scale, 240 >= 224
        ((960, 480), 240, (480, 240)),  # exactly half still fits 240
        ((100, 80), 224, (100, 80)),  # smaller than needed: never upscaled
    ],
)
def test_draft_scale_keeps_the_short_side(size, min_size, expected) -> None:
    data = encode(noise(size), "JPEG")
    assert decode_image(data, min_size=min_size).size == expected


def test_min_size_does_not_change_other_formats() -> None:
    assert decode_image(encode(noise((960, 480)), "PNG"), min_size=100).size == (960, 480)


def test_draft_applies_orientation_after_scaling() -> None:
    data = with_orientation(noise((960, 480)), "JPEG", 6)
    assert decode_image(data, min_size=100).size == (120, 240)


# --- animation ---------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["GIF", "WEBP"])
def test_animation_returns_the_first_frame(fmt: str) -> None:
    img = decode_image(animated(fmt, [RED, (0, 255, 0), BLUE]))
    assert pixel(img) == RED


# --- probe -------------------------------------------------------------------------------

# (id, file name, bytes, expected (format, width, height, mode, orientation, frames, code),
#  is_16bit)
PROBE_CASES = [
    ("rgb-jpeg", "a.jpg", JPEG_BYTES, ("JPEG", 64, 48, "RGB", 1, 1, None), False),
    ("gray-png", "g.png", encode(uniform("L", 3), "PNG"), ("PNG", 6, 4, "L", 1, 1, None), False),
    ("cmyk-jpeg", "c.jpg", encode(uniform("CMYK", (0, 0, 0, 0)), "JPEG"),
     ("JPEG", 6, 4, "CMYK", 1, 1, None), False),
    ("16bit-png", "d.png", encode(gray16(9), "PNG"), ("PNG", 6, 4, "I;16", 1, 1, None), True),
    ("rotated-jpeg", "r.jpg", with_orientation(corner_image(), "JPEG", 6),
     ("JPEG", 32, 16, "RGB", 6, 1, None), False),
    ("tiny-png", "t.png", encode(uniform("RGB", 0, (1, 1)), "PNG"),
     ("PNG", 1, 1, "RGB", 1, 1, None), False),
    ("animated-gif", "m.gif", animated("GIF", [RED, BLUE, RED]), ("GIF", 8, 8, "P", 1, 3, None),
     False),
    ("truncated-png", "h.png", truncated(PNG_BYTES), ("PNG", 64, 48, "RGB", 1, 1, None), False),
    ("huge-png", "x.png", blank_png(10_000, 10_000), ("PNG", 10_000, 10_000, "1", 1, 1,
                                                      "too_large"), False),
    ("tiff", "t.tif", encode(noise(), "TIFF"), (None, 0, 0, "", 1, 0, "unsupported_format"),
     False),
    ("empty", "e.png", b"", (None, 0, 0, "", 1, 0, "empty"), False),
]


@pytest.mark.parametrize(
    "name, data, expected, is_16bit",
    [case[1:] for case in PROBE_CASES],
    ids=[case[0] for case in PROBE_CASES],
)
def test_probe_reads_the_header(tmp_path, name, data, expected, is_16bit) -> None:
    path = tmp_path / name
    path.write_bytes(data)
    info = probe_image(path)
    assert (info.format, info.width, info.height, info.mode, info.exif_orientation, info.frames,
            info.error_code) == expected
    assert info.is_16bit is is_16bit
    assert info.ok is (expected[-1] is None)
    assert (info.error is None) is info.ok


def test_probe_verify_finds_what_the_header_hides(tmp_path) -> None:
    path = tmp_path / "h.png"
    path.write_bytes(truncated(PNG_BYTES))
    info = probe_image(path, verify=True)
    assert (info.format, info.width, info.error_code) == ("PNG", 64, "corrupt")
    assert probe_image(path).ok


def test_probe_missing_file(tmp_path) -> None:
    info = probe_image(tmp_path / "gone.png", verify=True)
    assert info.error_code == "unreadable" and "gone.png" in info.error


def test_image_info_helpers() -> None:
    info = ImageInfo("JPEG", 40, 30, "L", 6, 1, None, None)
    assert info.oriented_size == (30, 40) and info.is_grayscale and not info.is_16bit
    with pytest.raises(dataclasses.FrozenInstanceError):
        info.width = 1  # type: ignore[misc]


def test_module_does_not_import_torch() -> None:
    code = "import sys, lensforge.data.image; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0
