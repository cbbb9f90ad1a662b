"""Make tensors inside If/Loop/Scan bodies observable: route each out to a main-graph output.

onnxruntime returns only main-graph outputs, so calibration cannot see a tensor computed inside a
control-flow body. ``tap`` rewrites a *copy* of the model's proto so that it can:

- in the body that defines the tensor, an Identity copies it to a new body output;
- the control-flow node gets a matching new output: for Loop and Scan a new scan output (the
  tensor's values over every iteration, stacked); for If, the other branch outputs an empty tensor
  of the same type, so the new output holds the values only when the tapping branch ran;
- that output is tapped the same way in the enclosing body, up to the main graph.

A Loop's scan output needs the same shape at every iteration; where a body tensor's shape varies,
onnxruntime refuses the tapped model and calibration falls back to the main graph only (see
``passes.calibrate``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import onnx
from onnx import helper

from qinject.core.ir import fresh_name

TAPPABLE_OPS = ("If", "Loop", "Scan")


@dataclass
class _Scope:
    """One enclosing level of a body: its owner node, the attribute holding the body, the owner's graph."""

    owner: onnx.NodeProto
    attribute: str
    parent: onnx.GraphProto


def tap(proto: onnx.ModelProto, tensors: dict[str, int]) -> dict[str, str]:
    """Route each body tensor in ``tensors`` (name -> onnx element type) to a main-graph output.

    Modifies ``proto`` in place. Returns ``tensor name -> main-graph output name`` for the tensors
    it could route (defined in a body of an If, Loop or Scan, at any depth); the others are left out.
    """
    definitions: dict[str, tuple[onnx.GraphProto, list[_Scope]]] = {}
    taken: set[str] = set()
    _index(proto.graph, [], definitions, taken)
    def fresh(base: str) -> str:
        return fresh_name(base, taken)

    routed = {}
    for name, elem in tensors.items():
        found = definitions.get(name)
        if found is None or not all(s.owner.op_type in TAPPABLE_OPS for s in found[1]):
            continue
        body, scopes = found
        current = fresh(f"{name}_tap")
        body.node.append(helper.make_node("Identity", [name], [current], name=fresh(f"{name}_tap_Identity")))
        for scope in reversed(scopes):
            body.output.append(helper.make_tensor_value_info(current, elem, None))
            _add_scan_output(scope, body, elem, fresh)
            current = fresh(f"{name}_tap")
            scope.owner.output.append(current)
            body = scope.parent
        proto.graph.output.append(helper.make_tensor_value_info(current, elem, None))
        routed[name] = current
    return routed


def _index(graph: onnx.GraphProto, scopes: list[_Scope], definitions: dict, taken: set[str]) -> None:
    """Record where each tensor is defined (bodies only) and every name in use."""
    names = [i.name for i in graph.input] + [t.name for t in graph.initializer]
    names += [o for node in graph.node for o in node.output]
    taken.update(names)
    taken.update(node.name for node in graph.node)
    if scopes:
        for name in names:
            definitions.setdefault(name, (graph, scopes))
    for node in graph.node:
        for attr in node.attribute:
            bodies = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
            for body in bodies:
                _index(body, [*scopes, _Scope(node, attr.name, graph)], definitions, taken)


def _add_scan_output(scope: _Scope, body: onnx.GraphProto, elem: int, fresh: Callable[[str], str]) -> None:
    """Keep the owner consistent with the body's new last output."""
    owner = scope.owner
    if owner.op_type == "If":
        other_name = "else_branch" if scope.attribute == "then_branch" else "then_branch"
        other = next(a.g for a in owner.attribute if a.name == other_name)
        empty = fresh("qinject_tap_empty")
        other.node.append(helper.make_node("Constant", [], [empty], name=fresh(f"{empty}_Constant"),
                                           value=helper.make_tensor(empty, elem, [0], [])))
        other.output.append(helper.make_tensor_value_info(empty, elem, None))
    elif owner.op_type == "Scan":
        for attr in owner.attribute:
            if attr.name in ("scan_output_axes", "scan_output_directions"):
                attr.ints.append(0)
