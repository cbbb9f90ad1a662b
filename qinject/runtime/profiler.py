"""Measure a model's latency table on this machine through onnxruntime (``qinject profile``).

What is measured. Every quantizable node (after the quantize pipeline's folding), with the epilogue
that runs inside its kernel (a ReLU), is cut out into a single-node model (``qinject.profiler_models``)
and quantized by qinject's own pipeline at each candidate (weight bits, activation bits), so that
onnxruntime fuses exactly what the rewrite produces. Every other node is timed in float, range-
preserving ops (MaxPool, Reshape, ...) also on integers, and each tensor that may cross a precision
boundary gets a QuantizeLinear and a DequantizeLinear entry (keys ``x<elements>``, what
``qinject.cost`` looks up). Where a convolution writes a probe's input in the model, a 1x1 context
convolution does in the probe, since onnxruntime picks a kernel's layout from its neighbours
(NHWC around QLinearConv, NCHWc blocks around a float Conv).

How a node is timed (``qinject.profiler_timing``): each probe runs alone and as three copies side by
side, unprofiled (wall time) and with onnxruntime's per-node profiling (which kernels ran, and their
shares). An entry is the wall time one more copy adds, times the share of the profiled time that
copy added which the node's own kernels took:

- its own kernels are the fused integer kernel (QLinearConv, QGemm, ...), or, where onnxruntime
  does not fuse (16-bit, 4-bit weights), the DequantizeLinear of its inputs and weight, the float
  kernel and the QuantizeLinear of its output, which run in a whole quantized graph too;
- not its own: the QuantizeLinear of the probe's input and the DequantizeLinear of its output (the
  cost model charges those as conversions where precision regions meet), the context's kernels, and
  the layout changes onnxruntime adds around a lone kernel. Layout changes at a precision boundary
  (NHWC ``Transpose`` into and out of QLinearConv, ``ReorderOutput`` out of a float NCHWc region)
  are part of the conversion entries instead: they run only where the regions meet.

Why not the profiled kernel times themselves: profiling inflates small kernels (onnxruntime then
also collects thread-pool statistics; a 3-Gemm MLP that runs in 45 us profiles at 65 us of
kernels). Why not the wall time of one copy: it includes what a run pays once, however many nodes it
holds: the ``session.run`` call (~10 us) and waking the thread pool for the first parallel kernel
(~30 us here, without spinning), which would be charged to every node (single Gemms of the digits
MLP came out at 35 us each, where the whole MLP runs in 45 us). The end-to-end validation of this
choice is in ``BENCHMARKS.md`` (``bench_latency``).

Execution modes (``qinject.plan.MODES``). Each quantizable node is also timed in every other mode
it has (``op_facts.modes``), rewritten by the same pipeline with a plan that names the node alone
(its contexts stay float), at the widths of ``MODE_BITS``: dynamic at W8A8 (onnxruntime's
DynamicQuantizeMatMul, or DynamicQuantizeLinear + MatMulIntegerToFloat), weight-only at W4 and W8
in blocks of ``BLOCK_SIZE`` (MatMulNBits; a Conv runs the DequantizeLinear of its weight and the float
kernel every run), with activation bits 32 in the table. Such a node reads and writes float, so every
kernel of its probe is its own (the run-time quantization of its input included) and it has no
quantized output and no conversion entries of its own: conversions and integer data movement are
measured for static widths only.

Entries are medians over ``repeats`` runs after ``warmup`` runs, on onnxruntime's CPU provider
with ``THREADS`` intra-op threads and no spinning (the options of ``tools/bench_latency.py``). An
entry already in the given table is not measured again, and entries of other models are kept.
"""

from __future__ import annotations

import datetime
import math
import os
import platform
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from qinject.backends import onnx_backend
from qinject.core import ir as qir
from qinject.core import op_facts
from qinject.core.errors import QinjectError
from qinject.core.pass_manager import PassManager
from qinject.core.plan import DYNAMIC, MODES, STATIC, WEIGHT_ONLY, NodeQuant, Plan
from qinject.core.quant_points import activation_points, output_point
from qinject.cost.latency_table import FLOAT_BITS, PEAK_MATMUL, Entry, LatencyTable, Roofline
from qinject.frontends.onnx_frontend import load_onnx
from qinject.passes.transforms import prepare
from qinject.runtime import profiler_models as pm
from qinject.runtime.profiler_timing import (
    COPIES,
    THREADS,
    KernelTimes,
    conversion_kernels,
    marginal_us,
    own_kernels,
    time_models,
)

DEFAULT_BITS = ((32, 32), (16, 16), (8, 8), (4, 8))
# The (weight bits, activation bits) each other mode is timed at: dynamic runs W8A8 only (onnxruntime's
# DynamicQuantizeMatMul); weight-only activations stay float (bits 32, as the table keys them).
MODE_BITS = {DYNAMIC: ((8, 8),), WEIGHT_ONLY: ((4, FLOAT_BITS), (8, FLOAT_BITS))}
# Weight-only entries are timed at the plan's default block size; the table keys no block size.
BLOCK_SIZE = 32
# onnxruntime removes these from a graph unless they read a graph input.
_REMOVABLE = frozenset({"Dropout", "Identity"})

Key = tuple[str, str, int, int, str]  # (op, shape, weight bits, activation bits, mode): an Entry's key


@dataclass
class Probe:
    """One single-node model to time, and which of its kernels price which entries.

    ``build`` makes the model (float for node probes: it is copied, then quantized as ``quant``
    says); ``select`` names, in onnxruntime's optimised graph, the kernels of each entry's key.
    """

    keys: list[Key]
    build: Callable[[dict[str, np.ndarray]], tuple[onnx.ModelProto, dict[str, np.ndarray]]]
    select: Callable[[KernelTimes], dict[Key, list[str]]]
    quant: NodeQuant | None = None  # None: timed as built (float, or already quantized)
    quantized_output: bool = False  # the output is read by a quantized node in the model
    # A dynamic / weight-only probe quantizes this node alone (and its copies); static ones quantize
    # every node, contexts included (a context on the integer side runs quantized in the model too).
    only: str | None = None


@dataclass
class ProfileRun:
    """What ``run_profile`` did: the table, and how many entries it measured or found cached."""

    table: LatencyTable
    measured: int = 0
    reused: int = 0
    failed: list[str] = field(default_factory=list)


def profile(model: str | os.PathLike | onnx.ModelProto | ir.Model, table: LatencyTable | None = None, *,
            batch: int = 1, bits: Iterable[tuple[int, int]] = DEFAULT_BITS, modes: Iterable[str] = MODES,
            warmup: int = 3, repeats: int = 15, progress: bool = True, target: str = "local-cpu",
            feeds: dict[str, np.ndarray] | None = None, input_shapes: dict[str, Sequence[int]] | None = None
            ) -> LatencyTable:
    """Measure ``model``'s latency entries on this machine (onnxruntime CPU) into a table.

    Args:
        model: an ONNX path, ModelProto or IR model (jax-domain graphs: export them to ONNX first).
        table: a table to extend; its entries are not measured again, its roofline is kept. None:
            a new table named ``target`` with a roofline fitted from microbenchmarks.
        batch: the size given to a symbolic batch dimension.
        bits: the (weight bits, activation bits) to time every quantizable node at statically;
            (32, 32) is float, timed whatever ``modes`` says.
        modes: the execution modes to time (``qinject.plan.MODES``): ``static`` at ``bits``, the
            others at ``MODE_BITS`` for the nodes that have them.
        warmup, repeats: runs before timing, and timed runs (the median is kept).
        feeds: the model's inputs for the run that gives each node realistic input values
            (default: standard normal floats, integer inputs 0 or 1).
        input_shapes: input name -> shape, for inputs with symbolic dims other than the batch.

    Returns:
        ``table`` itself with the new entries, or the new table.
    """
    return run_profile(model, table, batch=batch, bits=bits, modes=modes, warmup=warmup, repeats=repeats,
                       progress=progress, target=target, feeds=feeds, input_shapes=input_shapes).table


def run_profile(model: str | os.PathLike | onnx.ModelProto | ir.Model, table: LatencyTable | None = None, *,
                batch: int = 1, bits: Iterable[tuple[int, int]] = DEFAULT_BITS, modes: Iterable[str] = MODES,
                warmup: int = 3, repeats: int = 15, progress: bool = True, target: str = "local-cpu",
                feeds: dict[str, np.ndarray] | None = None,
                input_shapes: dict[str, Sequence[int]] | None = None) -> ProfileRun:
    """``profile``, also saying how many entries were measured and how many were already there."""
    bits, modes = _check_bits(bits), _check_modes(modes)
    ir_model = _prepared(model, batch, input_shapes)
    if table is None:
        table = LatencyTable(target, "measured", fit_roofline(warmup, repeats), *_provenance())
    run = ProfileRun(table)
    values = _input_values(ir_model, feeds)
    _observed_shapes(ir_model, values)
    probes = probes_for(ir_model, bits, modes)
    wanted = {k for p in probes for k in p.keys}
    todo = [p for p in probes if any(k not in table.entries for k in p.keys)]
    run.reused = len(wanted & set(table.entries))
    from tqdm.auto import tqdm  # slow to import (it loads its notebook support); only a profile run needs it

    for probe in tqdm(todo, desc="profiling", unit="model", disable=None if progress and todo else True, leave=False):
        try:
            prices = measure(probe, values, warmup, repeats)
        except QinjectError as exc:  # e.g. a node the rewrite cannot quantize at these bits
            run.failed.append(f"{_label(probe.keys[0])}: {exc}")
            continue
        for (op, shape, w, a, mode), us in prices.items():
            if (op, shape, w, a, mode) not in table.entries:
                table.add(Entry(op, shape, w, a, round(us, 3), mode))
                run.measured += 1
    return run


def _label(key: Key) -> str:
    op, shape, w, a, mode = key
    return f"{op} {shape} W{w}A{a}" + ("" if mode == STATIC else f" {mode}")


def _check_bits(bits: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    out = []
    for w, a in bits:
        if (w, a) != (FLOAT_BITS, FLOAT_BITS) and (w not in (4, 8, 16) or a not in (4, 8, 16)):
            raise QinjectError(f"bit widths {w}/{a} are not profilable: use 32/32 (float) or weights and "
                               "activations of 4, 8 or 16")
        out.append((w, a))
    return out


def _check_modes(modes: Iterable[str]) -> tuple[str, ...]:
    out = tuple(modes)
    unknown = [m for m in out if m not in MODES]
    if unknown or not out:
        raise QinjectError(f"modes {unknown or list(out)} are not profilable (--modes): choose some of "
                           f"{list(MODES)}")
    return out


def _prepared(model: str | os.PathLike | onnx.ModelProto | ir.Model, batch: int,
              input_shapes: dict[str, Sequence[int]] | None = None) -> ir.Model:
    """The model as the cost model sees it: constants folded, Conv affines fused, batch (and the
    symbolic dims ``input_shapes`` sizes) concrete."""

    ir_model = model if isinstance(model, ir.Model) else load_onnx(model)
    if qir.has_jax_nodes(ir_model):
        raise QinjectError("the model holds jax equations, which onnxruntime cannot run: export it to ONNX "
                           "first (qinject.export_onnx)")
    ir_model = PassManager(prepare()).run(ir_model.clone()).model
    _give_shapes(ir_model, input_shapes or {})
    return qir.with_batch(ir_model, batch)


def _give_shapes(model: ir.Model, shapes: dict[str, Sequence[int]]) -> None:
    """Record the caller's input shapes where ``qir.with_batch`` reads them."""
    inputs = {v.name: v for v in model.graph.inputs}
    for name, dims in shapes.items():
        if name not in inputs:
            raise QinjectError(f"input shape given for {name!r}, which is not a model input (inputs: "
                               f"{sorted(inputs)})")
        have = inputs[name].shape
        if have is not None and len(have) != len(dims):
            raise QinjectError(f"input shape for {name!r} has {len(dims)} dims, the input has {len(have)} "
                               f"({[str(d) for d in have]})")
    if shapes:
        model.meta[qir.INPUT_SHAPES] = {n: tuple(int(d) for d in dims) for n, dims in shapes.items()}
        model.meta[qir.SHAPES_GIVEN] = True


def _observed_shapes(model: ir.Model, values: dict[str, np.ndarray]) -> None:
    """Give the values shape inference left symbolic the shapes they had in the float run: onnx's
    data propagation stops at shape arithmetic such as a Slice whose end comes from an input's
    Shape (TorchScript BERT's position ids), and every node after it would have no latency key."""
    for node in model.graph:
        for value in node.outputs:
            known = value.shape is not None and all(isinstance(d, int) for d in value.shape)
            if value.name in values and not known:
                value.shape = ir.Shape(values[value.name].shape)


def _provenance() -> tuple[str, str]:
    description = (f"{_cpu_name()} through onnxruntime {ort.__version__} (CPU provider, {THREADS} intra-op "
                   "threads, no spinning): each kernel's cost in a run, medians (qinject.profiler)")
    source = (f"qinject profile on {os.cpu_count()} cores, {_cpu_name()}, {platform.platform()}; "
              f"{datetime.date.today().isoformat()}")
    return description, source


def _cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    text = cpuinfo.read_text() if cpuinfo.exists() else ""
    return next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name")),
                platform.processor() or "unknown CPU")


# -- what to measure ---------------------------------------------------------------------------------------
def probes_for(model: ir.Model, bits: list[tuple[int, int]], modes: Iterable[str] = MODES) -> list[Probe]:
    """The single-node models to time for ``model`` (with concrete shapes), deduplicated by key.

    ``bits`` are the static widths (and float); without ``static`` in ``modes`` only float of them."""
    static = pm.static_values(model)
    fused = {n.name for q in qir.quantizable_nodes(model) for n in pm.node_group(q)[1:]}
    modes = tuple(modes)
    bits = bits if STATIC in modes else [b for b in bits if b == (FLOAT_BITS, FLOAT_BITS)]
    probes: dict[Key, Probe] = {}
    act_bits = sorted({a for w, a in bits if a != FLOAT_BITS})
    for node in model.graph:
        key = op_facts.latency_key(node)
        if key is None or node.name in fused:
            continue
        for probe in _node_probes(node, key, model, static, bits, modes):
            probes.setdefault(probe.keys[0], probe)
        if op_facts.preserves_range(node) and _float_input(node) and node.inputs[0].name not in static:
            # The rewrite leaves range-preserving ops on integers only after 8-bit integer kernels.
            for a in (a for a in act_bits if a == 8):
                full = (*key, 0, a, STATIC)
                if full not in probes:
                    probes[full] = _integer_probe(full, node, model, static, a)
    # Only static nodes convert: a dynamic or weight-only node reads and writes float.
    for value in _conversion_values(model).values():
        for a in act_bits:
            for op in ("QuantizeLinear", "DequantizeLinear"):
                full = (op, f"x{math.prod(value.shape)}", 0, a, STATIC)
                probes[full] = _conversion_probe(full, value)
    return list(probes.values())


def _node_probes(node: ir.Node, key: tuple[str, str], model: ir.Model, static: set[str],
                 bits: list[tuple[int, int]], modes: tuple[str, ...]) -> Iterator[Probe]:
    """``node``'s probes: float alone if it is not quantizable, else each static width of ``bits``
    and each other mode of ``modes`` it has, at ``MODE_BITS``."""
    if not op_facts.is_quantizable(node):
        yield _node_probe((*key, FLOAT_BITS, FLOAT_BITS, STATIC), [node], model, static, None)
        return
    group = pm.node_group(node)
    static_form = STATIC in op_facts.modes(node)  # LSTM has none: a static width would time float again
    for w, a in (b for b in bits if static_form or b == (FLOAT_BITS, FLOAT_BITS)):
        # A node without a weight (activation x activation) is keyed by its activation bits twice.
        w_key = w if (w == FLOAT_BITS or op_facts.weight_of(node) is not None) else a
        quant = None if (w, a) == (FLOAT_BITS, FLOAT_BITS) else NodeQuant(weights=w, activations=a)
        yield _node_probe((*key, w_key, a, STATIC), group, model, static, quant)
    for mode in (m for m in op_facts.modes(node) if m != STATIC and m in modes):
        for w, a in MODE_BITS[mode]:
            # weight-only ignores the plan's activation bits: the default keeps NodeQuant valid
            quant = NodeQuant(weights=w, mode=mode, block_size=BLOCK_SIZE)
            yield _mode_probe((*key, w, a, mode), group, model, static, quant)


def _float_input(node: ir.Node) -> bool:
    value = node.inputs[0] if node.inputs else None
    return value is not None and value.dtype is not None and value.dtype.is_floating_point()


def _conversion_values(model: ir.Model) -> dict[int, ir.Value]:
    """A tensor of each size that may cross a precision boundary (the activation points, and what
    range-preserving ops carry on from them), by element count."""
    sizes: dict[int, ir.Value] = {}
    frontier = list(activation_points(model))
    while frontier:
        value = frontier.pop(0)
        if value.shape is None or not all(isinstance(d, int) for d in value.shape):
            continue
        sizes.setdefault(math.prod(value.shape), value)
        frontier += [v for u in value.uses() if u.idx == 0 for v in op_facts.carried(u.node)]
    return sizes


def _node_probe(key: Key, group: list[ir.Node], model: ir.Model, static: set[str], quant: NodeQuant | None
                ) -> Probe:
    return Probe([key], _group_builder(group, model, static), lambda times: {key: own_kernels(times)},
                 quant, _read_quantized(output_point(group[0])))


def _mode_probe(key: Key, group: list[ir.Node], model: ir.Model, static: set[str], quant: NodeQuant) -> Probe:
    """A dynamic or weight-only node: float in and out, so every kernel but the contexts' is its own
    (the run-time quantization of its input, the dequantization of its weight)."""
    return Probe([key], _group_builder(group, model, static), lambda times: {key: own_kernels(times)},
                 quant, only=group[0].name)


def _group_builder(group: list[ir.Node], model: ir.Model, static: set[str]
                   ) -> Callable[[dict[str, np.ndarray]], tuple[onnx.ModelProto, dict[str, np.ndarray]]]:
    def build(values: dict[str, np.ndarray]) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
        proto, feeds = pm.group_model(group, model, values, static)
        inputs = [v for v in pm.group_inputs(group) if v.name in feeds]
        if group[0].op_type in _REMOVABLE:
            pm.with_contexts(proto, feeds, [v.name for v in inputs[:1]], "Neg")
        else:
            pm.with_contexts(proto, feeds, [v.name for v in inputs if pm.conv_fed(v)])
        return proto, feeds

    return build


def _read_quantized(value: ir.Value) -> bool:
    """Whether a quantizable node reads ``value`` as an activation (so, in a uniformly quantized
    model, the rewrite quantizes it), directly or through range-preserving ops."""
    for use in value.uses():
        if op_facts.is_quantizable(use.node) and use.idx in op_facts.activation_inputs(use.node):
            return True
        if use.idx == 0 and any(_read_quantized(v) for v in op_facts.carried(use.node)):
            return True
    return False


def _integer_probe(key: Key, node: ir.Node, model: ir.Model, static: set[str], bits: int) -> Probe:
    def build(values: dict[str, np.ndarray]) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
        return pm.integer_model(node, model, values, static, bits)

    return Probe([key], build, lambda times: {key: own_kernels(times)})


def _conversion_probe(key: Key, value: ir.Value) -> Probe:
    shape, after, before = tuple(value.shape), pm.conv_fed(value), pm.conv_read(value)

    def build(values: dict[str, np.ndarray]) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
        return pm.conversion_model(shape, key[3], key[0], after, before)

    return Probe([key], build, lambda times: {key: conversion_kernels(times, key[0])})


# -- timing --------------------------------------------------------------------------------------------------
def measure(probe: Probe, values: dict[str, np.ndarray], warmup: int, repeats: int) -> dict[Key, float]:
    """Time ``probe``'s model alone and as ``COPIES`` copies; each key's marginal cost (us)."""
    proto, feeds = probe.build(values)
    (one, one_feeds), (many, many_feeds) = (pm.copies(proto, feeds, n) for n in (1, COPIES))
    if probe.quant is not None:
        one, many = _quantized(probe, one, one_feeds, 1), _quantized(probe, many, many_feeds, COPIES)
    one, many = time_models([(one, one_feeds), (many, many_feeds)], warmup, repeats)
    picked_one, picked_many = probe.select(one), probe.select(many)
    return {key: marginal_us(one, many, COPIES, picked_one[key], picked_many[key]) for key in probe.keys}


def _quantized(probe: Probe, proto: onnx.ModelProto, feeds: dict[str, np.ndarray], count: int
               ) -> onnx.ModelProto:
    """``count`` copies of ``probe``'s model through the quantize pipeline as the probe says."""
    if probe.only is None:
        out = pm.quantized(proto, feeds, Plan(probe.quant))
        return pm.quantize_output(out, probe.quant.activations) if probe.quantized_output else out
    names = pm.copy_names(probe.only, count)
    out = pm.quantized(proto, feeds, Plan(None, dict.fromkeys(names, probe.quant)))
    # The rewrite leaves a node float (with a note) where it has no such form: timing it would
    # price float as the mode.
    if not all(pm.mode_applied(out, name, probe.quant.mode) for name in names):
        raise QinjectError(f"the rewrite left node {probe.only!r} float in mode {probe.quant.mode!r} "
                           "(its note says why): no entry")
    return out


def _input_values(model: ir.Model, feeds: dict[str, np.ndarray] | None) -> dict[str, np.ndarray]:
    """Every non-constant value of ``model`` from one float run (the inputs of the probes)."""
    rng = np.random.default_rng(0)
    feeds = dict(feeds or {})
    for value in model.graph.inputs:
        if value.name not in feeds:
            shape = [d if isinstance(d, int) else 1 for d in value.shape]
            dtype = value.dtype.numpy()
            feeds[value.name] = (rng.standard_normal(shape).astype(dtype) if np.dtype(dtype).kind == "f"
                                 else rng.integers(0, 2, shape).astype(dtype))
    return onnx_backend.all_values(model, feeds)


# -- the roofline --------------------------------------------------------------------------------------------
def fit_roofline(warmup: int = 3, repeats: int = 15) -> Roofline:
    """This machine's roofline in onnxruntime: fp32 and int8 peaks from a large MatMul (float, and
    quantized W8A8 by qinject so it runs as one integer kernel), bandwidth from a large Add, the
    per-op overhead from a chain of one-element Adds (marginal costs, as for entries). 16-bit layers
    run as dequantize + float in onnxruntime (it has no int16 kernels), so fp16/int16 are left out and
    priced at fp32; W4A8 also runs in float, int4 is left out."""
    m, k, n = PEAK_MATMUL
    flops = 2.0 * m * k * n
    matmul = pm.matmul_model(m, k, n)
    peaks = {"fp32": flops / (_marginal(*matmul, None, warmup, repeats) * 1e-6),
             "int8": flops / (_marginal(*matmul, NodeQuant(), warmup, repeats) * 1e-6)}
    big, chain = 1 << 23, 50
    bandwidth = 3 * 4 * big / (_marginal(*pm.elementwise_model(big), None, warmup, repeats) * 1e-6)
    overhead = _marginal(*pm.add_chain_model(chain), None, warmup, max(repeats, 30)) / chain
    # What a run pays once, whatever its graph (session.run): a one-Add model's wall time less the Add.
    (single,) = time_models([pm.add_chain_model(1)], warmup, max(repeats, 30))
    per_run = max(single.wall_us - overhead, 0.0)
    notes = (f"fitted by qinject.profiler.fit_roofline: fp32 and int8 from a {m}x{k}x{n} MatMul, bandwidth from "
             f"an Add of {big} floats, overhead per op from a chain of {chain} one-element Adds; {THREADS} "
             "intra-op threads. onnxruntime has no int16 kernels (16-bit QDQ runs as dequantize + float), so "
             "16-bit is priced at fp32")
    notes += "; run_overhead_us: a one-Add model's wall time less the Add (session.run)"
    return Roofline({p: float(f"{v:.4g}") for p, v in peaks.items()}, float(f"{bandwidth:.4g}"),
                    round(overhead, 2), "fp16", notes, round(per_run, 2))


def _marginal(proto: onnx.ModelProto, feeds: dict[str, np.ndarray], quant: NodeQuant | None, warmup: int,
              repeats: int) -> float:
    key = ("model", "", 0, 0, STATIC)
    probe = Probe([key], lambda values: (proto, feeds), lambda times: {key: own_kernels(times)}, quant)
    return measure(probe, {}, warmup, repeats)[key]
