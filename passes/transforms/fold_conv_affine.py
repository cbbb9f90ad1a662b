"""Fold a per-channel affine that follows a Conv into the Conv's weight and bias.

Inference-mode BatchNormalization, and Mul / Add by a per-channel constant (the "scale layer" of
Caffe2-converted nets such as Inception v2 and DenseNet). Quantizing the folded weight is what the
deployed integer kernel computes; an affine left between a Conv and its ReLU would stay in float
between a dequantize and a requantize, and block onnxruntime's QLinearConv fusion.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from qinject.passes.transforms.fold_constants import fold_value

from qinject.core import ir as qir
from qinject.core.pass_manager import Pass, PassResult


class FoldConvAffine(Pass):
    """Conv -> BatchNormalization | Mul(c) | Add(c), c constant per output channel, becomes one Conv."""

    name = "fold-conv-affine"

    def call(self, model: ir.Model) -> PassResult:
        graph = model.graph
        opset = model.opset_imports.get("", 1)
        folded = 0
        for node in list(graph):
            if node.op_type not in ("BatchNormalization", "Mul", "Add") or node.domain not in ("", "ai.onnx"):
                continue
            found = _conv_and_affine(graph, node, opset)
            if found is None:
                continue
            conv, scale, shift = found
            weight = conv.inputs[1].const_value.numpy().astype(np.float64)
            channels = weight.shape[0]
            bias = (conv.inputs[2].const_value.numpy().astype(np.float64)
                    if len(conv.inputs) > 2 and conv.inputs[2] is not None else np.zeros(channels))
            new_w = weight * scale.reshape(-1, *([1] * (weight.ndim - 1)))
            w_val = qir.add_initializer(graph, f"{conv.inputs[1].name}_folded", new_w.astype(np.float32))
            b_val = qir.add_initializer(graph, f"{conv.name}_bias_folded", (bias * scale + shift).astype(np.float32))
            conv.replace_input_with(1, w_val)
            if len(conv.inputs) < 3:
                conv.resize_inputs(3)
            conv.replace_input_with(2, b_val)
            node.outputs[0].replace_all_uses_with(conv.outputs[0], replace_graph_outputs=True)
            out_name = node.outputs[0].name
            graph.remove(node, safe=True)
            conv.outputs[0].name = out_name  # keep the tensor name users and references know
            folded += 1
        qir.drop_unused_initializers(graph)
        return PassResult(model, folded > 0)


def _conv_and_affine(graph: ir.Graph, node: ir.Node, opset: int
                     ) -> tuple[ir.Node, np.ndarray, np.ndarray] | None:
    """The Conv feeding ``node`` and the per-channel scale and shift of ``node``, if foldable."""
    conv_input = next((i for i, v in enumerate(node.inputs[:2]) if v is not None and v.producer() is not None
                       and v.producer().op_type == "Conv"), None)
    if conv_input is None or (node.op_type == "BatchNormalization" and conv_input != 0):
        return None
    conv = node.inputs[conv_input].producer()
    if conv.graph is not graph or len(conv.outputs[0].uses()) != 1 or conv.outputs[0].is_graph_output():
        return None
    if conv.inputs[1] is None or conv.inputs[1].const_value is None:
        return None
    if len(conv.inputs) > 2 and conv.inputs[2] is not None and conv.inputs[2].const_value is None:
        return None
    if any(o.uses() for o in node.outputs[1:]):
        return None  # training-mode BatchNormalization outputs are used
    channels = conv.inputs[1].shape[0]
    for i, v in enumerate(node.inputs):
        if i != conv_input and v is not None:
            fold_value(graph, v, opset)
    params = [v for i, v in enumerate(node.inputs) if i != conv_input]  # re-read: folding replaced them
    if any(v is None or v.const_value is None for v in params):
        return None
    arrays = [v.const_value.numpy().astype(np.float64) for v in params]
    if node.op_type == "BatchNormalization":
        gamma, beta, mean, var = arrays
        eps_attr = node.attributes.get("epsilon")
        factor = gamma / np.sqrt(var + (1e-5 if eps_attr is None else float(eps_attr.value)))
        return conv, factor, beta - mean * factor
    per_channel = _per_channel(arrays[0], channels, len(conv.inputs[1].shape))
    if per_channel is None:
        return None
    if node.op_type == "Mul":
        return conv, per_channel, np.zeros(channels)
    return conv, np.ones(channels), per_channel


def _per_channel(c: np.ndarray, channels: int, rank: int) -> np.ndarray | None:
    """``c`` as a vector over output channels, if it broadcasts against [N, C, spatial...] that way."""
    if c.ndim > rank:
        return None
    shape = (1,) * (rank - c.ndim) + c.shape
    if all(d == 1 for d in shape):
        return np.full(channels, float(c.reshape(-1)[0]))
    if shape[1] == channels and all(d == 1 for i, d in enumerate(shape) if i != 1):
        return c.reshape(channels)
    return None
