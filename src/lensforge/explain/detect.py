"""Per-box maps for detectors: EigenCAM (Muhammad & Yeasin, 2020) on the FPN, through the
``grad-cam`` package as its Faster R-CNN tutorial does, restricted to each detected box.

EigenCAM is gradient-free: the map is the projection of the FPN activations on their first
principal component, so it needs no differentiable score (Faster R-CNN's NMS and box decoding
have none worth following) and is the same whatever the box. "Per box" means the map inside
each box, renormalised to [0, 1] there (what the tutorial's ``renormalize_cam_in_bounding_boxes``
does): where inside the box the features are strongest. Boxes and map come from one forward
pass of the bundle's torch detector on exactly the input the Predictor prepares.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.nn import functional as F  # noqa: N812

from lensforge.errors import ModelError
from lensforge.runtime.bundle import Bundle, as_bundle
from lensforge.runtime.draw import draw_detections
from lensforge.runtime.explain import ALPHA, colorize_image, label_index
from lensforge.runtime.predictor import Predictor
from lensforge.runtime.results import DetectionResult
from lensforge.runtime.runners import DetectorInput

DETECT_METHODS = ("eigencam",)  # what a detector explains with, the default first


@dataclass
class BoxExplanation:
    """Where a detector looked for its boxes.

    result: the detections shown (at or above the threshold, boxes in the image's pixels).
    cam: float32 (H, W) in [0, 1], EigenCAM over the whole image at its resolution.
    image: the RGB image.
    """

    result: DetectionResult
    cam: np.ndarray
    image: Image.Image = field(repr=False)
    method: str = "eigencam"

    def box_map(self, i: int) -> np.ndarray:
        """float32 (H, W): box ``i``'s map, the cam inside the box rescaled to [0, 1] (min → 0,
        max → 1), 0 outside it."""
        out = np.zeros_like(self.cam)
        x1, y1, x2, y2 = _pixel_box(self.result.boxes[i], self.cam.shape)
        inside = self.cam[y1:y2, x1:x2]
        if inside.size:
            lo, hi = float(inside.min()), float(inside.max())
            out[y1:y2, x1:x2] = (inside - lo) / (hi - lo) if hi > lo else 0.0
        return out

    def maps(self) -> np.ndarray:
        """float32 (H, W): every box's map, the largest where boxes overlap."""
        out = np.zeros_like(self.cam)
        for i in range(len(self.result)):
            np.maximum(out, self.box_map(i), out=out)
        return out

    def overlay(self, alpha: float = ALPHA) -> Image.Image:
        """A new RGB image: inside each box its map in the turbo colour map blended with
        ``alpha``, the image untouched outside the boxes, and the boxes with their labels drawn."""
        base = self.image.convert("RGB")
        blended = Image.blend(base, colorize_image(self.maps()), alpha)
        mask = np.zeros(self.cam.shape, np.uint8)
        for box in self.result.boxes:
            x1, y1, x2, y2 = _pixel_box(box, self.cam.shape)
            mask[y1:y2, x1:x2] = 255
        return draw_detections(Image.composite(blended, base, Image.fromarray(mask, "L")), self.result, threshold=0.0)


def _pixel_box(box: np.ndarray, shape: tuple[int, ...]) -> tuple[int, int, int, int]:
    """xyxy float → integer pixel bounds inside an (H, W) map (at least one pixel wide when the box is)."""
    h, w = shape[:2]
    x1, y1 = int(np.clip(math.floor(box[0]), 0, w)), int(np.clip(math.floor(box[1]), 0, h))
    x2, y2 = int(np.clip(math.ceil(box[2]), x1, w)), int(np.clip(math.ceil(box[3]), y1, h))
    return x1, y1, x2, y2


def fpn_reshape(size: tuple[int, int], divisible: int) -> Callable[[dict[str, torch.Tensor]], torch.Tensor]:
    """grad-cam's ``fasterrcnn_reshape_transform``, at the finest FPN level instead of the
    coarsest (a 96-px image has a 2x2 "pool" level) and cropped to the image: torchvision pads
    the batch to a multiple of ``divisible`` at the bottom and right, which the map must not
    stretch over. size: the (height, width) of the model's input."""
    h, w = size
    ph, pw = math.ceil(h / divisible) * divisible, math.ceil(w / divisible) * divisible

    def reshape(levels: dict[str, torch.Tensor]) -> torch.Tensor:
        finest = max(levels.values(), key=lambda t: t.shape[-1] * t.shape[-2])
        fh, fw = finest.shape[-2:]
        stacked = torch.cat([F.interpolate(v.abs(), (fh, fw), mode="bilinear") for v in levels.values()], dim=1)
        return stacked[..., :max(1, round(fh * h / ph)), :max(1, round(fw * w / pw))]

    return reshape


class DetectionExplainer:
    """EigenCAM per box for a detector bundle (torch: the train extra)."""

    def __init__(self, bundle: str | os.PathLike[str] | Bundle, method: str = "auto",
                 labels: Sequence[str | int] | None = None, conf: float | None = None) -> None:
        from lensforge.tasks import get_task

        self.bundle = as_bundle(bundle)
        if self.bundle.task != "detect":
            raise ModelError(f"{self.bundle.path} holds a classifier; per-box maps are for detectors")
        if method != "auto" and method not in DETECT_METHODS:
            raise ModelError(f"{method} does not fit a detector; it supports: {', '.join(DETECT_METHODS)}")
        self.method = DETECT_METHODS[0]
        self.classes = tuple(self.bundle.classes)
        self.class_ids = None if labels is None else {label_index(lab, self.classes) for lab in labels}
        self.conf = conf
        self.predictor = Predictor(self.bundle)  # the decoder and the prepared input, as predict has them
        self.model = get_task("detect").torch_model(self.bundle)  # ExportableDetector: the graph model.onnx holds

    def explain(self, source: Any) -> BoxExplanation:
        """One image (path, bytes, PIL image) → its confident boxes (only those of ``labels`` when
        given) and their maps."""
        from pytorch_grad_cam import EigenCAM

        img = self.predictor.load(source)
        item: DetectorInput = self.predictor.runner.prepare(img)
        x = torch.from_numpy(np.ascontiguousarray(item.pixels, np.float32)[None])
        detector = self.model.model
        reshape = fpn_reshape(tuple(x.shape[2:]), int(detector.transform.size_divisible))
        with EigenCAM(model=self.model, target_layers=[detector.backbone], reshape_transform=reshape) as cam, \
                torch.no_grad():
            # EigenCAM uses no target (gradient-free); an empty list only stops grad-cam from
            # taking an argmax over the detector's outputs
            grid = cam(input_tensor=x, targets=[])[0]  # (h, w) in [0, 1] at the model's input size
            outputs = tuple(t.numpy() for t in cam.outputs)
        result = self.predictor.runner.result(outputs, item)
        keep = result.scores >= (result.threshold if self.conf is None else self.conf)
        if self.class_ids is not None:
            keep &= np.isin(result.class_ids, sorted(self.class_ids))
        # boxes in the pixels of the image as decoded (a large JPEG may be decoded at a reduced scale)
        scale = np.array([img.width / result.image_size[0], img.height / result.image_size[1]] * 2, np.float32) \
            if result.image_size else np.ones(4, np.float32)
        result = DetectionResult(result.boxes[keep] * scale, result.scores[keep], result.class_ids[keep], result.classes,
                                 result.threshold, img.size)
        full = np.asarray(Image.fromarray(np.asarray(grid, np.float32), "F").resize(img.size, Image.Resampling.BILINEAR))
        return BoxExplanation(result, np.clip(full, 0, 1).astype(np.float32), img, self.method)
