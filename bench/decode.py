"""How fast does a 12-MP phone photo become a 224x224 model input?

Compares, in one run on one generated photo:

(a) plain Pillow: ``Image.open(p).convert("RGB")``, then resize + crop;
(b) lensforge: ``decode_image(p, min_size=256)`` (JPEG draft mode: libjpeg decodes at 1/8
    scale), then ``resize_and_crop`` (only the centre crop is resampled, in one pass);
(c) the floor under (b): libjpeg's 1/8-scale decode alone (``draft`` + ``load``, no checks,
    no resize). A sequential JPEG's Huffman-coded coefficients must all be read whatever the
    output scale, so no decoder gets a 12-MP JPEG to 224 px faster than this line.

The resize makes the shorter side 256 (bilinear), then the centre 224x224 is cropped, as an
eval transform does. Prints medians over several repetitions and the speed-ups (issue 16 goal:
(b) >= 5x (a)), the load average, and the mean absolute pixel difference between (a) and (b).

    python bench/decode.py [--repeats 9] [--smoke]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import PIL
from PIL import Image

from lensforge.data.image import decode_image
from lensforge.runtime.preprocess import InputSpec, resize_and_crop

WIDTH, HEIGHT = 4000, 3000  # a 12-MP phone photo
SHORT_SIDE, CROP = 256, 224


def make_photo(path: Path, seed: int = 0) -> None:
    """Smooth colour gradients, a soft texture and sensor-like noise, saved at quality 90."""
    rng = np.random.default_rng(seed)
    x = np.linspace(0.0, 1.0, WIDTH, dtype=np.float32)[None, :]
    y = np.linspace(0.0, 1.0, HEIGHT, dtype=np.float32)[:, None]
    texture = 20 * np.sin(40 * x) * np.cos(25 * y)
    channels = [40 + 170 * x + 0 * y, 30 + 190 * y + 0 * x, 120 + 80 * (x - y)]
    rgb = np.stack([c + texture for c in channels], axis=-1)
    rgb += rng.normal(0.0, 6.0, rgb.shape).astype(np.float32)
    Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8)).save(path, "JPEG", quality=90)


def resize_crop(img: Image.Image) -> Image.Image:
    w, h = img.size
    scale = SHORT_SIDE / min(w, h)
    size = (max(SHORT_SIDE, round(w * scale)), max(SHORT_SIDE, round(h * scale)))
    img = img.resize(size, Image.Resampling.BILINEAR)
    left, top = (size[0] - CROP) // 2, (size[1] - CROP) // 2
    return img.crop((left, top, left + CROP, top + CROP))


def plain_pillow(path: Path) -> Image.Image:
    with Image.open(path) as img:
        return resize_crop(img.convert("RGB"))


SPEC = InputSpec(size=CROP, resize=SHORT_SIDE, interpolation="bilinear")


def lensforge_draft(path: Path) -> Image.Image:
    return resize_and_crop(decode_image(path, min_size=SHORT_SIDE), SPEC)


def libjpeg_floor(path: Path) -> Image.Image:
    with Image.open(path) as img:
        img.draft("RGB", (SHORT_SIDE, SHORT_SIDE))
        img.load()
        return img


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def thread_count() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def time_ms(fn: Callable[[Path], Image.Image], path: Path) -> float:
    start = time.perf_counter()
    fn(path)
    return (time.perf_counter() - start) * 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9, help="timed runs per method")
    parser.add_argument("--smoke", action="store_true", help="smallest sizes, a few seconds: checks the script still runs and prints its table")
    args = parser.parse_args()
    if args.smoke:
        args.repeats = 1

    methods = {
        "(a) Image.open().convert('RGB') + resize": plain_pillow,
        "(b) decode_image(min_size=256) + resize_and_crop": lensforge_draft,
        "(c) floor: libjpeg 1/8 decode alone": libjpeg_floor,
    }
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "photo.jpg"
        make_photo(path)
        size_mb = path.stat().st_size / 1e6
        outputs = {name: fn(path) for name, fn in methods.items()}  # warm-up, and checked below
        times: dict[str, list[float]] = {name: [] for name in methods}
        for _ in range(args.repeats):  # interleaved, so drifts in machine load hit both alike
            for name, fn in methods.items():
                times[name].append(time_ms(fn, path))

    a, b = (np.asarray(outputs[name], dtype=np.int16) for name in list(methods)[:2])
    medians = {name: statistics.median(t) for name, t in times.items()}
    baseline = medians[next(iter(methods))]

    print(f"# lensforge bench/decode.py -- CPU: {cpu_model()}, threads: {thread_count()}")
    print(f"# load average {' '.join(f'{x:.1f}' for x in os.getloadavg())} (shared machine: ratios, not ms, compare)")
    print(f"# Python {platform.python_version()}, Pillow {PIL.__version__}, numpy {np.__version__}")
    print(f"# input: {WIDTH}x{HEIGHT} JPEG q90 ({size_mb:.1f} MB) -> {CROP}x{CROP} "
          f"(short side {SHORT_SIDE}, bilinear, centre crop); {args.repeats} runs, median")
    print(f"{'method':<52}{'median ms':>11}{'min ms':>9}{'speed-up':>10}")
    for name, t in times.items():
        print(f"{name:<52}{medians[name]:>11.1f}{min(t):>9.1f}{baseline / medians[name]:>9.2f}x")
    diff = np.abs(a - b).mean()
    print(f"mean |a - b| over the {CROP}x{CROP}x3 outputs: {diff:.2f} (0-255 scale)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
