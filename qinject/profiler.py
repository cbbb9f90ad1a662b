"""Measure a model's latency table on this machine through onnxruntime (``qinject profile``).

Every quantizable node (after the quantize pipeline's folding) is cut out with its fused epilogue into
a single-node model (``qinject.profiler_models``), quantized by qinject's own pipeline at each
candidate (weight bits, activation bits), so onnxruntime fuses exactly what the rewrite produces, and
timed. Other nodes are timed in float, range-preserving ops (MaxPool, Reshape) also on integers, and
QuantizeLinear/DequantizeLinear at every tensor size the model's precision boundaries may need.

How a node is timed: onnxruntime's per-node profiling (``SessionOptions.enable_profiling``), not
the wall time of the single-node model. The profile names every kernel of the optimised graph, so
the entry sums exactly the node's own kernels for each run: the fused integer kernel (QLinearConv,
QGemm, ...), or, where onnxruntime does not fuse (16-bit, 4-bit weights), the DequantizeLinear of
its inputs and weight, the float kernel and the QuantizeLinear of its output, which run in a whole
quantized graph too. Left out are the kernels the single-node model adds around the node: the
QuantizeLinear of a graph input, the DequantizeLinear of a graph output (the cost model charges
those as conversions, where precision regions meet) and the layout changes onnxruntime inserts
around a lone kernel (NHWC ``Transpose`` around QLinearConv, ``ReorderInput``/``ReorderOutput``
around NCHWc float convolutions), which in a whole network it cancels between neighbouring
kernels. Wall time minus separately measured Q/DQ would charge each node with those layout
changes and with the ~10-30 us of a ``session.run`` call, which a whole model pays once; see
``BENCHMARKS.md`` (``bench_latency``) for the end-to-end validation of this choice.

Entries are medians over ``repeats`` runs after ``warmup`` runs, on onnxruntime's CPU provider with
``THREADS`` intra-op threads and no spinning (the options of ``tools/bench_latency.py``). An entry
already in the given table is not measured again, and entries of other models are kept.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from qinject import ir as qir
from qinject import op_facts
from qinject import profiler_models as pm
from qinject.errors import QinjectError
from qinject.latency_table import FLOAT_BITS, Entry, LatencyTable, Roofline
from qinject.quant_points import activation_points, output_point

THREADS = 2
DEFAULT_BITS = ((32, 32), (16, 16), (8, 8), (4, 8))
# A kernel onnxruntime folded away at session creation still gets an entry (the format wants > 0).
FLOOR_US = 0.01
# Each node is timed alone and as this many copies side by side: the difference is its cost in a run.
COPIES = 3
_LAYOUT_OPS = frozenset({"Transpose", "ReorderInput", "ReorderOutput"})

Key = tuple[str, str, int, int]


@dataclass
class Probe:
    """One single-node model to time, and which of its kernels price which entries.

    ``build`` makes the model (float for node probes: it is copied, then quantized at ``bits``);
    ``select`` names, in onnxruntime's optimised graph, the kernels of each entry's key.
    """

    keys: list[Key]
    build: Callable[[dict[str, np.ndarray]], tuple[onnx.ModelProto, dict[str, np.ndarray]]]
    select: Callable[[KernelTimes], dict[Key, list[str]]]
    bits: tuple[int, int] | None = None
    quantized_output: bool = False  # the output is read by a quantized node in the model


@dataclass
class KernelTimes:
    """One model's timing: the median wall time of a run, and per-run kernel times by node of
    onnxruntime's optimised graph from a profiled session of it."""

    runs: list[dict[str, float]]  # node name -> us, one dict per timed run of the profiled session
    ops: dict[str, str]  # node name -> op type as it ran
    graph: onnx.GraphProto  # the optimised graph (without weights)
    source_names: set[str]  # the nodes of the model given to onnxruntime
    wall_us: float = math.nan

    def profiled(self, nodes: Iterable[str] | None = None) -> float:
        """Median over runs of the profiled time of ``nodes`` (all kernels if None)."""
        nodes = set(self.ops if nodes is None else nodes)
        return float(np.median([sum(t for n, t in run.items() if n in nodes) for run in self.runs]))


def marginal_us(one: KernelTimes, many: KernelTimes, copies: int, nodes_one: list[str], nodes_many: list[str]
                ) -> float:
    """What the selected kernels of one more copy of the model cost in a run.

    The wall time of one extra copy, ``(wall(copies) - wall(1)) / (copies - 1)``, times the selected
    kernels' share of the profiled time the extra copies added. The difference drops what a run pays
    once whatever it holds: the ``session.run`` call (~10 us) and waking the thread pool for its
    first parallel kernel (~30 us here, without spinning; later kernels find it awake), which a
    single-node model would otherwise charge to every node. The share drops the Q/DQ and layout
    changes around each copy; it is taken from the profile because profiling inflates small kernels
    (onnxruntime also collects thread-pool statistics then), so its times are only good as ratios.
    """
    wall = (many.wall_us - one.wall_us) / (copies - 1)
    added = many.profiled() - one.profiled()
    own = many.profiled(nodes_many) - one.profiled(nodes_one)
    share = own / added if added > 0 and own >= 0 else many.profiled(nodes_many) / max(many.profiled(), 1e-9)
    return max(wall * min(max(share, 0.0), 1.0), FLOOR_US)


@dataclass
class ProfileRun:
    """What ``run_profile`` did: the table, and how many entries it measured or found cached."""

    table: LatencyTable
    measured: int = 0
    reused: int = 0
    failed: list[str] = field(default_factory=list)


def profile(model: str | os.PathLike | onnx.ModelProto | ir.Model, table: LatencyTable | None = None, *,
            batch: int = 1, bits: Iterable[tuple[int, int]] = DEFAULT_BITS, warmup: int = 3, repeats: int = 15,
            progress: bool = True, target: str = "local-cpu", feeds: dict[str, np.ndarray] | None = None
            ) -> LatencyTable:
    """Measure ``model``'s latency entries on this machine (onnxruntime CPU) into a table.

    Args:
        model: an ONNX path, ModelProto or IR model (jax-domain graphs: export them to ONNX first).
        table: a table to extend; its entries are not measured again, its roofline is kept. None:
            a new table named ``target`` with a roofline fitted from microbenchmarks.
        batch: the size given to a symbolic batch dimension.
        bits: the (weight bits, activation bits) to time every quantizable node at; (32, 32) is float.
        warmup, repeats: runs before timing, and timed runs (the median is kept).
        feeds: the model's inputs for the run that gives each node realistic input values
            (default: standard normal floats, integer inputs 0 or 1).

    Returns:
        ``table`` itself with the new entries, or the new table.
    """
    return run_profile(model, table, batch=batch, bits=bits, warmup=warmup, repeats=repeats, progress=progress,
                       target=target, feeds=feeds).table


def run_profile(model: str | os.PathLike | onnx.ModelProto | ir.Model, table: LatencyTable | None = None, *,
                batch: int = 1, bits: Iterable[tuple[int, int]] = DEFAULT_BITS, warmup: int = 3, repeats: int = 15,
                progress: bool = True, target: str = "local-cpu", feeds: dict[str, np.ndarray] | None = None
                ) -> ProfileRun:
    """``profile``, also saying how many entries were measured and how many were already there."""
    bits = _check_bits(bits)
    ir_model = _prepared(model, batch)
    if table is None:
        table = LatencyTable(target, "measured", fit_roofline(warmup, repeats), *_provenance())
    run = ProfileRun(table)
    probes = probes_for(ir_model, bits)
    wanted = {k for p in probes for k in p.keys}
    todo = [p for p in probes if any(k not in table.entries for k in p.keys)]
    run.reused = len(wanted & set(table.entries))
    values = _input_values(ir_model, feeds) if todo else {}
    from tqdm.auto import tqdm

    for probe in tqdm(todo, desc="profiling", unit="model", disable=not progress, leave=False):
        try:
            prices = measure(probe, values, warmup, repeats)
        except QinjectError as exc:  # e.g. a node the rewrite cannot quantize at these bits
            run.failed.append(f"{probe.keys[0][0]} {probe.keys[0][1]}: {exc}")
            continue
        for key, us in prices.items():
            if key not in table.entries:
                table.add(Entry(*key, round(us, 3)))
                run.measured += 1
    return run


def _check_bits(bits: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    out = []
    for w, a in bits:
        if (w, a) != (FLOAT_BITS, FLOAT_BITS) and (w not in (4, 8, 16) or a not in (4, 8, 16)):
            raise QinjectError(f"bit widths {w}/{a} are not profilable: use 32/32 (float) or weights and "
                               "activations of 4, 8 or 16")
        out.append((w, a))
    return out


def _prepared(model: str | os.PathLike | onnx.ModelProto | ir.Model, batch: int) -> ir.Model:
    """The model as the cost model sees it: constants folded, Conv affines fused, batch concrete."""
    from qinject.frontends.onnx_frontend import load_onnx
    from qinject.pass_manager import PassManager
    from qinject.passes import FoldConstantWeights, FoldConvAffine

    ir_model = model if isinstance(model, ir.Model) else load_onnx(model)
    if qir.has_jax_nodes(ir_model):
        raise QinjectError("the model holds jax equations, which onnxruntime cannot run: export it to ONNX "
                           "first (qinject.export_onnx)")
    ir_model = PassManager([FoldConstantWeights(), FoldConvAffine()]).run(ir_model.clone()).model
    return qir.with_batch(ir_model, batch)


def _provenance() -> tuple[str, str]:
    description = (f"{_cpu_name()} through onnxruntime {ort.__version__} (CPU provider, {THREADS} intra-op "
                   "threads, no spinning): kernel medians from onnxruntime's per-node profiling")
    source = (f"qinject profile on {os.cpu_count()} cores, {_cpu_name()}, {platform.platform()}; "
              f"{datetime.date.today().isoformat()}")
    return description, source


def _cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    text = cpuinfo.read_text() if cpuinfo.exists() else ""
    return next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name")),
                platform.processor() or "unknown CPU")


# -- what to measure ---------------------------------------------------------------------------------------
def probes_for(model: ir.Model, bits: list[tuple[int, int]]) -> list[Probe]:
    """The single-node models to time for ``model`` (with concrete shapes), deduplicated by key."""
    static = pm.static_values(model)
    fused = {n.name for q in qir.quantizable_nodes(model) for n in pm.node_group(q)[1:]}
    probes, seen = [], set()
    act_bits = sorted({a for w, a in bits if a != FLOAT_BITS})
    for node in model.graph:
        key = op_facts.latency_key(node)
        if key is None or node.name in fused:
            continue
        group = pm.node_group(node) if op_facts.is_quantizable(node) else [node]
        choices = bits if op_facts.is_quantizable(node) else [(FLOAT_BITS, FLOAT_BITS)]
        for w, a in choices:
            w_key = w if (w == FLOAT_BITS or op_facts.weight_of(node) is not None) else a
            full = (*key, w_key, a)
            if full not in seen:
                seen.add(full)
                probes.append(_node_probe(full, group, model, static, (w, a)))
        if op_facts.fact(node).range_preserving and _float_input(node):
            for a in act_bits:
                full = (*key, 0, a)
                if full not in seen and node.inputs[0].name not in static:
                    seen.add(full)
                    probes.append(_integer_probe(full, node, model, static, a))
    for elements in sorted(_conversion_sizes(model)):
        for a in act_bits:
            keys = [("QuantizeLinear", f"x{elements}", 0, a), ("DequantizeLinear", f"x{elements}", 0, a)]
            probes.append(_conversion_probe(keys, elements, a))
    return probes


def _float_input(node: ir.Node) -> bool:
    value = node.inputs[0] if node.inputs else None
    return value is not None and value.dtype is not None and value.dtype.is_floating_point()


def _conversion_sizes(model: ir.Model) -> set[int]:
    """Element counts of every tensor that may cross a precision boundary: the activation points,
    and what range-preserving ops carry on from them."""
    sizes, frontier = set(), list(activation_points(model))
    while frontier:
        value = frontier.pop()
        if value.shape is None or not all(isinstance(d, int) for d in value.shape):
            continue
        sizes.add(math.prod(value.shape))
        frontier += [u.node.outputs[0] for u in value.uses()
                     if op_facts.fact(u.node).range_preserving and u.idx == 0]
    return sizes


def _node_probe(key: Key, group: list[ir.Node], model: ir.Model, static: set[str], wa: tuple[int, int]) -> Probe:
    def build(values: dict[str, np.ndarray]) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
        return pm.group_model(group, model, values, static)

    return Probe([key], build, lambda times: {key: own_kernels(times)},
                 None if wa == (FLOAT_BITS, FLOAT_BITS) else wa, _read_quantized(output_point(group[0])))


def _read_quantized(value: ir.Value) -> bool:
    """Whether a quantizable node reads ``value`` as an activation (so, in a uniformly quantized
    model, the rewrite quantizes it), directly or through range-preserving ops."""
    for use in value.uses():
        if op_facts.is_quantizable(use.node) and use.idx in op_facts.activation_inputs(use.node):
            return True
        if op_facts.fact(use.node).range_preserving and use.idx == 0 and _read_quantized(use.node.outputs[0]):
            return True
    return False


def _integer_probe(key: Key, node: ir.Node, model: ir.Model, static: set[str], bits: int) -> Probe:
    # Only 8-bit convolutions have an integer kernel (QLinearConv, NHWC); after one, onnxruntime runs
    # a MaxPool on integers in that layout too.
    after_conv = bits == 8 and node.op_type == "MaxPool" and _after_conv(node)

    def build(values: dict[str, np.ndarray]) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
        return pm.integer_model(node, model, values, static, bits, after_conv)

    def select(times: KernelTimes) -> dict[Key, list[str]]:
        return {key: [k for k in own_kernels(times) if not k.startswith(pm.CONTEXT)]}

    return Probe([key], build, select)


def _after_conv(node: ir.Node) -> bool:
    """Whether ``node`` reads a convolution's output stage, directly or through range-preserving ops."""
    producer = node.inputs[0].producer()
    while producer is not None and (op_facts.fact(producer).range_preserving or op_facts.is_epilogue(producer)):
        producer = producer.inputs[0].producer()
    return producer is not None and producer.op_type in ("Conv", "ConvTranspose")


def _conversion_probe(keys: list[Key], elements: int, bits: int) -> Probe:
    def select(times: KernelTimes) -> dict[Key, list[str]]:
        return {k: [n for n, op in times.ops.items() if op == k[0]] for k in keys}

    return Probe(keys, lambda values: pm.conversion_model(elements, bits), select)


def own_kernels(times: KernelTimes) -> list[str]:
    """The kernels of the optimised single-node graph that price the node: all but the
    QuantizeLinear of a graph input, the DequantizeLinear of a graph output, and the layout changes
    onnxruntime inserted (``Transpose``/``Reorder*`` that are not one of the original nodes)."""
    graph = times.graph
    inputs = {v.name for v in graph.input}
    outputs = {v.name for v in graph.output}
    producers = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)

    def layout(n: onnx.NodeProto) -> bool:
        return n.op_type in _LAYOUT_OPS and n.name not in times.source_names

    def from_input(name: str) -> bool:  # a graph input, possibly through inserted layout changes
        p = producers.get(name)
        return name in inputs or (p is not None and layout(p) and from_input(p.input[0]))

    def to_output(name: str) -> bool:
        uses = consumers.get(name, [])
        return name in outputs or (bool(uses) and all(layout(u) or u.op_type == "Identity" for u in uses)
                                   and all(to_output(u.output[0]) for u in uses))

    skip = set()
    for n in graph.node:
        if layout(n) or (n.op_type == "QuantizeLinear" and from_input(n.input[0])) or (
                n.op_type == "DequantizeLinear" and to_output(n.output[0])):
            skip.add(n.name)
    return [n for n in times.ops if n not in skip]


# -- timing --------------------------------------------------------------------------------------------------
def session_options(profile_prefix: str | None = None, optimized_path: str | None = None) -> ort.SessionOptions:
    """onnxruntime CPU options of every profile and of the validation benchmark."""
    from qinject.backends import onnx_backend

    opts = onnx_backend.session_options(threads=THREADS, optimized_path=optimized_path)
    # Spinning worker threads fight for the cores with anything else running on the machine.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if profile_prefix:
        opts.enable_profiling = True
        opts.profile_file_prefix = profile_prefix
    if optimized_path:
        opts.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                      Path(optimized_path).name + ".data")
        opts.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    return opts


def measure(probe: Probe, values: dict[str, np.ndarray], warmup: int, repeats: int) -> dict[Key, float]:
    """Time ``probe``'s model alone and as ``COPIES`` copies; each key's marginal cost (us)."""
    proto, feeds = probe.build(values)
    (one, one_feeds), (many, many_feeds) = (pm.copies(proto, feeds, n) for n in (1, COPIES))
    if probe.bits is not None:
        one, many = pm.quantized(one, one_feeds, *probe.bits), pm.quantized(many, many_feeds, *probe.bits)
        if probe.quantized_output:
            one, many = pm.quantize_output(one, probe.bits[1]), pm.quantize_output(many, probe.bits[1])
    one, many = time_models([(one, one_feeds), (many, many_feeds)], warmup, repeats)
    picked_one, picked_many = probe.select(one), probe.select(many)
    return {key: marginal_us(one, many, COPIES, picked_one[key], picked_many[key]) for key in probe.keys}


def time_models(models: list[tuple[onnx.ModelProto, dict[str, np.ndarray]]], warmup: int, repeats: int
                ) -> list[KernelTimes]:
    """Time each (model, feeds): wall times of ``repeats`` runs after ``warmup``, the models
    interleaved run by run (a burst of load on the machine hits all alike), then as many profiled
    runs of each."""
    plain = [(_session(m.SerializeToString(), session_options(), m.graph.name), f) for m, f in models]
    walls: list[list[float]] = [[] for _ in models]
    for i in range(warmup + repeats):
        for (sess, feeds), times in zip(plain, walls):
            start = time.perf_counter()
            sess.run(None, feeds)
            if i >= warmup:
                times.append(time.perf_counter() - start)
    del plain
    out = []
    for (model, feeds), times in zip(models, walls):
        timed = _profiled(model, feeds, warmup, repeats)
        timed.wall_us = float(np.median(times)) * 1e6
        out.append(timed)
    return out


def _profiled(model: onnx.ModelProto, feeds: dict[str, np.ndarray], warmup: int, repeats: int) -> KernelTimes:
    with tempfile.TemporaryDirectory(prefix="qinject-profile.") as tmp:
        optimized = os.path.join(tmp, "optimized.onnx")
        sess = _session(model.SerializeToString(), session_options(os.path.join(tmp, "profile"), optimized),
                        model.graph.name)
        for _ in range(warmup + repeats):
            sess.run(None, feeds)
        events = json.loads(Path(sess.end_profiling()).read_text())
        graph = onnx.load(optimized, load_external_data=False).graph
    return KernelTimes(*_runs(events, warmup), graph, {n.name for n in model.graph.node})


def _session(data: bytes, opts: ort.SessionOptions, name: str) -> ort.InferenceSession:
    try:
        return ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001  (onnxruntime raises its own types; one line is enough)
        raise QinjectError(f"onnxruntime cannot run {name}: {str(exc).splitlines()[0]}") from None


def _runs(events: list[dict], warmup: int) -> tuple[list[dict[str, float]], dict[str, str]]:
    """Kernel times grouped by the ``model_run`` that contains them, warm-up runs dropped."""
    runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("cat") == "Session"
                  and e.get("name") == "model_run")
    per_run: list[dict[str, float]] = [{} for _ in runs]
    ops: dict[str, str] = {}
    starts = [r[0] for r in runs]
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        name = e["name"][: -len("_kernel_time")]
        ops[name] = e.get("args", {}).get("op_name", "")
        i = int(np.searchsorted(starts, e["ts"], side="right")) - 1
        if 0 <= i < len(runs) and e["ts"] <= runs[i][1]:
            per_run[i][name] = per_run[i].get(name, 0.0) + float(e["dur"])
    return per_run[warmup:], ops


def _input_values(model: ir.Model, feeds: dict[str, np.ndarray] | None) -> dict[str, np.ndarray]:
    """Every non-constant value of ``model`` from one float run (the inputs of the probes)."""
    from qinject.backends import onnx_backend

    rng = np.random.default_rng(0)
    feeds = dict(feeds or {})
    for value in model.graph.inputs:
        if value.name not in feeds:
            shape = [d if isinstance(d, int) else 1 for d in value.shape]
            dtype = value.dtype.numpy()
            feeds[value.name] = (rng.standard_normal(shape).astype(dtype) if np.dtype(dtype).kind == "f"
                                 else rng.integers(0, 2, shape).astype(dtype))
    proto = onnx_backend.to_proto(model)
    known = {v.name for v in proto.graph.output}
    wanted = [v for n in model.graph for v in n.outputs if v.name and v.name not in known and v.type is not None]
    for value in wanted:
        proto.graph.output.append(pm._value_info(value.name, value.dtype, value.shape or []))
    opts = session_options()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return {**feeds, **dict(zip(names, sess.run(names, feeds)))}


# -- the roofline --------------------------------------------------------------------------------------------
def fit_roofline(warmup: int = 3, repeats: int = 15) -> Roofline:
    """This machine's roofline in onnxruntime: fp32 and int8 peaks from a large MatMul (float, and
    quantized W8A8 by qinject so it runs as one integer kernel), bandwidth from a large Add, the
    per-op overhead from a chain of one-element Adds (marginal costs, as for entries). 16-bit layers
    run as dequantize + float in onnxruntime (it has no int16 kernels), so fp16/int16 are left out and
    priced at fp32; W4A8 also runs in float, int4 is left out."""
    m, k, n = 256, 1024, 1024
    flops = 2.0 * m * k * n
    matmul = pm.matmul_model(m, k, n)
    peaks = {"fp32": flops / (_marginal(*matmul, None, warmup, repeats) * 1e-6),
             "int8": flops / (_marginal(*matmul, (8, 8), warmup, repeats) * 1e-6)}
    big, chain = 1 << 23, 50
    bandwidth = 3 * 4 * big / (_marginal(*pm.elementwise_model(big), None, warmup, repeats) * 1e-6)
    overhead = _marginal(*pm.add_chain_model(chain), None, warmup, max(repeats, 30)) / chain
    notes = (f"fitted by qinject.profiler.fit_roofline: fp32 and int8 from a {m}x{k}x{n} MatMul, bandwidth from "
             f"an Add of {big} floats, overhead per op from a chain of {chain} one-element Adds; {THREADS} "
             "intra-op threads. onnxruntime has no int16 kernels (16-bit QDQ runs as dequantize + float), so "
             "16-bit is priced at fp32")
    return Roofline({p: float(f"{v:.4g}") for p, v in peaks.items()}, float(f"{bandwidth:.4g}"),
                    round(overhead, 2), "fp16", notes)


def _marginal(proto: onnx.ModelProto, feeds: dict[str, np.ndarray], bits: tuple[int, int] | None, warmup: int,
              repeats: int) -> float:
    probe = Probe([("model", "", 0, 0)], lambda values: (proto, feeds),
                  lambda times: {("model", "", 0, 0): own_kernels(times)}, bits)
    return measure(probe, {}, warmup, repeats)[("model", "", 0, 0)]
