"""The eval transform's fast path stays the transform: real photos (scikit-learn's sample
images, JPEG-encoded up to 12 MP) through decode_image's DCT draft + one-pass crop resize
must match a full-resolution decode + resize-then-crop + normalise reference."""

from __future__ import annotations

import io
from functools import lru_cache

import numpy as np
import pytest
from PIL import Image

from lensforge.data.image import decode_image
from lensforge.runtime.preprocess import InputSpec, crop_geometry, normalize, preprocess, resize_and_crop

_RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}


@lru_cache(maxsize=None)
def photo_jpeg(index: int, width: int) -> bytes:
    """Sample photo ``index`` (china, flower) resized to ``width``, JPEG q90."""
    from sklearn.datasets import load_sample_images

    src = Image.fromarray(load_sample_images().images[index])
    height = round(width * src.height / src.width)
    buf = io.BytesIO()
    src.resize((width, height), Image.Resampling.BICUBIC).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def reference(data: bytes, spec: InputSpec) -> np.ndarray:
    """The textbook path: decode every pixel, resize the shorter side, crop, normalise in float64."""
    img = decode_image(data)  # no min_size: no draft
    (nw, nh), (left, top) = crop_geometry(img.size, spec)
    img = img.resize((nw, nh), _RESAMPLE[spec.interpolation])
    x = np.asarray(img.crop((left, top, left + spec.size, top + spec.size)), dtype=np.float64) / 255
    return ((x - spec.mean) / spec.std).transpose(2, 0, 1)


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
@pytest.mark.parametrize("index,width", [(0, 640), (1, 1600), (0, 2000), (1, 4000)])
def test_fast_path_matches_a_full_decode_on_real_photos(index: int, width: int, interpolation: str) -> None:
    spec = InputSpec(interpolation=interpolation)
    data = photo_jpeg(index, width)
    img = decode_image(data, min_size=spec.resize)  # 1/2 (2000), 1/4 (1600) or 1/8 (4000) DCT scale
    fast = preprocess(img, spec)
    ref = reference(data, spec)
    diff = np.abs(fast - ref)
    # In normalised units (1/255/std ~ 0.0175 per 8-bit level). The DCT-scaled decode is a
    # box filter where the reference resizes all pixels: a few levels here and there, never a
    # shifted image. Before the crop was placed in the original's geometry, the 12-MP case
    # was off by mean 0.11 / max 1.8 (a 0.3-pixel shift at the far edge).
    assert diff.mean() < 0.04, (width, diff.mean())
    assert diff.max() < 0.6, (width, diff.max())
    if width == 640:  # no draft: the same pixels up to one 8-bit level of rounding
        assert diff.max() < 0.02


def test_one_pass_crop_resize_equals_resize_then_crop() -> None:
    img = decode_image(photo_jpeg(0, 640))
    spec = InputSpec()
    (nw, nh), (left, top) = crop_geometry(img.size, spec)
    two_pass = img.resize((nw, nh), Image.Resampling.BILINEAR).crop((left, top, left + 224, top + 224))
    one_pass = resize_and_crop(img, spec)
    assert one_pass.size == (224, 224)
    assert np.abs(np.asarray(one_pass, np.int16) - np.asarray(two_pass, np.int16)).max() <= 1


def test_stale_original_size_does_not_move_the_crop() -> None:
    """A draft-decoded image resized by the caller keeps Pillow's copied ``info``; its
    ``original_size`` no longer describes its pixels and must be ignored."""
    spec = InputSpec()
    img = decode_image(photo_jpeg(1, 4000), min_size=spec.resize).resize((300, 200))
    assert img.info.get("original_size") == (4000, 2669)
    plain = Image.frombytes("RGB", img.size, img.tobytes())  # same pixels, no info
    np.testing.assert_array_equal(preprocess(img, spec), preprocess(plain, spec))


def test_normalize_writes_into_a_batch_row() -> None:
    spec = InputSpec(size=32, resize=36)
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    batch = np.full((2, 3, 32, 32), np.nan, dtype=np.float32)
    out = normalize(Image.fromarray(pixels), spec, out=batch[1])
    assert out is not None and np.shares_memory(out, batch)
    expected = ((pixels / 255.0 - spec.mean) / spec.std).transpose(2, 0, 1)
    np.testing.assert_allclose(batch[1], expected, atol=1e-5)
    assert np.isnan(batch[0]).all()  # the other row is untouched
    fresh = normalize(Image.fromarray(pixels), spec)
    assert fresh.dtype == np.float32 and fresh.flags.c_contiguous
    np.testing.assert_array_equal(fresh, batch[1])


def test_normalize_refuses_a_wrong_out() -> None:
    spec = InputSpec(size=32, resize=36)
    img = Image.new("RGB", (32, 32))
    with pytest.raises(ValueError, match="out must be float32"):
        normalize(img, spec, out=np.empty((3, 32, 32), np.float64))
    with pytest.raises(ValueError, match="expected an RGB image of 32x32"):
        normalize(Image.new("RGB", (30, 32)), spec)
