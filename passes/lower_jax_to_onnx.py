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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import ShapeInferencePass

from qinject import ir as qir
from qinject import op_facts
from qinject.errors import UnsupportedModelError
from qinject.pass_manager import Pass, PassResult

JAX = op_facts.JAX
# All-constant equations whose result has at most this many elements are evaluated at lowering
# time; larger ones (a broadcast of a scalar to a big activation shape) stay as ONNX ops.
FOLD_LIMIT = 1 << 16

Lowered = ir.Value | Sequence[ir.Value]


@dataclass(frozen=True)
class Rule:
    """How one primitive becomes ONNX: ``lower(node, emitter)`` returns the replacement outputs;
    ``check(node)`` returns why this node cannot be lowered, or None."""

    lower: Callable[[ir.Node, Emitter], Lowered]
    check: Callable[[ir.Node], str | None] | None = None


RULES: dict[str, Rule] = {}


def lowering(*primitives: str, check: Callable[[ir.Node], str | None] | None = None) -> Callable:
    """Register the decorated function as the rule of ``primitives``."""
    def register(fn: Callable[[ir.Node, Emitter], Lowered]) -> Callable:
        for prim in primitives:
            RULES[prim] = Rule(fn, check)
        return fn
    return register


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


class Emitter:
    """Builds the ONNX nodes that replace one jax node (inserted before it, in emission order)."""

    def __init__(self, state: _Lowering, node: ir.Node) -> None:
        self.state, self.node = state, node
        self.nodes: list[ir.Node] = []
        self.main: ir.Node | None = None
        self.absorbed: ir.Node | None = None

    @property
    def params(self) -> dict[str, Any]:
        return op_facts.jax_params(self.node)

    def op(self, op_type: str, inputs: Sequence[ir.Value | None], attrs: dict | None = None, *,
           main: bool = False, num_outputs: int = 1, name: str | None = None) -> Any:
        """Emit one ONNX node; returns its output (or outputs, when ``num_outputs`` > 1)."""
        name = self.state.unique(name or f"{self.node.name}/{op_type}", self.state.node_names)
        node = ir.node(op_type, list(inputs), attrs or {}, name=name, num_outputs=num_outputs)
        for i, out in enumerate(node.outputs):
            out.name = self.state.unique(name if num_outputs == 1 else f"{name}:{i}", self.state.value_names)
        self.nodes.append(node)
        if main:
            self.main = node
        return node.outputs[0] if num_outputs == 1 else list(node.outputs)

    def const(self, array: Any, label: str) -> ir.Value:
        return self.state.const(f"{self.node.name}/{label}", np.asarray(array))

    def ints(self, values: Sequence[int], label: str) -> ir.Value:
        return self.const(np.asarray(list(values), dtype=np.int64), label)

    def absorb(self, consumer: ir.Node) -> None:
        """The returned values replace ``consumer``'s outputs (a bias add folded into a Conv)."""
        self.absorbed = consumer

    def quantized(self) -> bool:
        """Whether any input of the node comes from a DequantizeLinear (a QDQ graph)."""
        return any(v is not None and _producer_is(v, "DequantizeLinear") for v in self.node.inputs)

    # -- layout and dtype helpers -------------------------------------------------------------------
    def cast(self, value: ir.Value, dtype: Any, current: Any = None) -> ir.Value:
        """``value`` as ``dtype``; ``current`` is its dtype where ``value`` does not record one."""
        dtype = np.dtype(dtype)
        current = np.dtype(current) if current is not None else value.dtype.numpy()
        if current == dtype:
            return value
        array = _const(value)
        if array is not None:
            return self.const(array.astype(dtype), f"{value.name}.{dtype.name}")
        out = self.op("Cast", [value], {"to": ir.DataType.from_numpy(dtype)})
        out.shape, out.type = value.shape, ir.TensorType(ir.DataType.from_numpy(dtype))
        return out

    def transpose(self, value: ir.Value, perm: Sequence[int]) -> ir.Value:
        perm = [int(p) for p in perm]
        return value if perm == sorted(perm) else self.op("Transpose", [value], {"perm": perm})

    def reshape(self, value: ir.Value, old: Sequence[int], new: Sequence[int]) -> ir.Value:
        if list(old) == list(new):
            return value
        return self.op("Reshape", [value, self.ints(new, "shape")])

    def relayout(self, value: ir.Value, perm: Sequence[int], shape: Sequence[int],
                 flip: Sequence[int] = ()) -> ir.Value:
        """``value`` transposed by ``perm``, its axes ``flip`` (after the transpose) reversed and
        reshaped to ``shape``. A constant is re-laid out itself (a new initializer), as is the
        integer initializer behind a DequantizeLinear (its ``axis`` follows); an activation gets
        Transpose/Slice/Reshape nodes."""
        perm, shape, flip = [int(p) for p in perm], [int(d) for d in shape], tuple(flip)
        old = _shape(value)
        moved = [old[p] for p in perm]
        if perm == sorted(perm) and not flip and moved == shape:
            return value
        key = (value, tuple(perm), tuple(shape), flip)
        if key in self.state.relaid:
            return self.state.relaid[key]
        array = _const(value)
        if array is not None:
            label = f"{value.name}.T" if moved == shape and not flip else f"{value.name}.relayout"
            out = self.state.const(label, np.ascontiguousarray(np.flip(array.transpose(perm), flip).reshape(shape)))
        elif (dq := _dequantized_constant(value)) is not None and (
                axis := _surviving_axis(dq[1], old, perm, shape)) is not False:
            node, q, scale, zero_point = dq[0], *dq[2:]
            new_q = self.state.const(f"{node.inputs[0].name}.relayout",
                                     np.ascontiguousarray(np.flip(q.transpose(perm), flip).reshape(shape)))
            inputs = [new_q, scale] + ([zero_point] if zero_point is not None else [])
            out = self.op("DequantizeLinear", inputs, {} if axis is None else {"axis": axis},
                          name=f"{node.name}.relayout")
            out.name = self.state.unique(f"{value.name}.relayout", self.state.value_names)
            out.shape, out.type = ir.Shape(shape), value.type
        else:
            # An activation, or a per-axis weight whose channel axis a reshape merges with others
            # (so its scale vector no longer lines up with one axis): move it after the DequantizeLinear.
            out = self.transpose(value, perm)
            if flip:
                out = self.op("Slice", [out, self.ints([-1] * len(flip), "starts"),
                                        self.ints([-(2**63)] * len(flip), "ends"), self.ints(flip, "axes"),
                                        self.ints([-1] * len(flip), "steps")])
            out = self.reshape(out, moved, shape)
        self.state.relaid[key] = out
        return out


# -- helpers the rules share ------------------------------------------------------------------------
def _shape(value: ir.Value) -> list[int]:
    return [int(d) for d in value.shape]


def _const(value: ir.Value | None) -> np.ndarray | None:
    if value is None or value.const_value is None or value.is_graph_input():
        return None
    return value.const_value.numpy()


def _producer_is(value: ir.Value, op_type: str) -> bool:
    producer = value.producer()
    return producer is not None and producer.domain in ("", "ai.onnx") and producer.op_type == op_type


def _dequantized_constant(value: ir.Value) -> tuple | None:
    """``(node, axis, q, scale, zero_point)`` when ``value`` = DequantizeLinear(integer initializer,
    ...): axis is None for a per-tensor scale, q the integer array, scale and zero_point the
    DequantizeLinear's own inputs. Blocked quantization is not re-laid out."""
    if not _producer_is(value, "DequantizeLinear"):
        return None
    node = value.producer()
    q = _const(node.inputs[0])
    if q is None or any(v is not None and _const(v) is None for v in node.inputs[1:]):
        return None
    if node.attributes.get("block_size") is not None and node.attributes["block_size"].value:
        return None
    scale = node.inputs[1].const_value.numpy()
    axis = None
    if scale.ndim == 1:
        axis = node.attributes["axis"].value if "axis" in node.attributes else 1
        axis %= q.ndim
    zero_point = node.inputs[2] if len(node.inputs) > 2 else None
    return node, axis, q, node.inputs[1], zero_point


def _surviving_axis(axis: int | None, old: list[int], perm: list[int], shape: list[int]) -> int | None | bool:
    """Where a per-axis scale's axis lands after transpose ``perm`` and reshape to ``shape``: None
    for per-tensor, False if the reshape splits or merges it."""
    if axis is None:
        return None
    moved = [old[p] for p in perm]
    a = perm.index(axis)
    before = math.prod(moved[:a])
    for b in range(len(shape)):
        if math.prod(shape[:b]) == before and shape[b] == moved[a]:
            return b
    return False


def _bias_add(node: ir.Node, e: Emitter, channel: int) -> np.ndarray | None:
    """The bias vector of a constant ``add`` that is the only reader of ``node``'s output and
    varies along its ``channel`` axis only; the add is absorbed. None (nothing absorbed) otherwise."""
    out = node.outputs[0]
    uses = list(out.uses())
    if e.quantized() or out.is_graph_output() or len(uses) != 1 or out.dtype.numpy().kind != "f":
        return None
    add = uses[0].node
    if add.domain != JAX or add.op_type != "add" or add.outputs[0].shape != out.shape:
        return None
    b = _const(add.inputs[1 - uses[0].idx])
    rank = len(out.shape)
    if b is None or b.dtype != out.dtype.numpy() or b.ndim > rank:
        return None
    full = b.reshape((1,) * (rank - b.ndim) + b.shape)
    if any(full.shape[d] != 1 for d in range(rank) if d != channel):
        return None
    e.absorb(add)
    return np.ascontiguousarray(np.broadcast_to(full.reshape(-1), (_shape(out)[channel],)))


def _inverse(perm: Sequence[int]) -> list[int]:
    return [int(i) for i in np.argsort(perm)]


# The rule table lives in its own module; importing it fills RULES.
from qinject.passes import jax_to_onnx_rules  # noqa: E402, F401
