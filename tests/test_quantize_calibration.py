"""int8 calibration methods and --method auto; int8 / fp16 of detectors (issue 16)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from lensforge.errors import ExportError
from lensforge.export.quantize import (
    CALIBRATIONS,
    AccuracyRefused,
    export_fp16,
    export_int8,
)
from lensforge.runtime import Predictor


def _meta(bundle: Path) -> dict:
    return json.loads((bundle / "lensforge.json").read_text())


@pytest.mark.parametrize("method", ["entropy", "percentile"])
def test_histogram_calibrations_take_an_uneven_last_batch(colour_bundle: Path, tmp_path: Path, method: str,
                                                         capfd: pytest.CaptureFixture[str]) -> None:
    # 13 images in batches of 8: ORT's histogram collectors np.asarray the batches of one
    # collect_data call, which failed on the short last batch ("inhomogeneous shape")
    out = export_int8(colour_bundle, tmp_path / method, method=method, calib=13, max_drop=50)
    assert "histogram" not in capfd.readouterr().out  # ORT's per-batch print()s stay out of the terminal
    rec = _meta(out)["export"]
    assert rec["calibrate_method"] == method and rec["calibration"]["images"] == 13
    assert "auto" not in rec and rec["int8"] is not None
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in onnx.load(str(out / "model.onnx")).graph.node}


def test_auto_picks_the_best_candidate_on_val_and_is_judged_on_test(colour_bundle: Path, tmp_path: Path) -> None:
    out = export_int8(colour_bundle, tmp_path / "auto", calib=16, max_drop=50)
    rec = _meta(out)["export"]
    auto = rec["auto"]
    assert auto["chosen_on"]["split"] == "val" and rec["checked_on"]["split"] == "test"
    got = {(c["calibration"], c["float_head"], c["float_first_block"]) for c in auto["candidates"]}
    # every calibration, head int8 and float, first block int8 and float
    assert got == {(c, h, b) for c in CALIBRATIONS for h in (False, True) for b in (False, True)}
    best = max(c["points"] for c in auto["candidates"])
    key = ("calibration", "float_head", "float_first_block")
    chosen = next(c for c in auto["candidates"]
                  if tuple(c[k] for k in key) == (rec["calibrate_method"], rec["float_head"], rec["float_first_block"]))
    assert chosen["points"] == best
    assert rec["chosen_by"].startswith(f"auto: {rec['calibrate_method']}") and rec["chosen_by"] == auto["chosen_by"]
    head = [n for n in rec["float_nodes"] if "Gemm" in n or "MatMul" in n]
    assert bool(head) == rec["float_head"]  # a float head is named among the float nodes, and only then


def test_first_block_is_found_by_graph_inspection(colour_bundle: Path, tmp_path: Path) -> None:
    from lensforge.export.quantize import _first_block, _input_convs

    graph = onnx.load(str(colour_bundle / "model.onnx")).graph
    # rename every node: the block must be found by the graph's shape, not by timm's names
    for i, n in enumerate(graph.node):
        n.name = f"n{i}"
    nodes = {n.name: n for n in graph.node}
    block = _first_block(graph, _input_convs(graph))
    weights = {t.name: t for t in graph.initializer}

    def group(n: onnx.NodeProto) -> int:
        return next((a.i for a in n.attribute if a.name == "group"), 1)

    # EfficientNet-Lite0's first block: a depthwise conv (group == channels, one input channel
    # per filter) then the pointwise conv that ends the block
    assert [nodes[b].op_type for b in block] == ["Conv", "Conv"]
    dw, pw = nodes[block[0]], nodes[block[1]]
    assert group(dw) > 1 and weights[dw.input[1]].dims[1] == 1 and weights[dw.input[1]].dims[0] == group(dw)
    assert group(pw) == 1
    assert _first_block(graph, []) == []  # no stem, no block


def test_float_first_block_candidate_keeps_those_convs_float(colour_bundle: Path, tmp_path: Path) -> None:
    out = export_int8(colour_bundle, tmp_path / "auto", calib=8, max_drop=50)
    rec = _meta(out)["export"]
    graph = onnx.load(str(out / "model.onnx")).graph
    weights = {t.name for t in graph.initializer}
    dq_weights = {n.output[0] for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in weights}
    convs = {n.name: n for n in graph.node if n.op_type == "Conv"}
    float_convs = {name for name, n in convs.items() if n.input[1] not in dq_weights}
    first = [n for n in rec["float_nodes"] if "blocks.0.0" in n]
    assert bool(first) == rec["float_first_block"]
    assert set(first) <= float_convs  # recorded float nodes really run on float weights


def test_static_is_read_as_minmax(colour_bundle: Path, tmp_path: Path) -> None:
    rec = _meta(export_int8(colour_bundle, tmp_path / "s", method="static", calib=8, max_drop=50))["export"]
    assert rec["method"] == "static" and rec["calibrate_method"] == "minmax" and "auto" not in rec


def test_head_nodes_are_the_gemm_before_the_output(colour_bundle: Path) -> None:
    from lensforge.export.quantize import _head_nodes

    graph = onnx.load(str(colour_bundle / "model.onnx")).graph
    heads = _head_nodes(graph)
    assert heads and all(n.op_type in ("Gemm", "MatMul") for n in graph.node if n.name in heads)
    last = [n.name for n in graph.node if n.op_type in ("Gemm", "MatMul")][-1]
    assert last in heads


def test_cli_method_and_the_choice_printed(colour_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from lensforge.cli import main

    out = tmp_path / "int8"
    assert main(["export", str(colour_bundle), "--to", "onnx-int8", "--out", str(out), "--method", "percentile",
                 "--calib", "8", "--max-drop", "50"]) == 0
    assert _meta(out)["export"]["calibrate_method"] == "percentile"
    assert "percentile" in capsys.readouterr().out


# -- detectors -----------------------------------------------------------------------------------


def _consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    out: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for i in n.input:
            out.setdefault(i, []).append(n)
    return out


def test_detector_int8_quantises_backbone_fpn_and_inner_heads(detect_bundle: Path, tmp_path: Path,
                                                               capfd: pytest.CaptureFixture[str]) -> None:
    capfd.readouterr()
    out = export_int8(detect_bundle, tmp_path / "int8", method="minmax", calib=4, max_drop=100)
    graph = onnx.load(str(out / "model.onnx")).graph
    users = _consumers(graph)
    producer = {o: n for n in graph.node for o in n.output}
    weights = {i.name for i in graph.initializer}
    # the ops that run on int8 weights: consumers of a DequantizeLinear of an initializer
    quantised = {u.name: u.op_type for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in weights
                 for u in users.get(n.output[0], [])}
    assert set(quantised.values()) == {"Conv", "Gemm"}
    inner = ("/backbone/", "/rpn/head/conv/", "/roi_heads/box_head/")
    assert all(any(part in name for part in inner) for name in quantised)  # logits, box offsets: float weights
    assert any("/rpn/head/conv/" in name for name in quantised) and any("box_head/fc6" in name for name in quantised)
    assert not any(part in name for name in quantised for part in ("cls_logits", "bbox_pred", "box_predictor"))
    # int8 tensors flow from convolution to convolution: every add, pool and upsampling in the
    # backbone + FPN reads a DequantizeLinear and feeds a QuantizeLinear (ORT runs them in uint8),
    # and the activations were folded into the convolutions' output ranges
    between = [n for n in graph.node if "/backbone/" in n.name and n.op_type in ("Add", "MaxPool", "Resize")]
    assert between
    for n in between:
        assert producer[n.input[0]].op_type == "DequantizeLinear", n.name
        assert {u.op_type for u in users[n.output[0]]} == {"QuantizeLinear"}, n.name
    stem = _meta(out)["export"]["float_nodes"]
    assert not [n.name for n in graph.node if "/backbone/" in n.name and n.op_type in ("Relu", "Clip")
                and not any(producer.get(n.input[0]) is not None and producer[n.input[0]].name == s for s in stem)]
    rec = _meta(out)["export"]
    assert rec["metric"] == "map50" and rec["checked_on"]["split"] == "test" and rec["int8"] is not None
    assert set(rec["seconds_per_image"]) == {"fp32", "int8"} and rec["quantized"] == "backbone + FPN + RPN conv + box head"
    boxes, scores, labels = Predictor(out).run_detector(np.random.default_rng(0).random((3, 96, 128), dtype=np.float32))
    assert boxes.shape[1:] == (4,) and boxes.dtype == np.float32 and len(scores) == len(labels)
    # no float weight is left behind unused in any graph the export loads (ORT warns about each
    # in the user's terminal: the RPN conv's weight, shared by every FPN level, was)
    assert "not used by any node" not in capfd.readouterr().err


def test_detector_int8_past_max_drop_is_refused(detect_bundle: Path, tmp_path: Path) -> None:
    with pytest.raises(AccuracyRefused, match=r"int8 map50 [\d.]+ vs fp32 [\d.]+: drop -?[\d.]+ points > --max-drop -1"):
        export_int8(detect_bundle, tmp_path / "int8", method="minmax", calib=4, max_drop=-1)
    assert not (tmp_path / "int8").exists()


def test_detector_fp16_converts_backbone_and_fpn_only(detect_bundle: Path, tmp_path: Path) -> None:
    out = export_fp16(detect_bundle, tmp_path / "fp16")
    model = onnx.load(str(out / "model.onnx"))
    graph = model.graph
    halves = {t.name for t in graph.initializer if t.data_type == onnx.TensorProto.FLOAT16}
    convs = [n for n in graph.node if n.op_type == "Conv"]
    in_half = {n.name for n in convs if n.input[1] in halves}
    assert in_half == {n.name for n in convs if "/backbone/" in n.name}  # RPN and heads: float32
    # the box-decoding subgraphs are untouched: every If's outer-scope inputs are still float32
    assert any(n.op_type == "If" for n in graph.node)
    outs = [o.name for o in graph.output]
    assert [o.type.tensor_type.elem_type for o in graph.output] == [onnx.TensorProto.FLOAT] * 2 + [onnx.TensorProto.INT64]
    rec = _meta(out)["export"]
    assert rec["converter"].startswith("lensforge.export.half") and rec["metric"] == "map50"
    assert rec["fp16"] is not None and rec["checked_on"]["split"] == "test"
    fp32 = Predictor(detect_bundle).run_detector(np.random.default_rng(0).random((3, 96, 128), dtype=np.float32))
    half = Predictor(out).run_detector(np.random.default_rng(0).random((3, 96, 128), dtype=np.float32))
    assert half[0].dtype == np.float32 and len(half[0]) == len(half[1]) == len(half[2]) and outs[0] == "boxes"
    if len(fp32[1]) and len(half[1]):  # same top detection, up to float16 rounding
        assert abs(float(fp32[1][0]) - float(half[1][0])) < 0.02


def test_half_island_casts_at_its_border_only() -> None:
    from onnx import TensorProto, helper, numpy_helper

    from lensforge.export.half import half_island

    w = numpy_helper.from_array(np.full((2, 2, 1, 1), 0.5, dtype=np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["a"], name="c1"), helper.make_node("Relu", ["a"], ["b"], name="r1"),
         helper.make_node("Conv", ["b", "w"], ["y"], name="c2")],  # c2 shares w and reads b from outside
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 3, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 3, 3])], [w])
    model = half_island(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), {"c1", "r1"})
    kinds = [(n.op_type, n.name) for n in model.graph.node]
    assert kinds == [("Cast", "x__to_fp16"), ("Conv", "c1"), ("Relu", "r1"), ("Cast", "b__to_fp32"), ("Conv", "c2")]
    assert {t.name: t.data_type for t in model.graph.initializer} == {"w": TensorProto.FLOAT, "w__fp16": TensorProto.FLOAT16}
    import onnxruntime as ort

    x = np.random.default_rng(0).random((1, 2, 3, 3), dtype=np.float32)
    y = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(y, 0.5 * np.maximum(x.sum(1, keepdims=True).repeat(2, 1) * 0.5, 0).sum(1, keepdims=True).repeat(2, 1),
                               rtol=1e-3)


def _resnet_bundle(tmp_path: Path) -> Path:
    """A random-init ResNet-18 classifier bundle at 64 px: its freshly folded batch norms give
    every convolution the same all-zero bias, which torch's exporter merges into one tensor."""
    import torch
    from PIL import Image

    from lensforge.export.onnx import export_onnx
    from lensforge.models import Classifier, ScoresModel, create_backbone
    from lensforge.runtime import InputSpec
    from lensforge.runtime.bundle import write_meta

    backbone, _ = create_backbone("resnet18", pretrained=False)
    model = ScoresModel(Classifier(backbone, 3), multilabel=False).eval()
    bundle = tmp_path / "fp32"
    bundle.mkdir()
    export_onnx(model, torch.zeros(1, 3, 64, 64), bundle / "model.onnx")
    write_meta(bundle, {"task": "classify", "classes": ["a", "b", "c"], "input": InputSpec.for_size(64).to_dict()})
    calib = tmp_path / "calib"
    calib.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((80, 80)).save(calib / f"{i}.png")
    return bundle


def test_resnet_int8_keeps_the_stem_and_its_pool_float_and_unshared(tmp_path: Path) -> None:
    fp32 = _resnet_bundle(tmp_path)
    out = export_int8(fp32, tmp_path / "int8", method="minmax", calib_dir=tmp_path / "calib", calib=4, force=True)
    graph = onnx.load(str(out / "model.onnx")).graph
    weights = {t.name for t in graph.initializer}
    stem = next(n for n in graph.node if n.op_type == "Conv" and n.input[0] == "images")
    # every input but the image is a float initializer of its own: no DequantizeLinear at run
    # time, which kept ORT from fusing the stem into its blocked layout
    assert all(i in weights for i in stem.input[1:])
    pool = next(n for n in graph.node if n.op_type == "MaxPool")
    assert pool.name in _meta(out)["export"]["float_nodes"]

    # the Predictor leaves the quantiser after the pool: ORT's optimised graph keeps the pool float
    pred = Predictor(out, cache_optimized=True)
    assert pred.optimized_path is not None
    opt = onnx.load(str(pred.optimized_path)).graph
    producer = {o: n for n in opt.node for o in n.output}
    pool = next(n for n in opt.node if n.op_type == "MaxPool")
    assert producer[pool.input[0]].op_type != "QuantizeLinear"
    # and it changes no score: max-pooling commutes with the monotonic quantiser
    import onnxruntime as ort

    x = np.random.default_rng(1).random((2, 3, 64, 64), dtype=np.float32)
    default = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(pred.session.run(None, {"images": x})[0], default.run(None, {"images": x})[0])


def test_int8_export_reports_progress_of_each_stage(colour_bundle: Path, tmp_path: Path) -> None:
    """A detector's int8 export on full-size photos takes minutes: each stage is tracked, every
    item counted once."""
    import contextlib

    from lensforge.ui import Reporter

    class Recording(Reporter):
        def __init__(self) -> None:
            self.tracks: list[tuple[str, int, int]] = []

        @contextlib.contextmanager
        def track(self, description: str, total: int, *, unit: str = "img", every: float | None = None):  # type: ignore[override]
            done = [0]
            yield lambda n=1: done.__setitem__(0, done[0] + n)
            self.tracks.append((description, total, done[0]))

    ui = Recording()
    export_int8(colour_bundle, tmp_path / "int8", method="minmax", calib=13, reporter=ui)
    assert [t[0] for t in ui.tracks] == ["calibrating (minmax)", "checking: fp32", "checking: int8"]
    assert ui.tracks[0][1:] == (13, 13)
    assert all(total == done > 0 for _, total, done in ui.tracks)


def test_plan_keeps_the_stem_pool_float_and_still_finds_the_first_block(tmp_path: Path) -> None:
    """stem conv → relu → max-pool → conv: the pool joins the float stem, and the first-block
    candidate is still found past it (it looked for exactly one stem node)."""
    from types import SimpleNamespace

    from onnx import TensorProto, helper, numpy_helper

    from lensforge.export.quantize import _plan

    def w(name: str, cin: int) -> onnx.TensorProto:
        return numpy_helper.from_array(np.ones((4, cin, 3, 3), np.float32), name)

    graph = helper.make_graph(
        [helper.make_node("Conv", ["images", "w1"], ["a"], name="stem", pads=[1, 1, 1, 1]),
         helper.make_node("Relu", ["a"], ["b"], name="act"),
         helper.make_node("MaxPool", ["b"], ["c"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
         helper.make_node("Conv", ["c", "w2"], ["d"], name="block", pads=[1, 1, 1, 1]),
         helper.make_node("Conv", ["d", "w3"], ["y"], name="later", pads=[1, 1, 1, 1])],
        "g", [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 4, 4])], [w("w1", 3), w("w2", 4), w("w3", 4)])
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    plan = _plan(SimpleNamespace(task="classify"), path)  # type: ignore[arg-type]
    assert plan.float_nodes == ["stem", "pool"] and plan.first_block == ["block"]
