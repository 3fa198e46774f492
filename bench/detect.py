"""Detector Predictor (ONNX Runtime fp32) vs torch eager fp32, per image, side by side.

For each detector the same weights run both ways on one generated 640x480 JPEG, end to end
(decode → model → boxes in original pixels): ``Predictor.predict(path)`` against the usual
torch recipe (``Image.open().convert("RGB")`` → ``to_tensor`` → ``model([x])``). The
box head is untrained (random init, no internet for COCO weights here), so both produce
their full 100 detections per image: the post-processing cost is the realistic worst case.

    python bench/detect.py [--detectors lite0_fpn,fasterrcnn_resnet50_fpn] [--repeats 5] [--smoke]

Goals (issue #4): ORT >= 1.5x torch; R50-FPN at 800 px <= 1.5 s per image (the seed app: 5-10 s).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
from _timing import timeit
from PIL import Image

from lensforge.export.onnx import export_detector
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--detectors", default="lite0_fpn,fasterrcnn_mobilenet_v3_large_fpn,fasterrcnn_resnet50_fpn")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--smoke", action="store_true", help="smallest sizes, a few seconds: checks the script still runs and prints its table")
    args = ap.parse_args()
    if args.smoke:
        args.detectors, args.repeats = "lite0_fpn", 1

    threads = cpu_count()
    torch.set_num_threads(threads)
    classes = ["damage", "scratch", "dent"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        photo = Path(tmp) / "photo.jpg"
        rng = np.random.default_rng(0)
        Image.fromarray(rng.integers(0, 255, (480, 640, 3), dtype=np.uint8)).save(photo, quality=90)
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

            from torchvision.transforms.functional import to_tensor

            def torch_e2e() -> None:
                with torch.inference_mode():
                    model([to_tensor(Image.open(photo).convert("RGB"))])

            t_torch = timeit(torch_e2e, args.repeats, warmup=1)
            t_ort = timeit(lambda: predictor.predict(photo), args.repeats, warmup=1)
            n = len(predictor.predict(photo))
            rows.append((f"{name} @ {size}px", t_torch, t_ort, n))

    print("# Detector Predictor (ONNX Runtime fp32) vs torch eager fp32, end to end from a 640x480 JPEG, per image")
    print(f"# {describe()} | torch {torch.__version__} | threads {threads}")
    print(f"{'detector':42} {'torch s/img':>12} {'ORT s/img':>10} {'speed-up':>9} {'boxes':>6}")
    for name, a, b, n in rows:
        print(f"{name:42} {a:12.3f} {b:10.3f} {a / b:8.2f}x {n:6d}")


if __name__ == "__main__":
    main()
