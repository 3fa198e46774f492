"""Per-box maps for detectors: EigenCAM (Muhammad & Yeasin, 2020) on the FPN, through the
``grad-cam`` package as its Faster R-CNN tutorial does, restricted to each detected box.

EigenCAM is gradient-free: the map is the projection of the FPN activations on their first
principal component, so it needs no differentiable score (Faster R-CNN's NMS and box decoding
have none worth following). The whole-image map (``cam``) is grad-cam's.

Per box, the map is the whole-image map inside the box, renormalised to [0, 1] there (the
tutorial's ``renormalize_cam_in_bounding_boxes``): where inside the box the features are
strongest. Where that map is flat inside a box (it varies by less than :data:`FLAT`), the box
gets its own component instead (:func:`local_eigencam`: the FPN cells under the box projected
on *their* first principal component). On a busy scene the image's component can belong to
something else entirely: on the real chess test photos (29 photos, 382 boxes at least 4 px a
side) the board's component left 34 boxes with no heat at all. With the fallback none is
flat, and 328 boxes are hotter in their central half than at their border (313 before; the
box's own component everywhere: only 232, so it is the fallback, not the rule). Boxes and
maps come from one forward pass of the bundle's torch detector on exactly the input the
Predictor prepares.
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
FLAT = 0.01  # the whole-image map (in [0, 1]) varying less than this inside a box tells nothing there


@dataclass
class BoxExplanation:
    """Where a detector looked for its boxes.

    result: the detections shown (at or above the threshold, boxes in the image's pixels).
    cam: float32 (H, W) in [0, 1], EigenCAM over the whole image at its resolution.
    image: the RGB image.
    local: per box where ``cam`` is flat inside it (:func:`_flat`), float32 in [0, 1] over the
        box's pixels (:func:`_pixel_box`): the box's own EigenCAM (:func:`local_eigencam`);
        None for the other boxes (their map is ``cam``'s).
    """

    result: DetectionResult
    cam: np.ndarray
    image: Image.Image = field(repr=False)
    local: list[np.ndarray | None] = field(repr=False)
    method: str = "eigencam"

    def box_map(self, i: int) -> np.ndarray:
        """float32 (H, W): box ``i``'s map, 0 outside the box. Inside: ``cam`` rescaled to
        [0, 1] there (min → 0, max → 1), or the box's own map where ``cam`` is flat (:func:`_flat`)."""
        out = np.zeros_like(self.cam)
        x1, y1, x2, y2 = _pixel_box(self.result.boxes[i], self.cam.shape)
        inside = self.cam[y1:y2, x1:x2]
        if inside.size:
            lo, hi = float(inside.min()), float(inside.max())
            out[y1:y2, x1:x2] = self.local[i] if _flat(inside) else (inside - lo) / (hi - lo)
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


def _flat(inside: np.ndarray) -> bool:
    """Whether the whole-image map tells nothing inside a box: it varies by less than :data:`FLAT` there."""
    return float(inside.max()) - float(inside.min()) < FLAT


def local_eigencam(activations: np.ndarray, cells: tuple[int, int, int, int]) -> np.ndarray:
    """EigenCAM of one region: ``activations`` float (C, h, w), ``cells`` (x0, y0, x1, y1) →
    float32 (y1 - y0, x1 - x0) in [0, 1].

    The region's activation vectors, centred, projected on their first principal component.
    A component's sign is arbitrary; the one kept makes the map grow with the activation
    strength (the channel sum), so the heat sits where the features fire, not where they are
    quiet. A region whose features do not vary is flat 0."""
    x0, y0, x1, y1 = cells
    region = np.asarray(activations[:, y0:y1, x0:x1], np.float64)
    vectors = region.reshape(region.shape[0], -1).T  # (cells, C)
    centred = vectors - vectors.mean(axis=0)
    if not np.abs(centred).max(initial=0) > 0:
        return np.zeros((y1 - y0, x1 - x0), np.float32)
    component = np.linalg.svd(centred, full_matrices=False)[2][0]
    projection = centred @ component
    if np.dot(projection, vectors.sum(axis=1) - vectors.sum(axis=1).mean()) < 0:
        projection = -projection
    lo, hi = projection.min(), projection.max()
    out = (projection - lo) / (hi - lo) if hi > lo else np.zeros_like(projection)
    return out.reshape(y1 - y0, x1 - x0).astype(np.float32)


def box_cells(box: np.ndarray, image_size: tuple[int, int], grid: tuple[int, int], least: int = 3
              ) -> tuple[int, int, int, int]:
    """The feature cells (x0, y0, x1, y1) under ``box`` (xyxy in the pixels of an image of
    ``image_size`` (w, h)) on a ``grid`` (h, w) covering that image; at least ``least`` cells
    a side (grown around the box's centre, inside the grid), so that a box a cell wide still
    has a component to find."""
    (w, h), (gh, gw) = image_size, grid

    def span(a: float, b: float, side: int, n: int) -> tuple[int, int]:
        lo, hi = int(np.clip(math.floor(a / side * n), 0, n)), int(np.clip(math.ceil(b / side * n), 0, n))
        want = min(max(least, hi - lo), n)
        lo = int(np.clip(round((lo + hi - want) / 2), 0, n - want))
        return lo, lo + want

    x0, x1 = span(float(box[0]), float(box[2]), w, gw)
    y0, y1 = span(float(box[1]), float(box[3]), h, gh)
    return x0, y0, x1, y1


def _box_map(activations: np.ndarray, box: np.ndarray, image_size: tuple[int, int]) -> np.ndarray:
    """float32 over the box's pixels (:func:`_pixel_box`), in [0, 1]: the box's
    :func:`local_eigencam`, bilinear between cell centres, renormalised over the box."""
    gh, gw = activations.shape[1:]
    x0, y0, x1, y1 = box_cells(box, image_size, (gh, gw))
    grid = local_eigencam(activations, (x0, y0, x1, y1))
    px1, py1, px2, py2 = _pixel_box(box, (image_size[1], image_size[0]))
    # each pixel centre in cell units relative to the region (cell centres at 0, 1, ...)
    ys = (np.arange(py1, py2) + 0.5) * gh / image_size[1] - 0.5 - y0
    xs = (np.arange(px1, px2) + 0.5) * gw / image_size[0] - 0.5 - x0
    out = _bilinear(grid, ys, xs)
    if out.size:
        lo, hi = float(out.min()), float(out.max())
        out = (out - lo) / (hi - lo) if hi > lo else np.zeros_like(out)
    return out.astype(np.float32)


def _bilinear(grid: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """``grid`` sampled at rows ``ys`` x columns ``xs`` (fractional, clamped to the edges)."""
    h, w = grid.shape
    ys, xs = np.clip(ys, 0, h - 1), np.clip(xs, 0, w - 1)
    y0, x0 = np.floor(ys).astype(int), np.floor(xs).astype(int)
    y1, x1 = np.minimum(y0 + 1, h - 1), np.minimum(x0 + 1, w - 1)
    wy, wx = (ys - y0)[:, None], (xs - x0)[None, :]
    top = grid[y0][:, x0] * (1 - wx) + grid[y0][:, x1] * wx
    bottom = grid[y1][:, x0] * (1 - wx) + grid[y1][:, x1] * wx
    return top * (1 - wy) + bottom * wy


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
            # the FPN cells the map was made of (after fpn_reshape: (C, h, w), covering the image)
            activations = cam.activations_and_grads.activations[0][0].numpy()
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
        cam = np.clip(full, 0, 1).astype(np.float32)
        local: list[np.ndarray | None] = []
        for box in result.boxes:  # only where it is shown: a box as large as the image takes seconds
            x1, y1, x2, y2 = _pixel_box(box, cam.shape)
            inside = cam[y1:y2, x1:x2]
            local.append(_box_map(activations, box, img.size) if inside.size and _flat(inside) else None)
        return BoxExplanation(result, cam, img, local, self.method)
