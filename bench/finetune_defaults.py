"""Do lensforge's fine-tuning defaults match a plain hand-written loop on real images?

Same data, same split (lensforge's saved train/test split), same offline EfficientNet-Lite0
weights, same epochs and image size, measured in one run:

(a) ``lensforge.train(data, epochs=E, image_size=S)`` with every other setting at its default;
    test accuracy from the bundle (ONNX Runtime, the Predictor's preprocessing);
(b) the loop people write by hand: ``Resize(S)`` + horizontal flip, Adam lr 1e-4, batch 32,
    cross-entropy, E epochs on the same training images, last epoch's weights, test images
    through ``Resize(S)``.

The data is a class-folder dataset (``--data DIR``); without it, scikit-learn's handwritten
digits (1,797 real 8x8 scans, written upscaled to S px). ``--set key=value`` overrides a
TrainConfig setting of (a), to find which default costs points.

    python bench/finetune_defaults.py [--data DIR | --per-class N] [--epochs 8] [--size 64] [--set lr=1e-4]
    python bench/finetune_defaults.py --smoke      # a few seconds: tiny digits subset, 2 steps

Goal (issue 10): (a) >= (b).

Measured (issue 10), real Fashion-MNIST (the official 28x28 images as PNGs, Sentdex/nnfs_book's
copy; first 100 train + 50 test images per class, upscaled bilinear to 64 px, split folders:
800 train / 200 val / 500 test), 6 epochs at 64 px, seed 0, 2-core AMD EPYC with native bf16,
shared with other work (seconds are not comparable between rows):

    run                                        test acc   seconds
    lensforge defaults (bf16 autocast, crop 0.35-1)  0.754     807
    lensforge --set precision=32                     0.770    1479
    lensforge --crop-scale 0.8,1                     0.756    1489
    plain loop (Resize+flip, Adam 1e-4, fp32)        0.720    1585

One seed each (the shared CPUs allowed no second): on 500 test images one standard error is
about 1.9 points, so fp32 (+1.6) and crop 0.8 (+0.2) are within noise and the defaults stay;
the defaults beat the plain loop by 3.4 points here.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from _digits import write_digits
from PIL import Image
from torchvision.transforms import v2

import lensforge
from lensforge.config import TrainConfig
from lensforge.data.formats import read_dataset
from lensforge.data.split import load_split
from lensforge.hardware import cpu_count, describe
from lensforge.models import Classifier, create_backbone
from lensforge.runtime.bundle import SPLIT_FILE
from lensforge.training import dataset


def plain_loop(root: Path, split_file: Path, size: int, epochs: int, max_steps: int, seed: int) -> tuple[float, float]:
    """(test accuracy, seconds) of the hand-written loop on lensforge's saved split."""
    ds = read_dataset(str(root))
    splits = load_split(split_file, ds)
    torch.manual_seed(seed)
    backbone, cfg = create_backbone("efficientnet_lite0", pretrained=True, image_size=size)
    model = Classifier(backbone, len(ds.classes))
    norm = [v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(cfg["mean"]), list(cfg["std"]))]
    train_tf = v2.Compose([v2.Resize((size, size), antialias=True), v2.RandomHorizontalFlip(), *norm])
    test_tf = v2.Compose([v2.Resize((size, size), antialias=True), *norm])

    def load(records: list[Any]) -> list[tuple[Image.Image, int]]:
        return [(Image.open(r.path).convert("RGB"), r.labels[0]) for r in records]

    train, test = load(splits["train"]), load(splits["test"])
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(seed)
    t, steps = time.perf_counter(), 0
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(train), generator=g).tolist()
        for i in range(0, len(order), 32):
            batch = [train[j] for j in order[i:i + 32]]
            x = torch.stack([train_tf(img) for img, _ in batch])
            y = torch.tensor([label for _, label in batch])
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            steps += 1
            if 0 < max_steps <= steps:
                break
    model.eval()
    correct = 0
    with torch.inference_mode():
        for i in range(0, len(test), 64):
            batch = test[i:i + 64]
            pred = model(torch.stack([test_tf(img) for img, _ in batch])).argmax(1)
            correct += int((pred == torch.tensor([label for _, label in batch])).sum())
    return correct / max(1, len(test)), time.perf_counter() - t


def parse_set(items: list[str]) -> dict[str, Any]:
    """``key=value`` pairs typed as the TrainConfig field says (``lr=1e-4`` a float, ``precision=32`` a string)."""
    types = {f.name: str(f.type) for f in dataclasses.fields(TrainConfig)}
    out: dict[str, Any] = {}
    for item in items:
        key, _, value = item.partition("=")
        kind = types.get(key, "str")
        if kind.startswith("float"):
            out[key] = float(value)
        elif kind.startswith("int"):
            out[key] = int(value)
        elif kind.startswith("bool"):
            out[key] = value.lower() in ("1", "true", "yes", "on")
        else:
            out[key] = value
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, help="class-folder dataset (default: sklearn digits written at --size px)")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--per-class", type=int, help="digits only: the first N images of each digit (default: all 1,797)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="TrainConfig overrides for lensforge")
    ap.add_argument("--crop-scale", help="lensforge's RandomResizedCrop area range, e.g. 0.8,1 (default: training.dataset.CROP_SCALE)")
    ap.add_argument("--out", type=Path, help="keep lensforge's run (bundle, split) here, e.g. to export it afterwards")
    ap.add_argument("--skip-plain", action="store_true", help="only the lensforge run (when comparing settings)")
    ap.add_argument("--smoke", action="store_true", help="tiny digits subset at 32 px, 2 optimiser steps: checks the script runs")
    args = ap.parse_args()
    torch.set_num_threads(cpu_count())
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    max_steps = 2 if args.smoke else -1
    if args.smoke:
        args.epochs, args.size = 1, 32
    overrides = parse_set(args.set)
    if args.crop_scale:
        dataset.CROP_SCALE = tuple(float(v) for v in args.crop_scale.split(","))  # type: ignore[assignment]
    with tempfile.TemporaryDirectory() as tmp:
        root = args.data or write_digits(Path(tmp) / "digits", size=args.size, per_class=6 if args.smoke else args.per_class)
        t = time.perf_counter()
        result = lensforge.train(data=str(root), out=str(args.out or Path(tmp) / "run"), epochs=args.epochs, image_size=args.size,
                                 seed=args.seed, max_steps=max_steps, **overrides)
        ours = (float(result.metrics["test"]["accuracy"]), time.perf_counter() - t)
        plain = None if args.skip_plain else plain_loop(
            root, result.bundle_dir / SPLIT_FILE, args.size, args.epochs, max_steps, args.seed)
        n_train = len(load_split(result.bundle_dir / SPLIT_FILE, read_dataset(str(root)))["train"])
    data = args.data or f"sklearn digits{' (smoke subset)' if args.smoke else ''}"
    print(f"# fine-tuning defaults vs a plain loop — {data}, {n_train} training images, "
          f"{args.epochs} epochs at {args.size}px, efficientnet_lite0 offline weights")
    print(f"# {describe()} | torch {torch.__version__} | crop scale {dataset.CROP_SCALE}"
          + (f" | lensforge overrides: {overrides}" if overrides else ""))
    print(f"{'run':40} {'test acc':>9} {'seconds':>8}")
    print(f"{'lensforge train (defaults)' if not overrides else 'lensforge train (overrides)':40} {ours[0]:9.3f} {ours[1]:8.1f}")
    if plain is not None:
        print(f"{'plain loop (Resize+flip, Adam 1e-4)':40} {plain[0]:9.3f} {plain[1]:8.1f}")


if __name__ == "__main__":
    main()
