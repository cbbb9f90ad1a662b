"""The small models the profiler times: one node (with its fused epilogue) cut out of a graph, a lone
QuantizeLinear or DequantizeLinear, a range-preserving op on integers, and the roofline's
microbenchmarks. Pure model building: nothing here runs onnxruntime (``qinject.profiler`` does).

Every model ends in the tensors its node writes; the node's own output goes through an ``Identity``
so that it is not a graph output (the Q/DQ rewrite never quantizes a graph output, and a Conv's
integer kernel needs a quantized one). onnxruntime removes the Identity.

A *context* is a 1x1 depthwise convolution (identity weights) put before a probe's input where, in the
model, a convolution produces it: onnxruntime picks a kernel's layout from its neighbours (NHWC
around QLinearConv, NCHWc blocks around float Conv), and a uint8 MaxPool, say, runs 5-10x slower in
NCHW than in the NHWC it gets after a QLinearConv. Contexts are named ``CONTEXT...`` and not timed.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

from qinject.backends import onnx_backend
from qinject.core import op_facts
from qinject.core.pass_manager import PassManager
from qinject.core.plan import DYNAMIC, NodeQuant, Plan
from qinject.core.quant_points import output_point
from qinject.frontends.onnx_frontend import load_onnx
from qinject.passes.transforms import keep_slow_kernels_float, rewrite

SINK = "__profiled_output"
CONTEXT = "__context"  # prefix of the nodes that set up the layout a probe runs in; not timed
BEFORE, AFTER = f"{CONTEXT}_a", f"{CONTEXT}_b"  # contexts before a probed tensor, and after it
# onnxruntime folds these at session creation when their inputs are known shapes or constants.
_SHAPE_OPS = frozenset({"Shape", "Size"})


def node_group(node: ir.Node) -> list[ir.Node]:
    """``node`` and the epilogue chain that runs inside its kernel (the ReLU after a Conv)."""
    group = [node]
    end = output_point(node) if op_facts.is_quantizable(node) else node.outputs[0]
    while group[-1].outputs[0] is not end:
        group.append(group[-1].outputs[0].uses()[0].node)
    return group


def static_values(model: ir.Model) -> set[str]:
    """Names of the values onnxruntime knows before a run: initializers, and what nodes compute from
    them and from static shapes (``Shape`` of a fully known tensor). Nodes reading only these are
    constant-folded at session creation, so a single-node model keeps them as initializers."""
    static = {name for name, v in model.graph.initializers.items() if v.const_value is not None}
    for node in model.graph:
        if node.op_type in _SHAPE_OPS and node.inputs and _known_shape(node.inputs[0]) or all(v is None or v.name in static for v in node.inputs):
            static.update(v.name for v in node.outputs)
    return static


def _known_shape(value: ir.Value | None) -> bool:
    return value is not None and value.shape is not None and all(isinstance(d, int) for d in value.shape)


def group_inputs(group: list[ir.Node]) -> list[ir.Value]:
    """The values the group reads from outside itself, in order, without repeats."""
    inside = {v.name for n in group for v in n.outputs}
    seen: dict[str, ir.Value] = {}
    for node in group:
        for value in node.inputs:
            if value is not None and value.name not in inside:
                seen.setdefault(value.name, value)
    return list(seen.values())


def group_model(group: list[ir.Node], model: ir.Model, values: dict[str, np.ndarray], static: set[str]
                ) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """A model running ``group`` alone, and its feeds.

    Inputs that are constant in ``model`` (or static, see ``static_values``) become initializers with
    their values from ``values`` (or the constant), the others graph inputs fed from ``values``.
    """
    inits, graph_inputs, feeds = [], [], {}
    for value in group_inputs(group):
        array = _value_array(value, values)
        if value.name in static:
            inits.append(numpy_helper.from_array(array, value.name))
        else:
            graph_inputs.append(_value_info(value.name, array.dtype, array.shape))
            feeds[value.name] = array
    nodes = [ir.serde.serialize_node(n) for n in group]
    main = group[-1].outputs[0]
    nodes.append(helper.make_node("Identity", [main.name], [SINK], name=SINK))
    outputs = [_value_info(SINK, main.dtype, main.shape)]
    used_inside = {v.name for n in group for v in n.inputs if v is not None}
    for node in group:
        for value in node.outputs:
            if value.name and value is not main and value.name not in used_inside and value.uses():
                outputs.append(_value_info(value.name, value.dtype, value.shape))
    graph = helper.make_graph(nodes, f"profile_{group[0].name}", graph_inputs, outputs, inits)
    return _model(graph, model.opset_imports, model.ir_version), feeds


def _value_array(value: ir.Value, values: dict[str, np.ndarray]) -> np.ndarray:
    if value.const_value is not None:
        return value.const_value.numpy()
    if value.name in values:
        return values[value.name]
    raise KeyError(value.name)


def _value_info(name: str, dtype: object, shape: Iterable) -> onnx.ValueInfoProto:
    elem = int(dtype) if isinstance(dtype, ir.DataType) else helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    return helper.make_tensor_value_info(name, elem, [d if isinstance(d, int) else None for d in shape])


def _model(graph: onnx.GraphProto, opsets: dict[str, int], ir_version: int | None = None) -> onnx.ModelProto:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets.items()])
    model.ir_version = max(ir_version or 0, 8)
    return model


# -- conversions and integer data movement -------------------------------------------------------------
def qtype(bits: int) -> tuple[int, type]:
    """The activation type of ``bits`` the rewrite uses by default (unsigned, asymmetric)."""
    return {4: (TensorProto.UINT4, np.uint8), 8: (TensorProto.UINT8, np.uint8),
            16: (TensorProto.UINT16, np.uint16)}[bits]


def _qdq_opset(bits: int) -> int:
    return 21 if bits in (4, 16) else 13


def conv_fed(value: ir.Value) -> bool:
    """Whether a convolution's output stage writes ``value`` (through range-preserving ops and
    Concat too: onnxruntime keeps a Concat of convolutions in their layout, NCHWc or NHWC)."""
    producer = value.producer()
    while producer is not None and (op_facts.preserves_range(producer) or op_facts.is_epilogue(producer)
                                    or producer.op_type == "Concat"):
        producer = producer.inputs[0].producer() if producer.inputs and producer.inputs[0] is not None else None
    return producer is not None and op_facts.fact(producer).sets_layout and _spatial(value)


def conv_read(value: ir.Value) -> bool:
    """Whether a convolution reads ``value`` as its data input (through range-preserving ops too)."""
    for use in value.uses():
        if op_facts.fact(use.node).sets_layout and use.idx == 0:
            return _spatial(value)
        if use.idx == 0 and any(conv_read(v) for v in op_facts.carried(use.node)):
            return _spatial(value)
    return False


def _spatial(value: ir.Value) -> bool:
    return value.shape is not None and len(value.shape) >= 3 and value.dtype is not None and (
        value.dtype.is_floating_point())


def _context(name: str, source: str, shape: tuple[int, ...]) -> tuple[onnx.NodeProto, onnx.TensorProto]:
    """A context convolution ``name`` reading ``source`` (writing ``<name>_out``) and its weight."""
    weight = np.ones((shape[1], 1, *[1] * (len(shape) - 2)), np.float32)
    node = helper.make_node("Conv", [source, f"{name}_w"], [f"{name}_out"], name=name, group=shape[1])
    return node, numpy_helper.from_array(weight, f"{name}_w")


def with_contexts(proto: onnx.ModelProto, feeds: dict[str, np.ndarray], inputs: Iterable[str],
                  op: str = "Conv") -> list[str]:
    """Put a context between each graph input of ``inputs`` and its readers (in place): a
    convolution, or a ``Neg`` (which onnxruntime fuses with nothing) before ops it removes when they
    do not read a graph input (Dropout, Identity). Returns the contexts' names."""
    graph, names = proto.graph, []
    for i, name in enumerate(inputs):
        if op == "Conv":
            node, weight = _context(f"{BEFORE}{i}", name, feeds[name].shape)
            graph.initializer.append(weight)
        else:
            node = helper.make_node(op, [name], [f"{BEFORE}{i}_out"], name=f"{BEFORE}{i}")
        for reader in graph.node:
            reader.input[:] = [node.output[0] if x == name else x for x in reader.input]
        graph.node.insert(0, node)
        names.append(node.name)
    return names


def conversion_model(shape: tuple[int, ...], bits: int, op: str, after_conv: bool, before_conv: bool
                     ) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """A tensor of ``shape`` converted float -> ``bits`` (``op`` QuantizeLinear) or back, between the
    kernels that write and read it in the model: a context convolution where a convolution writes it
    (``after_conv``: context ``BEFORE0``) and where one reads it (``before_conv``: ``AFTER0``), the one
    on the integer side quantized at ``bits``, the other float.

    The layout changes onnxruntime adds at such a precision boundary (NHWC Transposes of QLinearConv,
    ``ReorderOutput`` of a float NCHWc region) belong to the conversion; ``qinject.profiler`` times
    what runs between the contexts."""
    nodes, inits, tensor = [], [], "x"
    for wanted, name in ((after_conv, f"{BEFORE}0"), (before_conv, f"{AFTER}0")):
        if wanted:
            node, weight = _context(name, tensor, shape)
            nodes.append(node)
            inits.append(weight)
            tensor = node.output[0]
    # onnxruntime drops the Identity and names a float NCHWc Conv after its output: keep the prefix.
    sink = f"{AFTER}0{SINK}" if before_conv else SINK
    nodes.append(helper.make_node("Identity", [tensor], [sink], name=SINK))
    vec = helper.make_tensor_value_info
    graph = helper.make_graph(nodes, "profile_conversion", [vec("x", TensorProto.FLOAT, shape)],
                              [vec(sink, TensorProto.FLOAT, shape)], inits)
    proto, feeds = _model(graph, {"": 13}), {"x": np.random.default_rng(0).standard_normal(shape).astype(np.float32)}
    integer = f"{BEFORE}0" if op == "DequantizeLinear" else f"{AFTER}0"
    if any(n.name == integer for n in nodes):
        proto = quantized(proto, feeds, Plan(None, {integer: NodeQuant(weights=bits, activations=bits)}))
    else:  # no convolution on the integer side: a plain Q/DQ pair where the precision changes
        insert_qdq(proto, f"{BEFORE}0_out" if after_conv else "x", bits)
    _set_opset(proto, max(_opset(proto), _qdq_opset(bits)))
    return proto, feeds


def insert_qdq(proto: onnx.ModelProto, tensor: str, bits: int, scale: str | None = None, zero: str | None = None
               ) -> None:
    """Route ``tensor``'s readers through a QuantizeLinear/DequantizeLinear pair (in place), with the
    given scale and zero point initializers or new ones (0.05, 0) of uint ``bits``."""
    graph = proto.graph
    if scale is None:
        elem, _ = qtype(bits)
        scale, zero = f"{tensor}__scale", f"{tensor}__zero"
        graph.initializer.extend([numpy_helper.from_array(np.array(0.05, np.float32), scale),
                                  helper.make_tensor(zero, elem, [], [0])])
    q, dq = f"{tensor}__q", f"{tensor}__dq"
    for node in graph.node:
        node.input[:] = [dq if x == tensor else x for x in node.input]
    producer = next((i for i, n in enumerate(graph.node) if tensor in n.output), -1)
    graph.node.insert(producer + 1, helper.make_node("QuantizeLinear", [tensor, scale, zero], [q], name=q))
    graph.node.insert(producer + 2, helper.make_node("DequantizeLinear", [q, scale, zero], [dq], name=dq))


def integer_model(node: ir.Node, model: ir.Model, values: dict[str, np.ndarray], static: set[str], bits: int
                  ) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """A range-preserving op (MaxPool, Reshape, ...) between Q/DQ pairs of one scale, as the rewrite
    leaves it, so onnxruntime runs it on the integers (or drops it) instead of in float. Where a
    convolution writes its input, a quantized context convolution does (``QLinearConv``, NHWC)."""
    proto, feeds = group_model([node], model, values, static)
    data = node.inputs[0].name
    if conv_fed(node.inputs[0]):
        (ctx,) = with_contexts(proto, feeds, [data])
        proto = quantized(proto, feeds, Plan(None, {ctx: NodeQuant(weights=bits, activations=bits)}))
        target = next(n for n in proto.graph.node if n.name == node.name)
        dq = next(n for n in proto.graph.node if target.input[0] in n.output)  # the context's output pair
        scale, zero = dq.input[1], dq.input[2]
    else:
        insert_qdq(proto, data, bits)
        scale, zero = f"{data}__scale", f"{data}__zero"
    target = next(n for n in proto.graph.node if n.name == node.name)
    for i, _ in enumerate(op_facts.carried(node)):  # every piece of a Split
        insert_qdq(proto, target.output[i], bits, scale, zero)
    _set_opset(proto, max(_opset(proto), _qdq_opset(bits)))
    return proto, feeds


def _opset(proto: onnx.ModelProto) -> int:
    return next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))


def _set_opset(proto: onnx.ModelProto, version: int) -> None:
    for entry in proto.opset_import:
        if entry.domain in ("", "ai.onnx"):
            entry.version = version


def quantized(proto: onnx.ModelProto, feeds: dict[str, np.ndarray], plan: object) -> onnx.ModelProto:
    """``proto`` through qinject's rewrite (``passes.transforms.rewrite``, as a plain quantize runs it) with ``plan`` (a Plan, or (weight bits,
    activation bits) for every node), calibrated on ``feeds``."""

    plan = plan if isinstance(plan, Plan) else Plan.uniform(*plan)
    calib = {k: np.nan_to_num(v) if v.dtype.kind == "f" else v for k, v in feeds.items()}
    model = load_onnx(proto)
    plan, _ = keep_slow_kernels_float(model, plan)  # as a plain quantize does
    model = PassManager(rewrite(plan, [calib], progress=False)).run(model).model
    return onnx_backend.to_proto(model)


# -- roofline microbenchmarks -------------------------------------------------------------------------------
def matmul_model(m: int, k: int, n: int) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """x[m, k] @ W[k, n] with a constant weight (the roofline's compute peak)."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array((rng.standard_normal((k, n)) / math.sqrt(k)).astype(np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="matmul"),
                               helper.make_node("Identity", ["y"], [SINK], name=SINK)], "peak",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, k])],
                              [helper.make_tensor_value_info(SINK, TensorProto.FLOAT, [m, n])], [w])
    return _model(graph, {"": 13}), {"x": rng.standard_normal((m, k)).astype(np.float32)}


def elementwise_model(elements: int) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """a + b of two float vectors (the roofline's bandwidth, and its per-op overhead when tiny)."""
    rng = np.random.default_rng(0)
    vec = helper.make_tensor_value_info
    graph = helper.make_graph([helper.make_node("Add", ["a", "b"], ["y"], name="add")], "bandwidth",
                              [vec("a", TensorProto.FLOAT, [elements]), vec("b", TensorProto.FLOAT, [elements])],
                              [vec("y", TensorProto.FLOAT, [elements])])
    return _model(graph, {"": 13}), {k: rng.standard_normal(elements).astype(np.float32) for k in "ab"}


def add_chain_model(count: int) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """``count`` one-element Adds in a row (the roofline's fixed cost per op)."""
    one = numpy_helper.from_array(np.ones(1, np.float32), "one")
    names = ["x", *[f"a{i}" for i in range(count)]]
    nodes = [helper.make_node("Add", [names[i], "one"], [names[i + 1]], name=f"add{i}") for i in range(count)]
    vec = helper.make_tensor_value_info
    graph = helper.make_graph(nodes, "overhead", [vec("x", TensorProto.FLOAT, [1])],
                              [vec(names[-1], TensorProto.FLOAT, [1])], [one])
    return _model(graph, {"": 13}), {"x": np.zeros(1, np.float32)}


def copies(proto: onnx.ModelProto, feeds: dict[str, np.ndarray], count: int
           ) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """``count`` independent copies of ``proto``'s nodes side by side, each with its own inputs (fed
    the same arrays), initializers and outputs: onnxruntime's common-subexpression elimination would
    merge copies reading one input, and the Q/DQ rewrite would give copies of one weight a single
    DequantizeLinear (a cost each node pays in a network). Copy 0 keeps the original names."""
    if count == 1:
        return proto, feeds
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    graph = out.graph
    del graph.node[:], graph.input[:], graph.output[:], graph.value_info[:], graph.initializer[:]
    shared = {""}
    all_feeds = {}
    for i in range(count):
        def rename(name: str, i: int = i) -> str:
            return name if name in shared else copy_name(name, i)

        for node in proto.graph.node:
            copy = graph.node.add()
            copy.CopyFrom(node)
            copy.name = rename(node.name) if node.name else ""
            copy.input[:] = [rename(x) for x in node.input]
            copy.output[:] = [rename(x) for x in node.output]
        for tensor in proto.graph.initializer:
            copy = graph.initializer.add()
            copy.CopyFrom(tensor)
            copy.name = rename(tensor.name)
        for source, target in ((proto.graph.input, graph.input), (proto.graph.output, graph.output)):
            for value in source:
                copy = target.add()
                copy.CopyFrom(value)
                copy.name = rename(value.name)
        all_feeds.update({rename(k): v for k, v in feeds.items()})
    return out, all_feeds


def copy_name(name: str, i: int) -> str:
    """The name ``copies`` gives ``name`` in copy ``i`` (copy 0 keeps it)."""
    return name if i == 0 else f"{name}__copy{i}"


def copy_names(name: str, count: int) -> list[str]:
    """The names of node ``name`` in ``count`` copies of a model."""
    return [copy_name(name, i) for i in range(count)]


def mode_applied(proto: onnx.ModelProto, name: str, mode: str) -> bool:
    """Whether the rewrite gave node ``name`` of a quantized ``proto`` its ``mode`` form: the node that
    keeps its name (MatMulInteger, the MatMul a Gemm became, the op itself) reads a
    DynamicQuantizeLinear (dynamic) or the DequantizeLinear of its weight (weight-only); or, dynamic,
    it became a contrib kernel quantizing its own activations (an LSTM's DynamicQuantizeLSTM)."""
    producers = {o: n.op_type for n in proto.graph.node for o in n.output}
    node = next((n for n in proto.graph.node if n.name == name), None)
    if node is not None and mode == DYNAMIC and node.domain == "com.microsoft":
        return True
    wanted = "DynamicQuantizeLinear" if mode == DYNAMIC else "DequantizeLinear"
    return node is not None and any(producers.get(x) == wanted for x in node.input)


def quantize_output(proto: onnx.ModelProto, bits: int) -> onnx.ModelProto:
    """Put a Q/DQ pair (uint ``bits``) on each copy's output before its ``SINK`` where it is float,
    as the rewrite does when a quantized node reads the output: a Gemm then fuses into QGemm with
    an integer output (and its ReLU into the requantization), where with a float output onnxruntime
    leaves Gemm + ReLU unfused behind a DequantizeLinear of the weight."""
    producers = {o: n for n in proto.graph.node for o in n.output}
    for sink in [n for n in proto.graph.node if n.name.startswith(SINK)]:
        if producers[sink.input[0]].op_type != "DequantizeLinear":
            insert_qdq(proto, sink.input[0], bits)
    return proto
