"""Linear probe on 2,000 images end to end: decode → frozen-backbone features → logistic
regression, in seconds, with the share of each stage.

    python bench/probe.py [--images 2000] [--size 224] [--smoke]

The images are the generated demo shapes (4 classes); the backbone is EfficientNet-Lite0
with its offline ImageNet weights. Reports train accuracy of the probe as a sanity check.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from lensforge.data.demo import make_demo_dataset
from lensforge.data.formats import read_dataset
from lensforge.hardware import cpu_count, describe
from lensforge.models import create_backbone
from lensforge.runtime import InputSpec
from lensforge.data.records import targets
from lensforge.training.dataset import RecordDataset, eval_transform, load_images
from lensforge.training.probe import extract_features, fit_probe


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--smoke", action="store_true", help="smallest sizes, a few seconds: checks the script still runs and prints its table")
    args = ap.parse_args()
    if args.smoke:
        args.images, args.size = 40, 64
    torch.set_num_threads(cpu_count())
    with tempfile.TemporaryDirectory() as tmp:
        root = make_demo_dataset(Path(tmp) / "data", n_per_class=args.images // 4, size=256)
        ds = read_dataset(root)
        spec = InputSpec.for_size(args.size)
        timings = {}
        t = time.perf_counter()
        records, images, _ = load_images(ds.records, spec)
        timings["decode"] = time.perf_counter() - t
        t = time.perf_counter()
        backbone, _ = create_backbone()
        data = RecordDataset(records, len(ds.classes), False, eval_transform(spec), spec, images)
        feats = extract_features(backbone, torch.utils.data.DataLoader(data, batch_size=64))
        timings["features"] = time.perf_counter() - t
        t = time.perf_counter()
        y = targets(records, len(ds.classes), False)
        w, b = fit_probe(feats, y, len(ds.classes), False, c=1.0, seed=0)
        timings["logistic regression"] = time.perf_counter() - t
        acc = float(((feats @ w.T + b).argmax(1) == y).mean())
    total = sum(timings.values())
    print(f"# linear probe, {len(records)} images at {args.size}px, efficientnet_lite0 features ({feats.shape[1]})")
    print(f"# {describe()} | torch {torch.__version__}")
    print(f"{'stage':24} {'seconds':>8} {'share':>7}")
    for k, v in timings.items():
        print(f"{k:24} {v:8.1f} {v / total:7.0%}")
    print(f"{'total':24} {total:8.1f}   ({len(records) / total:.0f} img/s; train accuracy {acc:.3f})")


if __name__ == "__main__":
    main()
