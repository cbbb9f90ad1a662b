"""The ONNX frontend: a file or ModelProto in, a shape-annotated IR model out.

It knows ONNX and nothing downstream. It validates the file, treats initializers that are also
listed as graph inputs (the IR-version-3 habit of old exporters) as constants, as onnxruntime's own
quantizer does, and runs shape inference so passes can count MACs and build Q/DQ of the right type.
External data is not read here: onnx-ir maps it lazily when a pass touches a tensor.
"""

from __future__ import annotations

import os
from pathlib import Path

import onnx
import onnx_ir as ir
from google.protobuf.message import DecodeError
from onnx_ir.passes.common import NameFixPass

from qinject.core import ir as qir
from qinject.core import op_facts
from qinject.core.errors import ModelLoadError, UnsupportedModelError

MIN_OPSET = 1  # older opsets are upgraded by onnx's version converter, which refuses clearly
MAX_OPSET = onnx.defs.onnx_opset_version()


def load_onnx(source: str | os.PathLike | onnx.ModelProto) -> ir.Model:
    """Load an ONNX model into the IR.

    Args:
        source: a path to a ``.onnx`` file (external data next to it is found), or a ModelProto.

    Raises:
        ModelLoadError: the file is missing, truncated, not ONNX, or fails onnx.checker.
        UnsupportedModelError: the opset is outside the supported range.
    """
    base_dir = None
    if isinstance(source, onnx.ModelProto):
        proto, label = source, "model"
    else:
        path = Path(source)
        label = f"model file {str(path)!r}"
        if not path.is_file():
            raise ModelLoadError(f"{label} does not exist")
        try:
            proto = onnx.load(str(path), load_external_data=False)
        except (DecodeError, RuntimeWarning, ValueError, OSError) as exc:
            raise ModelLoadError(f"{label} is not a valid ONNX file (truncated or corrupt): "
                                 f"{type(exc).__name__}") from None
        base_dir = str(path.parent)
    if not proto.graph.node:
        raise ModelLoadError(f"{label} has an empty graph (is it really an ONNX model?)")
    _check_opset(proto, label)
    _check_structure(proto.graph, label)
    try:
        # A file is checked from disk: the checker finds external data there and Python never
        # re-serialises the weights.
        onnx.checker.check_model(str(source) if base_dir is not None else proto)
        _drop_initializers_from_inputs(proto)
        annotated = frozenset(info.name for info in proto.graph.value_info)
        model = ir.serde.deserialize_model(proto)
        if base_dir is not None:
            ir.external_data.set_base_dir(model.graph, base_dir)
        _detach_from_proto(model)
        del proto
        model = qir.infer_shapes(model)
        model.graph.meta[qir.ANNOTATED_VALUES] = annotated
        if base_dir is not None:
            model.graph.meta[qir.SOURCE_FILE] = str(Path(source).resolve())
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"{label} is not a valid ONNX model: {first}") from None
    # Plans and reports address nodes by name: exporters that leave names empty get unique ones.
    NameFixPass()(model)
    return model


def _check_structure(graph: onnx.GraphProto, label: str) -> None:
    """Name what is wrong with the main graph's data flow, before onnx.checker's generic
    "topologically sorted" message: a value nothing defines (a missing initializer), a cycle, or a
    value used before the node that defines it."""
    defined = {v.name for v in graph.input} | {t.name for t in graph.initializer} | {""}
    defined |= {t.name for t in graph.sparse_initializer}
    producer = {out: i for i, node in enumerate(graph.node) for out in node.output}
    for node in graph.node:
        for name in node.input:
            if name not in defined and name not in producer:
                kind = "an initializer" if op_facts.lookup(node.domain, node.op_type).quantizable else "a value"
                raise ModelLoadError(f"{label}: node {node.name or node.op_type!r} reads {name!r}, which no node, "
                                     f"graph input or initializer defines (missing {kind}?)")
    for out in graph.output:
        if out.name not in defined and out.name not in producer:
            raise ModelLoadError(f"{label}: graph output {out.name!r} is not produced by any node")
    backward = [(i, node, name) for i, node in enumerate(graph.node) for name in node.input
                if name in producer and producer[name] >= i and name not in defined]
    if not backward:
        return  # every edge points forward: in order, and no cycle is possible
    cycle = _find_cycle(graph, producer)
    if cycle:
        names = [graph.node[u].name or graph.node[u].op_type for u, _ in cycle]
        raise ModelLoadError(f"{label}: the graph has a cycle through node(s) {names[:6]}")
    _, node, name = backward[0]
    raise ModelLoadError(f"{label}: node {node.name or node.op_type!r} uses {name!r} before the node "
                         f"that defines it (nodes are not in topological order)")


def _find_cycle(graph: onnx.GraphProto, producer: dict[str, int]) -> list[tuple[int, int]]:
    import networkx as nx  # only for graphs out of order

    edges = nx.DiGraph()
    edges.add_nodes_from(range(len(graph.node)))
    for i, node in enumerate(graph.node):
        for name in node.input:
            if name in producer:
                edges.add_edge(producer[name], i)
    try:
        return nx.find_cycle(edges)
    except nx.NetworkXNoCycle:
        return []


def _detach_from_proto(model: ir.Model) -> None:
    """Give inline initializers their own numpy arrays, so the parsed protobuf can be freed.

    Every read of a protobuf-backed tensor copies its bytes again; arrays are read once here, and
    the weights then live once in memory instead of in the protobuf plus each reader's copy.
    External data stays memory-mapped.
    """
    for name, value in model.graph.initializers.items():
        tensor = value.const_value
        if isinstance(tensor, ir.TensorProtoTensor):
            value.const_value = ir.tensor(tensor.numpy(), name=name)


def _check_opset(proto: onnx.ModelProto, label: str) -> None:
    opset = default_opset_of(proto)
    if opset is None:
        raise UnsupportedModelError(f"{label} imports no default ('ai.onnx') opset")
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise UnsupportedModelError(
            f"{label} uses default-domain opset {opset}; supported are {MIN_OPSET} to {MAX_OPSET}")


def default_opset_of(proto: onnx.ModelProto) -> int | None:
    for imp in proto.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return imp.version
    return None


def _drop_initializers_from_inputs(proto: onnx.ModelProto) -> None:
    names = {init.name for init in proto.graph.initializer}
    if any(i.name in names for i in proto.graph.input):
        # IR version 4 is the first that lets an initializer stand outside the graph inputs.
        proto.ir_version = max(proto.ir_version, 4)
        kept = [i for i in proto.graph.input if i.name not in names]
        del proto.graph.input[:]
        proto.graph.input.extend(kept)
