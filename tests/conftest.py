"""Shared test fixtures: tiny generated images and datasets."""

from __future__ import annotations

import os
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def _write_image(
    path: Path,
    size: tuple[int, int] = (16, 12),
    mode: str = "RGB",
    fmt: str | None = None,
    **save_kwargs: object,
) -> Path:
    """Write a small image whose pixels depend on ``path`` (so files differ unless copied).

    size: (width, height). mode: a Pillow mode ("RGB", "L", "CMYK", "I;16", "RGBA", "P").
    fmt: Pillow format name; None guesses it from the suffix.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(zlib.crc32(str(path).encode()))
    w, h = size
    rgb = Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8))
    if mode == "I;16":
        image = Image.fromarray(rng.integers(0, 65536, size=(h, w), dtype=np.uint16))
    elif mode == "P":
        image = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    else:
        image = rgb.convert(mode)
    image.save(path, format=fmt, **save_kwargs)
    return path


@pytest.fixture
def make_image() -> Callable[..., Path]:
    """``make_image(path, size=(16, 12), mode="RGB", fmt=None, **save_kwargs) -> path``."""
    return _write_image


# -- trained bundles, shared by the training, predictor and CLI tests ------------------------
# Training is the slow part of the suite, so each bundle is trained once per session, tiny:
# 64 px inputs, one epoch capped at a few optimiser steps, a few dozen generated images.

TINY_TRAIN: dict[str, object] = {"image_size": 64, "epochs": 1, "max_steps": 3, "batch_size": 8}


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Class folders of generated shapes: 4 classes x 10 JPEGs of 64 x 64 (do not modify)."""
    from lensforge.data.demo import make_demo_dataset

    return make_demo_dataset(tmp_path_factory.mktemp("shapes") / "data", n_per_class=10, size=64)


@pytest.fixture(scope="session")
def shapes_run(tmp_path_factory: pytest.TempPathFactory, shapes_dir: Path) -> object:
    """``TrainResult`` of pretrained EfficientNet-Lite0 fine-tuned for 3 steps on
    :func:`shapes_dir` (real features, so scores differ from image to image)."""
    import lensforge

    out = tmp_path_factory.mktemp("shapes-run") / "run"
    return lensforge.train(data=str(shapes_dir), out=str(out), **TINY_TRAIN)


@pytest.fixture(scope="session")
def shapes_bundle(shapes_run: object) -> Path:
    """The bundle directory of :func:`shapes_run` (read-only: copy it before breaking it)."""
    return Path(shapes_run.bundle_dir)  # type: ignore[attr-defined]


@pytest.fixture(scope="session")
def predictor(shapes_bundle: Path) -> object:
    """A Predictor on :func:`shapes_bundle` (the reference the server tests compare with)."""
    from lensforge.runtime import Predictor

    return Predictor(shapes_bundle)


@pytest.fixture(scope="session")
def jpegs(shapes_dir: Path) -> list[bytes]:
    """Every fifth JPEG of :func:`shapes_dir`, as bytes (8 images over the 4 classes)."""
    return [p.read_bytes() for p in sorted(shapes_dir.glob("*/*.jpg"))[::5]]


@pytest.fixture(scope="session")
def multilabel_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A generated multi-label CSV dataset: 24 PNGs of 64 x 64 in images/, labels.csv."""
    from lensforge.data.demo import make_demo_dataset

    root = tmp_path_factory.mktemp("multilabel") / "data"
    return make_demo_dataset(root, task="multilabel", n_per_class=8, size=64)


@pytest.fixture(scope="session")
def multilabel_run(tmp_path_factory: pytest.TempPathFactory, multilabel_dir: Path) -> object:
    """``TrainResult`` of a multi-label model (thresholds tuned on validation)."""
    import lensforge

    out = tmp_path_factory.mktemp("multilabel-run") / "run"
    return lensforge.train(data=str(multilabel_dir), out=str(out), **TINY_TRAIN)


@pytest.fixture(scope="session")
def tiny_train() -> dict[str, object]:
    """Training options that keep a run to seconds; unpack with ``**tiny_train``."""
    return dict(TINY_TRAIN)


@pytest.fixture(autouse=True, scope="session")
def _isolated_feature_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Probe features are cached per user; tests use a cache of their own."""
    os.environ["LENSFORGE_CACHE"] = str(tmp_path_factory.mktemp("lensforge-cache"))


# -- a tiny trained detector, shared by the detection, predictor and server tests -----------

# a tiny learning rate keeps the new box head near its initial state, so it still proposes boxes
# (parity, drawing and every server dialect then have real detections to compare)
TINY_DETECT: dict[str, object] = {"image_size": 96, "epochs": 1, "max_steps": 2, "batch_size": 4, "lr": 1e-6}


@pytest.fixture(scope="session")
def detect_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A generated Roboflow COCO export: 12 / 6 / 6 images of 96 x 96 with 0-3 shapes each."""
    from lensforge.data.demo import make_demo_detection

    root = tmp_path_factory.mktemp("detect") / "data"
    return make_demo_detection(root, n_train=12, n_val=6, n_test=6, size=96, max_objects=3)


@pytest.fixture(scope="session")
def detect_run(tmp_path_factory: pytest.TempPathFactory, detect_dir: Path) -> object:
    """``TrainResult`` of the offline Lite0-FPN Faster R-CNN after 2 steps on :func:`detect_dir`."""
    import lensforge

    out = tmp_path_factory.mktemp("detect-run") / "run"
    return lensforge.train(data=str(detect_dir), out=str(out), **TINY_DETECT)


@pytest.fixture(scope="session")
def detect_bundle(detect_run: object) -> Path:
    """The bundle directory of :func:`detect_run` (read-only: copy it before breaking it)."""
    return Path(detect_run.bundle_dir)  # type: ignore[attr-defined]


COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}


@pytest.fixture(scope="session")
def colour_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A linear probe on EfficientNet-Lite0 features over 4 noisy colour classes x 10 PNGs
    (train / val / test saved in split.json); tests read it and never write into it.

    Not the shapes fixture for int8: three fine-tuning steps leave that at chance (25%), where
    a broken int8 model cannot score lower. The probe reaches 100% on its 8 test images, so a
    quantisation drop is visible.
    """
    import lensforge

    root = tmp_path_factory.mktemp("colours")
    rng = np.random.default_rng(0)
    for name, rgb in COLOURS.items():
        (root / "data" / name).mkdir(parents=True)
        for i in range(10):
            pixels = np.clip(np.array(rgb) + rng.normal(0, 40, (64, 64, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / "data" / name / f"{i}.png")
    run = lensforge.train(data=str(root / "data"), out=str(root / "run"), image_size=64, probe=True)
    return Path(run.bundle_dir)
