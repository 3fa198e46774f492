"""int8 (static QDQ) and fp16 vs ONNX Runtime fp32, same model, measured side by side in one run.

For each backbone (random weights, ``pretrained=False``: speed does not depend on them) a
fp32 bundle is exported, then turned into fp16 and int8 bundles with
``lensforge.export.quantize`` (int8 calibrated on generated images). Model-only images/s at
batch 1 and 8 with :func:`~lensforge.export.quantize.throughput` (the models take turns, so
machine noise hits all alike). Accuracy needs trained weights and real held-out images: the
export measures and records it itself, and `lensforge export BUNDLE --to all` tabulates it.

Calibration: ``--method`` (default minmax: ``auto`` needs held-out images to choose on, and
speed does not depend on the calibration). The load average before and after is printed: on
a shared machine only the ratios, measured side by side, mean something.

    python bench/int8.py [--backbones efficientnet_lite0 resnet50] [--size 224] [--rounds 10] [--method minmax] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from lensforge.export.onnx import export_onnx
from lensforge.export.quantize import export_fp16, export_int8, throughput
from lensforge.hardware import cpu_count, describe
from lensforge.models import Classifier, ScoresModel, create_backbone
from lensforge.runtime import InputSpec, Predictor
from lensforge.runtime.bundle import MODEL_FILE, write_meta


def make_bundle(name: str, size: int, dest: Path) -> None:
    backbone, _ = create_backbone(name, pretrained=False)
    model = ScoresModel(Classifier(backbone, 10), multilabel=False).eval()
    spec = InputSpec.for_size(size)
    dest.mkdir(parents=True)
    export_onnx(model, torch.zeros(1, 3, size, size), dest / MODEL_FILE)
    write_meta(dest, {"task": "classify", "classes": [f"class_{i}" for i in range(10)], "input": spec.to_dict()})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbones", nargs="+", default=["efficientnet_lite0", "resnet50"])
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--calib", type=int, default=32)
    ap.add_argument("--method", default="minmax", choices=("minmax", "entropy", "percentile", "dynamic"))
    ap.add_argument("--smoke", action="store_true", help="smallest sizes, a few seconds: checks the script still runs and prints its table")
    args = ap.parse_args()
    if args.smoke:
        args.backbones, args.size, args.rounds, args.calib = ["efficientnet_lite0"], 64, 1, 4

    rows = []
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp_str:
        tmp = Path(tmp_str)
        rng = np.random.default_rng(0)
        calib = tmp / "calib"
        calib.mkdir()
        for i in range(args.calib):  # smooth random blobs: closer to photos than white noise
            small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
            Image.fromarray(small).resize((args.size + 32, args.size + 32), Image.BICUBIC).save(calib / f"{i}.jpg")
        for name in args.backbones:
            fp32 = tmp / f"{name}-fp32"
            make_bundle(name, args.size, fp32)
            fp16 = export_fp16(fp32, tmp / f"{name}-fp16")
            int8 = export_int8(fp32, tmp / f"{name}-int8", calib_dir=calib, calib=args.calib, force=True,
                               method=args.method)
            preds = {"fp32": Predictor(fp32), "fp16": Predictor(fp16), "int8": Predictor(int8)}
            x = np.stack([preds["fp32"].prepare(p) for p in sorted(calib.glob("*.jpg"))])
            for batch in (1, 8):
                rows.append((name, batch, throughput(preds, x[:batch], rounds=args.rounds)))
            settings = json.loads((int8 / "lensforge.json").read_text())["export"]

    calibration = settings.get("calibrate_method", settings["method"])
    print(f"# int8 ({settings['method']} {calibration}, U8S8 per-channel, reduce_range={settings['reduce_range']}) "
          f"and fp16 vs ORT fp32 at {args.size}px, model only")
    print(f"# {describe()} | onnxruntime threads {cpu_count()} | load average {load_before:.1f} before, "
          f"{os.getloadavg()[0]:.1f} after")
    print(f"{'model':20} {'batch':>5} {'fp32 img/s':>11} {'fp16 img/s':>11} {'int8 img/s':>11} "
          f"{'fp16/fp32':>10} {'int8/fp32':>10}")
    for name, batch, s in rows:
        print(f"{name:20} {batch:5d} {s['fp32']:11.1f} {s['fp16']:11.1f} {s['int8']:11.1f} "
              f"{s['fp16'] / s['fp32']:9.2f}x {s['int8'] / s['fp32']:9.2f}x")


if __name__ == "__main__":
    main()
