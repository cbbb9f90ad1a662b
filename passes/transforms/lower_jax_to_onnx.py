"""Lower jax-domain nodes (jaxpr equations) to standard ONNX, so a JAX model runs in onnxruntime.

Each primitive has one small rule in ``RULES`` (registered with ``@lowering`` beside it). A rule
receives the jax node and an ``Emitter`` and returns the values that replace the node's outputs;
the pass then hands those values the old outputs' names, shapes, dtypes and ``meta`` (calibration
statistics survive), names the main new node exactly like the jax node (``fc1`` stays ``fc1``, so
a plan addresses the same layers before and after), and helpers ``fc1/Transpose`` and so on.

Forms chosen so that onnxruntime quantizes and fuses what InsertQDQ marked:
- ``dot_general`` becomes ``MatMul(x, W)`` with W laid out ``[..., K, N]``; a constant weight (or
  the integer initializer behind its DequantizeLinear, with ``axis`` remapped) is re-laid out
  itself, so no Transpose sits between a weight and its MatMul. A constant left operand (``W @ x``)
  is computed as ``(x' @ W')'`` so the weight stays the MatMul's input 1, as op_facts expects.
- ``conv_general_dilated`` becomes ``Conv`` (or ``ConvTranspose`` for ``lhs_dilation``), with the
  activation transposed to channel-first and the weight to OIHW where the layout needs it.
- In a float graph, a constant ``add`` that is the only reader of a 2-D dot or a convolution and
  varies along its output channels only is folded in as the Gemm/Conv bias. Quantized graphs keep
  the Add: InsertQDQ decided their bias handling, and a float bias beside quantized inputs would be
  quantized by onnxruntime itself (see ``insert_qdq``).

Before changing anything the pass finds every primitive without a rule, and every node a rule
refuses (its ``check`` says why), and raises one error listing them. Small all-constant equations
(a broadcast bias, ``iota``) are evaluated into initializers first.
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import ShapeInferencePass
from qinject.passes.transforms import _jax_to_onnx_rules  # noqa: F401  (importing it fills RULES)
from qinject.passes.transforms._jax_lowering import (
    JAX,
    RULES,
    Emitter,
    _const,
    _shape,
)

from qinject.core import ir as qir
from qinject.core import op_facts
from qinject.core.errors import UnsupportedModelError
from qinject.core.pass_manager import Pass, PassResult

# All-constant equations whose result has at most this many elements are evaluated at lowering
# time; larger ones (a broadcast of a scalar to a big activation shape) stay as ONNX ops.
FOLD_LIMIT = 1 << 16

class LowerJaxToOnnx(Pass):
    """Replace every jax-domain node by standard ONNX (default domain, opset 21) in place.

    Raises:
        UnsupportedModelError: listing every primitive without a rule (with counts) and every node
            a rule refuses, before the model is changed.
    """

    name = "lower-jax-to-onnx"

    def call(self, model: ir.Model) -> PassResult:
        if not qir.has_jax_nodes(model):
            return PassResult(model, False)
        graph = model.graph
        foldable = _foldable(graph)
        _refuse_unsupported(graph, foldable)
        state = _Lowering(graph)
        for node in [n for n in graph if n in foldable]:  # first, so rules see the constants
            state.fold(node)
        for node in list(graph):
            if node.graph is None or node.domain != JAX:  # absorbed by an earlier rule, or ONNX
                continue
            if not any(v.uses() or v.is_graph_output() for v in node.outputs):
                graph.remove(node, safe=True)
            else:
                state.lower(node)
        _remove_dead_nodes(graph)
        qir.drop_unused_initializers(graph)
        model.opset_imports.pop(JAX, None)
        model.opset_imports[""] = max(model.opset_imports.get("", 0), 21)
        ShapeInferencePass(strict_mode=False)(model)  # types of the helper values, for later passes
        return PassResult(model, True)


# -- the pass's machinery ---------------------------------------------------------------------------
def _foldable(graph: ir.Graph) -> set[ir.Node]:
    """jax nodes whose inputs are all constant (or computed from constants) and whose result is small."""
    constant: set[int] = set()
    nodes = set()
    for node in graph:
        if node.domain != JAX or any(v.is_graph_output() for v in node.outputs):
            continue
        if all(_const(v) is not None or id(v) in constant for v in node.inputs) and (
                node.op_type == "iota" or sum(math.prod(_shape(v)) for v in node.outputs) <= FOLD_LIMIT):
            nodes.add(node)
            constant.update(id(v) for v in node.outputs)
    return nodes


def _refuse_unsupported(graph: ir.Graph, foldable: set[ir.Node]) -> None:
    missing: Counter[str] = Counter()
    refused: list[str] = []
    for node in graph:
        if node.domain != JAX or node in foldable:
            continue
        rule = RULES.get(node.op_type)
        if rule is None:
            missing[node.op_type] += 1
        elif rule.check is not None and (why := rule.check(node)) is not None:
            refused.append(f"node {node.name!r} ({node.op_type}): {why}")
    if missing or refused:
        parts = []
        if missing:
            listed = ", ".join(f"{p} (x{n})" for p, n in sorted(missing.items()))
            parts.append(f"no ONNX lowering for primitive(s) {listed}")
        parts.extend(refused)
        raise UnsupportedModelError(f"cannot export to ONNX: {'; '.join(parts)}; rewrite those parts of the "
                                    "function with supported jax.numpy/lax operations")


def _remove_dead_nodes(graph: ir.Graph) -> None:
    """Drop nodes nothing reads any more: the producers of a folded-in bias, a DequantizeLinear
    whose integer weight was re-laid out. Reverse order removes whole dead chains in one sweep."""
    for node in reversed(list(graph)):
        if not any(v.uses() or v.is_graph_output() for v in node.outputs):
            graph.remove(node, safe=True)


class _Lowering:
    """State shared by the rules of one run: unique names, re-laid-out constants."""

    def __init__(self, graph: ir.Graph) -> None:
        self.graph = graph
        self.node_names = {n.name for n in graph}
        self.value_names = {v.name for v in graph.inputs} | set(graph.initializers) | {
            v.name for n in graph for v in n.outputs}
        self.relaid: dict[tuple, ir.Value] = {}

    def unique(self, base: str, taken: set[str]) -> str:
        name, i = base, 1
        while name in taken:
            name, i = f"{base}_{i}", i + 1
        taken.add(name)
        return name

    def const(self, name: str, array: np.ndarray) -> ir.Value:
        return qir.add_initializer(self.graph, self.unique(name, self.value_names), np.asarray(array))

    def fold(self, node: ir.Node) -> None:
        eqn = node.meta[op_facts.JAX_EQN]
        outs = eqn.primitive.bind(*[_const(v) for v in node.inputs], **eqn.params)
        for old, array in zip(node.outputs, outs if eqn.primitive.multiple_results else [outs]):
            name = old.name
            old.name = self.unique(f"{name}__folded", self.value_names)
            array = np.asarray(array, dtype=old.dtype.numpy()).reshape(_shape(old))
            new = qir.add_initializer(self.graph, name, array)
            new.meta.update(old.meta)
            old.replace_all_uses_with(new)
        self.graph.remove(node, safe=True)

    def lower(self, node: ir.Node) -> None:
        e = Emitter(self, node)
        result = RULES[node.op_type].lower(node, e)
        outs = [result] if isinstance(result, ir.Value) else list(result)
        target = e.absorbed or node
        if len(outs) != len(target.outputs):
            raise AssertionError(f"the {node.op_type} rule returned {len(outs)} values for {len(target.outputs)}")
        for i, (old, new) in enumerate(zip(target.outputs, outs)):
            if new.producer() not in e.nodes and old.is_graph_output():
                outs[i] = e.op("Identity", [new])  # a graph output needs a node of its own
        self.graph.insert_before(node, e.nodes)
        for old, new in zip(target.outputs, outs):
            if new.producer() not in e.nodes:
                old.replace_all_uses_with(new)  # a pass-through (stop_gradient, copy) or a constant
                continue
            name = old.name
            old.name = f"{name}__lowered"
            new.name = name
            if new.shape is None:
                new.shape = old.shape
            new.type = old.type
            new.meta.update(old.meta)
            old.replace_all_uses_with(new, replace_graph_outputs=True)
        if e.absorbed is not None:
            self.graph.remove(e.absorbed, safe=True)
        self.graph.remove(node, safe=True)
        main = e.main or next((n for n in e.nodes if outs[0].producer() is n), None)
        if main is not None:
            main.name = node.name


