"""The cost model: per-node prices, fallbacks, conversions between precision regions, baselines."""

from __future__ import annotations

import pytest

from qinject.core import ir as qir
from qinject.core import op_facts
from qinject.cost.estimate import MEASURED, MISSING, ROOFLINE, estimate, format_report
from qinject.frontends.onnx_frontend import load_onnx
from qinject.latency_table import Entry, LatencyTable, Roofline
from qinject.plan import NodeQuant, Plan
from tests.builders import conv_net, residual_net

ROOF = Roofline({"fp32": 1e11, "fp16": 2e11, "int8": 4e11, "int4": 8e11}, 1e10, op_overhead_us=2.0)


def _model():
    return qir.with_batch(load_onnx(conv_net()), 4)


def test_measured_entries_win_and_a_missing_shape_falls_back_to_the_roofline_and_says_so():
    model = _model()
    conv1 = next(n for n in model.graph if n.name == "conv1")
    table = LatencyTable("cpu", "measured", ROOF)
    table.add(Entry(*op_facts.latency_key(conv1), 8, 8, 123.0))
    report = estimate(model, Plan.uniform(8, 8), table)
    costs = {c.node: c for c in report.nodes}
    assert costs["conv1"].latency_us == 123.0 and costs["conv1"].source == MEASURED
    assert costs["conv2"].source == MISSING  # int8 conv2 is not in the table
    assert "priced by the roofline: their shapes are not in the table" in format_report(report)
    analytic = estimate(model, Plan.uniform(8, 8), LatencyTable("gpu", "analytic", ROOF))
    assert {c.source for c in analytic.nodes if not c.source.startswith("fused")} == {ROOFLINE}


def test_relu_after_a_convolution_is_fused():
    report = estimate(_model(), Plan.uniform(8, 8), LatencyTable("gpu", "analytic", ROOF))
    relu = next(c for c in report.nodes if c.node == "relu1")
    assert relu.latency_us == 0 and relu.source == "fused into conv1"


def test_lower_bits_are_cheaper_on_a_compute_bound_target():
    table = LatencyTable("gpu", "analytic", Roofline({"fp32": 1e9, "fp16": 2e9, "int8": 4e9, "int4": 8e9}, 1e15))
    totals = [estimate(_model(), plan, table, baselines=False).total_us
              for plan in (Plan(None), Plan.uniform(16, 16), Plan.uniform(8, 8), Plan.uniform(4, 4))]
    assert totals == sorted(totals, reverse=True) and len(set(totals)) == 4


def test_conversions_where_precision_regions_meet():
    table = LatencyTable("gpu", "analytic", ROOF)
    uniform = estimate(_model(), Plan.uniform(8, 8), table)
    # The float input is quantized once; the int8 region then runs to the float logits of fc.
    assert [(c.tensor, c.from_bits, c.to_bits) for c in uniform.conversions] == [("x", 32, 8)]
    # conv2 in float: conv1's int8 output (after relu and pool) must be dequantized for it, and
    # conv2's float output quantized again for fc.
    mixed = estimate(_model(), Plan(NodeQuant(), {"conv2": None}), table)
    assert sorted((c.from_bits, c.to_bits) for c in mixed.conversions) == [(8, 32), (32, 8), (32, 8)]
    assert mixed.conversion_us > uniform.conversion_us
    # Two widths meeting: a requantization 8 -> 16.
    sixteen = estimate(_model(), Plan(NodeQuant(), {"conv2": NodeQuant(weights=16, activations=16)}), table)
    assert (8, 16) in {(c.from_bits, c.to_bits) for c in sixteen.conversions}


def test_two_widths_meeting_on_a_cpu_cost_a_dequantize_and_a_quantize():
    """onnxruntime has no requantize kernel: an 8-bit output read by a 16-bit node is dequantized
    and quantized again, dearer than the one dequantize a float reader needs. Priced as one
    quantize, a search on light SqueezeNet kept convolutions at W16A16 (dequantize + float on a CPU)
    to save conversions that were never saved."""
    model = _model()
    table = LatencyTable("cpu", "measured", ROOF)

    def edge(choice):
        report = estimate(model, Plan(NodeQuant(), {"conv2": choice}), table, baselines=False)
        return next(c for c in report.conversions if c.from_bits == 8 and c.to_bits != 8)

    elements = edge(None).elements  # conv1's pooled output, which conv2 reads
    table.add(Entry("DequantizeLinear", f"x{elements}", 0, 8, 5.0))
    table.add(Entry("QuantizeLinear", f"x{elements}", 0, 16, 7.0))
    to_float, to_sixteen = edge(None), edge(NodeQuant(weights=16, activations=16))
    assert to_float.tensor == to_sixteen.tensor and to_float.latency_us == 5.0
    assert (to_sixteen.to_bits, to_sixteen.latency_us, to_sixteen.source) == (16, 12.0, MEASURED)


def test_measured_conversion_entries_are_used():
    model = _model()
    table = LatencyTable("cpu", "measured", ROOF)
    table.add(Entry("QuantizeLinear", f"x{4 * 3 * 8 * 8}", 0, 8, 7.5))
    (conv,) = estimate(model, Plan.uniform(8, 8), table).conversions
    assert conv.latency_us == 7.5 and conv.source == MEASURED


def test_baselines_and_savings():
    report = estimate(_model(), Plan.uniform(8, 8), LatencyTable("gpu", "analytic", ROOF))
    assert report.float_us > report.sixteen_bit_us > report.total_us
    assert report.saving_vs_float == pytest.approx(1 - report.total_us / report.float_us)
    text = format_report(report)
    assert "float baseline" in text and "W16A16 baseline" in text


def test_symbolic_batch_takes_the_given_size():
    model = load_onnx(conv_net())
    small = estimate(model, Plan.uniform(8, 8), LatencyTable("gpu", "analytic", ROOF), batch=1)
    large = estimate(model, Plan.uniform(8, 8), LatencyTable("gpu", "analytic", ROOF), batch=512)
    assert large.total_us > small.total_us


def test_concat_of_quantized_tensors_runs_on_integers():
    """Two convolutions joined by a Concat that a third reads: onnxruntime's QLinearConcat, so no
    dequantize of the branches and no quantize of the join."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = {name: numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)
         for name, shape in (("wa", (4, 3, 1, 1)), ("wb", (4, 3, 3, 3)), ("wc", (2, 8, 1, 1)))}
    nodes = [helper.make_node("Conv", ["x", "wa"], ["a"], name="conv_a"),
             helper.make_node("Conv", ["x", "wb"], ["b"], name="conv_b", pads=[1, 1, 1, 1]),
             helper.make_node("Concat", ["a", "b"], ["ab"], name="join", axis=1),
             helper.make_node("Conv", ["ab", "wc"], ["y"], name="conv_c")]
    graph = helper.make_graph(nodes, "branches", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 8, 8])], list(w.values()))
    model = load_onnx(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]))
    table = LatencyTable("gpu", "analytic", ROOF)
    report = estimate(model, Plan.uniform(8, 8), table)
    assert [(c.tensor, c.from_bits, c.to_bits) for c in report.conversions] == [("x", 32, 8)]  # y: float output
    join = next(c for c in report.nodes if c.node == "join")
    assert join.activation_bits == 8
    # With the reader in float, the join is float: both branches are dequantized for it.
    float_reader = estimate(model, Plan(NodeQuant(), {"conv_c": None}), table)
    assert sorted(c.tensor for c in float_reader.conversions) == ["a", "b", "x"]


def test_a_residual_add_of_quantized_tensors_runs_on_integers():
    """As the rewrite writes it (QLinearAdd, the Relu after it in the output's Q): no dequantize of
    the branches, no quantize of the join, the Relu free. Were the join priced float, keeping a
    convolution after it float would look free of conversions (ResNet-50 kept two so, which cost
    layout changes in onnxruntime). A join read by float ops only stays float."""
    model = qir.with_batch(load_onnx(residual_net()), 1)
    report = estimate(model, Plan.uniform(8, 8), LatencyTable("cpu", "measured", ROOF))
    costs = {c.node: c for c in report.nodes}
    assert costs["join1"].activation_bits == 8 and costs["relu_j1"].source == "fused into join1"
    assert costs["join2"].activation_bits == 32
    # x quantized once; the float tail reads the dequantized branches of join2
    assert sorted((c.tensor, c.from_bits, c.to_bits) for c in report.conversions) == [
        ("s", 8, 32), ("x", 32, 8), ("y2", 8, 32)]


def test_a_cpu_table_prices_widths_without_an_integer_kernel_as_dequantize_plus_float():
    """onnxruntime's CPU runs 4- and 16-bit nodes as dequantize + the float op: a measured table's
    fallback never prices them below float (the fitted roofline alone would call 4-bit weights fast)."""
    model = _model()
    cpu = LatencyTable("cpu", "measured", ROOF)
    nodes = [n.name for n in qir.quantizable_nodes(model)]
    floats = {c.node: c.latency_us for c in estimate(model, Plan(None), cpu).nodes}
    for bits in ((4, 8), (16, 16)):
        priced = {c.node: c.latency_us for c in estimate(model, Plan.uniform(*bits), cpu).nodes}
        assert all(priced[n] > floats[n] for n in nodes), bits
    eight = {c.node: c.latency_us for c in estimate(model, Plan.uniform(8, 8), cpu).nodes}
    assert all(eight[n] < floats[n] for n in nodes)  # the integer kernel is priced as such
    gpu = LatencyTable("gpu", "analytic", ROOF)  # an accelerator has 4-bit units
    four = {c.node: c.latency_us for c in estimate(model, Plan.uniform(4, 8), gpu).nodes}
    assert all(four[n] < {c.node: c.latency_us for c in estimate(model, Plan(None), gpu).nodes}[n] for n in nodes)


def test_a_convolution_whose_output_stays_float_is_priced_as_dequantize_plus_float():
    """The rewrite leaves a Conv's output float when calibration predicts too low an SQNR for it (heavy
    tails) or it is a graph output; onnxruntime then runs no QLinearConv but the float Conv on
    dequantized inputs, and a CPU table must price that, not the integer kernel (magika's first Conv
    was estimated 2x faster quantized and measured 2x slower)."""
    import numpy as np

    from qinject.core.stats import TensorStats

    model = _model()
    out = next(n for n in model.graph if n.name == "relu2").outputs[0]  # conv2's output point
    cpu = LatencyTable("cpu", "measured", ROOF)
    plan = Plan(None, {"conv2": NodeQuant()})
    float_us = {c.node: c.latency_us for c in estimate(model, Plan(None), cpu).nodes}["conv2"]
    smooth = TensorStats()
    smooth.update(np.random.default_rng(0).uniform(0, 1, 4096).astype(np.float32))
    out.meta[qir.ACT_STATS] = smooth
    assert {c.node: c.latency_us for c in estimate(model, plan, cpu).nodes}["conv2"] < float_us
    heavy = TensorStats()
    heavy.update(np.concatenate([np.random.default_rng(0).exponential(0.01, 4096), [300.0]]).astype(np.float32))
    out.meta[qir.ACT_STATS] = heavy
    assert {c.node: c.latency_us for c in estimate(model, plan, cpu).nodes}["conv2"] > float_us
