"""Training throughput: lensforge's fine-tuning step vs a plain fp32 PyTorch loop.

Same model (EfficientNet-Lite0 + linear head), same batches, same optimiser, same threads,
measured side by side in one run, the variants interleaved over ``--repeats`` rounds (the
median step counts; a shared machine is noisy). Rows:

- plain fp32 PyTorch: the loop people write by hand, NCHW, fp32 (the baseline, 1.00x)
- lensforge fp32: Lightning ``fit``, channels_last, fp32 (what every CPU gets by default)
- lensforge bf16: Lightning ``fit``, channels_last, bf16 autocast with the depthwise convolutions
  in fp32 (``--precision bf16``, opt-in:
  faster on CPUs with AMX / AVX512-BF16 but lower held-out accuracy in our seeds; not run where
  bf16 is emulated, ~10x slower there)
- + compile: the row lensforge picks for this CPU with ``--compile`` (torch.compile, inductor)

"step" is the median steady-state step (after the first), "ratio" the plain loop's step over
it; "cpu ratio" the same on this process's CPU seconds per step, steadier than wall time where
other work competes for the cores (the load average in the header says so); "first" is the first step (for the
compile row: compiling, from an empty inductor cache as on a user's first run); "total" is the
whole ``fit`` call (Trainer set-up, every step, the final checkpoint). "break-even" is the
number of steps after which compiling has paid for itself.

    python bench/train_step.py [--size 224] [--batch 32] [--steps 8] [--repeats 2] [--smoke]

Goal (issue 16): >= 1.5x on CPUs with native bf16, never slower elsewhere.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lensforge.config import TrainConfig
from lensforge.hardware import cpu_count, describe, has_native_bf16, load_average
from lensforge.models import Classifier, create_backbone
from lensforge.training.finetune import ClassifierModule, choose_precision, fit


def batches(n: int, batch: int, size: int, classes: int) -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n * batch, 3, size, size, generator=g)
    y = torch.randint(0, classes, (n * batch,), generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch)


class Timing:
    """Step times and the whole call of one run."""

    def __init__(self) -> None:
        self.steps: list[float] = []
        self.cpu: list[float] = []  # this process's CPU seconds per step: steadier than wall on a shared machine
        self.total = 0.0


def plain_loop(data: torch.utils.data.DataLoader, lr: float) -> Timing:
    torch.manual_seed(0)
    out = Timing()
    t0 = time.perf_counter()
    model = Classifier(create_backbone(pretrained=False)[0], 10).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    for x, y in data:
        t, c = time.perf_counter(), time.process_time()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        out.steps.append(time.perf_counter() - t)
        out.cpu.append(time.process_time() - c)
    out.total = time.perf_counter() - t0
    return out


class TimedModule(ClassifierModule):
    """The real training module, timing each step from batch start to batch end (forward,
    backward, optimiser step and Lightning's per-batch work)."""

    timing: Timing

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._t, self._c = time.perf_counter(), time.process_time()

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.timing.steps.append(time.perf_counter() - self._t)
        self.timing.cpu.append(time.process_time() - self._c)


def lensforge_fit(data: torch.utils.data.DataLoader, lr: float, precision: str, compile: bool) -> Timing:
    torch.manual_seed(0)
    out = Timing()
    t0 = time.perf_counter()
    model = Classifier(create_backbone(pretrained=False)[0], 10)
    # resolved as a real run is: the task fills what the config leaves to it (weight decay, ...)
    cfg = TrainConfig(data="bench", epochs=1, max_steps=len(data), lr=lr, patience=0, precision=precision,
                      compile=compile).resolve("classify")
    with tempfile.TemporaryDirectory() as tmp:
        module = TimedModule(model, False, cfg, steps_per_epoch=len(data))
        module.timing = out
        fit(module, data, None, cfg, Path(tmp), monitor="val_acc", channels_last=True)
    out.total = time.perf_counter() - t0
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=224, help="image side (the classifier default)")
    ap.add_argument("--batch", type=int, default=32, help="the classifier default")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2, help="interleaved rounds of every row")
    ap.add_argument("--no-compile", dest="compile", action="store_false", help="leave out the compile row")
    ap.add_argument("--smoke", action="store_true",
                    help="smallest sizes, one round, no compile row: checks the script still runs and prints its table")
    args = ap.parse_args()
    if args.smoke:
        args.size, args.batch, args.steps, args.repeats, args.compile = 64, 4, 2, 1, False
    torch.set_num_threads(cpu_count())
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    data = batches(args.steps, args.batch, args.size, 10)
    chosen = "bf16" if choose_precision("auto") == "bf16-mixed" else "32"
    rows: dict[str, Callable[[], Timing]] = {"plain fp32 PyTorch": lambda: plain_loop(data, 1e-3),
                                             "lensforge fp32": lambda: lensforge_fit(data, 1e-3, "32", False)}
    if has_native_bf16():
        rows["lensforge bf16"] = lambda: lensforge_fit(data, 1e-3, "bf16", False)
    if args.compile:
        rows[f"lensforge {'bf16' if chosen == 'bf16' else 'fp32'} + compile"] = lambda: lensforge_fit(data, 1e-3, chosen, True)
    load_before = load_average()
    with tempfile.TemporaryDirectory() as cache:
        # an empty inductor cache: the compile row's first step is what a user's first run pays
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", cache)
        results: dict[str, list[Timing]] = {name: [] for name in rows}
        for _ in range(args.repeats):  # interleaved: machine noise spreads over every row
            for name, run in rows.items():
                results[name].append(run())
    load_after = load_average()
    print(f"# training throughput — efficientnet_lite0 at {args.size}px, batch {args.batch}, {args.steps} steps, "
          f"{args.repeats} interleaved round(s), median step")
    print(f"# {describe()} | torch {torch.__version__} | load average {load_before or 0:.1f} → {load_after or 0:.1f} "
          f"| lensforge picks precision {chosen}, channels_last")

    def step(name: str, what: str = "steps") -> float:
        return statistics.median(s for t in results[name] for s in (getattr(t, what)[1:] or getattr(t, what)))

    base, base_cpu = step("plain fp32 PyTorch"), step("plain fp32 PyTorch", "cpu")
    print(f"{'loop':28} {'img/s':>8} {'ratio':>7} {'step s':>8} {'cpu ratio':>9} {'first s':>8} {'total s':>8} "
          f"{'break-even':>10}")
    for name in rows:
        s = step(name)
        first = max(t.steps[0] for t in results[name])
        total = statistics.median(t.total for t in results[name])
        even = ""
        if "compile" in name:
            eager = name.replace(" + compile", "")
            eager = eager if eager in rows else "lensforge fp32"
            saved, extra = step(eager) - s, first - max(t.steps[0] for t in results[eager])
            even = f"{extra / saved:.0f} steps" if saved > 0 else "never"
        print(f"{name:28} {args.batch / s:8.1f} {base / s:6.2f}x {s:8.3f} {base_cpu / step(name, 'cpu'):8.2f}x "
              f"{first:8.2f} {total:8.2f} {even:>10}")


if __name__ == "__main__":
    main()
