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


def test_overlay_label_fits_a_small_image() -> None:
    """On a 64 px image "3 0.75 (cam)" is wider than the image: the label drops the method
    instead of being cut off mid-word, so its dark panel stops short of the right edge."""
    img = Image.new("RGB", (64, 64), (200, 200, 200))
    e = Explanation(np.zeros((64, 64), np.float32), "3", 0.75, "cam", img)
    out = e.overlay(colorbar=False)
    assert out.getpixel((63, 4)) == out.getpixel((63, 60))  # no panel at the top-right corner
    assert out.getpixel((2, 4)) != out.getpixel((2, 60))  # the panel is there, at the left


def test_colour_map_lookup_follows_the_turbo_polynomial() -> None:
    """The 256-entry look-up (the overlay's fast path) against the polynomial it samples: within
    one quantisation step of the map (turbo's steepest channel moves ~6 levels per step)."""
    from lensforge.runtime.explain import _turbo, colorize

    x = np.random.default_rng(0).random((50, 60)).astype(np.float32)
    exact = (_turbo(x) * 255 + 0.5).astype(np.int16)
    assert colorize(x).dtype == np.uint8 and colorize(x).shape == (50, 60, 3)
    assert np.abs(colorize(x).astype(np.int16) - exact).max() <= 8
    assert (colorize(np.array([[0.0, 1.0]], np.float32)) == (_turbo(np.array([[0.0, 1.0]])) * 255 + 0.5).astype(np.uint8)).all()


def test_map_upsampling_equals_the_dense_bilinear_product() -> None:
    """to_image's two-tap gather (no BLAS: OpenBLAS's threads cost 8-16 ms per 640x427 map on a busy
    machine) against the dense separable product it replaced, for odd image / grid / crop geometries."""
    def dense(n_image: int, n_grid: int, scale: float, offset: int, crop: int) -> np.ndarray:
        u = (np.arange(n_image) + 0.5) * scale - offset
        g = np.clip(u * n_grid / crop - 0.5, 0, n_grid - 1)
        lo = np.floor(g).astype(int)
        w = np.zeros((n_image, n_grid))
        np.add.at(w, (np.arange(n_image), lo), 1 - (g - lo))
        np.add.at(w, (np.arange(n_image), np.minimum(lo + 1, n_grid - 1)), g - lo)
        w[(u < 0) | (u >= crop)] = 0
        return w

    rng = np.random.default_rng(0)
    for spec in (InputSpec.for_size(224), InputSpec(size=64, resize=64), InputSpec(size=100, resize=120)):
        for w, h in ((640, 427), (100, 200), (37, 500), (1, 1), (224, 224)):
            for shape in ((7, 7), (1, 1), (3, 5), (spec.size, spec.size)):
                grid = rng.random(shape).astype(np.float32)
                s = spec.resize / min(w, h)
                nw, nh = max(spec.size, round(w * s)), max(spec.size, round(h * s))
                ref = dense(h, shape[0], nh / h, (nh - spec.size) // 2, spec.size) @ grid.astype(np.float64) \
                    @ dense(w, shape[1], nw / w, (nw - spec.size) // 2, spec.size).T
                m = to_image(grid, spec, (w, h))
                assert m.dtype == np.float32 and m.shape == (h, w)
                assert np.abs(m - ref).max() < 1e-5, (spec, w, h, shape)


def test_overlay_is_the_colour_map_blended_in_uint8() -> None:
    """The Pillow path (levels as a palette image, Image.blend, the colour bar drawn once per size)
    gives the pixels of the numpy look-up blended over the image."""
    from lensforge.runtime.explain import ALPHA, colorize, colorize_image

    x = np.random.default_rng(1).random((80, 120)).astype(np.float32)
    assert (np.asarray(colorize_image(x)) == colorize(x)).all()
    img = Image.fromarray(np.random.default_rng(2).integers(0, 256, (80, 120, 3), dtype=np.uint8))
    e = Explanation(x, "cat", 0.9, "cam", img)
    expected = np.asarray(Image.blend(img, Image.fromarray(colorize(x), "RGB"), ALPHA))
    out = np.asarray(e.overlay(colorbar=False))
    assert (out[40:, :] == expected[40:, :]).all()  # below the label's panel: exactly the blend
    first, again = e.overlay(), e.overlay()  # the cached colour bar is pasted, never drawn on
    assert (np.asarray(first) == np.asarray(again)).all() and (np.asarray(first) != out).any()


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


def test_fp16_export_carries_the_explain_graph(shapes_bundle: Path, images: list[Path], tmp_path: Path) -> None:
    """``--to onnx-fp16`` (and int8: the same copying) keeps explain.onnx, which the metadata it
    copies names: before, the new bundle claimed a graph it did not have."""
    from lensforge.export.quantize import export_fp16

    out = export_fp16(shapes_bundle, tmp_path / "fp16")
    assert (out / EXPLAIN_FILE).is_file()
    got, want = Predictor(out).explain(images[0]), Predictor(shapes_bundle).explain(images[0])
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


def _rank_corr(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation of two maps; 0 when either is constant (nothing left to rank:
    the map is gone, which counts as changed)."""
    from scipy.stats import spearmanr

    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return 0.0
    return float(spearmanr(a.ravel(), b.ravel())[0])


def _reinitialise(*modules: torch.nn.Module) -> None:
    """Every layer in ``modules`` back to its default initialisation (BatchNorm: running stats too)."""
    for module in modules:
        for layer in module.modules():
            if hasattr(layer, "reset_parameters"):
                layer.reset_parameters()


def test_cascading_randomisation_changes_the_map() -> None:
    """Model-randomisation sanity check (Adebayo et al. 2018, cascading from the top): a map that
    survives random weights shows the image, not what the model learned.

    Pretrained Lite0 at 224 px (a 7x7 map) with a linear head fitted to the disc images; Spearman
    correlations of each map with the trained model's, median over images, CAM compared on its own
    7x7 grid (upsampled, the tied zeros outside the centre crop would inflate it). Measured (this
    seed): random head: CAM -0.15, Grad-CAM -0.34; + the last stage (blocks[-1], conv_head, bn2): CAM
    0.15, Grad-CAM 0.21; the trained model against itself: 1. CAM after the head alone depends on the
    draw (0.42 with another seed, 0.93 on the 64 px shapes bundle): the feature map, not the head,
    decides where the disc is, and random weights only re-mix it, so CAM's bound is checked after the
    last stage."""
    from sklearn.linear_model import LogisticRegression

    from lensforge.runtime.preprocess import preprocess

    backbone, cfg = create_backbone("efficientnet_lite0", pretrained=True)
    spec = InputSpec.for_size(224, mean=tuple(cfg["mean"]), std=tuple(cfg["std"]))
    classifier = Classifier(backbone, 2, head="linear").eval()
    rng = np.random.default_rng(0)
    images, classes = [], []
    for i in range(14):
        img = Image.new("RGB", (96, 96), (128, 128, 128))
        cx, cy = rng.uniform(19, 77, 2)
        ImageDraw.Draw(img).ellipse((cx - 11, cy - 11, cx + 11, cy + 11),
                                    fill=(230, 20, 20) if i % 2 == 0 else (20, 20, 230))
        images.append(img)
        classes.append(i % 2)
    train, test, test_classes = images[:10], images[10:], classes[10:]
    with torch.no_grad():  # the probe's head: logistic regression on pooled features
        pooled = backbone.forward_head(backbone.forward_features(torch.from_numpy(np.stack([preprocess(i, spec) for i in train]))))
        fit = LogisticRegression(max_iter=1000).fit(pooled.numpy(), classes[:10])
        linear = classifier.final_linear()
        linear.weight.zero_()
        linear.bias.zero_()
        linear.weight[1] = torch.from_numpy(fit.coef_[0])
        linear.bias[1] = float(fit.intercept_[0])
    explainer = TorchExplainer(classifier, spec, ["red", "blue"])
    batch = torch.from_numpy(np.stack([preprocess(i, spec) for i in test]))

    def maps() -> dict[str, list[np.ndarray]]:
        cams = explainer.cams(batch)[0]
        return {"cam": [normalise(cams[j, c]) for j, c in enumerate(test_classes)],
                "gradcam": [explainer.gradcam(batch[j:j + 1], [c])[0, 0] for j, c in enumerate(test_classes)]}

    trained = maps()
    assert all(m.max() > 0 for m in trained["cam"])
    rho = {}
    torch.manual_seed(0)
    for step, modules in (("head", (classifier.head,)),
                          ("last stage", (backbone.blocks[-1], backbone.conv_head, backbone.bn2))):
        _reinitialise(*modules)
        now = maps()
        rho[step] = {m: float(np.median([_rank_corr(a, b) for a, b in zip(trained[m], now[m])])) for m in trained}
        print(f"randomised up to the {step}: median Spearman vs trained {rho[step]}")
    assert rho["head"]["gradcam"] < 0.5  # Grad-CAM's weights are the head's gradients: gone with the head
    assert rho["last stage"]["cam"] < 0.5 and rho["last stage"]["gradcam"] < 0.5


# -- do maps point at the object? ---------------------------------------------------------------
#
# What makes the CAM localise (a linear probe on pretrained Lite0; peak inside the disc; issue 14):
# 1. The object must be the only class evidence. On colour noise the background's own colour features
#    vary from place to place and speak for a class too: 29 % at 224 px, 47 % at 448.
# 2. The object must be larger than a map cell. At 224 px the map is 7x7 (32 px cells) and a 51 px disc
#    is missed mostly by one cell toward the image centre: 30 % on a plain background. 448 px (14x14).
# 3. The disc's edge must be soft, as objects' edges are in photographs. Measured on 100 unseen images
#    (probe on 120 training images; frozen features, the pipeline's preprocessing): sharp discs drawn at
#    512 px 65 % (red 90 %, blue 42 %: a blue disc's map is a broad blob whose maximum sits on the disc's
#    edge, ~3 cells from its centre; 65 % with 80 to 400 training images alike, so more data does not
#    help; on 60: 4x-supersampled edges 65 %, a 3 px Gaussian blur 82 %); discs drawn at 96 px and
#    enlarged bilinearly to 512 px (a ~5 px ramp) 80 % with 120 training images, 81 % with 160, 84 %
#    with 320. Bicubic enlargement (Lite0's own interpolation) rings round the saturated disc: 70 %,
#    hence the enlargement here, in the generator, to the model's resize size (512 px for 448), where
#    the pipeline's resize is a no-op and only the centre crop acts.
#    End to end (lensforge.train probe, C chosen on validation, Predictor.explain from the bundle's ONNX):
#    86/100 with 160 training images; with another training set (seed 5), 93/100 and 92/100 on two
#    other unseen sets. The peak's cell-centre mapping (cell i at (i + 0.5) * 32 crop px) was checked
#    against i * 32 + 0.5 (the receptive-field centre of symmetric-padded stride-2 convs): no gain
#    (44 vs 43 of 60 sharp discs, 49 vs 49 soft), so the maths is left as it is.

SIDE, LOC_SIZE = 512, 448  # SIDE = round(LOC_SIZE / 0.875): the resize is a no-op, only the centre crop acts
DRAW = 96  # the side the disc is drawn at, before the bilinear enlargement to SIDE
DISC_R = 11 * SIDE / DRAW  # 11 px at 96, 58.7 px at 512
MARGIN = (SIDE - LOC_SIZE) // 2  # the crop's border
N_TRAIN, N_TEST = 160, 100  # 100 unseen images: one image is 1 point of the rate


def _discs(root: Path, n: int, seed: int = 0) -> list[tuple[Path, str, float, float]]:
    """A plain grey image with one red or blue disc (the class, and the only thing in the image
    that differs between classes) at a random place inside the centre crop, soft-edged: drawn at
    DRAW px and enlarged bilinearly. Returns (path, class, centre x, centre y) in SIDE px."""
    rng = np.random.default_rng(seed)
    k = SIDE / DRAW  # PIL's resize maps continuous coordinates by this factor (pixel centres at +0.5)
    rows = []
    for i in range(n):
        cls = ("red", "blue")[i % 2]
        img = Image.new("RGB", (DRAW, DRAW), (128, 128, 128))
        cx, cy = rng.uniform((MARGIN + 2 + DISC_R) / k, (SIDE - MARGIN - 2 - DISC_R) / k, 2)  # inside the crop
        r = DISC_R / k
        ImageDraw.Draw(img).ellipse((cx - r, cy - r, cx + r, cy + r), fill=(230, 20, 20) if cls == "red" else (20, 20, 230))
        path = root / cls / f"{i:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        img.resize((SIDE, SIDE), Image.Resampling.BILINEAR).save(path)
        rows.append((path, cls, float(cx * k), float(cy * k)))
    return rows


@pytest.mark.slow
def test_cam_peak_falls_on_the_object(tmp_path: Path) -> None:
    """Issue 14's goal: the map's peak (the arg-max of Predictor.explain's map, at the image's
    resolution) inside the object for >= 80 % of correctly classified unseen images; chance: the
    disc's share of the image, 4.1 %."""
    import lensforge

    _discs(tmp_path / "discs", N_TRAIN)
    run = lensforge.train(data=str(tmp_path / "discs"), out=str(tmp_path / "run"), probe=True, image_size=LOC_SIZE)
    predictor = Predictor(run.bundle_dir)
    hits = correct = 0
    for path, cls, cx, cy in _discs(tmp_path / "held_out", N_TEST, seed=1):  # images the model never saw
        e = predictor.explain(path)
        if e.label != cls:
            continue
        correct += 1
        x, y = e.peak
        hits += (x + 0.5 - cx) ** 2 + (y + 0.5 - cy) ** 2 <= DISC_R ** 2
    chance = np.pi * DISC_R ** 2 / SIDE ** 2
    rate = hits / max(correct, 1)
    msg = f"CAM peak inside the disc: {hits}/{correct} = {rate:.0%} of correctly classified images (chance {chance:.1%})"
    print(msg)
    assert correct >= 0.9 * N_TEST and rate >= 0.8, msg
