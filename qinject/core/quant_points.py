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

from collections.abc import Callable, Mapping
from typing import TypeVar

import onnx_ir as ir

from qinject.core import op_facts
from qinject.core.ir import ACT_STATS, quantizable_nodes, subgraph_quantizable_nodes
from qinject.core.numerics import QType
from qinject.core.stats import expected_sqnr_db, select_range

K = TypeVar("K")

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
    for node in model.graph:  # a join another join reads needs its own range (integer_joins)
        if _joins(node) and not (out := output_point(node)).is_graph_output():
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
    if producer is None or not any(value is v for v in op_facts.carried(producer)):
        return None
    return producer.inputs[0]


def integer_joins(graph: ir.Graph, held: Mapping[str, K], read_quantized: Callable[[ir.Value], bool]
                  ) -> dict[str, K]:
    """The joins (``op_facts.joins_integers``: Concat, residual Add, Mul of two activations) that run
    on integers, by name, each with the key (width, or type) its inputs and output are held at.

    ``held``: the tensors held quantized before any join, each at its key. A join runs on integers
    when every non-constant input is held at one key (directly; through range-preserving ops; made
    by a lookup op from a held tensor, SiLU's Sigmoid; or as the output of another join that runs
    on integers) and its output point is read quantized (``read_quantized``, or another such join
    reads it). Joins chain: in a YOLO block a SiLU's Mul feeds a Split, a residual Add and a Concat,
    and each runs on integers only if the others do. So this is the largest such set: every join
    is a candidate, and those that fail are dropped until none does.
    """
    alive = {n.name: n for n in graph if _joins(n) and not output_point(n).is_graph_output()}
    while True:
        by_output = {output_point(n).name: n for n in alive.values()}
        keys: dict[str, K | None] = {}

        def key_of(value: ir.Value) -> K | None:
            if value.name not in keys:
                keys[value.name] = None  # a cycle (none in a valid graph) holds nothing
                keys[value.name] = _key_of(value)
            return keys[value.name]

        def _key_of(value: ir.Value) -> K | None:
            if value.name in held:
                return held[value.name]
            if value.name in by_output:
                return join_key(by_output[value.name])
            source = range_source(value)
            if source is None:
                source = op_facts.looked_up_from(value)
            return None if source is None else key_of(source)

        def join_key(node: ir.Node) -> K | None:
            found = {key_of(v) for v in node.inputs if v is not None and v.const_value is None}
            out = held.get(output_point(node).name)
            if len(found) != 1 or None in found or (out is not None and found != {out}):
                return None
            return found.pop()

        reads: dict[str, bool] = {}

        def read(value: ir.Value) -> bool:
            if value.name not in reads:
                reads[value.name] = read_quantized(value) or any(
                    use.node.name in alive or (use.idx == 0 and any(read(v) for v in op_facts.carried(use.node)))
                    for use in value.uses())
            return reads[value.name]

        failed = [name for name, n in alive.items() if join_key(n) is None or not read(output_point(n))]
        if not failed:
            return {name: join_key(n) for name, n in alive.items()}
        for name in failed:
            del alive[name]


def _joins(node: ir.Node) -> bool:
    return node.domain in ("", "ai.onnx") and op_facts.joins_integers(node)


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
