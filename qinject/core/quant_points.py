"""Where activations are quantized: the tensors that get a QuantizeLinear/DequantizeLinear pair.

Shared by calibration (which collects statistics for exactly these tensors) and by the Q/DQ
rewrite (which quantizes them), so the two never disagree.

For each quantizable node: its activation inputs, and its *output point*: the output itself, or the
output of its output stage: the chain of single consumers the op facts call an epilogue (a ReLU; in
jax graphs also the bias add, which jax writes as a separate ``add``). Quantizing after the ReLU with
zero point at the bottom of the code range lets onnxruntime drop the ReLU (ReluQuantFusion) and fuse
DequantizeLinear -> Conv -> QuantizeLinear into one integer kernel (QLinearConv).
"""

from __future__ import annotations

import onnx_ir as ir

from qinject.core import op_facts
from qinject.core.ir import ACT_STATS, quantizable_nodes, subgraph_quantizable_nodes
from qinject.core.numerics import QType
from qinject.core.stats import expected_sqnr_db, select_range

# Below this predicted SQNR an optional output quantization is skipped (see output_sqnr_db).
OUTPUT_MIN_SQNR_DB = 30.0


def output_point(node: ir.Node) -> ir.Value:
    out = node.outputs[0]
    while True:
        uses = out.uses()
        if len(uses) != 1 or out.is_graph_output():
            return out
        consumer = uses[0].node
        if consumer.graph is not node.graph or not op_facts.is_epilogue(consumer):
            return out
        out = consumer.outputs[0]


def activation_points(model: ir.Model) -> list[ir.Value]:
    """Every tensor the Q/DQ rewrite may quantize as an activation, in a stable order."""
    seen: dict[str, ir.Value] = {}
    for node in quantizable_nodes(model):
        _add_inputs(node, seen)
        out = output_point(node)
        if not out.is_graph_output():
            seen.setdefault(out.name, out)
    return list(seen.values())


def subgraph_activation_points(model: ir.Model) -> list[ir.Value]:
    """The activation inputs of quantizable nodes inside control-flow bodies (their outputs stay
    float: no integer kernel consumes them there), in a stable order."""
    seen: dict[str, ir.Value] = {}
    for node in subgraph_quantizable_nodes(model):
        _add_inputs(node, seen)
    return list(seen.values())


def _add_inputs(node: ir.Node, seen: dict[str, ir.Value]) -> None:
    for i in op_facts.activation_inputs(node):
        seen.setdefault(node.inputs[i].name, node.inputs[i])


def range_source(value: ir.Value) -> ir.Value | None:
    """The tensor upstream of ``value`` through range-preserving ops (MaxPool, Reshape, ...), if any.

    A Q/DQ on ``value`` may reuse that tensor's scale and zero point: onnxruntime then runs the ops
    in between on integers (or drops them) instead of dequantizing and requantizing.
    """
    producer = value.producer()
    if producer is None or not op_facts.fact(producer).range_preserving or value is not producer.outputs[0]:
        return None
    return producer.inputs[0]


def output_sqnr_db(value: ir.Value, qtype: QType, symmetric: bool, method: str = "minmax",
                   percentile: float = 99.99) -> float | None:
    """The SQNR calibration predicts for quantizing ``value`` (None: it was not observed). An output
    quantized only to reach an integer kernel (Conv's QLinearConv) is left float below
    ``OUTPUT_MIN_SQNR_DB``: a heavy-tailed output would cost more accuracy than the kernel saves, and
    the node then runs in float on dequantized inputs (the rewrite decides; the cost model prices it)."""
    stats = value.meta.get(ACT_STATS)
    if stats is None:
        return None
    lo, hi = select_range(stats, method, qtype, symmetric, percentile)
    return expected_sqnr_db(stats, lo, hi, qtype, symmetric)
