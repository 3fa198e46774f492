"""Training throughput: lensforge's fine-tuning step vs a plain fp32 PyTorch loop.

Same model (EfficientNet-Lite0 + linear head), same batches, same optimiser, same threads,
measured side by side in one run. "lensforge" is the real path: Lightning ``fit`` with the
memory format and precision lensforge picks for this CPU (bf16 autocast only where bf16 is
native, channels_last). "plain" is the loop people write by hand: NCHW, fp32.
Both include their first steps (warm-up) the same way.

    python bench/train_step.py [--size 160] [--batch 32] [--steps 12] [--smoke]

Goal: >= 1.5x on CPUs with native bf16, never slower elsewhere (issue #3).
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
import warnings
from pathlib import Path

import torch

from lensforge.config import TrainConfig
from lensforge.hardware import cpu_count, describe
from lensforge.models import Classifier, create_backbone
from lensforge.training.finetune import ClassifierModule, choose_precision, fit


def batches(n: int, batch: int, size: int, classes: int) -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n * batch, 3, size, size, generator=g)
    y = torch.randint(0, classes, (n * batch,), generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch)


def plain_loop(data: torch.utils.data.DataLoader, lr: float) -> float:
    torch.manual_seed(0)
    model = Classifier(create_backbone(pretrained=False)[0], 10).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    t = time.perf_counter()
    for x, y in data:
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return time.perf_counter() - t


def lensforge_fit(data: torch.utils.data.DataLoader, lr: float) -> float:
    torch.manual_seed(0)
    model = Classifier(create_backbone(pretrained=False)[0], 10)
    # resolved as a real run is: the task fills what the config leaves to it (weight decay, ...)
    cfg = TrainConfig(data="bench", epochs=1, max_steps=len(data), lr=lr, patience=0).resolve("classify")
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        module = ClassifierModule(model, False, cfg, steps_per_epoch=len(data))
        fit(module, data, None, cfg, Path(tmp), monitor="val_acc", channels_last=True)
        return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=160)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--smoke", action="store_true", help="smallest sizes, a few seconds: checks the script still runs and prints its table")
    args = ap.parse_args()
    if args.smoke:
        args.size, args.batch, args.steps = 64, 4, 2
    torch.set_num_threads(cpu_count())
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    data = batches(args.steps, args.batch, args.size, 10)
    images = args.steps * args.batch
    # alternate to spread machine noise over both
    plain = [plain_loop(data, 1e-3), plain_loop(data, 1e-3)]
    ours = [lensforge_fit(data, 1e-3), lensforge_fit(data, 1e-3)]
    plain_ips, ours_ips = images / min(plain), images / min(ours)
    print(f"# training throughput — efficientnet_lite0 at {args.size}px, batch {args.batch}, {args.steps} steps")
    print(f"# {describe()} | torch {torch.__version__} | lensforge precision: {choose_precision('auto')}, channels_last")
    print(f"{'loop':28} {'img/s':>8}")
    print(f"{'plain fp32 PyTorch':28} {plain_ips:8.1f}")
    print(f"{'lensforge (Lightning)':28} {ours_ips:8.1f}")
    print(f"ratio lensforge / plain: {ours_ips / plain_ips:.2f}x")


if __name__ == "__main__":
    main()
