"""The graph IR: onnx-ir's mutable model, plus what qinject adds on top.

onnx-ir supplies use-def chains (``Value.uses()``, ``replace_all_uses_with``), a non-serialised
``meta`` store on every node and value for analysis results, and (de)serialisation. This module adds
the quantization view (which nodes are quantizable), a networkx view for graph algorithms, and the
verifier. Analysis keys are namespaced strings, defined here so every pass uses the same ones.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING

import numpy as np
import onnx
import onnx_ir as ir

from qinject.core import op_facts

if TYPE_CHECKING:
    import networkx as nx
from qinject.core.errors import UnsupportedModelError, VerificationError

Model = ir.Model

# Analysis keys in node/value ``meta``.
ACT_STATS = "qinject.calibration.stats"  # on values: qinject.stats.TensorStats
QUANT_APPLIED = "qinject.quant.applied"  # on nodes: the NodeQuant the rewrite applied
QUANT_NOTES = "qinject.quant.notes"  # on nodes: list of strings explaining refusals
COST_REPORT = "qinject.cost.report"  # on the model: qinject.cost.CostReport of the plan applied
CHOSEN_PLAN = "qinject.plan.chosen"  # on the model: the Plan fitted to a target (passes/target/fit_*.py)
# On the model: (plan, its notes, the chosen plan's notes, those nodes): a second fitted plan with the nodes
# kept float only for onnxruntime's slow kernels free, which fit-measured times against the chosen one
ALTERNATIVE_PLAN = "qinject.plan.alternative"
# On the model: the rewrite's time with the Adds onnxruntime would fuse into SkipLayerNormalization written
# as Sum over its time without, where fit-measured found that faster (passes/transforms/split_skip_layernorm.py)
SPLIT_SKIP_LAYERNORM = "qinject.split_skip_layernorm"
# On the model: {"float_ms", "quantized_ms", "tried"}: the rewrite timed on this machine (passes/target/fit_measured.py)
MEASURED_LATENCY = "qinject.measured.latency"
# On the model: input name -> concrete shape, for latency estimates of symbolic dims. Calibration records
# the shapes it saw (leading dim left symbolic); ``--shape`` sets them explicitly (SHAPES_GIVEN).
INPUT_SHAPES = "qinject.input_shapes"
SHAPES_GIVEN = "qinject.input_shapes.given"
# On the main graph (graph meta survives a clone; model meta does not): the names of the values the
# source file annotated with a shape (its value_info). The ONNX backend writes shapes for these only:
# shapes the frontend inferred beyond them change which fusions onnxruntime makes (a TorchScript
# BERT-base whose file names no shapes gets no SkipLayerNormalization, 7x slower than Add +
# LayerNormalization on onnxruntime 1.32's CPU, but got one per residual Add once qinject wrote them).
ANNOTATED_VALUES = "qinject.source.annotated_values"
SOURCE_FILE = "qinject.source.file"  # main graph meta: the file the model was loaded from (absolute)
# On the model: one small calibration feed (input name -> array) that the written model is run on once.
SAMPLE_FEED = "qinject.calibration.sample_feed"
# On jax-domain nodes (op_type = the primitive's name): the JaxEqn the JAX backend re-binds.
JAX_EQN = op_facts.JAX_EQN
JAX_DOMAIN = op_facts.JAX
JaxEqn = op_facts.JaxEqn

# The full verifier (onnx.checker after every pass) is behind this switch; the test suite sets it.
FULL_VERIFY_ENV = "QINJECT_VERIFY"


# Where weightless protos say their large tensors live; nothing is ever written there.
PLACEHOLDER_LOCATION = "__qinject_weights_in_memory__"


@contextmanager
def weightless(model: ir.Model, threshold: int = 1024, numpy_only: bool = False,
               shared: Mapping[str, ir.TensorProtocol] | None = None) -> Iterator[dict[str, ir.TensorProtocol]]:
    """Within the block, large initializers serialise as external-data stubs instead of bytes.

    Serialising hundreds of MB of weights only to hand them to the version converter, shape
    inference or a calibration session costs seconds and doubles memory; the stubs keep the proto
    small. Yields ``name -> tensor`` of the stubbed tensors (no copies), e.g. for
    ``SessionOptions.add_external_initializers``; the real tensors are back in place after the block.
    ``numpy_only`` keeps inline the tensors whose numpy form onnxruntime cannot take as an OrtValue
    (ml_dtypes' types such as int4 and bfloat16, and strings). Given ``shared``, only the
    initializers whose tensor is the very tensor ``shared`` holds under their name are stubbed,
    whatever their size: a model variant then serialises only what differs from the model whose
    tensors ``shared`` holds (a clone shares its tensors), and a worker holding those supplies them.
    """
    if shared is None:
        swapped = large_initializers(model, threshold, numpy_only)
    else:
        swapped = {name: v.const_value for name, v in model.graph.initializers.items()
                   if v.const_value is not None and shared.get(name) is v.const_value}
    for name, tensor in swapped.items():
        model.graph.initializers[name].const_value = ir.ExternalTensor(
            PLACEHOLDER_LOCATION, 0, tensor.nbytes, tensor.dtype, shape=tensor.shape, name=name)
    try:
        yield swapped
    finally:
        for name, tensor in swapped.items():
            model.graph.initializers[name].const_value = tensor


def large_initializers(model: ir.Model, threshold: int = 1024, numpy_only: bool = False
                       ) -> dict[str, ir.TensorProtocol]:
    """``name -> tensor`` of the initializers ``weightless`` stubs: over ``threshold`` bytes, or
    external (their relative location means nothing to a proto without a folder); with
    ``numpy_only``, none whose numpy form onnxruntime cannot take as an OrtValue."""
    return {name: v.const_value for name, v in model.graph.initializers.items()
            if v.const_value is not None
            and not (numpy_only and _void_in_numpy(v.const_value.dtype))
            and (v.const_value.nbytes > threshold or isinstance(v.const_value, ir.ExternalTensor))}


def _void_in_numpy(dtype: ir.DataType) -> bool:
    """ml_dtypes' types (int4, bfloat16, float8, ...: not numpy built-ins) and strings."""
    array_type = np.dtype(dtype.numpy())
    return array_type.isbuiltin != 1 or array_type.kind == "O"


def round_trip(model: ir.Model, transform: Callable[[onnx.ModelProto], onnx.ModelProto]) -> ir.Model:
    """Apply a protobuf-level transform (version conversion, shape inference) without serialising
    the weights. Initializers come back as the very tensors they were (external data keeps its base
    folder), and ``meta`` of nodes and values is carried over by name, the main graph's as it is
    (protobuf has no place for it: a jax node's equation, calibration statistics)."""
    originals = {name: v.const_value for name, v in model.graph.initializers.items()}
    node_meta = {n.name: n.meta for n in model.graph if n.meta}
    value_meta = {v.name: v.meta for v in _values(model.graph) if v.meta}
    with weightless(model):
        proto = ir.serde.serialize_model(model)
    new_model = ir.serde.deserialize_model(transform(proto))
    for name, value in new_model.graph.initializers.items():
        if originals.get(name) is not None:
            value.const_value = originals[name]
    for node in new_model.graph:
        node.meta.update(node_meta.get(node.name, {}))
    for value in _values(new_model.graph):
        value.meta.update(value_meta.get(value.name, {}))
    new_model.graph.meta.update(model.graph.meta)
    return new_model


def _values(graph: ir.Graph) -> Iterator[ir.Value]:
    yield from graph.inputs
    yield from graph.initializers.values()
    for node in graph:
        yield from node.outputs


def infer_shapes(model: ir.Model) -> ir.Model:
    """onnx shape inference (with data propagation) over the IR; raises onnx's InferenceError."""
    return round_trip(model, lambda p: onnx.shape_inference.infer_shapes(p, data_prop=True))


def with_batch(model: ir.Model, batch: int) -> ir.Model:
    """The model with its inputs' symbolic dims made concrete and shapes re-inferred, so MACs and
    latency keys are concrete; the model itself if nothing is symbolic.

    A leading symbolic dim becomes ``batch`` unless the shapes were given explicitly; the other
    symbolic dims come from ``model.meta[INPUT_SHAPES]`` (the shapes calibration saw, or ``--shape``).

    Raises:
        UnsupportedModelError: if a symbolic dim other than the leading one has no known size.
    """
    def concrete(value: ir.Value) -> bool:
        return value.shape is not None and all(isinstance(d, int) for d in value.shape)

    if all(concrete(v) for v in model.graph.inputs):
        return model
    known: dict[str, tuple[int, ...]] = model.meta.get(INPUT_SHAPES, {})
    given = model.meta.get(SHAPES_GIVEN, False)
    model = model.clone()
    for value in model.graph.inputs:
        if value.shape is None or concrete(value):
            continue
        value.shape = ir.Shape(_concrete_dims(value, known.get(value.name), batch, given))
    for node in model.graph:
        for value in node.outputs:
            value.shape = None
    return infer_shapes(model)


def _concrete_dims(value: ir.Value, seen: tuple[int, ...] | None, batch: int, given: bool) -> list[int]:
    dims = list(value.shape)
    if seen is not None and len(seen) == len(dims):
        out = [d if isinstance(d, int) else int(size) for d, size in zip(dims, seen)]
        if not given and not isinstance(dims[0], int):
            out[0] = batch  # calibration's batch size is not the batch the latency is wanted for
        return out
    if not all(isinstance(d, int) for d in dims[1:]):
        raise UnsupportedModelError(f"input {value.name!r} has shape {[str(d) for d in dims]}: the size of its "
                                    "symbolic dims is unknown (calibrate on real data, or give --shape "
                                    f"{value.name}=...)")
    return [batch, *dims[1:]]


def has_jax_nodes(model: ir.Model) -> bool:
    """Whether the graph holds jaxpr equations (so onnxruntime cannot run it; the JAX backend can)."""
    return any(n.domain == JAX_DOMAIN for n in model.graph)


def quantizable_nodes(model: ir.Model) -> list[ir.Node]:
    """Quantizable nodes of the main graph, in graph order."""
    return [n for n in model.graph if op_facts.is_quantizable(n)]


def searchable_nodes(model: ir.Model) -> list[ir.Node]:
    """The nodes a plan chooses for, sensitivity signals measure and searches decide: the main
    graph's quantizable nodes, then those inside If/Loop/Scan bodies."""
    return quantizable_nodes(model) + subgraph_quantizable_nodes(model)


def subgraph_quantizable_nodes(model: ir.Model) -> list[ir.Node]:
    """Quantizable nodes inside control-flow bodies (If/Loop/Scan, at any depth), in a stable order.

    Cost estimates price them (each body once), sensitivity signals and searches decide them like
    main-graph nodes, and the Q/DQ rewrite quantizes them at the plan's choice for their name.
    """
    return [n for n in model.graph.all_nodes() if n.graph is not model.graph and op_facts.is_quantizable(n)]


def bodies(node: ir.Node) -> list[ir.Graph]:
    """The graphs a node's attributes hold (If branches, Loop/Scan bodies), not those nested in them."""
    found: list[ir.Graph] = []
    for attr in node.attributes.values():
        if attr.type == ir.AttributeType.GRAPH:
            found.append(attr.value)
        elif attr.type == ir.AttributeType.GRAPHS:
            found.extend(attr.value)
    return found


def subgraph_owners(model: ir.Model) -> dict[int, ir.Node]:
    """``id(body graph) -> the main-graph node holding it`` (the outermost control-flow node)."""
    return {id(graph): node for node in model.graph for body in bodies(node)
            for graph in (body, *body.subgraphs())}


def fresh_name(base: str, taken: set[str]) -> str:
    """``base``, or ``base_1``, ``base_2``, ...: the first not in ``taken``, which it joins."""
    name, i = base, 1
    while name in taken:
        name, i = f"{base}_{i}", i + 1
    taken.add(name)
    return name


def all_names(graph: ir.Graph) -> set[str]:
    """Every value and node name in ``graph`` and its bodies, at any depth."""
    names: set[str] = set()
    for g in (graph, *graph.subgraphs()):
        names.update(g.initializers)
        names.update(v.name for v in g.inputs)
        for node in g:
            names.add(node.name or "")
            names.update(v.name for v in node.outputs)
    return names


def add_initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    """Register ``array`` as an initializer under ``name`` (made unique) and return its value."""
    name = fresh_name(name, set(graph.initializers))
    array = np.asarray(array)
    value = ir.Value(name=name, const_value=ir.tensor(array, name=name), shape=ir.Shape(array.shape),
                     type=ir.TensorType(ir.DataType.from_numpy(array.dtype)))
    graph.register_initializer(value)
    return value


def drop_unused_initializers(graph: ir.Graph) -> None:
    """Remove initializers nothing reads (e.g. float weights replaced by quantized ones)."""
    for name, value in list(graph.initializers.items()):
        if not value.uses() and not value.is_graph_output():
            del graph.initializers[name]


def to_networkx(graph: ir.Graph) -> nx.DiGraph:
    """A DiGraph with one vertex per node (keyed by the node object) and an edge per use."""
    import networkx as nx  # only graph algorithms need it; keeps `import qinject` light

    g = nx.DiGraph()
    for node in graph:
        g.add_node(node, name=node.name, op_type=node.op_type)
    for node in graph:
        for value in node.outputs:
            for use in value.uses():
                if use.node.graph is graph:
                    g.add_edge(node, use.node, value=value.name)
    return g


def verify(model: ir.Model, full: bool | None = None) -> None:
    """Check the IR's invariants; with ``full`` (default: the QINJECT_VERIFY switch) run onnx.checker.

    Raises:
        VerificationError: naming the node and value that break an invariant.
    """
    graph = model.graph
    defined = {v.name for v in graph.inputs} | set(graph.initializers)
    for node in graph:
        for i, value in enumerate(node.inputs):
            if value is None or value.name in defined or value.const_value is not None:
                continue
            if value.producer() is None:
                raise VerificationError(
                    f"node {node.name!r} input {i} reads {value.name!r}, which no node, graph input "
                    "or initializer defines")
            cycle = _find_cycle(graph)
            if cycle:
                raise VerificationError(f"the graph has a cycle through nodes {cycle}")
            raise VerificationError(
                f"node {node.name!r} reads {value.name!r} before it is defined "
                f"(expected a graph input or an earlier node; it is produced by {value.producer().name!r})")
        defined.update(v.name for v in node.outputs)
    for out in graph.outputs:
        if out.name not in defined:
            raise VerificationError(f"graph output {out.name!r} is not produced by any node")
    if full if full is not None else os.environ.get(FULL_VERIFY_ENV) == "1":
        try:
            onnx.checker.check_model(_with_external_data_inlined(ir.serde.serialize_model(model)), full_check=True)
        except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
            raise VerificationError(f"onnx.checker rejects the model: {_first_line(exc)}") from None


def _with_external_data_inlined(proto: onnx.ModelProto) -> onnx.ModelProto:
    """The proto with external tensors replaced by zeros of their shape: the checker would look for
    their files relative to the working directory, and their values do not matter to it."""
    for tensor in onnx.external_data_helper._get_all_tensors(proto):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
            tensor.CopyFrom(onnx.numpy_helper.from_array(np.zeros(tuple(tensor.dims), dtype), tensor.name))
    return proto


def _find_cycle(graph: ir.Graph) -> list[str]:
    import networkx as nx  # slow to import; only a broken graph needs it

    try:
        return [u.name for u, _ in nx.find_cycle(to_networkx(graph))]
    except nx.NetworkXNoCycle:
        return []


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
