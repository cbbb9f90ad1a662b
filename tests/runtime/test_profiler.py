"""The profiler: which entries it measures, its cache, its CLI, and that the cost model uses them."""

from __future__ import annotations

import math
import os

import numpy as np
import onnx
import pytest

from qinject.core import ir as qir
from qinject.core import op_facts
from qinject.core.errors import QinjectError
from qinject.core.quant_points import activation_points
from qinject.cost import estimate as cost
from qinject.latency_table import FLOAT_BITS, Entry, LatencyTable, Roofline
from qinject.plan import DYNAMIC, STATIC, WEIGHT_ONLY, NodeQuant, Plan
from qinject.runtime import profiler
from qinject.runtime import profiler_models as pm
from qinject.runtime import profiler_timing as timing
from tests.builders import conv_net, matmul_net, run_cli

BATCH = 4
FAST = {"warmup": 1, "repeats": 3, "progress": False}


def empty_table() -> LatencyTable:
    """A table with a roofline already, so a test does not spend time fitting one."""
    return LatencyTable("test-cpu", "measured", Roofline({"fp32": 1e11}, 1e10, 1.0))


@pytest.fixture(scope="module")
def profiled() -> tuple[LatencyTable, object]:
    table = profiler.profile(conv_net(), empty_table(), batch=BATCH, **FAST)
    return table, profiler._prepared(conv_net(), BATCH)


def test_every_quantizable_node_at_every_bit_width(profiled) -> None:
    table, model = profiled
    nodes = qir.quantizable_nodes(model)
    assert [n.name for n in nodes] == ["conv1", "conv2", "fc"]
    for node in nodes:
        for w, a in profiler.DEFAULT_BITS:
            assert table.lookup(*op_facts.latency_key(node), w, a) is not None, (node.name, w, a)


def test_every_mode_a_node_has(profiled) -> None:
    """The Gemm runs dynamic and weight-only, the convolutions weight-only (no dynamic form)."""
    table, model = profiled
    for node in qir.quantizable_nodes(model):
        have = {(e.weight_bits, e.activation_bits, e.mode) for e in table
                if (e.op, e.shape) == op_facts.latency_key(node) and e.mode != STATIC}
        want = {(w, a, m) for m in op_facts.modes(node) if m != STATIC for w, a in profiler.MODE_BITS[m]}
        assert have == want, node.name
    assert {m for e in table for m in [e.mode] if e.op == "Gemm"} == {STATIC, DYNAMIC, WEIGHT_ONLY}
    assert {e.mode for e in table if e.op == "Conv"} == {STATIC, WEIGHT_ONLY}


def test_conversions_float_nodes_and_integer_moves(profiled) -> None:
    table, model = profiled
    for value in activation_points(model):
        for op in ("QuantizeLinear", "DequantizeLinear"):
            for bits in (8, 16):
                assert table.lookup(op, f"x{math.prod(value.shape)}", 0, bits) is not None, (value.name, op, bits)
    by_name = {n.name: n for n in model.graph}
    for name in ("pool1", "flatten"):  # not quantizable: float, and on integers as the rewrite leaves them
        key = op_facts.latency_key(by_name[name])
        assert table.lookup(*key, 32, 32) is not None and table.lookup(*key, 0, 8) is not None
    # A ReLU runs inside its convolution's kernel: no entry of its own.
    assert not [e for e in table if e.op == "Relu"]
    assert all(e.latency_us > 0 for e in table)


def test_weightless_keys_and_matmul(tmp_path) -> None:
    table = profiler.profile(matmul_net(), empty_table(), batch=BATCH, bits=[(8, 8), (4, 8)], **FAST)
    model = profiler._prepared(matmul_net(), BATCH)
    for node in qir.quantizable_nodes(model):
        assert table.lookup(*op_facts.latency_key(node), 4, 8) is not None


@pytest.fixture(scope="module")
def moded() -> tuple[LatencyTable, object]:
    """A MatMul model timed in float and in its other modes only."""
    table = profiler.profile(matmul_net(), empty_table(), batch=BATCH, bits=[(32, 32)],
                             modes=[DYNAMIC, WEIGHT_ONLY], **FAST)
    return table, profiler._prepared(matmul_net(), BATCH)


def test_matmul_modes_are_measured_and_positive(moded) -> None:
    table, model = moded
    nodes = qir.quantizable_nodes(model)
    assert [n.name for n in nodes] == ["mm1", "mm2"]
    for node in nodes:
        key = op_facts.latency_key(node)
        for w, a, mode in ((8, 8, DYNAMIC), (4, FLOAT_BITS, WEIGHT_ONLY), (8, FLOAT_BITS, WEIGHT_ONLY)):
            us = table.lookup(*key, w, a, mode)
            assert us is not None and us > 0, (node.name, w, a, mode)
    # Without static: float only, no static widths, and no conversions (moded nodes read and write float).
    assert {(e.weight_bits, e.activation_bits) for e in table if e.mode == STATIC} == {(32, 32)}
    assert not [e for e in table if e.op in ("QuantizeLinear", "DequantizeLinear")]


def test_estimate_prices_modes_from_the_entries(moded, profiled) -> None:
    table, model = moded
    for choice in (NodeQuant(mode=DYNAMIC), NodeQuant(weights=4, mode=WEIGHT_ONLY),
                   NodeQuant(weights=8, mode=WEIGHT_ONLY)):
        report = cost.estimate(model, Plan(choice), table, BATCH, baselines=False)
        by_node = {n.node: n for n in report.nodes}
        assert by_node["relu1"].source.startswith("fused into mm1")
        for name in ("mm1", "mm2"):
            assert by_node[name].source == cost.MEASURED and by_node[name].mode == choice.mode, (name, choice)
        assert report.conversions == []
    table, model = profiled
    plan = Plan(NodeQuant(weights=4, mode=WEIGHT_ONLY), {"fc": NodeQuant(mode=DYNAMIC)})
    report = cost.estimate(model, plan, table, BATCH, baselines=False)
    assert {n.node: n.source for n in report.nodes if n.quantizable} == dict.fromkeys(
        ["conv1", "conv2", "fc"], cost.MEASURED)


def test_a_written_table_keeps_its_modes(moded, tmp_path) -> None:
    table, _ = moded
    loaded = LatencyTable.load(table.save(tmp_path / "table.json"))
    assert loaded.entries == table.entries
    assert {e.mode for e in loaded} == {STATIC, DYNAMIC, WEIGHT_ONLY}


def test_an_old_table_is_reused_and_only_the_modes_are_measured(profiled, monkeypatch, tmp_path) -> None:
    """A table written before modes (no ``mode`` fields) loads as static entries: re-profiling it times
    the dynamic and weight-only forms alone."""
    table, _ = profiled
    old = {k: e for k, e in table.entries.items() if e.mode == STATIC}
    path = LatencyTable("test-cpu", "measured", table.roofline, entries=old).save(tmp_path / "old.json")
    assert '"mode"' not in path.read_text()
    calls = []
    monkeypatch.setattr(profiler, "measure", lambda *args: calls.append(args[0].keys[0]) or {})
    run = profiler.run_profile(conv_net(), LatencyTable.load(path), batch=BATCH, **FAST)
    assert run.reused == len(old)
    assert sorted(calls) == sorted(k for k, e in table.entries.items() if e.mode != STATIC)


def test_modes_are_checked_and_a_refused_mode_is_reported(monkeypatch) -> None:
    with pytest.raises(QinjectError, match="not profilable"):
        profiler.run_profile(matmul_net(), empty_table(), batch=BATCH, modes=["fast"], **FAST)
    # A node the rewrite leaves float in a mode gets no entry (its float time would pass for the mode).
    monkeypatch.setattr(pm, "mode_applied", lambda *args: False)
    run = profiler.run_profile(matmul_net(), empty_table(), batch=BATCH, bits=[], modes=[DYNAMIC], **FAST)
    assert run.measured == 0 and len(run.failed) == 2  # mm1 (its Relu inside) and mm2
    assert all("left node" in f and "dynamic" in f for f in run.failed), run.failed


def test_input_shapes_size_symbolic_dims() -> None:
    model = onnx.helper.make_model(onnx.helper.make_graph(
        [onnx.helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "seq",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", "S", 16])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", "S", 8])],
        [onnx.numpy_helper.from_array(np.ones((16, 8), np.float32), "w")]),
        opset_imports=[onnx.helper.make_opsetid("", 13)])
    prepared = profiler._prepared(model, 2, {"x": (2, 5, 16)})
    keys = {p.keys[0] for p in profiler.probes_for(prepared, [(8, 8)], [STATIC, DYNAMIC])}
    assert ("MatMul", "2x5x16;16x8->2x5x8", 8, 8, DYNAMIC) in keys
    with pytest.raises(QinjectError, match="'z', which is not a model input"):
        profiler._prepared(model, 2, {"z": (2, 5, 16)})


def test_shapes_inference_cannot_reach_come_from_the_float_run(monkeypatch) -> None:
    """A Slice whose end is computed from the input's Shape (TorchScript BERT's position ids) stops
    onnx's shape inference; the float run that feeds the probes gives the nodes after it their keys."""
    h, nh, tp = onnx.helper, onnx.numpy_helper, onnx.TensorProto
    nodes = [h.make_node("Shape", ["x"], ["s"], name="shape"),
             h.make_node("Gather", ["s", "one"], ["g"], name="gather"),
             h.make_node("Unsqueeze", ["g", "zero"], ["u"], name="unsqueeze"),
             h.make_node("Slice", ["pos", "zero", "u", "zero"], ["p"], name="slice"),
             h.make_node("MatMul", ["p", "w"], ["y"], name="mm")]
    inits = [nh.from_array(np.array(1, np.int64), "one"), nh.from_array(np.array([0], np.int64), "zero"),
             nh.from_array(np.ones((32, 16), np.float32), "pos"), nh.from_array(np.ones((16, 8), np.float32), "w")]
    graph = h.make_graph(nodes, "positions", [h.make_tensor_value_info("x", tp.FLOAT, ["N", "S", 16])],
                         [h.make_tensor_value_info("y", tp.FLOAT, [None, 8])], inits)
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 13)])
    assert op_facts.latency_key(next(n for n in profiler._prepared(model, 2, {"x": (2, 5, 16)}).graph
                                     if n.name == "mm")) is None
    calls = []
    monkeypatch.setattr(profiler, "measure", lambda *args: calls.append(args[0].keys[0]) or {})
    profiler.run_profile(model, empty_table(), batch=2, bits=[(32, 32)], modes=[DYNAMIC],
                         input_shapes={"x": (2, 5, 16)}, **FAST)
    assert ("MatMul", "5x16;16x8->5x8", 8, 8, DYNAMIC) in calls


def test_second_run_measures_nothing_and_keeps_other_entries(profiled, monkeypatch) -> None:
    table, _ = profiled
    other = Entry("Conv", "1x1x1x1;1x1x1x1->1x1x1x1", 8, 8, 3.0)  # another model's entry
    table.add(other)
    before = dict(table.entries)
    calls = []
    monkeypatch.setattr(profiler, "measure", lambda *args: calls.append(args) or {})
    run = profiler.run_profile(conv_net(), table, batch=BATCH, **FAST)
    assert calls == [] and run.measured == 0 and run.reused == len(before) - 1
    assert table.entries == before


def test_a_new_bit_width_measures_only_what_is_missing(profiled, monkeypatch) -> None:
    table, _ = profiled
    subset = LatencyTable("test-cpu", "measured", table.roofline,
                          entries={k: e for k, e in table.entries.items() if k[2:] != (4, 8, STATIC)})
    calls = []
    real = profiler.measure
    monkeypatch.setattr(profiler, "measure", lambda *args: calls.append(args[0]) or real(*args))
    profiler.run_profile(conv_net(), subset, batch=BATCH, **FAST)
    assert [p.keys[0][2:] for p in calls] == [(4, 8, STATIC)] * 3


def test_estimate_uses_the_measured_entries(profiled) -> None:
    table, model = profiled
    for plan in (Plan.uniform(8, 8), Plan(None), Plan.uniform(16, 16), Plan(None, {"conv2": Plan.uniform(4, 8).default})):
        report = cost.estimate(model, plan, table, BATCH, baselines=False)
        sources = {n.node: n.source for n in report.nodes}
        assert sources["relu1"].startswith("fused into conv1")
        assert {s for n, s in sources.items() if not s.startswith("fused")} == {cost.MEASURED}, sources
        assert all(c.source == cost.MEASURED for c in report.conversions)


def test_copies_are_independent() -> None:
    proto, feeds = pm.group_model(*_conv_group())
    many, many_feeds = pm.copies(proto, feeds, 3)
    onnx.checker.check_model(many, full_check=True)
    assert len(many.graph.node) == 3 * len(proto.graph.node) and len(many_feeds) == 3 * len(feeds)
    assert len({t.name for t in many.graph.initializer}) == 3 * len(proto.graph.initializer)
    outs = timing.time_models([(many, many_feeds)], 0, 1)[0]
    assert outs.wall_us > 0 and all(op for op in outs.ops.values())


def _conv_group():
    model = profiler._prepared(conv_net(), BATCH)
    conv = next(n for n in model.graph if n.name == "conv1")
    return pm.node_group(conv), model, {"x": np.zeros((BATCH, 3, 8, 8), np.float32)}, pm.static_values(model)


def test_marginal_cost_drops_what_a_run_pays_once() -> None:
    def times(wall: float, runs: list[dict[str, float]]) -> timing.KernelTimes:
        return timing.KernelTimes(runs, {n: "Op" for n in runs[0]}, onnx.GraphProto(), set(), wall)

    # one copy: 40 us of wall time (30 of which a run pays once); three copies: 60 us.
    one = times(40.0, [{"q": 2.0, "node": 8.0}])
    many = times(60.0, [{"q": 2.0, "node": 8.0, "node__copy1": 8.0, "node__copy2": 8.0}])
    assert timing.marginal_us(one, many, 3, ["node"], ["node", "node__copy1", "node__copy2"]) == 10.0
    noisy = times(35.0, [{"q": 2.0, "node": 8.0}])
    assert timing.marginal_us(one, noisy, 3, ["node"], ["node"]) == timing.FLOOR_US




def test_cli_profile_writes_a_table_and_refuses_another_target(tmp_path) -> None:
    model = tmp_path / "m.onnx"
    onnx.save(conv_net(), str(model))
    out = tmp_path / "table.json"
    r = run_cli("profile", model, "--target", "test-cpu", "-o", out, "--batch", 2, "--bits", "32/32,8/8",
                "--modes", "static,dynamic", "--repeats", 2, "--warmup", 1, "--no-progress")
    assert r.returncode == 0, r.stderr
    table = LatencyTable.load(out)
    assert table.target == "test-cpu" and table.kind == "measured" and "fp32" in table.roofline.peak_ops_per_s
    assert {e.mode for e in table} == {STATIC, DYNAMIC}  # the Gemm's dynamic form; no weight-only
    assert "entries measured, 0 reused" in r.stdout
    r = run_cli("profile", model, "--target", "other-cpu", "-o", out, "--no-progress")
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 1 and len(lines) == 1 and "holds a table for target 'test-cpu'" in lines[0], r.stderr
    assert LatencyTable.load(out).entries == table.entries
    # Cached: nothing to measure; --save-as-target makes the table selectable by name.
    env = {**os.environ, "QINJECT_TARGETS": str(tmp_path / "targets")}
    r = run_cli("profile", model, "--target", "test-cpu", "-o", out, "--batch", 2, "--bits", "32/32,8/8",
                "--modes", "static,dynamic", "--save-as-target", "--no-progress", env=env)
    assert r.returncode == 0 and "0 entries measured" in r.stdout, r.stderr
    assert LatencyTable.load(tmp_path / "targets" / "test-cpu.json").entries == table.entries
    r = run_cli("targets", env=env)
    assert "test-cpu" in r.stdout and "measured" in r.stdout
    r = run_cli("profile", model, "--target", "test-cpu", "-o", out, "--modes", "static,fast", "--no-progress")
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 1 and len(lines) == 1 and "'fast'" in lines[0] and "weight-only" in lines[0], r.stderr


def test_layout_context_and_boundary_kernels() -> None:
    """A uint8 MaxPool after a convolution is timed in the NHWC layout it gets after a QLinearConv;
    the conversion of a float convolution's (pooled) output into a QLinearConv includes leaving the
    float NCHWc layout and the Transpose into NHWC."""
    model = profiler._prepared(conv_net(), BATCH)
    values = profiler._input_values(model, None)
    probes = {p.keys[0]: p for p in profiler.probes_for(model, [(8, 8)])}
    pool = next(p for k, p in probes.items() if k[0] == "MaxPool" and k[2:] == (0, 8, STATIC))
    times = timing.time_models([pool.build(values)], 0, 2)[0]
    assert [times.ops[k] for k in timing.own_kernels(times)] == ["NhwcMaxPool"]
    q = next(p for k, p in probes.items() if k[0] == "QuantizeLinear" and k[1] == f"x{BATCH * 8 * 4 * 4}")
    times = timing.time_models([q.build(values)], 0, 2)[0]
    assert sorted(times.ops[k] for k in timing.conversion_kernels(times, "QuantizeLinear")) == [
        "QuantizeLinear", "ReorderOutput", "Transpose"]
