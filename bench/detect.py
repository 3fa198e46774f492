"""Detector Predictor (ONNX Runtime fp32, and int8) vs torch eager fp32, per image, side by side.

For each detector the same weights run every way on one generated JPEG (640x480, or --photo), end to end
(decode → model → boxes in original pixels): ``Predictor.predict(path)`` against the usual
torch recipe (``Image.open().convert("RGB")`` → ``to_tensor`` → ``model([x])``). The
box head is untrained (random init, no internet for COCO weights here), so both produce
their full 100 detections per image: the post-processing cost is the realistic worst case.
The int8 column is ``lensforge export --to onnx-int8`` of the same bundle (backbone + FPN
quantised, minmax calibration on the photo; accuracy is not measured here: an export on a
trained bundle records held-out mAP50 fp32 vs int8). The three run in turns within each round.

    python bench/detect.py [--detectors lite0_fpn,fasterrcnn_resnet50_fpn] [--photo 2048x1371] [--repeats 5] [--smoke]

Goals (issue #4): ORT >= 1.5x torch; R50-FPN at 800 px <= 1.5 s per image (the seed app: 5-10 s).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from lensforge.export.onnx import export_detector
from lensforge.export.quantize import export_int8
from lensforge.hardware import cpu_count, describe
from lensforge.models.detector import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ExportableDetector,
    create_detector,
)
from lensforge.runtime import DetectSpec, Predictor
from lensforge.runtime.bundle import MODEL_FILE, write_meta

SIZES = {"lite0_fpn": 512, "fasterrcnn_mobilenet_v3_large_fpn": 640, "fasterrcnn_resnet50_fpn": 800,
         "fasterrcnn_resnet50_fpn_v2": 800}


def torch_e2e(model: torch.nn.Module, photo: Path) -> None:
    """The usual torch recipe, end to end: decode, to_tensor, the model."""
    from torchvision.transforms.functional import to_tensor

    with torch.inference_mode():
        model([to_tensor(Image.open(photo).convert("RGB"))])


def side_by_side(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds per call of each function, the functions taking turns within each round."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--detectors", default="lite0_fpn,fasterrcnn_mobilenet_v3_large_fpn,fasterrcnn_resnet50_fpn")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--photo", default="640x480", help="generated photo WIDTHxHEIGHT (the issue's row: 2048x1371)")
    ap.add_argument("--smoke", action="store_true", help="smallest sizes, a few seconds: checks the script still runs and prints its table")
    args = ap.parse_args()
    if args.smoke:
        args.detectors, args.repeats = "lite0_fpn", 1

    threads = cpu_count()
    torch.set_num_threads(threads)
    classes = ["damage", "scratch", "dent"]
    width, height = (int(v) for v in args.photo.lower().split("x"))
    rows = []
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        photos = Path(tmp) / "photos"
        photos.mkdir()
        photo = photos / "photo.jpg"
        rng = np.random.default_rng(0)
        Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(photo, quality=90)
        for name in args.detectors.split(","):
            size = SIZES.get(name, 640)
            torch.manual_seed(0)
            model = create_detector(name, len(classes), pretrained=name == "lite0_fpn", min_size=size,
                                    max_size=round(size * 5 / 3)).eval()
            bundle = Path(tmp) / name
            bundle.mkdir()
            graph = ExportableDetector(model).eval()
            export_detector(graph, torch.rand(1, 3, 480, 640), bundle / MODEL_FILE)
            spec = DetectSpec(min_size=size, max_size=round(size * 5 / 3), mean=IMAGENET_MEAN, std=IMAGENET_STD)
            write_meta(bundle, {"task": "detect", "classes": classes, "input": spec.to_dict()})
            predictor = Predictor(bundle, threads=threads)

            int8 = Predictor(export_int8(bundle, Path(tmp) / f"{name}-int8", calib_dir=photos, method="minmax",
                                         force=True), threads=threads)
            t = side_by_side({"torch": partial(torch_e2e, model, photo), "fp32": partial(predictor.predict, photo),
                              "int8": partial(int8.predict, photo)}, args.repeats)
            n = len(predictor.predict(photo))
            rows.append((f"{name} @ {size}px", t, n))

    print(f"# Detector Predictor (ONNX Runtime fp32 and int8) vs torch eager fp32, end to end from a {width}x{height} "
          "JPEG, per image, side by side")
    print(f"# {describe()} | torch {torch.__version__} | threads {threads} | load average {load_before:.1f} before, "
          f"{os.getloadavg()[0]:.1f} after")
    print(f"{'detector':42} {'torch s/img':>12} {'ORT s/img':>10} {'speed-up':>9} {'int8 s/img':>11} {'int8/fp32':>10} {'boxes':>6}")
    for name, t, n in rows:
        print(f"{name:42} {t['torch']:12.3f} {t['fp32']:10.3f} {t['torch'] / t['fp32']:8.2f}x {t['int8']:11.3f} "
              f"{t['fp32'] / t['int8']:9.2f}x {n:6d}")


if __name__ == "__main__":
    main()
