"""Shared test fixtures: tiny generated images and datasets."""

from __future__ import annotations

import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def _write_image(
    path: Path,
    size: tuple[int, int] = (16, 12),
    mode: str = "RGB",
    fmt: str | None = None,
    **save_kwargs: object,
) -> Path:
    """Write a small image whose pixels depend on ``path`` (so files differ unless copied).

    size: (width, height). mode: a Pillow mode ("RGB", "L", "CMYK", "I;16", "RGBA", "P").
    fmt: Pillow format name; None guesses it from the suffix.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(zlib.crc32(str(path).encode()))
    w, h = size
    rgb = Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8))
    if mode == "I;16":
        image = Image.fromarray(rng.integers(0, 65536, size=(h, w), dtype=np.uint16))
    elif mode == "P":
        image = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    else:
        image = rgb.convert(mode)
    image.save(path, format=fmt, **save_kwargs)
    return path


@pytest.fixture
def make_image() -> Callable[..., Path]:
    """``make_image(path, size=(16, 12), mode="RGB", fmt=None, **save_kwargs) -> path``."""
    return _write_image
