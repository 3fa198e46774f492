"""The synthetic demo datasets: drawn shapes on textured backgrounds.

Small enough to make in a second, hard enough that a classifier has to look at shape rather
than colour: shape and background colours come from the same distribution for every class,
backgrounds are noise, gradients or stripes, and thin clutter lines are drawn on top.
Generation is seeded, so the same arguments write byte-identical files.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from lensforge.data.records import Box
from lensforge.errors import DataError

CLASSIFY_CLASSES = ("circle", "square", "triangle", "cross")
MULTILABEL_CLASSES = ("circle", "square", "triangle")
DETECT_CLASSES = ("circle", "square", "triangle")
DETECT_SUPERCATEGORY = "shapes"  # Roboflow's dummy category id 0, named like the dataset
_DETECT_FOLDERS = ("train", "valid", "test")  # Roboflow's split folders
MARKER = ".lensforge-demo"  # hidden, so readers ignore it; lets a rerun replace its own files
_SUPERSAMPLE = 4  # shapes are drawn at 4x and averaged down: smooth, antialiased edges
_JPEG_QUALITY = 90


# --------------------------------------------------------------------------- backgrounds


def _colour(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(0, 255, size=3)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """float (size, size, 3) in [0, 255]: noise blobs, a gradient or stripes, plus grain."""
    kind = rng.integers(3)
    yy, xx = np.mgrid[0:size, 0:size] / size
    a, b = _colour(rng), _colour(rng)
    if kind == 0:  # low-frequency colour blobs
        coarse = rng.uniform(0, 1, size=(6, 6)).astype(np.float32)
        up = np.asarray(
            Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC)
        )
        t = np.clip(up, 0, 1)
    elif kind == 1:  # linear gradient at a random angle
        angle = rng.uniform(0, 2 * math.pi)
        t = (np.cos(angle) * xx + np.sin(angle) * yy + 1.5) / 3
    else:  # stripes
        angle = rng.uniform(0, math.pi)
        freq = rng.uniform(3, 9)
        t = 0.5 + 0.5 * np.sin(2 * math.pi * freq * (np.cos(angle) * xx + np.sin(angle) * yy))
    img = a + (b - a) * t[..., None]
    img += rng.normal(0, rng.uniform(4, 18), size=img.shape)  # sensor-like grain
    return img


# --------------------------------------------------------------------------- shapes


Points = list[tuple[float, float]]


def _rotated(points: Points, angle: float, cx: float, cy: float) -> Points:
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in points]


def _shape_mask(shape: str, size: int, cx: float, cy: float, r: float, angle: float) -> np.ndarray:
    """float (size, size) coverage in [0, 1] of one shape centred at (cx, cy), radius r px."""
    k = _SUPERSAMPLE
    mask = Image.new("L", (size * k, size * k), 0)
    draw = ImageDraw.Draw(mask)
    cx, cy, r = cx * k, cy * k, r * k
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
    elif shape == "square":
        h = r / math.sqrt(2)  # r is the half-diagonal, so all shapes span about 2r
        draw.polygon(_rotated([(-h, -h), (h, -h), (h, h), (-h, h)], angle, cx, cy), fill=255)
    elif shape == "triangle":
        corners = (-math.pi / 2 + i * 2 * math.pi / 3 for i in range(3))  # apex up, then rotate
        pts = [(r * math.cos(t), r * math.sin(t)) for t in corners]
        draw.polygon(_rotated(pts, angle, cx, cy), fill=255)
    elif shape == "cross":
        w = 0.33 * r  # half-width of each arm
        pts = [(-w, -r), (w, -r), (w, -w), (r, -w), (r, w), (w, w),
               (w, r), (-w, r), (-w, w), (-r, w), (-r, -w), (-w, -w)]  # fmt: skip
        draw.polygon(_rotated(pts, angle, cx, cy), fill=255)
    else:  # internal: callers only pass the names above
        raise ValueError(f"unknown demo shape {shape!r}")
    small = np.asarray(mask, dtype=np.float32).reshape(size, k, size, k).mean(axis=(1, 3))
    return small / 255.0


def _paint(img: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> None:
    """Composite a shape of a random colour (contrasting with what is under it) onto img."""
    colour = _colour(rng)
    under = (img * mask[..., None]).sum(axis=(0, 1)) / max(mask.sum(), 1e-6)
    if np.abs(colour - under).mean() < 60:  # too close to the background: invert it
        colour = 255 - under
    fill = colour + rng.normal(0, 6, size=img.shape)  # slight texture on the shape
    img[:] = img * (1 - mask[..., None]) + fill * mask[..., None]


def _clutter(image: Image.Image, rng: np.random.Generator) -> None:
    """Up to two thin random lines, so edges alone do not give the class away."""
    draw = ImageDraw.Draw(image)
    size = image.width
    for _ in range(int(rng.integers(0, 3))):
        x0, y0, x1, y1 = (float(v) for v in rng.uniform(0, size, size=4))
        draw.line((x0, y0, x1, y1), fill=tuple(int(c) for c in _colour(rng)), width=1)


def _render(
    shapes: list[str], rng: np.random.Generator, size: int, multi: bool
) -> Image.Image:
    img = _background(rng, size)
    if multi:
        # One shape per quadrant so shapes never hide each other.
        cells = rng.permutation(4)[: len(shapes)]
        for shape, cell in zip(shapes, cells):
            r = rng.uniform(0.11, 0.17) * size
            cx = (0.25 + 0.5 * (cell % 2)) * size + rng.uniform(-0.06, 0.06) * size
            cy = (0.25 + 0.5 * (cell // 2)) * size + rng.uniform(-0.06, 0.06) * size
            _paint(img, _shape_mask(shape, size, cx, cy, r, rng.uniform(0, 2 * math.pi)), rng)
    else:
        for shape in shapes:
            r = rng.uniform(0.17, 0.32) * size
            cx = rng.uniform(r + 2, size - r - 2)
            cy = rng.uniform(r + 2, size - r - 2)
            _paint(img, _shape_mask(shape, size, cx, cy, r, rng.uniform(0, 2 * math.pi)), rng)
    image = Image.fromarray(np.clip(img, 0, 255).round().astype(np.uint8))
    _clutter(image, rng)
    return image


# --------------------------------------------------------------------------- public API


def _prepare_root(root: Path, params: dict) -> None:
    """Create root; refuse to write into a non-empty folder that is not an earlier demo."""
    if root.exists() and not root.is_dir():
        raise DataError(f"{root} is a file; give a folder for the demo dataset")
    if root.exists() and any(root.iterdir()):
        if not (root / MARKER).is_file():
            raise DataError(
                f"{root} is not empty and was not made by make_demo_dataset; choose a new or "
                "empty folder"
            )
        for name in (*CLASSIFY_CLASSES, "images", *_DETECT_FOLDERS):
            shutil.rmtree(root / name, ignore_errors=True)
        (root / "labels.csv").unlink(missing_ok=True)
    root.mkdir(parents=True, exist_ok=True)
    (root / MARKER).write_text(json.dumps(params, sort_keys=True) + "\n", encoding="utf-8")


def make_demo_dataset(
    root: str | Path,
    *,
    task: str = "classify",
    n_per_class: int = 60,
    size: int = 96,
    seed: int = 0,
) -> Path:
    """Write a synthetic shapes dataset under ``root`` and return ``root``.

    task "classify": class folders ``root/<class>/img_0001.jpg`` for the 4 classes of
        :data:`CLASSIFY_CLASSES`, ``n_per_class`` RGB JPEGs of ``size`` x ``size`` each.
    task "multilabel": ``n_per_class * 3`` PNGs ``root/images/img_0001.png`` holding any
        subset of :data:`MULTILABEL_CLASSES` (all 8 subsets, "none" included, as evenly
        as the count allows, so each label is on about half the images), listed in
        ``root/labels.csv`` (``path,labels``, ``;``-separated labels, empty for none).

    The same arguments give byte-identical files. A rerun into the same folder replaces the
    files of the earlier run; any other non-empty folder is refused (DataError).
    """
    if task not in ("classify", "multilabel"):
        raise DataError(f"unknown demo task {task!r}; use 'classify' or 'multilabel'")
    if n_per_class < 1 or size < 16:
        raise DataError(
            f"demo needs n_per_class >= 1 and size >= 16, got {n_per_class} and {size}"
        )
    root = Path(root)
    params = {"task": task, "n_per_class": n_per_class, "size": size, "seed": seed}
    _prepare_root(root, params)
    rng = np.random.default_rng(seed)

    if task == "classify":
        for shape in CLASSIFY_CLASSES:
            (root / shape).mkdir()
        # Interleave classes so every class sees the same stretch of the random stream.
        for i in range(1, n_per_class + 1):
            for shape in CLASSIFY_CLASSES:
                image = _render([shape], rng, size, multi=False)
                image.save(root / shape / f"img_{i:04d}.jpg", quality=_JPEG_QUALITY)
        return root

    (root / "images").mkdir()
    n_images = n_per_class * len(MULTILABEL_CLASSES)
    n_subsets = 2 ** len(MULTILABEL_CLASSES)
    subsets = rng.permutation(np.arange(n_images) % n_subsets)
    lines = ["path,labels"]
    for i, bits in enumerate(subsets, start=1):
        shapes = [s for j, s in enumerate(MULTILABEL_CLASSES) if int(bits) >> j & 1]
        image = _render(shapes, rng, size, multi=True)
        rel = f"images/img_{i:04d}.png"
        image.save(root / rel)
        lines.append(f"{rel},{';'.join(shapes)}")
    (root / "labels.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


# --------------------------------------------------------------------------- detection


def _shape_extent(shape: str, cx: float, cy: float, r: float, angle: float) -> Box:
    """The xyxy box of a shape as :func:`_shape_mask` draws it (exact, from its corners)."""
    if shape == "circle":
        return (cx - r, cy - r, cx + r, cy + r)
    if shape == "square":
        h = r / math.sqrt(2)
        pts = _rotated([(-h, -h), (h, -h), (h, h), (-h, h)], angle, cx, cy)
    else:
        corners = (-math.pi / 2 + i * 2 * math.pi / 3 for i in range(3))
        pts = _rotated([(r * math.cos(t), r * math.sin(t)) for t in corners], angle, cx, cy)
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    return (min(xs), min(ys), max(xs), max(ys))


def _overlap(a: Box, b: Box) -> float:
    """Intersection area over the smaller box's area."""
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    if w <= 0 or h <= 0:
        return 0.0
    smaller = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return w * h / smaller


def _render_objects(
    rng: np.random.Generator, size: int, max_objects: int
) -> tuple[Image.Image, list[tuple[int, Box]]]:
    """One image and its (class index, xyxy box) objects; about 1 in 8 images has none."""
    img = _background(rng, size)
    n = 0 if rng.uniform() < 0.125 else int(rng.integers(1, max_objects + 1))
    objects: list[tuple[int, Box]] = []
    for _ in range(n):
        cls = int(rng.integers(len(DETECT_CLASSES)))
        for _attempt in range(20):  # rejection sampling: objects may touch, never hide
            r = rng.uniform(0.10, 0.225) * size  # the shape spans 20-45 % of the side
            cx, cy = rng.uniform(r, size - r, size=2)
            angle = rng.uniform(0, 2 * math.pi)
            box = _shape_extent(DETECT_CLASSES[cls], cx, cy, r, angle)
            if all(_overlap(box, other) < 0.05 for _, other in objects):
                break
        else:
            continue  # no room left for this object
        _paint(img, _shape_mask(DETECT_CLASSES[cls], size, cx, cy, r, angle), rng)
        clipped = (max(box[0], 0.0), max(box[1], 0.0), min(box[2], size), min(box[3], size))
        objects.append((cls, clipped))
    image = Image.fromarray(np.clip(img, 0, 255).round().astype(np.uint8))
    _clutter(image, rng)
    return image, objects


def make_demo_detection(
    root: str | Path,
    *,
    n_train: int = 160,
    n_val: int = 40,
    n_test: int = 40,
    size: int = 256,
    seed: int = 0,
    max_objects: int = 4,
) -> Path:
    """Write a synthetic shapes detection dataset as a Roboflow COCO export; returns ``root``.

    ``root/{train,valid,test}/_annotations.coco.json`` plus ``size`` x ``size`` RGB JPEGs
    (``img_0001.jpg``...) beside each JSON; ``n_test=0`` leaves out the test folder. Objects
    are solid-colour shapes of :data:`DETECT_CLASSES` spanning 20-45 % of the image side,
    0 to ``max_objects`` per image (about 1 in 8 images has none), barely overlapping, on the
    textured backgrounds of the classification demo. Categories are as Roboflow writes them:
    id 0 is the dummy :data:`DETECT_SUPERCATEGORY` with no boxes, the shapes are ids 1..3.
    COCO boxes are [x, y, width, height] float pixels, tight around each shape.

    The same arguments give byte-identical files; a rerun into the same folder replaces an
    earlier demo, any other non-empty folder is refused (DataError).
    """
    if min(n_train, n_val) < 1 or n_test < 0 or size < 64 or not 1 <= max_objects <= 8:
        raise DataError(
            "detection demo needs n_train, n_val >= 1, n_test >= 0, size >= 64 and 1 <= "
            f"max_objects <= 8, got {n_train}, {n_val}, {n_test}, {size}, {max_objects}"
        )
    root = Path(root)
    params = {"task": "detect", "n_train": n_train, "n_val": n_val, "n_test": n_test,
              "size": size, "seed": seed, "max_objects": max_objects}
    _prepare_root(root, params)
    rng = np.random.default_rng(seed)
    categories = [{"id": 0, "name": DETECT_SUPERCATEGORY, "supercategory": "none"}] + [
        {"id": i + 1, "name": name, "supercategory": DETECT_SUPERCATEGORY}
        for i, name in enumerate(DETECT_CLASSES)
    ]
    for folder, n in zip(_DETECT_FOLDERS, (n_train, n_val, n_test)):
        if not n:
            continue
        (root / folder).mkdir()
        images, annotations = [], []
        for i in range(n):
            image, objects = _render_objects(rng, size, max_objects)
            name = f"img_{i + 1:04d}.jpg"
            image.save(root / folder / name, quality=_JPEG_QUALITY)
            images.append({"id": i, "file_name": name, "width": size, "height": size})
            for cls, (x1, y1, x2, y2) in objects:
                w, h = x2 - x1, y2 - y1
                annotations.append({
                    "id": len(annotations), "image_id": i, "category_id": cls + 1,
                    "bbox": [round(x1, 2), round(y1, 2), round(w, 2), round(h, 2)],
                    "area": round(w * h, 2), "segmentation": [], "iscrowd": 0,
                })
        payload = {"info": {"description": "lensforge synthetic shapes"}, "categories": categories,
                   "images": images, "annotations": annotations}
        text = json.dumps(payload, indent=1) + "\n"
        (root / folder / "_annotations.coco.json").write_text(text, encoding="utf-8")
    return root
