"""scikit-learn's handwritten digits (real scans, 1,797 images of 8x8, 10 classes) written as a
class-folder dataset: the small real dataset the accuracy benches and tests share (not a
benchmark itself: `make bench` skips _files)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def write_digits(root: Path, size: int = 64, per_class: int | None = None) -> Path:
    """``root/<digit>/<index>.png``, each 8x8 scan upscaled to ``size`` px (bilinear) as
    3-channel PNG; ``per_class`` keeps the first N of each digit. Returns ``root``."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = (digits.images * (255.0 / 16.0)).round().clip(0, 255).astype(np.uint8)  # 0..16 ink levels
    seen: dict[int, int] = {}
    for i, (img, label) in enumerate(zip(pixels, digits.target)):
        label = int(label)
        if per_class is not None and seen.get(label, 0) >= per_class:
            continue
        seen[label] = seen.get(label, 0) + 1
        folder = Path(root) / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).resize((size, size), Image.Resampling.BILINEAR).convert("RGB").save(folder / f"{i:04d}.png")
    return Path(root)
