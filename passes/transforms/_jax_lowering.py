"""What the JAX-to-ONNX lowering rules (``_jax_to_onnx_rules``) and the pass that applies them
(``lower_jax_to_onnx``) share: the rule table ``RULES`` and its ``@lowering`` decorator, the
``Emitter`` a rule builds its ONNX nodes with, and the constant and layout helpers."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx_ir as ir

from qinject.core import op_facts

JAX = op_facts.JAX

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


class Emitter:
    """Builds the ONNX nodes that replace one jax node (inserted before it, in emission order).
    ``state`` is the pass's ``_Lowering`` (the graph, its fresh names, the re-laid-out constants)."""

    def __init__(self, state: Any, node: ir.Node) -> None:
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
