"""Records → torch tensors, with the one safe decoder and a decode-once image cache."""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence

import torch
from PIL import Image
from torchvision.transforms import v2

from lensforge.data.image import decode_image
from lensforge.data.records import Record
from lensforge.errors import ImageError
from lensforge.runtime.preprocess import InputSpec, preprocess, resize_shorter

log = logging.getLogger(__name__)

CACHE_BUDGET_BYTES = 2 << 30  # decoded images kept in RAM when they fit: decoding is most of an epoch on CPU


def _shrink(img: Image.Image, spec: InputSpec) -> Image.Image:
    """What gets cached: the shorter side brought down to ``spec.resize`` with the very resize
    the Predictor uses (never enlarged here; preprocessing enlarges small images later)."""
    return resize_shorter(img, spec) if min(img.size) > spec.resize else img


def load_images(
    records: Sequence[Record],
    spec: InputSpec,
    progress: Callable[[int], None] | None = None,
    threads: int = 2,
) -> tuple[list[Record], list[Image.Image] | None, list[tuple[Record, str]]]:
    """Decode every record once: drop unreadable images, and keep the decoded (shrunk)
    images in memory when they fit the cache budget.

    Returns (usable records, cached images or None, [(bad record, reason)]).
    """

    def one(r: Record) -> Image.Image | ImageError:
        try:
            return _shrink(decode_image(r.path, min_size=spec.resize), spec)
        except ImageError as e:
            return e

    good: list[Record] = []
    images: list[Image.Image] | None = []
    bad: list[tuple[Record, str]] = []
    used = 0
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for r, out in zip(records, pool.map(one, records)):
            if progress:
                progress(1)
            if isinstance(out, ImageError):
                bad.append((r, str(out)))
                continue
            good.append(r)
            if images is not None:
                used += out.width * out.height * 3
                if used > CACHE_BUDGET_BYTES:
                    log.info("decoded images exceed the cache budget; decoding from disk every epoch")
                    images = None
                else:
                    images.append(out)
    for r, why in bad[:5]:
        log.info("skipping unreadable image %s: %s", r.path, why)
    return good, images, bad


# Area range of the random resized crop (fraction of the image kept). A module constant so a
# bench can compare settings (bench/finetune_defaults.py --crop-scale); measurements in its docstring.
CROP_SCALE: tuple[float, float] = (0.35, 1.0)


def train_transform(spec: InputSpec, scale: tuple[float, float] | None = None) -> Callable[[Image.Image], torch.Tensor]:
    """Random resized crop (area ``scale``, default :data:`CROP_SCALE`) + horizontal flip, then
    the bundle's normalisation."""
    aug = v2.Compose([
        v2.RandomResizedCrop(spec.size, scale=scale or CROP_SCALE, antialias=True,
                             interpolation=v2.InterpolationMode(spec.interpolation)),
        v2.RandomHorizontalFlip(),
        v2.PILToTensor(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean=list(spec.mean), std=list(spec.std)),
    ])
    return aug


def eval_transform(spec: InputSpec) -> Callable[[Image.Image], torch.Tensor]:
    """Exactly the Predictor's preprocessing (numpy), so validation sees serving pixels."""
    return lambda img: torch.from_numpy(preprocess(img, spec))


class RecordDataset(torch.utils.data.Dataset):
    """(image tensor, target) pairs: target is a class index (single-label) or a float 0/1
    vector (multi-label)."""

    def __init__(
        self,
        records: Sequence[Record],
        num_classes: int,
        multilabel: bool,
        transform: Callable[[Image.Image], torch.Tensor],
        spec: InputSpec,
        images: Sequence[Image.Image] | None = None,
    ) -> None:
        self.records = list(records)
        self.num_classes = num_classes
        self.multilabel = multilabel
        self.transform = transform
        self.spec = spec
        self.images = images

    def __len__(self) -> int:
        return len(self.records)

    def target(self, r: Record) -> torch.Tensor:
        if self.multilabel:
            t = torch.zeros(self.num_classes, dtype=torch.float32)
            t[list(r.labels)] = 1.0
            return t
        return torch.tensor(r.labels[0], dtype=torch.long)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        r = self.records[i]
        img = self.images[i] if self.images is not None else _shrink(decode_image(r.path, min_size=self.spec.resize), self.spec)
        return self.transform(img), self.target(r)
