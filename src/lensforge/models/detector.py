"""Detectors by name: torchvision's Faster R-CNN family, and EfficientNet-Lite0 + FPN offline.

``create_detector(name, num_classes)`` returns a torchvision ``FasterRCNN`` in training
conventions (``model(images, targets)`` → losses; ``model(images)`` → one
``{"boxes", "labels", "scores"}`` dict per image, label 0 being background). Weights, in order
of preference: ``weights=FILE`` (a full detector checkpoint, e.g. torchvision's COCO weights
saved to disk, safetensors or a state dict), the packages on disk (EfficientNet-Lite0's
ImageNet weights for ``lite0_fpn``), or the torchvision hub when there is internet;
``pretrained=False`` gives random init (tests).
"""

from __future__ import annotations

import difflib
import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torchvision.ops import MultiScaleRoIAlign, roi_align
from torchvision.ops.poolers import _setup_scales  # private; export parity tests guard it

from lensforge.errors import ModelError
from lensforge.models.backbones import create_backbone, load_weights_file

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BOX_HEAD_WIDTH = 512  # lite0_fpn's box head (torchvision's R50 heads use 1024)
PROPOSALS_AT_TEST = 300  # region proposals per image at inference (torchvision's default: 1000)


@dataclass(frozen=True)
class DetectorInfo:
    build: Callable[..., nn.Module]  # (num_classes, pretrained, min_size, max_size) -> FasterRCNN
    about: str
    offline: bool  # pretrained weights available without internet


def _torchvision(builder_name: str, weights_enum: str) -> Callable[..., nn.Module]:
    """A builder for one of torchvision's Faster R-CNNs: COCO weights from the hub when
    ``pretrained``, with the box predictor replaced for ``num_classes`` (+ background)."""

    def build(num_classes: int, pretrained: bool, min_size: int | tuple[int, ...], max_size: int) -> nn.Module:
        from torchvision.models import detection
        from torchvision.models.detection.faster_rcnn import FastRCNNPredictor

        builder = getattr(detection, builder_name)
        # CPU serving: 300 proposals per image reach the box head instead of 1000 (the head's
        # cost scales with them; measured below 1.5 s per 800-px image for R50-FPN only so)
        kwargs = {"min_size": min_size, "max_size": max_size, "rpn_post_nms_top_n_test": PROPOSALS_AT_TEST}
        if pretrained:
            weights = getattr(detection, weights_enum).DEFAULT
            try:
                model = builder(weights=weights, **kwargs)
            except Exception as e:  # urllib / hub errors come in many types
                raise ModelError(
                    f"could not download the COCO weights of {builder_name} ({str(e).splitlines()[0][:120] if str(e) else type(e).__name__}); "
                    "without internet use --backbone lite0_fpn (offline ImageNet weights), pass --weights FILE "
                    "(a checkpoint on disk), or --no-pretrained"
                ) from e
        else:
            model = builder(weights=None, weights_backbone=None, num_classes=91, **kwargs)
        in_features = model.roi_heads.box_predictor.cls_score.in_features
        model.roi_heads.box_predictor = FastRCNNPredictor(in_features, num_classes + 1)
        return model

    return build


class _TimmFPN(nn.Module):
    """A timm feature extractor (strides 8, 16, 32) + torchvision's FPN, in the shape
    torchvision's FasterRCNN wants: ``forward(x) -> OrderedDict[str, Tensor]``, ``out_channels``."""

    def __init__(self, body: nn.Module, in_channels: list[int], out_channels: int = 128) -> None:
        from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool

        super().__init__()
        # contiguous NCHW on purpose: channels_last (faster for the classifier) measured 18 % slower
        # for this detector's training step (the FPN and box head outweigh the depthwise convs)
        self.body = body
        self.fpn = FeaturePyramidNetwork(in_channels, out_channels, extra_blocks=LastLevelMaxPool())
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        feats = self.body(x)
        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(feats)))


def _lite0_fpn(num_classes: int, pretrained: bool, min_size: int | tuple[int, ...], max_size: int) -> nn.Module:
    """EfficientNet-Lite0 (ImageNet weights from the package on disk) + a 128-channel FPN +
    Faster R-CNN heads sized for CPUs (fewer proposals than the COCO defaults)."""
    import timm
    from timm.layers import freeze_batch_norm_2d
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
    from torchvision.ops import MultiScaleRoIAlign

    body = timm.create_model("efficientnet_lite0", features_only=True, out_indices=(2, 3, 4), pretrained=False)
    if pretrained:
        full, _ = create_backbone("efficientnet_lite0", pretrained=True)  # the offline loader, shape-checked
        missing = body.load_state_dict(full.state_dict(), strict=False).missing_keys
        if missing:
            raise ModelError(f"EfficientNet-Lite0 weights do not cover the detector body (missing {missing[0]})")
    # Detection batches are a few images: batch statistics would be noise. Frozen BN (as
    # torchvision does for its ResNets) keeps the ImageNet statistics; the stem and first
    # stages stay frozen too (torchvision's trainable_backbone_layers=3 idea).
    body = freeze_batch_norm_2d(body)
    if pretrained:
        for name, p in body.named_parameters():
            if name.startswith(("conv_stem", "bn1", "blocks.0", "blocks.1")):
                p.requires_grad_(False)
    backbone = _TimmFPN(body, body.feature_info.channels())
    # three FPN levels + the max-pooled one: one anchor size per level, three aspect ratios
    anchors = AnchorGenerator(sizes=((32,), (64,), (128,), (256,)), aspect_ratios=((0.5, 1.0, 2.0),) * 4)
    # Sized for CPUs: the box head's two fully connected layers dominate a training step, so
    # they are 512 wide (torchvision: 1024) and see 128 sampled proposals per image (512);
    # 300 proposals at inference instead of 1000.
    head = TwoMLPHead(backbone.out_channels * 7 * 7, BOX_HEAD_WIDTH)
    return FasterRCNN(
        backbone, num_classes=None, rpn_anchor_generator=anchors,
        box_roi_pool=MultiScaleRoIAlign(["0", "1", "2"], output_size=7, sampling_ratio=2),
        box_head=head, box_predictor=FastRCNNPredictor(BOX_HEAD_WIDTH, num_classes + 1),
        min_size=min_size, max_size=max_size, image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD),
        rpn_pre_nms_top_n_test=500, rpn_post_nms_top_n_test=PROPOSALS_AT_TEST,
        rpn_pre_nms_top_n_train=1000, rpn_post_nms_top_n_train=500,
        box_batch_size_per_image=128, box_detections_per_img=100,
    )


DETECTORS: dict[str, DetectorInfo] = {
    "lite0_fpn": DetectorInfo(_lite0_fpn, "EfficientNet-Lite0 + FPN, ImageNet backbone offline, fast on CPU", True),
    "fasterrcnn_resnet50_fpn": DetectorInfo(
        _torchvision("fasterrcnn_resnet50_fpn", "FasterRCNN_ResNet50_FPN_Weights"), "Faster R-CNN R50-FPN v1, COCO weights (hub)", False),
    "fasterrcnn_resnet50_fpn_v2": DetectorInfo(
        _torchvision("fasterrcnn_resnet50_fpn_v2", "FasterRCNN_ResNet50_FPN_V2_Weights"), "Faster R-CNN R50-FPN v2, COCO weights (hub)", False),
    "fasterrcnn_mobilenet_v3_large_fpn": DetectorInfo(
        _torchvision("fasterrcnn_mobilenet_v3_large_fpn", "FasterRCNN_MobileNet_V3_Large_FPN_Weights"),
        "Faster R-CNN MobileNetV3-Large-FPN, COCO weights (hub)", False),
}
ALIASES = {"resnet50_fpn": "fasterrcnn_resnet50_fpn", "resnet50_fpn_v2": "fasterrcnn_resnet50_fpn_v2",
           "mobilenet_v3_fpn": "fasterrcnn_mobilenet_v3_large_fpn", "efficientnet_lite0": "lite0_fpn"}
DEFAULT_DETECTOR = "lite0_fpn"


def resolve_detector(name: str) -> str:
    """A detector name or alias → its canonical name; unknown names list the valid ones."""
    name = ALIASES.get(name, name)
    if name in DETECTORS:
        return name
    close = difflib.get_close_matches(name, [*DETECTORS, *ALIASES], n=3, cutoff=0.5)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise ModelError(f"unknown detector {name!r}.{hint} Detectors: {', '.join(DETECTORS)}")


def create_detector(
    name: str = DEFAULT_DETECTOR,
    num_classes: int = 1,
    *,
    pretrained: bool = True,
    weights: str | Path | None = None,
    min_size: int | tuple[int, ...] = 512,
    max_size: int = 853,
) -> nn.Module:
    """Build a Faster R-CNN for ``num_classes`` object classes (background is added).

    min_size: the shorter image side the model resizes to; a tuple picks one at random per
        training batch (scale jitter) and the last at evaluation. max_size caps the longer side.
    weights: a detector checkpoint on disk (safetensors or a torch state dict, loaded with
        ``weights_only=True``); tensors whose shape differs (the class-specific box head for a
        COCO checkpoint) are left at their initial values and reported.
    """
    if num_classes < 1:
        raise ModelError("a detector needs at least one object class")
    canonical = resolve_detector(name)
    info = DETECTORS[canonical]
    use_hub = pretrained and weights is None
    model = info.build(num_classes, use_hub, min_size, max_size)
    if weights is not None:
        sd = load_weights_file(weights)
        own = model.state_dict()
        fits = {k: v for k, v in sd.items() if k in own and own[k].shape == v.shape}
        if len(fits) < len(own) // 2:
            raise ModelError(
                f"{weights} does not fit {canonical}: only {len(fits)} of {len(own)} tensors match by name and shape; "
                "is it a checkpoint of another architecture?"
            )
        model.load_state_dict(fits, strict=False)
        skipped = [k for k in own if k not in fits and not k.endswith("num_batches_tracked")]
        log.info("loaded %d tensors from %s; %d left as initialised (e.g. %s)", len(fits), weights, len(skipped),
                 skipped[0] if skipped else "-")
    return model


def _keep_size(image: torch.Tensor, target: dict | None = None) -> tuple[torch.Tensor, dict | None]:
    return image, target


class ExportableDetector(nn.Module):
    """The graph a detector bundle holds: one float32 (1, 3, H, W) RGB image in [0, 1],
    already resized to the model's size (:meth:`DetectSpec.target_size`) →
    ``boxes`` float32 (K, 4) xyxy in input pixels, ``scores`` (K,), ``labels`` int64 (K,)
    0-based class ids (torchvision's background label 0 removed).

    The graph normalises but does not resize: torchvision's resize, traced into ONNX with
    dynamic sizes, samples differently from torch for some sizes (boxes off by whole
    objects at e.g. 50x100 px). The Predictor resizes with Pillow instead, exactly.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        transform = self.model.transform
        heads = self.model.roi_heads
        pool = heads.box_roi_pool
        transform.resize = _keep_size  # an instance attribute shadows the method while tracing
        if isinstance(pool, MultiScaleRoIAlign):
            heads.box_roi_pool = _GatheredRoIAlign(pool)
        try:
            out = self.model([images[0]])[0]
        finally:
            del transform.resize
            heads.box_roi_pool = pool
        return out["boxes"], out["scores"], out["labels"] - 1


class _GatheredRoIAlign(nn.Module):
    """torchvision's MultiScaleRoIAlign as the exported graph should compute it: the
    per-level RoIAlign outputs are concatenated and put back in proposal order with one
    Gather, instead of torchvision's traced merge (a zero tensor, one ScatterElements per
    level with a (K, C, 7, 7) int64 index built by Expand).

    Same values, less work: Lite0-FPN at 512x764, 300 proposals, 2 threads (AVX-512 EPYC),
    ORT profile: ScatterElements 6-12 ms + Expand 3.5 ms + ConstantOfShape 1.5 ms of an
    80-120 ms run.
    """

    def __init__(self, pool: MultiScaleRoIAlign) -> None:
        super().__init__()
        self.pool = pool

    def forward(self, x: dict[str, torch.Tensor], boxes: list[torch.Tensor],
                image_shapes: list[tuple[int, int]]) -> torch.Tensor:
        pool = self.pool
        features = [x[k] for k in pool.featmap_names if k in x]
        if len(features) == 1:
            return pool(x, boxes, image_shapes)  # one level: nothing to merge
        if pool.scales is None or pool.map_levels is None:  # what torchvision's first call does
            pool.scales, pool.map_levels = _setup_scales(features, image_shapes, pool.canonical_scale, pool.canonical_level)
        rois = torch.cat([torch.cat([torch.full_like(b[:, :1], i), b], dim=1) for i, b in enumerate(boxes)])
        levels = pool.map_levels(boxes)
        pooled, order = [], []
        for level, (feature, scale) in enumerate(zip(features, pool.scales)):
            idx = torch.where(levels == level)[0]
            pooled.append(roi_align(feature, rois[idx], pool.output_size, spatial_scale=scale,
                                    sampling_ratio=pool.sampling_ratio))
            order.append(idx)
        return torch.cat(pooled)[torch.argsort(torch.cat(order))]
