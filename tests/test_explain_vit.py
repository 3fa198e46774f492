"""ViT explanations: the last layer's CLS attention (per head and averaged) and attention
rollout, in torch and from the bundle's explain.onnx on ONNX Runtime alone; checked against
an independent reading of timm's attention weights, and the methods that do not fit a ViT or
a CNN refused in one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lensforge.cli import main
from lensforge.errors import ConfigError, ModelError
from lensforge.explain import TorchExplainer
from lensforge.explain.attention import AttentionGraph, unfused
from lensforge.models import Classifier, create_backbone
from lensforge.runtime import Predictor
from lensforge.runtime.explain import EXPLAIN_FILE
from lensforge.runtime.preprocess import InputSpec

VIT = "vit_tiny_patch16_224"  # 3 heads, 12 blocks; at 64 px a 4x4 patch grid


@pytest.fixture(scope="module")
def vit_bundle(tmp_path_factory: pytest.TempPathFactory, shapes_dir: Path, tiny_train: dict) -> Path:
    """A tiny ViT (random init, 3 steps) trained on the shapes: real weights the export carries."""
    import lensforge

    out = tmp_path_factory.mktemp("vit-run") / "run"
    return Path(lensforge.train(data=str(shapes_dir), out=str(out), backbone=VIT, pretrained=False,
                                **tiny_train).bundle_dir)


@pytest.fixture(scope="module")
def images(shapes_dir: Path) -> list[Path]:
    return sorted(shapes_dir.glob("*/*.jpg"))[::9]


def test_bundle_carries_the_attention_graph(vit_bundle: Path) -> None:
    meta = json.loads((vit_bundle / "lensforge.json").read_text())["explain"]
    assert (vit_bundle / EXPLAIN_FILE).is_file()
    assert meta["method"] == "attention" and meta["methods"] == ["attention", "rollout"]
    assert meta["outputs"] == ["attention", "rollout", "scores"] and meta["parity"]["max_abs_diff_maps"] < 1e-3


@pytest.mark.parametrize("method", ["attention", "rollout"])
def test_onnx_maps_equal_torch(vit_bundle: Path, images: list[Path], method: str) -> None:
    predictor, torch_side = Predictor(vit_bundle), TorchExplainer.from_bundle(vit_bundle)
    worst = 0.0
    for path in images:
        onnx_maps = predictor.explain_labels(path, labels=list(predictor.classes), method=method, heads=True)
        torch_maps = torch_side.explain(path, labels=list(predictor.classes), method=method, heads=True)
        assert len(onnx_maps) == len(torch_maps) == len(predictor.classes) * (4 if method == "attention" else 1)
        for a, b in zip(onnx_maps, torch_maps):
            assert (a.label, a.method, a.head) == (b.label, b.method, b.head) and abs(a.score - b.score) < 1e-5
            assert a.map.shape == (Image.open(path).height, Image.open(path).width) and a.map.max() > 0.5
            worst = max(worst, float(np.abs(a.map - b.map).max()))
    print(f"ONNX vs torch {method}, {len(images)} images: max abs diff {worst:.2e}")
    assert worst < 1e-4


def test_attention_and_rollout_match_timms_own_weights() -> None:
    """The graph's maps against the weights read another way: hooks on each block's attn_drop
    (timm's AttentionExtract, hook method) with rollout written out in numpy."""
    from timm.utils import AttentionExtract

    backbone, _ = create_backbone(VIT, pretrained=False, image_size=64)
    model = Classifier(backbone, 3).eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        attention, rollout, scores = (t.numpy() for t in AttentionGraph(model, multilabel=False)(x))
        with unfused(backbone):
            hooked = AttentionExtract(backbone, method="hook")  # timm's default: '*attn_drop' outputs
            weights = [a.numpy() for a in hooked(x).values()]
    assert backbone.blocks[0].attn.fused_attn  # restored: predict keeps the fused kernel
    assert len(weights) == 12 and weights[-1].shape == (2, 3, 17, 17)
    np.testing.assert_allclose(attention, weights[-1][:, :, 0, 1:].reshape(2, 3, 4, 4), atol=1e-6)
    joint = np.broadcast_to(np.eye(17), (2, 17, 17))
    for a in weights:
        a = a.mean(1) + np.eye(17)
        joint = (a / a.sum(-1, keepdims=True)) @ joint
    np.testing.assert_allclose(rollout[:, 0], joint[:, 0, 1:].reshape(2, 4, 4), atol=1e-5)
    np.testing.assert_allclose(scores, torch.softmax(model(x), -1).detach().numpy(), atol=1e-6)
    assert not np.allclose(rollout[:, 0] / rollout.max(), attention.mean(1) / attention.mean(1).max(), atol=1e-3)


def test_auto_picks_attention_and_cam_is_refused_on_a_vit(vit_bundle: Path, images: list[Path]) -> None:
    predictor = Predictor(vit_bundle)
    assert predictor.explain(images[0]).method == "attention"
    with pytest.raises(ModelError, match="cam does not fit this model \\(a ViT\\); it explains with: attention, rollout"):
        predictor.explain_labels(images[0], method="cam")
    torch_side = TorchExplainer.from_bundle(vit_bundle)
    assert torch_side.resolve("auto") == "attention"
    for method in ("cam", "gradcam", "gradcam++"):
        with pytest.raises(ModelError, match="it supports: attention, rollout"):
            torch_side.resolve(method)


def test_attention_is_refused_on_a_cnn() -> None:
    backbone, _ = create_backbone("efficientnet_lite0", pretrained=False)
    explainer = TorchExplainer(Classifier(backbone, 3), InputSpec.for_size(64), ["a", "b", "c"])
    for method in ("attention", "rollout"):
        with pytest.raises(ModelError, match="need a timm ViT backbone\\); it supports: cam, gradcam, gradcam\\+\\+"):
            explainer.resolve(method)


def test_bad_label_is_one_error(vit_bundle: Path, images: list[Path]) -> None:
    with pytest.raises(ConfigError, match="label 'nosuch' is not one of this model's 4 classes"):
        Predictor(vit_bundle).explain(images[0], label="nosuch")


def test_cli_draws_the_mean_and_every_head(vit_bundle: Path, images: list[Path], tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["explain", str(vit_bundle), str(images[0]), "--out", str(tmp_path / "a")]) == 0
    row = Image.open(tmp_path / "a" / f"{images[0].stem}.png")
    assert row.size == (4 * 64 + 3 * 4, 64)  # head mean + 3 heads, 4 px apart
    assert main(["explain", str(vit_bundle), str(images[0]), "--method", "rollout", "--out", str(tmp_path / "r")]) == 0
    assert Image.open(tmp_path / "r" / f"{images[0].stem}.png").size == (64, 64)
    assert "(rollout)" in capsys.readouterr().out
    for argv, message in ((["--method", "gradcam"], "gradcam does not fit this model (a ViT has no convolutional "
                                                    "feature map); it supports: attention, rollout"),
                          (["--label", "nosuch"], "label 'nosuch' is not one of this model's 4 classes")):
        assert main(["explain", str(vit_bundle), str(images[0]), *argv, "--out", str(tmp_path / "x")]) == 2
        err = capsys.readouterr().err
        assert message in " ".join(err.split()) and "Traceback" not in err


def test_cli_refuses_attention_on_a_cnn_bundle(shapes_bundle: Path, images: list[Path], tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["explain", str(shapes_bundle), str(images[0]), "--method", "attention", "--out", str(tmp_path)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "attention does not fit this model (a CNN); it explains with: cam" in err and "Traceback" not in err
