"""Timing for the profiler: how long a kernel of a small model takes in a run, on onnxruntime's CPU
provider, and which kernels of onnxruntime's optimised graph belong to what is being priced.

Every model is timed twice: as is and as ``COPIES`` independent copies side by side, each without
profiling (wall time, the models interleaved run by run) and with onnxruntime's per-node profiling
(kernel times). The cost of a kernel in a run is the wall time one more copy adds, times that
kernel's share of the profiled time one more copy adds (``marginal_us``).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from qinject.backends import onnx_backend
from qinject.core.errors import QinjectError
from qinject.runtime import profiler_models as pm

THREADS = 2
# Each model is timed alone and as this many copies side by side: the difference is its cost in a run.
COPIES = 3
# A kernel onnxruntime folded away at session creation still gets an entry (the format wants > 0).
FLOOR_US = 0.01
LAYOUT_OPS = frozenset({"Transpose", "ReorderInput", "ReorderOutput"})
_QDQ = frozenset({"QuantizeLinear", "DequantizeLinear"})


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


class _Optimised:
    """onnxruntime's optimised graph of a probe, for telling its kernels apart."""

    def __init__(self, times: KernelTimes) -> None:
        graph = times.graph
        self.nodes = list(graph.node)
        self.inputs = {v.name for v in graph.input}
        self.outputs = {v.name for v in graph.output}
        self.initializers = {t.name for t in graph.initializer}
        self.producers = {o: n for n in graph.node for o in n.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for n in graph.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        self.inserted = {n.name for n in graph.node if n.op_type in LAYOUT_OPS and n.name not in times.source_names}
        self.contexts = {n.name for n in graph.node if n.name.startswith(pm.CONTEXT)
                         and n.op_type not in _QDQ and n.name not in self.inserted}

    def downstream(self, names: set[str]) -> set[str]:
        seen, todo = set(), [n for n in self.nodes if n.name in names]
        while todo:
            for out in todo.pop().output:
                for user in self.consumers.get(out, []):
                    if user.name not in seen:
                        seen.add(user.name)
                        todo.append(user)
        return seen

    def upstream(self, names: set[str]) -> set[str]:
        seen, todo = set(), [n for n in self.nodes if n.name in names]
        while todo:
            for inp in todo.pop().input:
                producer = self.producers.get(inp)
                if producer is not None and producer.name not in seen:
                    seen.add(producer.name)
                    todo.append(producer)
        return seen

    def from_input(self, name: str) -> bool:
        """A graph input, possibly through inserted layout changes."""
        p = self.producers.get(name)
        return name in self.inputs or (p is not None and p.name in self.inserted and self.from_input(p.input[0]))

    def to_output(self, name: str) -> bool:
        uses = self.consumers.get(name, [])
        return name in self.outputs or (bool(uses) and all(
            (u.name in self.inserted or u.op_type == "Identity") and self.to_output(u.output[0]) for u in uses))


def own_kernels(times: KernelTimes) -> list[str]:
    """The kernels of a node probe that price the node: all but the contexts' (with the
    DequantizeLinear of their inputs and the QuantizeLinear of their outputs), the QuantizeLinear of a
    graph input, the DequantizeLinear of a graph output, and the layout changes onnxruntime inserted,
    except those between a context and the node (a Flatten after a QLinearConv needs its input back
    in NCHW, in a network too)."""
    g = _Optimised(times)
    excluded = set(g.contexts)
    for n in g.nodes:
        if (n.op_type == "DequantizeLinear" and any(u.name in g.contexts for u in g.consumers.get(n.output[0], []))
                or n.op_type == "QuantizeLinear" and g.producers.get(n.input[0]) is not None
                and g.producers[n.input[0]].name in g.contexts
                or n.op_type == "QuantizeLinear" and g.from_input(n.input[0])
                or n.op_type == "DequantizeLinear" and g.to_output(n.output[0])):
            excluded.add(n.name)
    kernels = {n.name for n in g.nodes if n.name not in excluded and n.name not in g.inserted}
    between = g.inserted & g.downstream(g.contexts) & g.upstream(kernels)
    return [n for n in times.ops if n in kernels | between]


def conversion_kernels(times: KernelTimes, op: str) -> list[str]:
    """The kernels of a conversion probe that price the conversion: the ``op`` (QuantizeLinear or
    DequantizeLinear) of the tensor and the layout changes onnxruntime inserted, between the context
    that writes the tensor (or the graph input) and the one that reads it (or the graph output)."""
    g = _Optimised(times)
    before = {n for n in g.contexts if n.startswith(pm.BEFORE)}
    after = {n for n in g.contexts if n.startswith(pm.AFTER)}
    span = ((g.downstream(before) if before else {n.name for n in g.nodes})
            & (g.upstream(after) if after else {n.name for n in g.nodes})) - g.contexts
    picked = {n.name for n in g.nodes if n.name in span and (
        n.name in g.inserted or n.op_type == op and n.input[0] not in g.initializers)}
    return [n for n in times.ops if n in picked]


def session_options(profile_prefix: str | None = None, optimized_path: str | None = None) -> ort.SessionOptions:
    """onnxruntime CPU options of every profile and of the validation benchmark."""

    opts = onnx_backend.session_options(threads=THREADS, optimized_path=optimized_path, spinning=False)
    if profile_prefix:
        opts.enable_profiling = True
        opts.profile_file_prefix = profile_prefix
    if optimized_path:
        opts.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                      Path(optimized_path).name + ".data")
        opts.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    return opts


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
