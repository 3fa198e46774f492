"""Explanations: the exact CAM (torch and ONNX agree), Grad-CAM / Grad-CAM++ through grad-cam,
the map geometry, old bundles, the CLI, and two checks that maps mean something."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from lensforge.cli import main
from lensforge.errors import BundleError, ConfigError, ModelError
from lensforge.explain import CamGraph, TorchExplainer
from lensforge.models import Classifier, create_backbone
from lensforge.runtime import Predictor
from lensforge.runtime.explain import EXPLAIN_FILE, Explanation, normalise, to_image
from lensforge.runtime.preprocess import InputSpec


@pytest.fixture(scope="module")
def images(shapes_dir: Path) -> list[Path]:
    return sorted(shapes_dir.glob("*/*.jpg"))[::7]


def test_bundle_writer_adds_the_explain_graph(shapes_bundle: Path) -> None:
    meta = json.loads((shapes_bundle / "lensforge.json").read_text())
    assert (shapes_bundle / EXPLAIN_FILE).is_file()
    assert meta["explain"]["method"] == "cam" and meta["explain"]["parity"]["max_abs_diff_maps"] < 1e-3


def test_onnx_cam_equals_torch_cam(shapes_bundle: Path, images: list[Path]) -> None:
    predictor, torch_side = Predictor(shapes_bundle), TorchExplainer.from_bundle(shapes_bundle)
    worst = 0.0
    for path in images:
        onnx_maps = predictor.explain_labels(path, labels=list(predictor.classes))
        torch_maps = torch_side.explain(path, labels=list(predictor.classes), method="cam")
        for a, b in zip(onnx_maps, torch_maps):
            assert a.map.shape == (Image.open(path).height, Image.open(path).width) and a.map.dtype == np.float32
            assert a.label == b.label and abs(a.score - b.score) < 1e-5
            worst = max(worst, float(np.abs(a.map - b.map).max()))
    print(f"ONNX vs torch CAM, {len(images)} images x {len(predictor.classes)} classes: max abs diff {worst:.2e}")
    assert worst < 1e-4


def test_cam_explains_the_logit_exactly(shapes_bundle: Path) -> None:
    """The spatial mean of a class's map plus its (centred) bias is its (centred) logit."""
    model = TorchExplainer.from_bundle(shapes_bundle).classifier
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        cams, _ = CamGraph(model, multilabel=False)(x)
        logits = model(x)
    bias = model.final_linear().bias
    got = cams.mean((2, 3)) + (bias - bias.mean())
    torch.testing.assert_close(got, logits - logits.mean(1, keepdim=True), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method", ["gradcam", "gradcam++"])
def test_gradcam_methods(shapes_bundle: Path, images: list[Path], method: str) -> None:
    e = TorchExplainer.from_bundle(shapes_bundle).explain(images[0], k=2, method=method)
    assert [x.method for x in e] == [method, method] and e[0].score >= e[1].score
    assert e[0].map.shape == (64, 64) and 0 <= e[0].map.min() and e[0].map.max() <= 1 and e[0].map.max() > 0


def test_method_that_does_not_fit_names_those_that_do() -> None:
    backbone, _ = create_backbone("efficientnet_lite0", pretrained=False)
    explainer = TorchExplainer(Classifier(backbone, 3, head="mlp"), InputSpec.for_size(64), ["a", "b", "c"])
    with pytest.raises(ModelError, match="supports: gradcam, gradcam\\+\\+"):
        explainer.resolve("cam")
    assert explainer.resolve("auto") == "gradcam"


def test_map_geometry_follows_the_centre_crop() -> None:
    """A hot cell at the top-right of the grid lands top-right in the image; what the centre
    crop cut off is 0; the map is at the image's own size."""
    spec = InputSpec(size=64, resize=64)  # no margin: the crop of a 200x100 image is its middle 100x100
    grid = np.zeros((4, 4), np.float32)
    grid[0, 3] = 1
    m = to_image(grid, spec, (200, 100))
    assert m.shape == (100, 200)
    y, x = np.unravel_index(int(m.argmax()), m.shape)
    assert 125 <= x < 150 and y < 25
    assert m[:, :50].max() == 0 and m[:, 150:].max() == 0
    assert normalise(np.full((2, 2), -1.0)).max() == 0  # no positive evidence: all zeros, not NaN


def test_overlay_is_the_image_size() -> None:
    img = Image.new("RGB", (120, 80), (90, 90, 90))
    e = Explanation(np.linspace(0, 1, 120 * 80, dtype=np.float32).reshape(80, 120), "cat", 0.9, "cam", img)
    out = e.overlay()
    assert out.size == (120, 80) and out.mode == "RGB" and out.getpixel((60, 40)) != (90, 90, 90)
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        Explanation(np.full((2, 2), 2, np.float32), "cat", 0.9, "cam")


def test_bad_label_is_a_config_error(shapes_bundle: Path, images: list[Path]) -> None:
    with pytest.raises(ConfigError, match="not one of this model's 4 classes"):
        Predictor(shapes_bundle).explain(images[0], label="giraffe")


def test_old_bundle_says_how_to_add_the_graph(shapes_bundle: Path, images: list[Path], tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    old = tmp_path / "old"
    shutil.copytree(shapes_bundle, old, ignore=shutil.ignore_patterns("*.ort.onnx", "*.ort.json"))
    (old / EXPLAIN_FILE).unlink()
    meta = json.loads((old / "lensforge.json").read_text())
    del meta["explain"]
    (old / "lensforge.json").write_text(json.dumps(meta))
    predictor = Predictor(old)
    assert predictor.predict(images[0]).label  # predict is untouched
    with pytest.raises(BundleError, match=f"lensforge export {old} --to explain"):
        predictor.explain(images[0])
    assert main(["explain", str(old), str(images[0]), "--out", str(tmp_path / "o")]) == 2
    assert "--to explain" in capsys.readouterr().err
    assert main(["export", str(old), "--to", "explain"]) == 0
    got = Predictor(old).explain(images[0])
    want = Predictor(shapes_bundle).explain(images[0])
    assert got.label == want.label and np.abs(got.map - want.map).max() < 1e-4


def test_cli_explain_top_k_and_a_refused_image(shapes_bundle: Path, images: list[Path], tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image")
    out = tmp_path / "out"
    code = main(["explain", str(shapes_bundle), str(images[0]), str(bad), str(images[1]), "--top-k", "2", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 0 and "broken.jpg" in err  # as predict: 0 while some image was explained and "Traceback" not in err
    written = sorted(out.glob("*.png"))
    assert len(written) == 2
    assert Image.open(written[0]).size == (2 * 64 + 4, 64)  # two maps side by side, 4 px apart
    assert main(["explain", str(shapes_bundle), str(images[0]), "--label", "giraffe", "--out", str(out)]) == 2
    assert main(["explain", str(shapes_bundle), str(images[0]), "--method", "gradcam", "--out", str(out)]) == 0


def test_randomising_the_head_changes_the_map(shapes_bundle: Path, images: list[Path]) -> None:
    """Model-randomisation sanity check (Adebayo et al. 2018): a map that survives random
    head weights shows the image, not what the model learned."""
    explainer = TorchExplainer.from_bundle(shapes_bundle)
    label = explainer.explain(images[0])[0].label
    before = {m: explainer.explain(images[0], [label], method=m)[0].map for m in ("cam", "gradcam")}
    torch.manual_seed(0)
    with torch.no_grad():
        explainer.classifier.final_linear().weight.normal_(0, 0.05)
    for method, old in before.items():
        new = explainer.explain(images[0], [label], method=method)[0].map
        corr = float(np.corrcoef(old.ravel(), new.ravel())[0, 1])
        print(f"{method}: trained vs randomised head: correlation {corr:.2f}, mean abs diff {np.abs(old - new).mean():.3f}")
        assert corr < 0.97 and np.abs(old - new).mean() > 0.05


# -- do maps point at the object? ---------------------------------------------------------------

DISC_R, SIDE = 11, 96


def _discs(root: Path, n: int, seed: int = 0) -> list[tuple[Path, str, float, float]]:
    """Colour noise with one red or blue disc (the class) at a random place inside the centre crop."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        cls = ("red", "blue")[i % 2]
        img = Image.fromarray(rng.integers(60, 200, (SIDE, SIDE, 3), dtype=np.uint8))
        cx, cy = rng.uniform(8 + DISC_R, SIDE - 8 - DISC_R, 2)
        ImageDraw.Draw(img).ellipse((cx - DISC_R, cy - DISC_R, cx + DISC_R, cy + DISC_R),
                                    fill=(230, 20, 20) if cls == "red" else (20, 20, 230))
        path = root / cls / f"{i:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        img.save(path)
        rows.append((path, cls, float(cx), float(cy)))
    return rows


@pytest.mark.slow
def test_cam_peak_falls_on_the_object(tmp_path: Path) -> None:
    import lensforge

    _discs(tmp_path / "discs", 120)
    run = lensforge.train(data=str(tmp_path / "discs"), out=str(tmp_path / "run"), probe=True, image_size=224)
    predictor = Predictor(run.bundle_dir)
    hits = correct = 0
    for path, cls, cx, cy in _discs(tmp_path / "held_out", 60, seed=1):  # images the model never saw
        e = predictor.explain(path)
        if e.label != cls:
            continue
        correct += 1
        x, y = e.peak
        hits += (x + 0.5 - cx) ** 2 + (y + 0.5 - cy) ** 2 <= DISC_R ** 2
    chance = np.pi * DISC_R ** 2 / SIDE ** 2
    rate = hits / max(correct, 1)
    print(f"CAM peak inside the disc: {hits}/{correct} = {rate:.0%} of correctly classified images (chance {chance:.1%})")
    assert correct >= 10 and rate >= 3 * chance
