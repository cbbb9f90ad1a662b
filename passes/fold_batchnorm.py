"""Fold an inference-mode BatchNormalization into the Conv that feeds it.

Quantizing the folded weight is what the deployed integer kernel computes; quantizing the Conv and
then applying BatchNormalization in float would leave the BN outside the integer chain and block
onnxruntime's QLinearConv fusion.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qinject import ir as qir
from qinject.pass_manager import Pass, PassResult


class FoldBatchNorm(Pass):
    """Conv -> BatchNormalization (constant parameters, Conv output used only by it) becomes one Conv."""

    name = "fold-batchnorm"

    def call(self, model: ir.Model) -> PassResult:
        graph = model.graph
        folded = 0
        for bn in list(graph):
            if bn.op_type != "BatchNormalization" or bn.domain not in ("", "ai.onnx"):
                continue
            conv = bn.inputs[0].producer() if bn.inputs[0] is not None else None
            if not _foldable(conv, bn):
                continue
            scale, beta, mean, var = (bn.inputs[i].const_value.numpy().astype(np.float64) for i in range(1, 5))
            eps_attr = bn.attributes.get("epsilon")
            eps = 1e-5 if eps_attr is None else float(eps_attr.value)
            factor = scale / np.sqrt(var + eps)
            weight = conv.inputs[1].const_value.numpy().astype(np.float64)
            bias = (conv.inputs[2].const_value.numpy().astype(np.float64)
                    if len(conv.inputs) > 2 and conv.inputs[2] is not None else np.zeros_like(mean))
            new_w = (weight * factor.reshape(-1, *([1] * (weight.ndim - 1)))).astype(np.float32)
            new_b = ((bias - mean) * factor + beta).astype(np.float32)
            w_val = qir.add_initializer(graph, f"{conv.inputs[1].name}_bnfolded", new_w)
            b_val = qir.add_initializer(graph, f"{conv.name or conv.outputs[0].name}_bias_bnfolded", new_b)
            conv.replace_input_with(1, w_val)
            if len(conv.inputs) > 2:
                conv.replace_input_with(2, b_val)
            else:
                conv.resize_inputs(3)
                conv.replace_input_with(2, b_val)
            bn.outputs[0].replace_all_uses_with(conv.outputs[0], replace_graph_outputs=True)
            out_name = bn.outputs[0].name
            graph.remove(bn, safe=True)
            conv.outputs[0].name = out_name  # keep the tensor name users and references know
            folded += 1
        qir.drop_unused_initializers(graph)
        return PassResult(model, folded > 0)


def _foldable(conv: ir.Node | None, bn: ir.Node) -> bool:
    if conv is None or conv.op_type != "Conv" or conv.graph is not bn.graph:
        return False
    if len(bn.outputs) > 1 and any(o.uses() for o in bn.outputs[1:]):
        return False  # training-mode outputs are used
    if len(conv.outputs[0].uses()) != 1 or conv.outputs[0].is_graph_output():
        return False
    params = [bn.inputs[i] for i in range(1, 5)]
    weight_const = conv.inputs[1] is not None and conv.inputs[1].const_value is not None
    bias_ok = len(conv.inputs) < 3 or conv.inputs[2] is None or conv.inputs[2].const_value is not None
    return weight_const and bias_ok and all(p is not None and p.const_value is not None for p in params)

