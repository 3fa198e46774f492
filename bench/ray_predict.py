"""Batch prediction: Ray Data (N actors, one Predictor each) vs the in-process batched
Predictor (``lensforge predict --engine local``), on the same images in one run.

Both engines run :func:`lensforge.predict_many` on the same bundle (EfficientNet-Lite0, random
init: the speed is the architecture's) and the same real images (scikit-learn's digit scans,
upscaled), writing Parquet. Ray is a private local instance started before the timing (its
start-up is reported apart); the Ray time includes starting the actors and loading a
Predictor in each, as a user's job does. The rows of the two engines are checked equal.

    python bench/ray_predict.py [--size 224] [--images 1797] [--actors N] [--smoke]

Ray's cost is measured at two points with the same actors: a job of one batch per actor (its
fixed cost: starting the actors, loading a Predictor in each) and the whole job; the
difference gives Ray's steady per-image rate. Ray's overhead per image is each actor's time per
image in that steady state minus a single 1-thread Predictor's (what each actor runs) without Ray.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import ray
import torch
from _digits import write_digits

from lensforge.batch import predict_many
from lensforge.export.onnx import export_onnx
from lensforge.hardware import cpu_count, describe
from lensforge.models import Classifier, ScoresModel, create_backbone
from lensforge.runtime import InputSpec
from lensforge.runtime.bundle import MODEL_FILE, write_meta


def make_bundle(dest: Path, size: int, classes: int = 10) -> Path:
    backbone, _ = create_backbone("efficientnet_lite0", pretrained=False)
    model = ScoresModel(Classifier(backbone, classes), multilabel=False).eval()
    dest.mkdir(parents=True)
    export_onnx(model, torch.zeros(1, 3, size, size), dest / MODEL_FILE)
    write_meta(dest, {"task": "classify", "classes": [str(i) for i in range(classes)],
                      "input": InputSpec.for_size(size).to_dict()})
    return dest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=224, help="model input size (images are written at size + 32)")
    ap.add_argument("--images", type=int, default=1797, help="images (at most 1797 digit scans)")
    ap.add_argument("--actors", type=int, help="Ray actors (default: one per core)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--smoke", action="store_true", help="smallest sizes, seconds: checks the script still runs and prints its table")
    args = ap.parse_args()
    if args.smoke:
        args.size, args.images = 64, 100
    cores = cpu_count()
    actors = args.actors or cores
    logging.getLogger("ray").setLevel(logging.WARNING)

    tmp = Path(tempfile.mkdtemp(prefix="lfbench", dir="/tmp"))  # short: Ray's unix sockets live below it
    try:
        bundle = make_bundle(tmp / "bundle", args.size)
        write_digits(tmp / "imgs", size=args.size + 32, per_class=-(-args.images // 10))
        images = sorted(str(p) for p in (tmp / "imgs").rglob("*.png"))[: args.images]
        (tmp / "images.txt").write_text("\n".join(images) + "\n")

        local = predict_many(bundle, tmp / "images.txt", engine="local", output=tmp / "local.parquet",
                             threads=cores, batch_size=args.batch_size)
        # one Predictor at one thread: what each Ray actor runs, without Ray around it
        single = predict_many(bundle, tmp / "images.txt", engine="local", threads=1, batch_size=args.batch_size)
        few = args.batch_size * actors  # one batch per actor: the job's fixed cost (actors start, load the model)
        (tmp / "few.txt").write_text("\n".join(images[:few]) + "\n")
        t0 = time.perf_counter()
        ray.init(num_cpus=cores, include_dashboard=False, logging_level=logging.WARNING, _temp_dir=str(tmp / "ray"))
        ray_start = time.perf_counter() - t0
        try:
            opts = {"engine": "ray", "actors": actors, "threads": max(1, cores // actors), "batch_size": args.batch_size}
            small = predict_many(bundle, tmp / "few.txt", output=tmp / "few.parquet", **opts)
            distributed = predict_many(bundle, tmp / "images.txt", output=tmp / "ray.parquet", **opts)
        finally:
            ray.shutdown()

        a = {r["path"]: r for r in pq.read_table(tmp / "local.parquet").to_pylist()}
        b = {r["path"]: r for r in pq.read_table(tmp / "ray.parquet").to_pylist()}
        if a.keys() != b.keys() or any(a[k]["labels"] != b[k]["labels"] for k in a):
            raise SystemExit("the engines disagree: Ray's rows differ from the local Predictor's")
        diff = max(float(np.abs(np.float32(a[k]["scores"]) - np.float32(b[k]["scores"])).max()) for k in a)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    n = len(images)
    # two points, same actors: the small job is (nearly) all fixed cost, the rest is the per-image rate
    steady = (n - small.images) / max(distributed.seconds - small.seconds, 1e-9)
    # each actor's time per image in steady state vs the same Predictor (1 thread) without Ray
    overhead_ms = (distributed.actors / steady - 1 / single.images_per_s) * 1000
    print(f"# Batch prediction, Ray Data vs in-process — EfficientNet-Lite0 at {args.size}px, {n} digit images, "
          f"batches of {args.batch_size}")
    print(f"# {describe()} | ray {ray.__version__} | private local Ray, started in {ray_start:.1f} s (not timed below)")
    print(f"{'engine':40} {'seconds':>9} {'img/s':>9} {'vs local':>9}")
    rows = [(f"local (1 process x {local.threads} threads)", local.seconds, local.images_per_s),
            ("local (1 process x 1 thread)", single.seconds, single.images_per_s),
            (f"ray ({distributed.actors} actors x {distributed.threads} thread), whole job", distributed.seconds,
             distributed.images_per_s),
            (f"ray, job of {small.images} images (fixed cost)", small.seconds, small.images_per_s),
            ("ray, steady state (job minus fixed cost)", n / steady, steady)]
    for name, seconds, rate in rows:
        print(f"{name:40} {seconds:9.2f} {rate:9.1f} {rate / local.images_per_s:8.2f}x")
    print(f"# Ray overhead per image in steady state: {overhead_ms:+.2f} ms per actor (vs one 1-thread Predictor); fixed cost per job "
          f"{small.seconds:.1f} s; rows equal, max score difference {diff:.1e}")

if __name__ == "__main__":
    main()
