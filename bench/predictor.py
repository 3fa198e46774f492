"""Predictor (ONNX Runtime fp32) vs torch eager fp32 on the same classifier.

Measured side by side in one run, same weights, same thread count, on one generated JPEG:
- model only: ``session.run`` vs ``model(x)`` under ``torch.inference_mode`` at batch 1 and 16;
- end to end at batch 1: ``Predictor.predict(jpeg_path)`` vs the usual torch recipe
  (``Image.open().convert("RGB")`` + torchvision transforms + ``model(x)``), on a white-noise
  JPEG (the decoder's worst case) and on a real photo (scikit-learn's china.jpg at 640x480).

    python bench/predictor.py [--backbone efficientnet_lite0] [--size 224] [--repeats 30] [--smoke]

Goals: >= 2x at batch 1 (issue #3); end to end from the 640x480 JPEG >= 3x (issue 16).
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from _timing import timeit
from PIL import Image

from lensforge.export.onnx import export_onnx
from lensforge.hardware import cpu_count, describe
from lensforge.models import Classifier, ScoresModel, create_backbone
from lensforge.runtime import InputSpec, Predictor
from lensforge.runtime.bundle import MODEL_FILE, write_meta


def make_bundle(model: torch.nn.Module, spec: InputSpec, classes: list[str], dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    export_onnx(model, torch.zeros(1, 3, spec.size, spec.size), dest / MODEL_FILE)
    write_meta(dest, {"task": "classify", "classes": classes, "input": spec.to_dict()})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--smoke", action="store_true", help="smallest sizes, a few seconds: checks the script still runs and prints its table")
    args = ap.parse_args()
    if args.smoke:
        args.size, args.repeats = 64, 2

    threads = cpu_count()
    torch.set_num_threads(threads)
    backbone, _ = create_backbone(args.backbone, pretrained=False)
    classes = [f"class_{i}" for i in range(10)]
    model = ScoresModel(Classifier(backbone, len(classes)), multilabel=False).eval()
    spec = InputSpec.for_size(args.size)

    with tempfile.TemporaryDirectory() as tmp:
        bundle = Path(tmp) / "bundle"
        make_bundle(model, spec, classes, bundle)
        predictor = Predictor(bundle, threads=threads)
        noise = Path(tmp) / "noise.jpg"
        rng = np.random.default_rng(0)
        Image.fromarray(rng.integers(0, 255, (480, 640, 3), dtype=np.uint8)).save(noise, quality=90)
        real = Path(tmp) / "photo.jpg"  # a real photo (scikit-learn's china.jpg), stretched to 640x480
        from sklearn.datasets import load_sample_image

        Image.fromarray(load_sample_image("china.jpg")).resize((640, 480), Image.Resampling.BICUBIC).save(real, quality=90)

        from torchvision.transforms import v2

        tv = v2.Compose([v2.PILToTensor(), v2.Resize(spec.resize, antialias=True), v2.CenterCrop(spec.size),
                         v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(spec.mean), list(spec.std))])

        rows = []
        for batch in (1, 16):
            x = torch.randn(batch, 3, spec.size, spec.size)
            xn = x.numpy()
            with torch.inference_mode():
                t_torch = timeit(lambda: model(x), max(5, args.repeats // batch))
            t_ort = timeit(lambda: predictor.run(xn), max(5, args.repeats // batch))
            rows.append((f"model only, batch {batch}", batch / t_torch, batch / t_ort))

        def torch_e2e(photo: Path) -> None:
            with torch.inference_mode():
                model(tv(Image.open(photo).convert("RGB"))[None])

        # white noise is the decoder's worst case (275 KB of entropy-coded data, 2.5 ms to decode
        # here); the real photo (106 KB) is what users send
        for what, photo in (("noise", noise), ("real photo", real)):
            rows.append((f"end to end (640x480 {what} JPEG), batch 1", 1 / timeit(lambda p=photo: torch_e2e(p), args.repeats),
                         1 / timeit(lambda p=photo: predictor.predict(p), args.repeats)))

    print(f"# Predictor (ONNX Runtime fp32) vs torch eager fp32 — {args.backbone} at {args.size}px")
    print(f"# {describe()} | torch {torch.__version__} | onnxruntime threads {threads}")
    print(f"# load average {' '.join(f'{x:.1f}' for x in os.getloadavg())} (a shared machine: compare the ratios, measured in one run)")
    print(f"{'case':40} {'torch img/s':>12} {'ORT img/s':>12} {'ratio':>8}")
    for name, a, b in rows:
        print(f"{name:40} {a:12.1f} {b:12.1f} {b / a:7.2f}x")


if __name__ == "__main__":
    main()
