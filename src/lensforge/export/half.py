"""fp16 for part of a graph: a detector's backbone + FPN, with casts at the border.

onnxruntime's float16 converter retypes a whole graph; on a Faster R-CNN it also retyped the
outer-scope inputs of the box-decoding If subgraphs while their nodes stayed float32, and ORT
refused the model (type mismatch in If/Add), even with every node outside the backbone on its
block list. Here only the chosen nodes change: their float32 weights become float16 copies,
each float32 tensor they read from outside gets one Cast to float16 before its first reader,
and each tensor they hand to the rest of the graph is cast back to float32 under its old name,
so nothing outside the island (subgraphs included) sees a type change.
"""

from __future__ import annotations

from typing import Any

import numpy as np

# ops whose float16 kernels ORT has on CPU and CUDA and that a backbone + FPN is made of
HALF_OPS = {"Conv", "Relu", "Clip", "Add", "Mul", "MaxPool", "AveragePool", "Resize", "Sigmoid", "HardSigmoid",
            "HardSwish"}
_FLOAT = 1  # onnx.TensorProto.FLOAT
_HALF = 10  # onnx.TensorProto.FLOAT16


def half_island(model: Any, island: set[str]) -> Any:
    """``model`` (an onnx ModelProto, changed in place and returned) with the nodes named in
    ``island`` computing in float16. Resize keeps its float32 roi/scales inputs (their type is
    separate from the image's in ONNX)."""
    import onnx
    from onnx import helper, numpy_helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    nodes = list(graph.node)
    inside = {o for n in nodes if n.name in island for o in n.output}
    types = _float_types(model)
    outside_readers = _names_read_outside(graph, island)

    # float32 tensor → its float16 twin: an input's (a weight copy or a Cast), or, for an island
    # tensor read outside, the island's own (renamed, and cast back under the old name)
    half_of: dict[str, str] = {}
    order: list[Any] = []
    for n in nodes:
        if n.name not in island:
            order.append(n)
            continue
        for k, name in enumerate(n.input):
            if not name or (n.op_type == "Resize" and k > 0):
                continue
            if name not in half_of:
                if name in inside:
                    continue
                if name in inits and inits[name].data_type == _FLOAT:
                    graph.initializer.append(numpy_helper.from_array(
                        numpy_helper.to_array(inits[name]).astype(np.float16), f"{name}__fp16"))
                elif name not in inits and types.get(name) == _FLOAT:
                    order.append(helper.make_node("Cast", [name], [f"{name}__fp16"], to=_HALF, name=f"{name}__to_fp16"))
                else:
                    continue
                half_of[name] = f"{name}__fp16"
            n.input[k] = half_of[name]
        order.append(n)
        for k, out in enumerate(n.output):
            if out in outside_readers:  # back to float32 under the old name, right after it is made
                half_of[out] = n.output[k] = f"{out}__fp16"
                order.append(helper.make_node("Cast", [half_of[out]], [out], to=_FLOAT, name=f"{out}__to_fp32"))
    del graph.node[:]
    graph.node.extend(order)
    # shape inference recorded the island's tensors as float32: drop those stale entries
    stale = [v for v in graph.value_info if v.name in inside]
    for v in stale:
        graph.value_info.remove(v)
    onnx.checker.check_model(model)
    return model


def _float_types(model: Any) -> dict[str, int]:
    """Element type of each tensor where known: inputs, initializers, Constant outputs and
    what onnx shape inference finds (it does not see into every detector op)."""
    import onnx

    types: dict[str, int] = {}
    try:
        inferred = onnx.shape_inference.infer_shapes(model).graph
        for v in list(inferred.value_info) + list(inferred.input) + list(inferred.output):
            types[v.name] = v.type.tensor_type.elem_type
    except Exception:  # noqa: BLE001 - inference is a help, the Constant rule below still applies
        pass
    for n in model.graph.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    types[n.output[0]] = a.t.data_type
    return types


def _names_read_outside(graph: Any, island: set[str]) -> set[str]:
    """Tensor names read by nodes outside ``island`` (If/Loop subgraphs included: they read
    outer-scope tensors by name) or returned by the graph."""
    names = {o.name for o in graph.output}

    def walk(g: Any, top: bool) -> None:
        for n in g.node:
            if not top or n.name not in island:
                names.update(n.input)
            for a in n.attribute:
                for sub in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                    walk(sub, False)

    walk(graph, True)
    return names
