"""Attention maps of ViT / DINO classifiers: the last layer's CLS attention per head (the
picture of the DINO paper's "last attention maps") and attention rollout (Abnar & Zuidema,
2020, "Quantifying Attention Flow in Transformers").

timm's fused attention (``F.scaled_dot_product_attention``) never materialises the weights,
so the graph is traced with each block's ``attn.fused_attn`` set to False (the same
arithmetic, written out), and the weights are read with timm's own
:class:`timm.utils.AttentionExtract` (an fx graph that returns the ``attn.softmax`` nodes).
Tracing bakes the unfused branch into the graph: the classifier itself is left as it was.

:class:`AttentionGraph` is what a ViT bundle's ``explain.onnx`` holds (see
:data:`lensforge.runtime.explain.ATTENTION_OUTPUTS`):

    images (N, 3, S, S) → attention float32 (N, heads, h, w)  last layer, CLS query → patches
                          rollout   float32 (N, 1, h, w)      rollout through every layer, CLS → patches
                          scores    float32 (N, C)            as model.onnx
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lensforge.errors import ExportError
from lensforge.export.onnx import INPUT_NAME, OPSET
from lensforge.models.classifier import Classifier
from lensforge.runtime.explain import ATTENTION_METHODS, ATTENTION_OUTPUTS, EXPLAIN_FILE, normalise

log = logging.getLogger(__name__)

PARITY_BATCH = 4  # seeded random images the exported graph is checked on
MAX_MAP_DIFF = 1e-3  # normalised maps (in [0, 1]) that differ more than this are refused


def _attention_modules(backbone: nn.Module) -> list[nn.Module] | None:
    """The blocks' attention modules of a timm ViT (VisionTransformer and its relatives: DINO,
    DeiT, ViTs with registers), or None when ``backbone`` is not one: it must have patch
    embedding, prefix tokens, and blocks whose ``attn`` has timm's ``fused_attn`` switch."""
    blocks = getattr(backbone, "blocks", None)
    if not isinstance(blocks, nn.Sequential) or not len(blocks) or not hasattr(backbone, "patch_embed") \
            or not hasattr(backbone, "num_prefix_tokens"):
        return None
    attns = [getattr(b, "attn", None) for b in blocks]
    if not all(a is not None and hasattr(a, "fused_attn") for a in attns):
        return None
    return attns


def attention_supported(classifier: Classifier) -> bool:
    """Whether ``classifier``'s backbone is a timm ViT whose attention weights can be read."""
    return _attention_modules(classifier.backbone) is not None


@contextmanager
def unfused(backbone: nn.Module) -> Iterator[None]:
    """Every block's attention computed with explicit weights (softmax(q kᵀ / √d)) while inside;
    the previous setting afterwards (fused is faster, and the classifier may go on training)."""
    attns = _attention_modules(backbone) or []
    before = [a.fused_attn for a in attns]
    for a in attns:
        a.fused_attn = False
    try:
        yield
    finally:
        for a, f in zip(attns, before):
            a.fused_attn = f


class AttentionGraph(nn.Module):
    """images → (attention (N, heads, h, w), rollout (N, 1, h, w), scores (N, C)); see the module doc.

    The query row is the CLS token's; a ViT without one (global average pooling) uses the mean
    over all query tokens, i.e. the attention each patch receives on average."""

    def __init__(self, classifier: Classifier, multilabel: bool) -> None:
        from timm.utils import AttentionExtract

        super().__init__()
        classifier = classifier.eval()
        bb = classifier.backbone
        if _attention_modules(bb) is None:
            raise ValueError("AttentionGraph needs a timm ViT backbone")
        self.prefix = int(bb.num_prefix_tokens)
        self.has_cls = bool(getattr(bb, "cls_token", None) is not None)
        self.patch = tuple(int(p) for p in bb.patch_embed.patch_size)
        self.multilabel = multilabel
        with unfused(bb):
            from timm.models._features_fx import get_graph_node_names

            nodes = get_graph_node_names(classifier)[1]  # eval-mode node names
            self.attn_nodes = [n for n in nodes if n.startswith("backbone.") and n.endswith("attn.softmax")]
            self.logits_node = nodes[-1]  # the classifier's output (its head's last layer)
            if len(self.attn_nodes) != len(bb.blocks):
                raise ValueError(f"found {len(self.attn_nodes)} attention softmaxes for {len(bb.blocks)} blocks")
            self.extract = AttentionExtract(classifier, names=[*self.attn_nodes, self.logits_node], method="fx")

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out = self.extract(images)
        attns = [out[n] for n in self.attn_nodes]  # each (N, heads, T, T), rows sum to 1
        logits = out[self.logits_node]
        h, w = images.shape[2] // self.patch[0], images.shape[3] // self.patch[1]
        last = attns[-1]
        rows = last[:, :, 0] if self.has_cls else last.mean(2)  # (N, heads, T): what the CLS query attends to
        attention = rows[:, :, self.prefix:].reshape(last.shape[0], last.shape[1], h, w)
        # rollout: heads averaged, the residual connection as identity, rows renormalised, multiplied
        # from the first layer up: R = Â_L ··· Â_1 (Abnar & Zuidema 2020, eq. for joint attention)
        eye = torch.eye(last.shape[-1], dtype=last.dtype, device=last.device)
        rollout = None
        for a in attns:
            a = a.mean(1) + eye
            a = a / a.sum(-1, keepdim=True)
            rollout = a if rollout is None else a @ rollout
        assert rollout is not None
        rolled = rollout[:, 0] if self.has_cls else rollout.mean(1)
        rolled = rolled[:, self.prefix:].reshape(last.shape[0], 1, h, w)
        scores = torch.sigmoid(logits) if self.multilabel else torch.softmax(logits, dim=-1)
        return attention, rolled, scores


def export_attention(classifier: Classifier, multilabel: bool, size: int, path: Path) -> dict[str, Any]:
    """Write the ViT explain graph to ``path`` (input side ``size``), checked against torch;
    returns the bundle's ``explain`` entry. Raises ExportError when ONNX disagrees."""
    try:
        graph = AttentionGraph(classifier, multilabel).eval().float()
    except Exception as e:  # an fx trace that fails: say so, the bundle goes on without the graph
        raise ExportError(f"could not trace the ViT's attention: {type(e).__name__}: {str(e).splitlines()[0][:300]}") from e
    images = torch.randn(PARITY_BATCH, 3, size, size, generator=torch.Generator().manual_seed(0))
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # exporter and tracer notices
            torch.onnx.export(graph, (images[:1],), str(path), input_names=[INPUT_NAME],
                              output_names=list(ATTENTION_OUTPUTS), opset_version=OPSET, dynamo=False,
                              dynamic_axes={INPUT_NAME: {0: "batch"}, **{o: {0: "batch"} for o in ATTENTION_OUTPUTS}})
    except Exception as e:
        raise ExportError(f"ONNX export of the attention graph failed: {type(e).__name__}: "
                          f"{str(e).splitlines()[0][:300]}") from e
    diff = attention_parity(graph, path, images)
    return {"file": EXPLAIN_FILE, "method": ATTENTION_METHODS[0], "methods": list(ATTENTION_METHODS),
            "outputs": list(ATTENTION_OUTPUTS),
            "parity": {**diff, "images": PARITY_BATCH, "compared": "seeded random images, ONNX Runtime vs torch fp32"}}


def attention_parity(graph: AttentionGraph, path: Path, images: torch.Tensor) -> dict[str, float]:
    """Max abs differences ONNX vs torch of the raw attention, the rollout, the normalised maps
    (every head's, the head mean and the rollout) and the scores."""
    import onnxruntime as ort

    with torch.no_grad():
        ref = [t.numpy() for t in graph(images)]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(list(ATTENTION_OUTPUTS), {INPUT_NAME: images.numpy()})
    for name, a, b in zip(ATTENTION_OUTPUTS, got, ref):
        if a.shape != b.shape:
            raise ExportError(f"attention graph: ONNX {name} {a.shape} differs in shape from torch {b.shape}")

    def maps(att: np.ndarray, roll: np.ndarray) -> list[np.ndarray]:
        return [normalise(m) for m in (*att.reshape(-1, *att.shape[2:]), *att.mean(1), *roll[:, 0])]

    worst = max(float(np.abs(a - b).max()) for a, b in zip(maps(got[0], got[1]), maps(ref[0], ref[1])))
    diff = {"max_abs_diff_attention": float(np.abs(got[0] - ref[0]).max()),
            "max_abs_diff_rollout": float(np.abs(got[1] - ref[1]).max()),
            "max_abs_diff_maps": worst, "max_abs_diff_scores": float(np.abs(got[2] - ref[2]).max())}
    if not np.isfinite(worst) or worst > MAX_MAP_DIFF:
        raise ExportError(f"the attention graph disagrees with torch: normalised maps differ by {worst:.3g} > {MAX_MAP_DIFF}")
    return diff
