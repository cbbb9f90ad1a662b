"""Fold constant subgraphs that compute a weight or bias into initializers, so they can be quantized.

Old exporters and the light model zoo produce weights as ``ConstantOfShape``, ``Constant``,
``Identity`` of an initializer, a ``Cast`` or ``Reshape`` of one, and so on. Only the chains that
feed a quantizable node's weight or bias are folded: folding every constant in the graph could
materialise large tensors nobody quantizes.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from onnx.reference import ReferenceEvaluator

from qinject.core import ir as qir
from qinject.core import op_facts
from qinject.core.pass_manager import Pass, PassResult

FOLDABLE = frozenset({
    "Constant", "ConstantOfShape", "Identity", "Cast", "Reshape", "Transpose", "Squeeze", "Unsqueeze",
    "Flatten", "Concat", "Slice", "Gather", "Mul", "Add", "Sub", "Div", "Neg", "Sqrt", "Reciprocal",
})


class FoldConstants(Pass):
    """Replace constant chains feeding quantizable weights/biases by initializers."""

    name = "fold-constants"

    def call(self, model: ir.Model) -> PassResult:
        graph = model.graph
        opset = model.opset_imports.get("", 1)
        folded = 0
        for node in list(graph):
            f = op_facts.fact(node)
            if not f.quantizable:
                continue
            for idx in (op_facts.weight_index(node), f.bias_input, *(f.weight_inputs or ())):  # LSTM's R too
                if idx is not None and idx < len(node.inputs) and node.inputs[idx] is not None:
                    folded += fold_value(graph, node.inputs[idx], opset)
        return PassResult(model, folded > 0)


def fold_value(graph: ir.Graph, value: ir.Value, opset: int) -> int:
    """Fold ``value``'s producer chain into initializers; returns how many nodes were folded.

    A chain that is not entirely constant is left alone, constant parts included: an activation
    MatMul's "weight" chain runs through shape arithmetic (Shape -> Gather -> Concat -> Reshape) that
    must stay exactly as exported."""
    if value.const_value is not None or not _constant_chain(graph, value):
        return 0
    producer = value.producer()
    count = sum(fold_value(graph, inp, opset) for inp in producer.inputs if inp is not None)
    outputs = _evaluate(producer, opset)
    for old, array in zip(producer.outputs, outputs):
        if not old.uses() and not old.is_graph_output():
            continue
        name = old.name
        old.name = f"{name}__before_fold"
        # np.require, not np.ascontiguousarray: that one turns a 0-d index into shape [1]
        new = qir.add_initializer(graph, name, np.require(array, requirements="C"))
        old.replace_all_uses_with(new, replace_graph_outputs=True)
    graph.remove(producer, safe=True)
    return count + 1


def _constant_chain(graph: ir.Graph, value: ir.Value) -> bool:
    """Whether ``value`` is computed from constants alone by foldable ops of ``graph``."""
    if value.const_value is not None:
        return not value.is_graph_input()
    producer = value.producer()
    if producer is None or producer.domain not in ("", "ai.onnx") or producer.op_type not in FOLDABLE:
        return False
    return producer.graph is graph and all(inp is None or _constant_chain(graph, inp) for inp in producer.inputs)


def _evaluate(node: ir.Node, opset: int) -> list[np.ndarray]:
    inputs = [None if v is None else v.const_value.numpy() for v in node.inputs]
    if node.op_type == "ConstantOfShape":
        # The reference evaluator is slow on the 100M-element weights of the light model zoo.
        attr = node.attributes.get("value")
        fill = attr.value.numpy().reshape(-1) if attr is not None else np.zeros(1, np.float32)
        return [np.full(tuple(int(d) for d in inputs[0]), fill[0], dtype=fill.dtype)]
    proto = ir.serde.serialize_node(node)
    # Wrapped in a one-node model so the evaluator picks the op version of the model's opset.
    graph = onnx.helper.make_graph(
        [proto], "fold", [onnx.helper.make_tensor_value_info(n, onnx.TensorProto.UNDEFINED, None)
                          for n in proto.input if n],
        [onnx.helper.make_tensor_value_info(n, onnx.TensorProto.UNDEFINED, None) for n in proto.output])
    evaluator = ReferenceEvaluator(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)]))
    feeds = {n: a for n, a in zip(proto.input, inputs) if n}
    return [np.asarray(a) for a in evaluator.run(None, feeds)]
