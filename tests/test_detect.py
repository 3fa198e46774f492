"""Detection end to end: train a few steps → ONNX bundle verified against torch → Predictor
(no torch) → evaluate → predict --annotate, and the errors between them."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lensforge.cli import main
from lensforge.errors import BundleError, DataError
from lensforge.runtime import DetectionResult, Predictor, load_bundle
from lensforge.runtime.runners import DetectorInput


def test_training_writes_a_verified_detector_bundle(detect_run: object, detect_bundle: Path) -> None:
    b = load_bundle(detect_bundle)
    assert b.task == "detect" and b.classes == ["circle", "square", "triangle"]  # dummy category 0 is not a class
    spec = b.detect_spec
    assert spec.min_size == 96 and spec.max_size == 160
    parity = b.meta["parity"]
    assert parity["min_box_iou"] >= 0.99 and parity["boxes_compared"] > 0  # real boxes were compared
    assert 0 <= b.score_threshold <= 1 and b.meta["threshold_tuning"]["beta"] == 2.0
    for split in ("val", "test"):
        m = b.meta["metrics"][split]
        assert {"map", "map50", "map75", "mar100"} <= set(m)
    run = Path(detect_run.run_dir)  # type: ignore[attr-defined]
    for name in ("metrics.json", "predictions.csv", "pr_curves.png", "per_class_ap.png", "fbeta_threshold.png",
                 "examples.png"):
        assert (run / "eval" / name).stat().st_size > 0, name
    assert (detect_bundle / "weights.safetensors").is_file() and (run / "checkpoints" / "last.ckpt").is_file()


def test_predictor_returns_boxes_in_original_pixels(detect_bundle: Path, detect_dir: Path) -> None:
    p = Predictor(detect_bundle)
    path = sorted((detect_dir / "test").glob("*.jpg"))[0]
    by_path = p.predict(path)
    assert isinstance(by_path, DetectionResult) and by_path.image_size == (96, 96)
    by_bytes = p.predict(path.read_bytes())
    np.testing.assert_allclose(by_bytes.boxes, by_path.boxes, atol=1e-4)
    assert len(by_path) > 0  # an untrained head still proposes boxes above the 0.05 floor
    assert (by_path.boxes >= 0).all() and (by_path.boxes[:, 2] <= 96).all() and (by_path.boxes[:, 3] <= 96).all()
    # a 4x larger copy: the Predictor shrinks it to the model's size, and maps boxes back to its pixels
    big = Image.open(path).convert("RGB").resize((384, 384), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    big.save(buf, "PNG")
    res = p.predict(buf.getvalue())
    assert res.image_size == (384, 384) and res.boxes[:, 2:].max() > 96  # not left in model-input pixels
    assert (res.boxes[:, 2] <= 384).all() and (res.boxes[:, 3] <= 384).all()


def test_box_mapping_is_exact_for_a_known_output(detect_bundle: Path) -> None:
    """result() divides by the shrink factor and clips to the original image."""
    p = Predictor(detect_bundle)
    prepared = DetectorInput(np.zeros((3, 96, 128), np.float32), (384, 288))  # shrunk by 1/3
    output = (np.array([[3, 6, 30, 60], [90, 0, 200, 96]], np.float32), np.array([0.9, 0.4], np.float32),
              np.array([2, 0], np.int64))
    r = p.result(output, prepared)
    np.testing.assert_allclose(r.boxes, [[9, 18, 90, 180], [270, 0, 384, 288]])  # 200*3 clipped to 384
    assert r.labels == ["triangle", "circle"] and r.image_size == (384, 288)
    assert len(r.above(0.5)) == 1


def test_cli_predict_json_and_annotate(detect_bundle: Path, detect_dir: Path, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    images = sorted((detect_dir / "test").glob("*.jpg"))[:2]
    out = tmp_path / "drawn"
    code = main(["predict", str(detect_bundle), *map(str, images), "--json", "--annotate", str(out)])
    assert code == 0
    docs = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert len(docs) == 2
    for doc in docs:
        assert {"detections", "threshold", "image_size"} <= set(doc)
        for d in doc["detections"]:
            assert d["label"] in ("circle", "square", "triangle") and len(d["box"]) == 4
            assert d["score"] >= doc["threshold"]
        drawn = Image.open(doc["annotated"])
        assert drawn.size == (96, 96)


def test_cli_evaluate_writes_the_coco_report(detect_bundle: Path, detect_dir: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["evaluate", str(detect_bundle), str(detect_dir), "--out", str(tmp_path / "ev"), "--json"])
    assert code == 0
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert metrics["evaluated_on"] == "the test split saved at training time" and metrics["n"] == 6
    assert metrics["threshold"] == pytest.approx(load_bundle(detect_bundle).score_threshold)
    # the same numbers the bundle recorded at training time, recomputed from disk
    assert metrics["map50"] == pytest.approx(load_bundle(detect_bundle).meta["metrics"]["test"]["map50"], abs=1e-6)


@pytest.mark.parametrize(
    "make_args, message",
    [
        (lambda det, cls, ddir, sdir: ["evaluate", str(cls), str(ddir)], "detect"),  # classifier on boxes
        (lambda det, cls, ddir, sdir: ["evaluate", str(det), str(sdir)], "detect"),  # detector on class folders
        (lambda det, cls, ddir, sdir: ["train", str(ddir), "--probe", "--out", "x"], "--probe"),
        (lambda det, cls, ddir, sdir: ["train", str(ddir), "--backbone", "yolo9000", "--out", "x"], "unknown detector"),
        (lambda det, cls, ddir, sdir: ["train", str(ddir), "--task", "classify", "--out", "x"], "detect"),
    ],
    ids=["classifier-on-coco", "detector-on-folders", "probe-detector", "unknown-detector", "classify-on-coco"],
)
def test_wrong_model_for_the_data_is_one_clear_error(make_args: object, message: str, detect_bundle: Path,
                                                     shapes_bundle: Path, detect_dir: Path, shapes_dir: Path,
                                                     capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    code = main(make_args(detect_bundle, shapes_bundle, detect_dir, shapes_dir))  # type: ignore[operator]
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "x").exists()  # nothing half-written


def _no_annotations(doc: dict) -> None:
    doc["annotations"] = []


def _all_crowd(doc: dict) -> None:
    for a in doc["annotations"]:
        a["iscrowd"] = 1  # crowd regions are not trained on


@pytest.mark.parametrize("edit", [_no_annotations, _all_crowd], ids=["no-annotations", "only-crowd-boxes"])
def test_zero_boxes_in_train_is_refused(detect_dir: Path, tmp_path: Path, edit: object) -> None:
    import lensforge

    data = tmp_path / "data"
    shutil.copytree(detect_dir, data)
    ann = data / "train" / "_annotations.coco.json"
    doc = json.loads(ann.read_text())
    edit(doc)  # type: ignore[operator]
    ann.write_text(json.dumps(doc))
    with pytest.raises(DataError, match="train"):
        lensforge.train(data=str(data), out=str(tmp_path / "run"), image_size=96, max_steps=1)
    assert not (tmp_path / "run").exists()


def test_detector_bundle_checks(detect_bundle: Path, tmp_path: Path) -> None:
    bad = tmp_path / "b"
    shutil.copytree(detect_bundle, bad)
    meta = json.loads((bad / "lensforge.json").read_text())
    meta["score_threshold"] = 3
    (bad / "lensforge.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="score_threshold"):
        load_bundle(bad)
    meta["score_threshold"] = 0.5
    meta["input"] = {"size": 224, "resize": 256, "mean": [0, 0, 0], "std": [1, 1, 1]}  # a classifier's spec
    (bad / "lensforge.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="min_size"):
        load_bundle(bad)


def test_detection_result_validates_shapes() -> None:
    with pytest.raises(ValueError, match=r"\(N, 4\)"):
        DetectionResult(np.zeros((2, 3)), np.zeros(2), np.zeros(2), ("a",))
    with pytest.raises(ValueError, match="one score and one class id per box"):
        DetectionResult(np.zeros((2, 4)), np.zeros(1), np.zeros(2), ("a",))
    with pytest.raises(ValueError, match="class ids"):
        DetectionResult(np.zeros((1, 4)), np.zeros(1), np.array([3]), ("a",))
    empty = DetectionResult(np.zeros((0, 4)), [], [], ("a",))
    assert len(empty) == 0 and empty.to_dict()["detections"] == []


def test_every_http_dialect_serves_the_detector(detect_bundle: Path, detect_dir: Path) -> None:
    """One detector behind the seed, TorchServe, native, annotate and KServe-v2 routes; every
    answer is the Predictor's detections above the tuned threshold, in each dialect's shape."""
    import requests
    import tritonclient.http as triton

    from lensforge.serve import create_app
    from serving import LiveServer

    image = sorted((detect_dir / "test").glob("*.jpg"))[0]
    data = image.read_bytes()
    expected = Predictor(detect_bundle).predict(data).above()
    with LiveServer(create_app({"det": detect_bundle})) as s:
        ts = requests.post(f"{s.url}/predictions/det", data=data, timeout=30)
        assert ts.status_code == 200
        assert [list(d)[0] for d in ts.json()] == expected.labels  # TorchServe's object-detector shape
        for d, box, score in zip(ts.json(), expected.boxes, expected.scores):
            label = next(k for k in d if k != "score")
            np.testing.assert_allclose(d[label], box, atol=1e-3)
            assert d["score"] == pytest.approx(float(score), abs=1e-5)
        seed = requests.post(f"{s.url}/predict", json=json.dumps({"raw_file": __import__("base64").b64encode(data).decode()}),
                             timeout=30).json()
        assert seed["status"] == "Success" and [p["label"] for p in seed["preds"]] == expected.labels
        native = requests.post(f"{s.url}/v1/models/det/predict", files={"file": ("x.jpg", data)}, timeout=30).json()
        assert [d["label"] for d in native["detections"]] == expected.labels and native["image_size"] == [96, 96]
        drawn = requests.post(f"{s.url}/annotate?format=png", files={"file": ("x.jpg", data)}, timeout=30)
        assert drawn.status_code == 200 and Image.open(io.BytesIO(drawn.content)).size == (96, 96)
        client = triton.InferenceServerClient(s.url.removeprefix("http://"))
        inp = triton.InferInput("image", [1], "BYTES")
        inp.set_data_from_numpy(np.array([data], dtype=object), binary_data=True)
        out = client.infer("det", [inp])
        np.testing.assert_allclose(out.as_numpy("boxes").reshape(-1, 4), expected.boxes, atol=1e-3)
        np.testing.assert_array_equal(out.as_numpy("class_ids").reshape(-1), expected.class_ids)


def _train_records(detect_dir: Path) -> list:
    from lensforge.data.formats import read_dataset

    return [r for r in read_dataset(detect_dir).records if r.split == "train"]


def test_validation_resizes_like_the_exported_graph() -> None:
    """Training raises torchvision's max_size for the scale jitter; validation (which picks the
    best checkpoint) must cap wide images at the bundle's max_size, as the ONNX graph does."""
    import torch

    from lensforge.config import TrainConfig
    from lensforge.training.detect import DetectorModule, build_detector, detect_spec

    cfg = TrainConfig(data="x", image_size=96, pretrained=False).resolve("detect")
    model = build_detector(cfg, 3).eval()
    module = DetectorModule(model, cfg, ("a", "b", "c"), None, 1)
    spec = detect_spec(cfg)
    train_max = model.transform.max_size
    assert train_max > spec.max_size  # room for the upscaled jitter sizes
    wide = [torch.zeros(3, 96, 320)]  # 10:3, wider than max_size / min_size allows
    module.on_validation_epoch_start()
    seen = model.transform(wide)[0].image_sizes[0]
    s = spec.scale_for(320, 96)
    assert seen == (round(96 * s), round(320 * s)) == (48, 160)
    module.on_validation_epoch_end()
    assert model.transform.max_size == train_max  # training resumes with its own sizes


def test_export_is_checked_on_training_images_without_a_val_split(detect_dir: Path) -> None:
    """No val images: the export is traced and verified on real (training) images, not on
    noise, where a trained detector finds nothing to compare."""
    from lensforge.data.image import decode_image
    from lensforge.runtime.preprocess import DetectSpec
    from lensforge.training.detect import DetectionImages, parity_images

    train = _train_records(detect_dir)
    checks = parity_images(DetectionImages([], [], [], train=False), train, DetectSpec(min_size=96, max_size=160))
    assert len(checks) == 5  # 4 images + a wide copy of the first (non-square sizes must agree too)
    first = np.asarray(decode_image(train[0].path), np.float32).transpose(2, 0, 1) / 255
    np.testing.assert_allclose(checks[0][0].numpy(), first, atol=1e-6)
    assert checks[4].shape[2] < checks[4].shape[3]


def test_training_warns_when_the_annotated_size_differs_from_the_file(
    detect_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import dataclasses
    import logging

    from lensforge.runtime.preprocess import DetectSpec
    from lensforge.training.detect import load_detection_images

    train = _train_records(detect_dir)[:2]
    spec = DetectSpec(min_size=96, max_size=160)
    with caplog.at_level(logging.WARNING, logger="lensforge.training.detect"):
        load_detection_images(train, spec, 1.0)
    assert not caplog.records  # the generated sizes match
    rotated = [dataclasses.replace(train[0], size=(48, 96)), train[1]]  # e.g. an EXIF-rotated file's stored size
    with caplog.at_level(logging.WARNING, logger="lensforge.training.detect"):
        kept = load_detection_images(rotated, spec, 1.0)[0]
    assert len(kept) == 2 and "1 image(s) differ in size from their annotations" in caplog.text
    assert "annotated 48x96, file 96x96" in caplog.text


@pytest.mark.parametrize(
    ("now", "classes", "expected"),
    [
        ({}, ["a", "b"], None),  # the CLI's --resume reloads config.yaml: everything matches
        ({"image_size": 512}, ["a", "b"], "image_size 96 (now 512)"),  # lensforge.train(resume=True) without it
        ({"backbone": "fasterrcnn_resnet50_fpn"}, ["a", "b"], "backbone 'lite0_fpn' (now 'fasterrcnn_resnet50_fpn')"),
        ({}, ["b", "a"], "classes a, b (the data now has b, a)"),  # another box head: the checkpoint cannot load
    ],
    ids=["same", "other-size", "other-detector", "other-classes"],
)
def test_resume_refuses_another_detector(tmp_path: Path, now: dict, classes: list[str], expected: str | None) -> None:
    import dataclasses
    import re

    from lensforge.config import TrainConfig
    from lensforge.errors import ConfigError
    from lensforge.training.detect import check_resumable

    cfg = TrainConfig(data="d", backbone="lite0_fpn", image_size=96).resolve("detect")
    cfg.save(tmp_path / "config.yaml", classes=["a", "b"])
    resumed = dataclasses.replace(cfg, resume=True, **now)
    if expected is None:
        check_resumable(tmp_path, resumed, classes)
    else:
        with pytest.raises(ConfigError, match=re.escape(expected)):
            check_resumable(tmp_path, resumed, classes)


@pytest.mark.parametrize("size", [(100, 50), (200, 96), (200, 80), (96, 96), (250, 120), (37, 141)])
def test_onnx_and_torch_agree_at_any_image_size(detect_run: object, detect_bundle: Path, size: tuple[int, int]) -> None:
    """The graph does not resize (the Predictor does, with Pillow): so no size can make the
    traced graph sample differently from torch (it did at 50x100 with torchvision's resize inside)."""
    import torch
    from safetensors.torch import load_file

    from lensforge.export.onnx import verify_detector
    from lensforge.models.detector import ExportableDetector
    from lensforge.runtime.preprocess import detector_input
    from lensforge.training.detect import build_detector
    from lensforge.config import TrainConfig

    b = load_bundle(detect_bundle)
    cfg = TrainConfig.from_dict(b.meta["config"]).resolve("detect")
    cfg.pretrained = False
    model = build_detector(cfg, len(b.classes)).eval()
    model.load_state_dict(load_file(str(detect_bundle / "weights.safetensors")))
    rng = np.random.default_rng(sum(size))
    img = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
    x = torch.from_numpy(detector_input(img, b.detect_spec))[None]
    parity = verify_detector(ExportableDetector(model).eval(), b.model_path, [x], min_iou=0.99)
    assert parity["boxes_compared"] > 0 and parity["min_box_iou"] >= 0.99


def test_cli_evaluate_prints_the_detection_report(detect_bundle: Path, detect_dir: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["evaluate", str(detect_bundle), str(detect_dir), "--out", str(tmp_path / "ev")]) == 0
    out = capsys.readouterr().out
    for word in ("AP@[.50:.95]", "AP50", "AR@100", "precision", "F2", "circle", "square", "triangle"):
        assert word in out, word


def test_cli_predict_detection_filters(detect_bundle: Path, detect_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    images = sorted((detect_dir / "test").glob("*.jpg"))[:3]
    assert main(["predict", str(detect_bundle), *map(str, images), "--json", "--conf", "0", "--max-det", "1"]) == 0
    docs = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert len(docs) == 3 and all(len(d["detections"]) <= 1 for d in docs) and all(d["threshold"] == 0 for d in docs)
    assert any(d["detections"] for d in docs)  # at conf 0 the model's own floor keeps something
    assert main(["predict", str(detect_bundle), *map(str, images), "--json", "--conf", "0", "--classes", "circle"]) == 0
    docs = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert {d["label"] for doc in docs for d in doc["detections"]} <= {"circle"}


@pytest.mark.parametrize(("argv", "message"), [
    (["--classes", "horse"], "unknown class 'horse'"),
    (["--conf", "1.5"], "between 0 and 1"),
])
def test_cli_predict_detection_filters_refuse_bad_values(detect_bundle: Path, detect_dir: Path, argv: list[str], message: str,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    image = sorted((detect_dir / "test").glob("*.jpg"))[0]
    with contextlib.suppress(SystemExit):
        assert main(["predict", str(detect_bundle), str(image), *argv]) == 2
    assert message in capsys.readouterr().err


def test_cli_predict_detection_filters_need_a_detector(shapes_bundle: Path, shapes_dir: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    image = next(shapes_dir.rglob("*.jpg"))
    assert main(["predict", str(shapes_bundle), str(image), "--max-det", "2"]) == 2
    assert "--max-det filter detections" in capsys.readouterr().err


def test_exported_roi_pool_gathers_instead_of_scattering(detect_bundle: Path) -> None:
    """The export-time RoI pool puts the per-level RoIAlign outputs back in proposal order with
    one Gather; torchvision's traced merge scattered them (ScatterElements per level)."""
    import onnx
    import torch
    from torchvision.ops import MultiScaleRoIAlign

    from lensforge.models.detector import _GatheredRoIAlign

    ops = {n.op_type for n in onnx.load(str(detect_bundle / "model.onnx")).graph.node}
    assert "RoiAlign" in ops and "ScatterElements" not in ops

    torch.manual_seed(0)
    features = {str(i): torch.rand(1, 8, 1024 // 2 ** (i + 2), 1024 // 2 ** (i + 2)) for i in range(4)}
    sides = torch.cat([torch.full((15, 1), s) for s in (20.0, 120.0, 300.0, 700.0)])[torch.randperm(60)]
    xy = torch.rand(60, 2) * (1024 - sides)
    boxes = [torch.cat([xy, xy + sides * (0.8 + 0.4 * torch.rand(60, 2))], dim=1).clamp(max=1023)]
    reference = MultiScaleRoIAlign(list(features), 7, 2)
    expected = reference(features, boxes, [(1024, 1024)])
    assert set(reference.map_levels(boxes).flatten().tolist()) == {0, 1, 2, 3}  # interleaved over every level
    gathered = _GatheredRoIAlign(MultiScaleRoIAlign(list(features), 7, 2))
    torch.testing.assert_close(gathered(features, boxes, [(1024, 1024)]), expected, rtol=0, atol=0)
